//! A masked convolution prepared for forward passes only, one sample at a time (inference):
//! the weights laid out once in the form that runs fastest, and buffers kept between calls so
//! that a call allocates and clears nothing.

use super::dense::{direct_is_faster, forward_im2col};
use super::direct::{forward_buffers, forward_direct_sample, DirectWeight};
use super::geometry::ConvGeometry;
use super::layout::{apply_epilogue, write_out, Epilogue, Placement};
use super::plan::masked;
use super::sparse::{keep_mask, SparseKernel, SparseSample, SparseWeight};

/// The weights of a [`ForwardPlan`].
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// The direct dense kernel, its weights laid out once.
    Direct(DirectWeight),
    /// im2col + GEMM on the masked dense weight.
    Im2col(Vec<f32>),
    /// The active weights.
    Sparse(SparseWeight),
    /// A 1×1 convolution with a stride and no padding, as the input's subsample (every
    /// stride-th row and column) through a stride-1 plan: no stride phases, no wide positions
    /// between the outputs (a strided product computes a whole input row per output row, half
    /// of it unused at stride 2). The subsample is placed with the border the inner plan
    /// reads in place: the sparse form runs as a 3×3 convolution with padding 1 whose only
    /// active weights are the centre ones (the same sums), which reads a border of 1 and
    /// writes one as a single run, as the layers around it do.
    Subsampled { inner: Box<ForwardPlan>, pad: usize },
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
    /// The padded input (and its stride phases) where the kernel copies it.
    padded: Vec<f32>,
    /// The direct form's wide planes, the sparse form's keep mask (`keep_mask`), or the
    /// im2col form's output before it is placed.
    wide: Vec<f32>,
    /// The input's interior when it comes in another border than the plan reads in place
    /// (sized at the first such call), or the subsample.
    compact: Vec<f32>,
    /// The inner plan's buffers of a subsampled form.
    inner: Option<Box<ForwardScratch>>,
}

/// Whether a layer of one sample with `active` weights runs faster in the sparse form. The
/// training cost model ([`super::MaskedConvPlan::picks_sparse`], fitted at batch 128, where the
/// GEMM's packing is paid once for many samples) kept layers dense that run several times
/// faster sparse at batch 1 (ResNet-18's 4×4 layers at density 0.06: 1.1 ms im2col against
/// 0.15 ms). Here, from `cargo bench -p ast-kernels --bench infer_kernels`: the sparse form
/// does 20–30 G active multiply-adds/s at stride 1 and about half that at stride 2, the dense
/// forms 50–75 G/s (direct) and 20–50 (im2col; 20 at stride 2), so the sparse form wins below
/// a density of about 0.35 at stride 1 (0.27–0.4 by shape) and 0.3–0.5 at stride 2;
/// depthwise-like layers (one input channel per group) always run sparse, as in training.
fn picks_sparse(g: &ConvGeometry, active: usize) -> bool {
    let density = active as f64 / g.weight_len().max(1) as f64;
    let limit = if g.stride == [1, 1] {
        SPARSE_BELOW
    } else {
        SPARSE_BELOW_STRIDED
    };
    (density <= limit || g.cin_g() == 1) && g.stride[0] == g.stride[1]
}

/// The density at or below which a stride-1 layer runs sparse for inference.
const SPARSE_BELOW: f64 = 0.35;
/// The same with a stride.
const SPARSE_BELOW_STRIDED: f64 = 0.3;

/// The stride-1 geometry on the subsample of a 1×1 convolution with a stride and no padding
/// (see `Form::Subsampled`); `None` for any other convolution.
fn subsampled(g: &ConvGeometry) -> Option<ConvGeometry> {
    let strided = g.kernel == [1, 1] && g.padding == [0, 0] && g.stride != [1, 1];
    strided.then(|| ConvGeometry {
        in_hw: g.out_hw().expect("supported geometry"),
        stride: [1, 1],
        ..*g
    })
}

impl ForwardPlan {
    /// Lays out `weight ⊙ mask` for the geometry's convolution of one sample (its `batch` is
    /// ignored) in the form `picks_sparse` (the inference cost model) picks, else the direct kernel
    /// where it is faster, else im2col + GEMM.
    ///
    /// # Panics
    /// If the geometry is not [`ConvGeometry::supported`] or the lengths do not match it.
    pub fn new(geometry: ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        let active = mask.iter().filter(|&&m| m).count();
        let runs = subsampled(&geometry).unwrap_or(geometry);
        Self::with_form(geometry, weight, mask, picks_sparse(&runs, active))
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
        let form = if let Some(inner) = subsampled(&geometry) {
            let (inner, pad) = if sparse {
                // The centre of a 3×3 kernel: `w3[(co, ci, 1, 1)] = w[(co, ci)]`.
                let centred = ConvGeometry {
                    kernel: [3, 3],
                    padding: [1, 1],
                    ..inner
                };
                let (mut w3, mut m3) = (vec![0.0; weight.len() * 9], vec![false; mask.len() * 9]);
                for (i, (&w, &m)) in weight.iter().zip(mask).enumerate() {
                    (w3[i * 9 + 4], m3[i * 9 + 4]) = (w, m);
                }
                (Self::with_form(centred, &w3, &m3, true), 1)
            } else {
                (Self::with_form(inner, weight, mask, false), 0)
            };
            Form::Subsampled {
                inner: Box::new(inner),
                pad,
            }
        } else if sparse {
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

    /// The form the plan runs: `sparse`, `direct` (the direct dense kernel) or `im2col`.
    pub fn form_name(&self) -> &'static str {
        match &self.form {
            Form::Sparse(_) => "sparse",
            Form::Direct(_) => "direct",
            Form::Im2col(_) => "im2col",
            Form::Subsampled { inner, .. } => inner.form_name(),
        }
    }

    /// Whether the plan runs the sparse form.
    pub fn is_sparse(&self) -> bool {
        match &self.form {
            Form::Subsampled { inner, .. } => inner.is_sparse(),
            form => matches!(form, Form::Sparse(_)),
        }
    }

    /// Zeroed buffers for [`Self::forward`] of this plan, to keep between calls.
    pub fn scratch(&self) -> ForwardScratch {
        let g = &self.geometry;
        let (padded, wide) = match &self.form {
            Form::Direct(w) => forward_buffers(g, w),
            Form::Im2col(_) | Form::Subsampled { .. } => (0, 0),
            Form::Sparse(_) => (g.sparse_buffer_len(), 0),
        };
        let wide = match &self.form {
            Form::Sparse(_) => keep_mask(g),
            _ => vec![0.0; wide],
        };
        ForwardScratch {
            geometry: *g,
            padded: vec![0.0; padded],
            wide,
            compact: Vec::new(),
            inner: match &self.form {
                Form::Subsampled { inner, .. } => Some(Box::new(inner.scratch())),
                _ => None,
            },
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
        self.forward_laid_out(x, 0, y, 0, scratch, epilogue)
    }

    /// [`Self::forward`] on placed activations: `x` placed as [`Placement::new`]`(in_hw,
    /// x_pad)`, `y` as [`Placement::new`]`(out_hw, y_pad)` (its border never written but with
    /// zeros, so a zeroed buffer keeps a zero border), the epilogue's residual as `y`. Pad 0 is
    /// the compact layout; a padded one is `[C, H + 2·pad, W + 2·pad]` then
    /// [`super::ACTIVATION_SLACK`] zeros.
    ///
    /// The sparse and direct forms read an input padded by their own (equal) padding in place
    /// and write the stride-1 output of the same size into a border of that padding as one
    /// run: a chain of such layers copies no activation. Other placements cost a copy: the
    /// input's interior into a compact buffer, or the im2col form's output into place.
    ///
    /// # Panics
    /// As [`Self::forward`]; also if a buffer's length is not its placement's
    /// ([`Placement::buffer_len`]).
    pub fn forward_laid_out(
        &self,
        x: &[f32],
        x_pad: usize,
        y: &mut [f32],
        y_pad: usize,
        scratch: &mut ForwardScratch,
        epilogue: Option<Epilogue<'_>>,
    ) {
        let g = &self.geometry;
        assert_eq!(&scratch.geometry, g, "ForwardScratch made for another plan");
        let (in_place, out_place) = (
            Placement::new(g.in_hw, x_pad),
            Placement::new(g.out_hw().expect("supported geometry"), y_pad),
        );
        assert_eq!(
            x.len(),
            in_place.buffer_len(g.c_in),
            "conv kernels: input length"
        );
        assert_eq!(
            y.len(),
            out_place.buffer_len(g.c_out),
            "conv kernels: output length"
        );
        if let Some(e) = &epilogue {
            assert_eq!(e.bias.len(), g.c_out, "conv kernels: epilogue bias length");
            assert!(
                e.residual.is_none_or(|r| r.len() == y.len()),
                "conv kernels: epilogue residual length"
            );
        }
        let ForwardScratch {
            padded,
            wide,
            compact,
            inner,
            ..
        } = scratch;
        if let Form::Subsampled { inner: plan, pad } = &self.form {
            let [ho, wo] = g.out_hw().expect("supported geometry");
            let [sh, sw] = g.stride;
            let sub = Placement::new([ho, wo], *pad);
            // Sized once; only the interior is ever written, so the border stays zero.
            compact.resize(sub.buffer_len(g.c_in), 0.0);
            for c in 0..g.c_in {
                for r in 0..ho {
                    let at = c * in_place.plane + in_place.origin + r * sh * in_place.pitch;
                    let to = c * sub.plane + sub.origin + r * sub.pitch;
                    for (o, v) in compact[to..to + wo].iter_mut().zip(x[at..].chunks(sw)) {
                        *o = v[0];
                    }
                }
            }
            let inner = inner.as_mut().expect("a subsampled plan's scratch");
            plan.forward_laid_out(compact, *pad, y, y_pad, inner, epilogue);
            return;
        }
        // In place where the border is the plan's padding and the buffer reaches as far as
        // the kernel's vector runs read (the slack covers the usual strides).
        let reach = match &self.form {
            Form::Direct(_) => Some(padded.len()),
            Form::Sparse(_) => Some(g.padded_buffer_len()),
            Form::Im2col(_) | Form::Subsampled { .. } => None,
        };
        let reads_in_place =
            x_pad > 0 && g.padding == [x_pad, x_pad] && reach.is_some_and(|n| n <= x.len());
        let (x, x_padded) = if x_pad == 0 || reads_in_place {
            (x, reads_in_place)
        } else {
            // Another border: the interior, compact.
            compact.resize(g.in_len(), 0.0);
            let [h, w] = g.in_hw;
            for (c, dst) in compact.chunks_exact_mut(h * w).enumerate() {
                for (r, row) in dst.chunks_exact_mut(w).enumerate() {
                    let at = c * in_place.plane + in_place.origin + r * in_place.pitch;
                    row.copy_from_slice(&x[at..at + w]);
                }
            }
            (&compact[..], false)
        };
        match &self.form {
            Form::Direct(w) => forward_direct_sample(
                g,
                (x, x_padded),
                w,
                (y, out_place),
                [padded, wide],
                epilogue,
            ),
            Form::Im2col(w) if y_pad == 0 => {
                forward_im2col(g, x, w, y);
                if let Some(e) = &epilogue {
                    apply_epilogue(y, e);
                }
            }
            Form::Im2col(w) => {
                // Computed compact, then placed with the epilogue.
                wide.resize(g.out_len(), 0.0);
                forward_im2col(g, x, w, wide);
                let [_, wo] = g.out_hw().expect("supported geometry");
                let rows = [g.out_plane(), wo, wo];
                write_out(y, wide, rows, 0..g.c_out, epilogue.as_ref(), out_place);
            }
            Form::Subsampled { .. } => unreachable!("run above"),
            Form::Sparse(w) => SparseSample {
                kernel: SparseKernel::ForwardByPositions {
                    x_padded,
                    place: out_place,
                },
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
    use crate::conv::MaskedConvPlan;
    use crate::test_support::{geometry, rel_err, TestRng};

    #[test]
    fn every_form_equals_the_training_plan_and_reuses_its_buffers() {
        // Sparse (low density), direct (stride 1, planes ≥ 256) and im2col (stride 2) forms;
        // 1×1 with a stride, on the subsample (sparse and dense).
        let cases = [
            (geometry(1, [16, 16], 16, 3, 1, 1, 1), 0.05),
            (geometry(1, [16, 32], 16, 3, 1, 1, 1), 1.0),
            (geometry(1, [16, 32], 9, 3, 2, 1, 1), 1.0),
            (geometry(1, [8, 8], 9, 3, 2, 1, 1), 0.05),
            (geometry(1, [16, 32], 9, 1, 2, 0, 1), 0.05),
            (geometry(1, [16, 32], 9, 1, 2, 0, 1), 1.0),
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
    fn the_inference_cost_model_runs_sparse_layers_sparse() {
        // ResNet-18's 512-channel 4×4 layers at density 0.06 ran im2col under the training
        // cost model (1.1 ms against 0.15 ms sparse).
        let g = geometry(1, [512, 512], 4, 3, 1, 1, 1);
        let n = g.weight_len();
        assert!(picks_sparse(&g, n * 6 / 100));
        assert!(!MaskedConvPlan::picks_sparse(&g, n * 6 / 100));
        assert!(picks_sparse(&g, n * 3 / 10) && !picks_sparse(&g, n * 4 / 10));
        let strided = geometry(1, [16, 32], 32, 3, 2, 1, 1);
        let m = strided.weight_len();
        assert!(picks_sparse(&strided, m / 4) && !picks_sparse(&strided, m * 4 / 10));
        // Depthwise: sparse whatever the density.
        assert!(picks_sparse(&geometry(1, [8, 8], 8, 3, 1, 1, 8), 72));
    }

    /// `v` (`[c, h, w]`) inside a zero border of `pad`, with the slack.
    fn placed(v: &[f32], c: usize, [h, w]: [usize; 2], pad: usize) -> Vec<f32> {
        let place = Placement::new([h, w], pad);
        let mut out = vec![0.0; place.buffer_len(c)];
        for (i, &x) in v.iter().enumerate() {
            let (ch, r, col) = (i / (h * w), i / w % h, i % w);
            out[ch * place.plane + place.origin + r * place.pitch + col] = x;
        }
        out
    }

    #[test]
    fn placed_activations_give_the_compact_results_with_a_zero_border() {
        // Sparse stride 1 (the in-place run) and stride 2 (rows), direct, im2col (stride 2,
        // dense), 1×1 without padding; inputs in their own border, in none, in another.
        let cases = [
            (geometry(1, [6, 9], 10, 3, 1, 1, 1), 0.1, true),
            (geometry(1, [6, 9], 10, 3, 2, 1, 1), 0.1, true),
            (geometry(1, [16, 16], 17, 3, 1, 1, 1), 1.0, false),
            (geometry(1, [6, 9], 10, 3, 2, 1, 1), 1.0, false),
            (geometry(1, [6, 9], 10, 1, 1, 0, 1), 0.3, true),
            (geometry(1, [7, 9], 10, 1, 2, 0, 1), 0.3, true),
            (geometry(1, [7, 9], 10, 1, 2, 0, 1), 1.0, false),
        ];
        let mut rng = TestRng::new(5);
        for (g, density, sparse) in cases {
            let w = rng.values(g.weight_len());
            let mask = rng.mask(g.weight_len(), density);
            let plan = ForwardPlan::with_form(g, &w, &mask, sparse);
            let (hw, out_hw) = (g.in_hw, g.out_hw().unwrap());
            let x = rng.values(g.in_len());
            let bias = rng.values(g.c_out);
            let residual = rng.values(g.out_len());
            let mut expected = vec![0.0; g.out_len()];
            let e = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                relu: true,
            };
            plan.forward(&x, &mut expected, &mut plan.scratch(), Some(e));
            let p = g.padding[0];
            for (x_pad, y_pad) in [(p, 0), (0, 1), (p, 1), (p, 2), (p + 1, 1)] {
                let input = placed(&x, g.c_in, hw, x_pad);
                let res = placed(&residual, g.c_out, out_hw, y_pad);
                // NaN everywhere the call must write; the border must stay zero.
                let mut y = placed(&vec![f32::NAN; g.out_len()], g.c_out, out_hw, y_pad);
                let mut scratch = plan.scratch();
                let e = Epilogue {
                    bias: &bias,
                    residual: Some(&res),
                    relu: true,
                };
                for _ in 0..2 {
                    plan.forward_laid_out(&input, x_pad, &mut y, y_pad, &mut scratch, Some(e));
                }
                let want = placed(&expected, g.c_out, out_hw, y_pad);
                let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{g:?}, sparse {sparse}, x pad {x_pad}, y pad {y_pad}");
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
