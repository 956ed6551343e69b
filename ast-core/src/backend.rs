//! The backend-extension seam for the masked layers' arithmetic.
//!
//! Every masked layer computes through [`AstBackend`], a trait on the backend with a generic
//! implementation written in burn's tensor API. A backend with faster kernels overrides the
//! methods for itself; the layers, the algorithms and the step do not change. Flex does: its
//! masked convolution runs on [`ast_kernels::conv`] (dense or sparse by density) and its
//! training BatchNorm on [`ast_kernels::norm`], each with a backward of its own
//! ([`set_flex_kernels`] turns them off).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
pub use flex::{flex_kernels_enabled, set_flex_kernels};

/// A backend the AST layers can run on. The provided methods are the reference arithmetic.
pub trait AstBackend: Backend {
    /// The effective weight `W ⊙ M` whose gradient with respect to `W` is **dense**.
    ///
    /// Computed as `W − stopgrad(W ⊙ ¬M)`: the value is exactly `W ⊙ M` (`w − w = 0` at pruned
    /// positions, `w − 0 = w` at kept ones), while the gradient reaching `W` is the gradient
    /// of the loss with respect to the effective weight at *every* position. Growth ranks
    /// inactive positions by that gradient (§5); the step masks it before the update (§6).
    fn masked_weight<const D: usize>(
        weight: Tensor<Self, D>,
        mask: Tensor<Self, D, Bool>,
    ) -> Tensor<Self, D> {
        generic_masked_weight(weight, mask)
    }

    /// 2-D convolution of `x` with the masked weight `W ⊙ M`.
    ///
    /// The weight's gradient is `∂L/∂(W ⊙ M)` at every position when `dense_weight_grad`
    /// (growth ranks inactive positions by it); otherwise a backend may leave it zero outside
    /// the mask, which is all an update inside the mask reads.
    fn masked_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        mask: Tensor<Self, 4, Bool>,
        bias: Option<Tensor<Self, 1>>,
        options: ConvOptions<2>,
        dense_weight_grad: bool,
    ) -> Tensor<Self, 4> {
        let _ = dense_weight_grad;
        generic_masked_conv2d(x, weight, mask, bias, options)
    }

    /// [`AstBackend::masked_conv2d`] of `Autodiff<Self, C>`: a backend with its own backward
    /// overrides this one (the `Autodiff` implementation delegates here).
    fn autodiff_masked_conv2d<C: CheckpointStrategy>(
        x: Tensor<Autodiff<Self, C>, 4>,
        weight: Tensor<Autodiff<Self, C>, 4>,
        mask: Tensor<Autodiff<Self, C>, 4, Bool>,
        bias: Option<Tensor<Autodiff<Self, C>, 1>>,
        options: ConvOptions<2>,
        dense_weight_grad: bool,
    ) -> Tensor<Autodiff<Self, C>, 4> {
        let _ = dense_weight_grad;
        generic_masked_conv2d(x, weight, mask, bias, options)
    }

    /// Training-mode batch norm of `x`, then the residual add and ReLU that follow it in the
    /// models: `y = act(γ·(x − μ)/√(σ² + ε) + β + r)` with the batch mean `μ` and biased
    /// variance `σ²` of each channel, which are returned (detached) for the running statistics.
    ///
    /// # Shapes
    /// - `x`, `residual`, output `y`: `[N, C, H, W]`; `gamma`, `beta`, `mean`, `var`: `[C]`.
    fn batch_norm_train(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        residual: Option<Tensor<Self, 4>>,
        norm: NormOptions,
    ) -> NormOutput<Self> {
        generic_batch_norm_train(x, gamma, beta, residual, norm)
    }

    /// [`AstBackend::batch_norm_train`] of `Autodiff<Self, C>`: a backend with its own backward
    /// overrides this one (the `Autodiff` implementation delegates here).
    fn autodiff_batch_norm_train<C: CheckpointStrategy>(
        x: Tensor<Autodiff<Self, C>, 4>,
        gamma: Tensor<Autodiff<Self, C>, 1>,
        beta: Tensor<Autodiff<Self, C>, 1>,
        residual: Option<Tensor<Autodiff<Self, C>, 4>>,
        norm: NormOptions,
    ) -> NormOutput<Autodiff<Self, C>> {
        generic_batch_norm_train(x, gamma, beta, residual, norm)
    }

    /// `x · (W ⊙ M) + b` with the weight stored `[d_input, d_output]` as burn does.
    fn masked_linear<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        mask: Tensor<Self, 2, Bool>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        linear(x, Self::masked_weight(weight, mask), bias)
    }
}

/// The constants of [`AstBackend::batch_norm_train`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormOptions {
    /// `ε` added to the variance.
    pub epsilon: f64,
    /// Whether a ReLU follows (after the residual add).
    pub relu: bool,
}

/// What [`AstBackend::batch_norm_train`] returns.
#[derive(Debug, Clone)]
pub struct NormOutput<B: Backend> {
    /// The normalised (and activated) output.
    pub y: Tensor<B, 4>,
    /// The batch mean of each channel, detached.
    pub mean: Tensor<B, 1>,
    /// The biased batch variance of each channel, detached.
    pub var: Tensor<B, 1>,
}

/// [`AstBackend::batch_norm_train`] in burn's tensor API, with `[N·C, H·W]` rows so that every
/// reduction and broadcast is row-wise (burn-flex runs `[1, C, 1, 1]` broadcasts through a
/// slow strided iterator). The variance is `E[x²] − E[x]²`.
pub fn generic_batch_norm_train<B: Backend>(
    x: Tensor<B, 4>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    residual: Option<Tensor<B, 4>>,
    norm: NormOptions,
) -> NormOutput<B> {
    let [n, c, h, w] = x.dims();
    let rows = x.reshape([n * c, h * w]);
    let count = (n * h * w) as f64;
    let per_channel = |rows: Tensor<B, 2>| rows.sum_dim(1).reshape([n, c]).sum_dim(0).reshape([c]);
    let mean = per_channel(rows.clone()) / count;
    let mean_sq = per_channel(rows.clone() * rows.clone()) / count;
    let var = (mean_sq - mean.clone() * mean.clone()).clamp_min(0.0);
    let y = normalize_rows(rows, gamma, beta, mean.clone(), var.clone(), norm.epsilon);
    NormOutput {
        y: activate(y.reshape([n, c, h, w]), residual, norm.relu),
        mean: mean.detach(),
        var: var.detach(),
    }
}

/// `γ·(x − μ)/√(σ² + ε) + β` of `[N·C, H·W]` rows with per-channel `μ`, `σ²`.
pub(crate) fn normalize_rows<B: Backend>(
    rows: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    mean: Tensor<B, 1>,
    var: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, 2> {
    let [c] = gamma.dims();
    let n = rows.dims()[0] / c.max(1);
    let scale = gamma / (var + epsilon).sqrt();
    let shift = beta - mean * scale.clone();
    let per_row = |v: Tensor<B, 1>| v.reshape([1, c]).repeat_dim(0, n).reshape([n * c, 1]);
    rows * per_row(scale) + per_row(shift)
}

/// `act(y + r)`: the residual add and ReLU after a batch norm, where there are.
pub(crate) fn activate<B: Backend>(
    y: Tensor<B, 4>,
    residual: Option<Tensor<B, 4>>,
    relu: bool,
) -> Tensor<B, 4> {
    let y = match residual {
        Some(r) => y + r,
        None => y,
    };
    if relu {
        burn::tensor::activation::relu(y)
    } else {
        y
    }
}

/// `W − stopgrad(W ⊙ ¬M)` on any backend (see [`AstBackend::masked_weight`]).
pub fn generic_masked_weight<B: Backend, const D: usize>(
    weight: Tensor<B, D>,
    mask: Tensor<B, D, Bool>,
) -> Tensor<B, D> {
    let pruned = weight.clone().mask_fill(mask, 0.0).detach();
    weight - pruned
}

/// burn's `conv2d` with [`generic_masked_weight`]: the reference every fast path is tested
/// against, and the fallback for what a fast path does not cover.
pub fn generic_masked_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    bias: Option<Tensor<B, 1>>,
    options: ConvOptions<2>,
) -> Tensor<B, 4> {
    conv2d(x, generic_masked_weight(weight, mask), bias, options)
}

#[cfg(feature = "ndarray")]
impl AstBackend for burn::backend::NdArray {}

impl<B: AstBackend, C: CheckpointStrategy> AstBackend for Autodiff<B, C> {
    fn masked_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        mask: Tensor<Self, 4, Bool>,
        bias: Option<Tensor<Self, 1>>,
        options: ConvOptions<2>,
        dense_weight_grad: bool,
    ) -> Tensor<Self, 4> {
        B::autodiff_masked_conv2d::<C>(x, weight, mask, bias, options, dense_weight_grad)
    }

    fn batch_norm_train(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        residual: Option<Tensor<Self, 4>>,
        norm: NormOptions,
    ) -> NormOutput<Self> {
        B::autodiff_batch_norm_train::<C>(x, gamma, beta, residual, norm)
    }
}
