//! The masked layers' arithmetic, on any burn backend.
//!
//! Every masked layer computes through the functions here ([`masked_conv2d`],
//! [`masked_linear`], [`batch_norm_train`]), generic over `B: Backend` and written in burn's
//! tensor API, so the layers, the algorithms and the step run on every backend (Wgpu, LibTorch,
//! Candle, CUDA, NdArray, …) with nothing to implement. Where this crate has faster kernels for
//! a backend, the function picks them at run time by the backend's type: with the `flex`
//! feature, Flex and `Autodiff<Flex>` (no or balanced checkpointing) run the masked
//! convolution on [`ast_kernels::conv`] (dense or sparse by density) and the training
//! BatchNorm on [`ast_kernels::norm`], each with a backward of its own ([`set_flex_kernels`]
//! turns them off). The generic implementations are public: the reference every fast path is
//! tested against.

use burn::prelude::*;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
pub use flex::{flex_kernels_enabled, set_flex_kernels};

/// The effective weight `W ⊙ M` whose gradient with respect to `W` is **dense**.
///
/// Computed as `W − stopgrad(W ⊙ ¬M)`: the value is exactly `W ⊙ M` (`w − w = 0` at pruned
/// positions, `w − 0 = w` at kept ones), while the gradient reaching `W` is the gradient of the
/// loss with respect to the effective weight at *every* position. Growth ranks inactive
/// positions by that gradient (§5); the step masks it before the update (§6).
pub fn masked_weight<B: Backend, const D: usize>(
    weight: Tensor<B, D>,
    mask: Tensor<B, D, Bool>,
) -> Tensor<B, D> {
    let pruned = weight.clone().mask_fill(mask, 0.0).detach();
    weight - pruned
}

/// 2-D convolution of `x` with the masked weight `W ⊙ M` ([`masked_weight`]).
///
/// The weight's gradient is `∂L/∂(W ⊙ M)` at every position when `dense_weight_grad`
/// (growth ranks inactive positions by it); otherwise a fast path may leave it zero outside
/// the mask, which is all an update inside the mask reads.
pub fn masked_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    bias: Option<Tensor<B, 1>>,
    options: ConvOptions<2>,
    dense_weight_grad: bool,
) -> Tensor<B, 4> {
    let inputs = (x, weight, mask, bias);
    #[cfg(feature = "flex")]
    let inputs = match flex::masked_conv2d(inputs, options.clone(), dense_weight_grad) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    let _ = dense_weight_grad;
    let (x, weight, mask, bias) = inputs;
    generic_masked_conv2d(x, weight, mask, bias, options)
}

/// Training-mode batch norm of `x`, then the residual add and ReLU that follow it in the
/// models: `y = act(γ·(x − μ)/√(σ² + ε) + β + r)` with the batch mean `μ` and biased variance
/// `σ²` of each channel, which are returned (detached) for the running statistics.
///
/// # Shapes
/// - `x`, `residual`, output `y`: `[N, C, H, W]`; `gamma`, `beta`, `mean`, `var`: `[C]`.
pub fn batch_norm_train<B: Backend>(
    x: Tensor<B, 4>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    residual: Option<Tensor<B, 4>>,
    norm: NormOptions,
) -> NormOutput<B> {
    let inputs = (x, gamma, beta, residual);
    #[cfg(feature = "flex")]
    let inputs = match flex::batch_norm_train(inputs, norm) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let (x, gamma, beta, residual) = inputs;
    generic_batch_norm_train(x, gamma, beta, residual, norm)
}

/// `x · (W ⊙ M) + b` with the weight stored `[d_input, d_output]` as burn does.
pub fn masked_linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    mask: Tensor<B, 2, Bool>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    linear(x, masked_weight(weight, mask), bias)
}

/// The constants of [`batch_norm_train`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormOptions {
    /// `ε` added to the variance.
    pub epsilon: f64,
    /// Whether a ReLU follows (after the residual add).
    pub relu: bool,
}

/// What [`batch_norm_train`] returns.
#[derive(Debug, Clone)]
pub struct NormOutput<B: Backend> {
    /// The normalised (and activated) output.
    pub y: Tensor<B, 4>,
    /// The batch mean of each channel, detached.
    pub mean: Tensor<B, 1>,
    /// The biased batch variance of each channel, detached.
    pub var: Tensor<B, 1>,
}

/// [`batch_norm_train`] in burn's tensor API, with `[N·C, H·W]` rows so that every
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

/// burn's `conv2d` with [`masked_weight`]: the reference every fast path is tested
/// against, and the fallback for what a fast path does not cover.
pub fn generic_masked_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    bias: Option<Tensor<B, 1>>,
    options: ConvOptions<2>,
) -> Tensor<B, 4> {
    conv2d(x, masked_weight(weight, mask), bias, options)
}
