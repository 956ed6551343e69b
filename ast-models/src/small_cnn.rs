//! A small CNN for quick runs (the quickstart): plain stem, three masked convolutions with
//! switchable BatchNorm, global average pooling and a masked classifier.
//!
//! Not a model of the paper: it exists so that a complete AST run with several sub-nets fits in
//! minutes on two CPU cores (about 9 M multiply-adds per 32×32 image, against 41 M for
//! ResNet-20).

use ast_core::layers::{batch_norm_act, plain_conv2d};
use ast_core::{MaskedConv2d, MaskedLinear, SubnetSwitch, SwitchableBatchNorm};
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::prelude::*;
use burn::tensor::module::adaptive_avg_pool2d;

use crate::build::LayerBuilder;

/// Configuration of a [`SmallCnn`].
#[derive(Config, Debug)]
pub struct SmallCnnConfig {
    /// Output classes.
    pub num_classes: usize,
    /// Number of sub-nets `K`.
    pub subnets: usize,
    /// Channels of the stem and of the three masked convolutions.
    #[config(default = "[32, 64, 128, 128]")]
    pub widths: [usize; 4],
}

/// Stem 3×3 (plain) → 3×3/2 → 3×3/2 → 3×3 (masked, switchable BN) → pool → masked linear.
#[derive(Module, Debug)]
pub struct SmallCnn<B: Backend> {
    pub(crate) stem: Conv2d<B>,
    pub(crate) stem_norm: BatchNorm<B>,
    pub(crate) convs: Vec<MaskedConv2d<B>>,
    pub(crate) norms: Vec<SwitchableBatchNorm<B>>,
    pub(crate) linear: MaskedLinear<B>,
    #[module(skip)]
    switch: SubnetSwitch,
}

impl SmallCnnConfig {
    /// Builds the model with every sub-net dense; convolutions Kaiming-normal (fan-out).
    pub fn init<B: Backend>(&self, device: &B::Device) -> SmallCnn<B> {
        let switch = SubnetSwitch::new();
        let b = LayerBuilder {
            switch: &switch,
            subnets: self.subnets,
            fan_out: true,
            device,
        };
        let [w0, w1, w2, w3] = self.widths;
        let shapes = [([w0, w1], 2), ([w1, w2], 2), ([w2, w3], 1)];
        SmallCnn {
            stem: b.plain_conv([3, w0], 3, 1),
            stem_norm: b.plain_norm(w0),
            convs: shapes.iter().map(|&(c, s)| b.conv(c, 3, s)).collect(),
            norms: shapes.iter().map(|&(c, _)| b.norm(c[1])).collect(),
            linear: b.linear(w3, self.num_classes),
            switch,
        }
    }
}

impl<B: Backend> SmallCnn<B> {
    /// The handle selecting the active sub-net.
    pub fn switch(&self) -> &SubnetSwitch {
        &self.switch
    }
}

impl<B: Backend> SmallCnn<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, H, W]` (any size; 32×32 in the recipes)
    /// - output `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = batch_norm_act(&self.stem_norm, plain_conv2d(&self.stem, x), None, true);
        let x = self
            .convs
            .iter()
            .zip(&self.norms)
            .fold(x, |x, (conv, norm)| {
                norm.forward_act(conv.forward(x), None, true)
            });
        self.linear
            .forward(adaptive_avg_pool2d(x, [1, 1]).flatten(1, 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{device, images, TB};
    use crate::trainable_params;
    use ast_core::subnet::masked_layers;

    #[test]
    fn shapes_and_counts() {
        let model = SmallCnnConfig::new(10, 3).init::<TB>(&device());
        assert_eq!(model.forward(images(2, 32, 1)).dims(), [2, 10]);
        let layers = masked_layers(&model);
        // 32·64·9 + 64·128·9 + 128·128·9 + 128·10 = 18432 + 73728 + 147456 + 1280.
        assert_eq!(layers.len(), 4);
        assert_eq!(layers.iter().map(|l| l.numel()).sum::<usize>(), 240_896);
        // + stem 864 + stem BN 64 + 3 × 2 × (64 + 128 + 128) switchable BN + bias 10.
        assert_eq!(trainable_params(&model), 240_896 + 864 + 64 + 1920 + 10);
    }
}
