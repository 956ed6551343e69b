//! The backend-extension seam for the masked layers' arithmetic.
//!
//! Every masked layer computes through [`AstBackend`], a trait on the backend with a generic
//! implementation written in burn's tensor API. A backend with faster kernels overrides the
//! methods for itself; the layers, the algorithms and the step do not change. Flex does: its
//! masked convolution runs on [`crate::kernels::conv`] (dense or sparse by density) with a
//! backward of its own ([`flex`]).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;

#[cfg(feature = "flex")]
mod flex;

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

#[cfg(feature = "cuda")]
impl AstBackend for burn::backend::Cuda {}

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
}
