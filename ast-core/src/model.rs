//! What a model offers so that a training loop other than the user's own (ast-train's, with its
//! checkpoints, evaluation, statistics and data-parallel runs) can train it by AST.
//!
//! The masked layers need no declaration: they are found by visiting the module
//! ([`crate::subnet::masked_layers`]). A model offers its forward pass and the
//! [`SubnetSwitch`] its masked layers were built with ([`AstModule`]); a [`ModelSpec`] says how to
//! build it for a run.

use burn::prelude::*;

use crate::layers::SubnetSwitch;

/// A burn module holding masked layers that share one [`SubnetSwitch`], classifying images.
pub trait AstModule<B: Backend>: Module<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, S, S]`, `S` the [`ModelSpec::image_size`] of its spec
    /// - output `[batch, classes]`
    fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2>;

    /// The switch the model's masked layers were built with.
    fn switch(&self) -> &SubnetSwitch;
}

/// How to build the model of a run, on any backend.
///
/// A run directory records [`ModelSpec::name`] in its configuration: the same spec rebuilds
/// the model to resume, evaluate or export the run.
pub trait ModelSpec: Send + Sync {
    /// The model on backend `B`.
    type Model<B: Backend>: AstModule<B>;

    /// The model's name, as runs record it.
    fn name(&self) -> &str;

    /// Side `S` of the square `[3, S, S]` images the model takes: 32 (CIFAR, and the
    /// greyscale sets padded and repeated to 3 channels) unless said otherwise; 224 for
    /// ImageNet.
    fn image_size(&self) -> usize {
        32
    }

    /// Builds the model with `classes` outputs and `subnets` sub-nets, all dense (the AST step
    /// writes their initial masks), on `device`.
    fn build<B: Backend>(
        &self,
        classes: usize,
        subnets: usize,
        device: &B::Device,
    ) -> Self::Model<B>;
}
