//! A masked convolution prepared for forward passes only, one sample at a time (inference):
//! the weights laid out once in the form that runs fastest, and buffers kept between calls so
//! that a call allocates and clears nothing.

use super::dense::{direct_is_faster, forward_im2col};
use super::direct::{forward_buffers, forward_direct_sample, DirectWeight};
use super::geometry::ConvGeometry;
use super::layout::{apply_epilogue, Epilogue};
use super::plan::{masked, MaskedConvPlan};
use super::sparse::{SparseKernel, SparseSample, SparseWeight};

/// The weights of a [`ForwardPlan`].
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// The direct dense kernel, its weights laid out once.
    Direct(DirectWeight),
    /// im2col + GEMM on the masked dense weight.
    Im2col(Vec<f32>),
    /// The active weights.
    Sparse(SparseWeight),
}

/// One masked convolution of one sample, ready for forward passes.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardPlan {
    geometry: ConvGeometry,
    form: Form,
}

/// The buffers of [`ForwardPlan::forward`], made by [`ForwardPlan::scratch`] for one plan.
#[derive(Debug, Clone)]
pub struct ForwardScratch {
    geometry: ConvGeometry,
    padded: Vec<f32>,
    wide: Vec<f32>,
}

impl ForwardPlan {
    /// Lays out `weight ⊙ mask` for the geometry's convolution of one sample (its `batch` is
    /// ignored) in the form [`MaskedConvPlan::picks_sparse`] picks, else the direct kernel
    /// where it is faster, else im2col + GEMM.
    ///
    /// # Panics
    /// If the geometry is not [`ConvGeometry::supported`] or the lengths do not match it.
    pub fn new(geometry: ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        let active = mask.iter().filter(|&&m| m).count();
        let sparse = MaskedConvPlan::picks_sparse(&geometry, active);
        Self::with_form(geometry, weight, mask, sparse)
    }

    /// [`Self::new`] with the form chosen by the caller: the sparse form, or the dense one
    /// (the direct kernel where it is faster, else im2col + GEMM). For benchmarks and for a
    /// caller with its own cost model.
    ///
    /// # Panics
    /// As [`Self::new`]; also if `sparse` is asked with unequal strides.
    pub fn with_form(geometry: ConvGeometry, weight: &[f32], mask: &[bool], sparse: bool) -> Self {
        let geometry = ConvGeometry {
            batch: 1,
            ..geometry
        };
        assert!(
            geometry.supported(),
            "conv kernels: unsupported geometry {geometry:?}"
        );
        let form = if sparse {
            Form::Sparse(SparseWeight::new(&geometry, weight, mask))
        } else {
            let w = masked(weight, mask);
            if direct_is_faster(&geometry) {
                Form::Direct(DirectWeight::new(&geometry, &w))
            } else {
                Form::Im2col(w)
            }
        };
        Self { geometry, form }
    }

    /// The geometry (batch 1).
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    /// Whether the plan runs the sparse form.
    pub fn is_sparse(&self) -> bool {
        matches!(self.form, Form::Sparse(_))
    }

    /// Zeroed buffers for [`Self::forward`] of this plan, to keep between calls.
    pub fn scratch(&self) -> ForwardScratch {
        let g = &self.geometry;
        let (padded, wide) = match &self.form {
            Form::Direct(w) => forward_buffers(g, w),
            Form::Im2col(_) => (0, 0),
            Form::Sparse(_) => (g.sparse_buffer_len(), 0),
        };
        ForwardScratch {
            geometry: *g,
            padded: vec![0.0; padded],
            wide: vec![0.0; wide],
        }
    }

    /// `y = conv(x, W ⊙ M)` for one sample (`x` `[C_in, H, W]`, `y` `[C_out, H_out, W_out]`,
    /// every value of `y` overwritten), then the `epilogue` (bias, residual, ReLU) while the
    /// output is written; on the calling thread but for the GEMM form's rayon region of one
    /// task.
    ///
    /// # Panics
    /// If a length does not match the geometry (the epilogue's bias `C_out`, its residual
    /// `y`'s) or `scratch` was made for another plan.
    pub fn forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        scratch: &mut ForwardScratch,
        epilogue: Option<Epilogue<'_>>,
    ) {
        let g = &self.geometry;
        assert_eq!(&scratch.geometry, g, "ForwardScratch made for another plan");
        assert_eq!(x.len(), g.in_len(), "conv kernels: input length");
        assert_eq!(y.len(), g.out_len(), "conv kernels: output length");
        if let Some(e) = &epilogue {
            assert_eq!(e.bias.len(), g.c_out, "conv kernels: epilogue bias length");
            assert!(
                e.residual.is_none_or(|r| r.len() == y.len()),
                "conv kernels: epilogue residual length"
            );
        }
        let ForwardScratch { padded, wide, .. } = scratch;
        match &self.form {
            Form::Direct(w) => forward_direct_sample(g, x, w, y, [padded, wide], epilogue),
            Form::Im2col(w) => {
                forward_im2col(g, x, w, y);
                if let Some(e) = &epilogue {
                    apply_epilogue(y, e);
                }
            }
            Form::Sparse(w) => SparseSample {
                kernel: SparseKernel::ForwardByPositions,
                g,
                w,
                input: x,
                dy: &[],
                out: y,
                padded,
                wide,
                epilogue,
            }
            .run(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{geometry, rel_err, TestRng};

    #[test]
    fn every_form_equals_the_training_plan_and_reuses_its_buffers() {
        // Sparse (low density), direct (stride 1, planes ≥ 256) and im2col (stride 2) forms.
        let cases = [
            (geometry(1, [16, 16], 16, 3, 1, 1, 1), 0.05),
            (geometry(1, [16, 32], 16, 3, 1, 1, 1), 1.0),
            (geometry(1, [16, 32], 9, 3, 2, 1, 1), 1.0),
            (geometry(1, [8, 8], 9, 3, 2, 1, 1), 0.05),
        ];
        let mut rng = TestRng::new(3);
        for (g, density) in cases {
            let w = rng.values(g.weight_len());
            let mask = rng.mask(g.weight_len(), density);
            let plan = ForwardPlan::new(g, &w, &mask);
            let reference = MaskedConvPlan::new(g, &w, &mask);
            let mut scratch = plan.scratch();
            let mut y = vec![f32::NAN; g.out_len()];
            for _ in 0..3 {
                let x = rng.values(g.in_len());
                plan.forward(&x, &mut y, &mut scratch, None);
                let expected = reference.forward(&x);
                assert!(rel_err(&y, &expected) <= 1e-5, "{g:?} at {density}");
                // With the epilogue: act(y + b[c] + r) per channel.
                let bias = rng.values(g.c_out);
                let residual = rng.values(y.len());
                for relu in [false, true] {
                    let epilogue = Epilogue {
                        bias: &bias,
                        residual: Some(&residual),
                        relu,
                    };
                    plan.forward(&x, &mut y, &mut scratch, Some(epilogue));
                    let plane = g.out_plane();
                    let expected: Vec<f32> = (0..y.len())
                        .map(|i| {
                            let v = expected[i] + bias[i / plane] + residual[i];
                            if relu {
                                v.max(0.0)
                            } else {
                                v
                            }
                        })
                        .collect();
                    assert!(
                        rel_err(&y, &expected) <= 1e-5,
                        "{g:?} at {density}, relu {relu}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "ForwardScratch made for another plan")]
    fn a_scratch_of_another_plan_is_refused() {
        let (a, b) = (
            geometry(1, [4, 4], 8, 3, 1, 1, 1),
            geometry(1, [4, 4], 9, 3, 1, 1, 1),
        );
        let w = vec![1.0; a.weight_len()];
        let mask = vec![true; a.weight_len()];
        let plan = ForwardPlan::new(a, &w, &mask);
        let mut other = ForwardPlan::new(b, &w, &mask).scratch();
        plan.forward(
            &vec![0.0; a.in_len()],
            &mut vec![0.0; a.out_len()],
            &mut other,
            None,
        );
    }
}
