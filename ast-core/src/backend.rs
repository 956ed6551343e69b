//! The backend-extension seam for the masked layers' arithmetic.
//!
//! Every masked layer computes through [`AstBackend`], a trait on the backend with a generic
//! implementation written in burn's tensor API. A backend that has faster kernels (a sparse
//! convolution for Flex once 90–98 % of the weights are zero, say) overrides the methods for
//! itself; the layers, the algorithms and the step do not change.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::module::{conv2d, linear};
use burn::tensor::ops::ConvOptions;

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
        let pruned = weight.clone().mask_fill(mask, 0.0).detach();
        weight - pruned
    }

    /// 2-D convolution of `x` with the masked weight `W ⊙ M`.
    fn masked_conv2d(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        mask: Tensor<Self, 4, Bool>,
        bias: Option<Tensor<Self, 1>>,
        options: ConvOptions<2>,
    ) -> Tensor<Self, 4> {
        conv2d(x, Self::masked_weight(weight, mask), bias, options)
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

impl AstBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl AstBackend for burn::backend::NdArray {}

#[cfg(feature = "cuda")]
impl AstBackend for burn::backend::Cuda {}

impl<B: AstBackend, C: CheckpointStrategy> AstBackend for Autodiff<B, C> {}
