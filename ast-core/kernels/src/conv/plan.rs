//! Which form a masked convolution runs in (the cost model), and [`MaskedConvPlan`], one
//! layer's weights in that form, ready to run forward and backward.

use rayon::prelude::*;

use super::dense::{direct_is_faster, forward_dense, input_grad_dense, weight_grad_dense};
use super::geometry::{check, ConvGeometry};
use super::layout::{sum_in_order, GRAD_CHUNK};
use super::sparse::{
    forward_sparse, input_grad_sparse, weight_grad_sparse, FusedSample, GradBuffers, SparseKernel,
    SparseSample, SparseWeight,
};
use crate::pool;

/// Whether the sparse form is expected to be faster than the dense form for `active` active
/// weights, by a cost model fitted to `cargo bench -p ast-kernels --bench conv_kernels` (forward,
/// input gradient and active-position weight gradient of the ResNet-32 / wide ResNet-32
/// convolutions at batch 128, 2-core AMD EPYC with AVX-512):
/// - sparse: `active · (L + 60)`, `L` the length of one strided product (the span of the
///   output plane rounded up to whole vectors) and 60 the fixed cost per active weight and
///   sample, in element-steps;
/// - dense: `7.8·P^−0.2 / C^0.45 · W·P` for `W` weights, output plane `P` and `C` output
///   channels per group: the GEMM's multiply-adds, cheaper per multiply-add as the GEMM's rows
///   (`C`) grow, since im2col costs the same per column whatever `C`, and a little cheaper on
///   large planes, where the sparse products pay more for padding and copies.
///
///   Where the dense forward runs on the direct kernel ([`direct_is_faster`]), the dense
///   cost is 0.8 of that.
///
/// Measured crossovers (2026-11-30, fourth session, with the direct dense kernels): 16 ch at 32×32 ≈ 0.45,
/// 32 ch at 32×32 ≈ 0.30, 32 ch at 16×16 ≈ 0.28, 64 ch at 16×16 ≈ 0.23, 64 ch at 8×8 ≈ 0.20,
/// 128 ch at 8×8 ≈ 0.17; the model's: 0.40, 0.29, 0.32, 0.23, 0.24, 0.17.
pub fn sparse_is_faster(geometry: &ConvGeometry, active: usize) -> bool {
    let p = geometry.out_plane() as f64;
    let sparse = active as f64 * (geometry.lanes_len() as f64 + 60.0);
    let per_mac = 7.8 * p.powf(-0.2) / (geometry.cout_g() as f64).powf(0.45);
    let direct = if direct_is_faster(geometry) { 0.8 } else { 1.0 };
    let dense = direct * per_mac * (geometry.weight_len() as f64) * p;
    sparse < dense
}

/// The weights a masked convolution computes with, in the form its density calls for.
// One per layer and call, moved rarely: the padding of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum PlanWeights {
    /// The masked dense weight `W ⊙ M`.
    Dense(Vec<f32>),
    /// The active weights.
    Sparse(SparseWeight),
}

/// One masked convolution ready to run: its geometry and its weights in dense or sparse form.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedConvPlan {
    /// Shapes and hyper-parameters.
    pub geometry: ConvGeometry,
    /// The weights.
    pub weights: PlanWeights,
}

/// `weight ⊙ mask`.
///
/// # Panics
/// If the lengths differ.
pub(crate) fn masked(weight: &[f32], mask: &[bool]) -> Vec<f32> {
    assert_eq!(
        weight.len(),
        mask.len(),
        "conv kernels: weight and mask lengths"
    );
    weight
        .iter()
        .zip(mask)
        .map(|(&w, &m)| if m { w } else { 0.0 })
        .collect()
}

impl MaskedConvPlan {
    /// Chooses the sparse form where [`sparse_is_faster`] and for depthwise-like layers (one
    /// input channel per group, where a GEMM has a single row), else the dense form; the sparse
    /// form needs equal strides along both axes.
    ///
    /// # Panics
    /// If the geometry is not [`ConvGeometry::supported`] or the lengths do not match it.
    pub fn new(geometry: ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        assert!(
            geometry.supported(),
            "conv kernels: unsupported geometry {geometry:?}"
        );
        let active = mask.iter().filter(|&&m| m).count();
        let weights = if Self::picks_sparse(&geometry, active) {
            PlanWeights::Sparse(SparseWeight::new(&geometry, weight, mask))
        } else {
            PlanWeights::Dense(masked(weight, mask))
        };
        Self { geometry, weights }
    }

    /// Whether [`Self::new`] picks the sparse form for a mask of `active` active weights.
    pub fn picks_sparse(geometry: &ConvGeometry, active: usize) -> bool {
        let sparse = sparse_is_faster(geometry, active) || geometry.cin_g() == 1;
        sparse && geometry.stride[0] == geometry.stride[1]
    }

    /// [`Self::forward`] into `y`, every value of which it overwrites.
    ///
    /// # Panics
    /// If `x` or `y` does not hold the geometry's batch.
    pub fn forward_into(&self, x: &[f32], y: &mut [f32]) {
        let g = &self.geometry;
        match &self.weights {
            PlanWeights::Dense(w) => forward_dense(g, x, w, y),
            PlanWeights::Sparse(w) => forward_sparse(g, x, w, y),
        }
    }

    /// `y = conv(x, W ⊙ M)`, `[N, C_out, H_out, W_out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let mut y = pool::take_overwritten(g.batch * g.out_len());
        self.forward_into(x, &mut y);
        y
    }

    /// `∂L/∂x` from `dy = ∂L/∂y`, `[N, C_in, H, W]`.
    pub fn input_grad(&self, dy: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let mut dx = pool::take_overwritten(g.batch * g.in_len());
        self.input_grad_into(dy, &mut dx);
        dx
    }

    /// [`Self::input_grad`] into `dx`, every value of which it overwrites (whatever `dx` held:
    /// a buffer no longer needed can take it without being cleared).
    ///
    /// # Panics
    /// If `dx` does not hold `N·C_in·H·W` values.
    pub fn input_grad_into(&self, dy: &[f32], dx: &mut [f32]) {
        let g = &self.geometry;
        match &self.weights {
            PlanWeights::Dense(w) => input_grad_dense(g, dy, w, dx),
            PlanWeights::Sparse(w) => input_grad_sparse(g, dy, w, dx),
        }
    }

    /// [`Self::input_grad`] in place: `io` holds `dy` on entry and `∂x` on return. Only where
    /// `∂x` is shaped like `dy` (same channels and plane) and the sparse form's stride-1 input
    /// gradient runs, which reads each sample's `dy` into its own buffer before it writes that
    /// sample's `∂x`; elsewhere it returns `false` and leaves `io` alone.
    pub fn input_grad_in_place(&self, io: &mut [f32]) -> bool {
        let g = &self.geometry;
        let PlanWeights::Sparse(w) = &self.weights else {
            return false;
        };
        let same_shape = g.c_in == g.c_out && g.out_hw() == Some(g.in_hw);
        if w.by_input_start.is_empty() || !same_shape || io.len() != g.batch * g.in_len() {
            return false;
        }
        w.check(g);
        io.par_chunks_mut(g.in_len()).for_each_init(
            || g.by_input_buffers(),
            |(buffer, plane), sample| {
                SparseSample {
                    kernel: SparseKernel::InputGradByInputInPlace,
                    g,
                    w,
                    input: &[],
                    dy: &[],
                    out: sample,
                    padded: buffer,
                    wide: plane,
                    epilogue: None,
                }
                .run()
            },
        );
        true
    }

    /// Whether [`Self::sparse_grads`] applies: the sparse form with its stride-1 input
    /// gradient by input channel.
    pub fn fuses_sparse_grads(&self) -> bool {
        matches!(&self.weights, PlanWeights::Sparse(w) if !w.by_input_start.is_empty())
    }

    /// Both gradients of a sparse-form, stride-1 plan in one pass over the batch: per sample,
    /// `dy` is laid out once and serves the input gradient and the weight gradient at the
    /// active positions (the two separate kernels each read `dy` from memory). The same
    /// values as [`Self::input_grad`] and [`Self::weight_grad`] (not `dense`), bit for bit.
    /// Returns the weight gradient shaped like the weight (zero at inactive positions), or
    /// `None` where it does not apply ([`Self::fuses_sparse_grads`]), leaving the buffers
    /// alone.
    ///
    /// # Panics
    /// If a buffer's length does not match the geometry.
    pub fn sparse_grads(&self, io: GradBuffers<'_>) -> Option<Vec<f32>> {
        let g = &self.geometry;
        let PlanWeights::Sparse(w) = &self.weights else {
            return None;
        };
        if !self.fuses_sparse_grads() {
            return None;
        }
        w.check(g);
        let [x, dy, dx] = io.lens();
        check(g, x, g.weight_len(), dy);
        assert_eq!(dx, x, "conv kernels: input gradient length");
        let partials: Vec<Vec<f32>> = io
            .split(g, GRAD_CHUNK)
            .into_par_iter()
            .map(|chunk| {
                let mut acc = vec![0.0; w.nnz()];
                let mut padded = vec![0.0; g.sparse_buffer_len()];
                let (mut buffer, mut plane) = g.by_input_buffers();
                for io in chunk.split(g, 1) {
                    crate::dispatch(FusedSample {
                        g,
                        w,
                        io,
                        acc: &mut acc,
                        padded: &mut padded,
                        buffer: &mut buffer,
                        plane: &mut plane,
                    });
                }
                acc
            })
            .collect();
        let mut active = vec![0.0; w.nnz()];
        sum_in_order(&partials, &mut active);
        let mut dw = vec![0.0; g.weight_len()];
        for (&i, v) in w.index.iter().zip(active) {
            dw[i] = v;
        }
        Some(dw)
    }

    /// `∂L/∂(W ⊙ M)`, shaped like the weight: at every position when `dense` (what growth
    /// ranks), else only at the active positions (zero elsewhere), which is all an update
    /// inside the mask needs. A dense-form plan always returns every position.
    pub fn weight_grad(&self, x: &[f32], dy: &[f32], dense: bool) -> Vec<f32> {
        let g = &self.geometry;
        let mut dw = vec![0.0; g.weight_len()];
        match &self.weights {
            PlanWeights::Sparse(w) if !dense => {
                for (&i, v) in w.index.iter().zip(weight_grad_sparse(g, x, dy, w)) {
                    dw[i] = v;
                }
            }
            _ => weight_grad_dense(g, x, dy, &mut dw),
        }
        dw
    }
}
