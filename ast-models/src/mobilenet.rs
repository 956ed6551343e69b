//! MobileNet-V1 for CIFAR (Howard et al. 2017, with a stride-1 stem) as in the AST code.
//!
//! Every convolution is masked — the 3×3 stem, the 13 depthwise 3×3 and the 13 pointwise 1×1
//! convolutions — each followed by a switchable BatchNorm and ReLU; average pooling 2 (global
//! on the final 2×2 map of a 32×32 input) feeds a masked linear classifier. Convolutions are
//! Kaiming-normal with fan-out.
//!
//! **N:M sparsity does not apply to this model**: N:M groups run along input channels, and a
//! depthwise convolution has one input channel per group (weight `[C, 1, 3, 3]`), the stem
//! three. [`AstStep::new`](ast_core::AstStep::new) with an N:M target therefore fails with
//! [`AstError::NmIndivisible`](ast_core::AstError::NmIndivisible), naming the first masked
//! layer that does not fit: the stem `conv1` (input 3); even without it, every depthwise layer
//! (`blocks.i.depthwise`, input 1) would be rejected.

use ast_core::{MaskedConv2d, MaskedLinear, SubnetSwitch, SwitchableBatchNorm};
use burn::prelude::*;
use burn::tensor::module::avg_pool2d;

use crate::build::LayerBuilder;

/// Output channels and stride of the 13 depthwise-separable blocks.
pub const BLOCKS: [(usize, usize); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

/// Configuration of a [`MobileNetV1`].
#[derive(Config, Debug)]
pub struct MobileNetV1Config {
    /// Output classes.
    pub num_classes: usize,
    /// Number of sub-nets `K`.
    pub subnets: usize,
}

impl MobileNetV1Config {
    /// The CIFAR MobileNet-V1 (32×32 inputs).
    pub fn cifar(num_classes: usize, subnets: usize) -> Self {
        Self::new(num_classes, subnets)
    }

    /// Builds the model with every sub-net dense and a new [`SubnetSwitch`] set to sub-net 0.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MobileNetV1<B> {
        let switch = SubnetSwitch::new();
        let b = LayerBuilder {
            switch: &switch,
            subnets: self.subnets,
            fan_out: true,
            device,
        };
        let mut c_in = 32;
        let blocks = BLOCKS
            .iter()
            .map(|&(c_out, stride)| {
                let block = DepthwiseSeparable {
                    depthwise: b.grouped_conv([c_in, c_in], 3, stride, c_in),
                    bn1: b.norm(c_in),
                    pointwise: b.conv([c_in, c_out], 1, 1),
                    bn2: b.norm(c_out),
                };
                c_in = c_out;
                block
            })
            .collect();
        MobileNetV1 {
            conv1: b.conv([3, 32], 3, 1),
            bn1: b.norm(32),
            blocks,
            linear: b.linear(c_in, self.num_classes),
            switch,
        }
    }
}

/// Depthwise 3×3 convolution (stride) – BN – ReLU – pointwise 1×1 convolution – BN – ReLU.
#[derive(Module, Debug)]
pub struct DepthwiseSeparable<B: Backend> {
    /// Masked depthwise 3×3 convolution (`groups = C_in`).
    pub depthwise: MaskedConv2d<B>,
    /// BatchNorm after the depthwise convolution.
    pub bn1: SwitchableBatchNorm<B>,
    /// Masked pointwise 1×1 convolution.
    pub pointwise: MaskedConv2d<B>,
    /// BatchNorm after the pointwise convolution.
    pub bn2: SwitchableBatchNorm<B>,
}

impl<B: Backend> DepthwiseSeparable<B> {
    /// Applies the block with the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, C_out, H / stride, W / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = (self.bn1).forward_act(self.depthwise.forward(x), None, true);
        (self.bn2).forward_act(self.pointwise.forward(x), None, true)
    }
}

/// MobileNet-V1 for AST (see [`MobileNetV1Config`]).
#[derive(Module, Debug)]
pub struct MobileNetV1<B: Backend> {
    /// Masked 3×3 stem convolution 3→32, stride 1.
    pub conv1: MaskedConv2d<B>,
    /// Stem BatchNorm.
    pub bn1: SwitchableBatchNorm<B>,
    /// The 13 depthwise-separable blocks of [`BLOCKS`].
    pub blocks: Vec<DepthwiseSeparable<B>>,
    /// Masked classifier.
    pub linear: MaskedLinear<B>,
    /// Selects the active sub-net in every masked layer and switchable BatchNorm.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl<B: Backend> MobileNetV1<B> {
    /// The handle selecting the active sub-net.
    pub fn switch(&self) -> &SubnetSwitch {
        &self.switch
    }
}

impl<B: Backend> MobileNetV1<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, 32, 32]` (the final average pooling 2 expects a 2×2 map)
    /// - output `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = (self.bn1).forward_act(self.conv1.forward(x), None, true);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        let x = avg_pool2d(x, [2, 2], [2, 2], [0, 0], true, false);
        self.linear.forward(x.flatten(1, 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{
        assert_counts, assert_one_ast_step_moves_only_the_active_weights, assert_subnets_differ,
        device, images, AD, TB,
    };
    use ast_core::subnet::masked_layers;
    use ast_core::{AstConfig, AstError, AstStep, SubnetTarget};

    #[test]
    fn parameter_and_prunable_counts_match_the_original_model() {
        let model = MobileNetV1Config::cifar(10, 3).init::<TB>(&device());
        assert_counts(&model, (3_261_002, 28, 3_195_328));
    }

    #[test]
    fn forward_gives_logits_for_a_cifar_batch() {
        let model = MobileNetV1Config::cifar(10, 3).init::<TB>(&device());
        assert_eq!(model.forward(images(2, 32, 1)).dims(), [2, 10]);
    }

    #[test]
    fn one_ast_step_moves_only_the_active_weights() {
        let model = MobileNetV1Config::cifar(10, 3).init::<AD>(&device());
        let switch = model.switch().clone();
        assert_one_ast_step_moves_only_the_active_weights(model, &switch, |m, x| m.forward(x), 32);
    }

    #[test]
    fn subnets_with_different_masks_differ_and_switching_back_is_exact() {
        let mut model = MobileNetV1Config::cifar(10, 3).init::<TB>(&device());
        // In inference mode with untrained running statistics (mean 0, variance 1) each
        // fan-out-initialised depthwise layer divides the feature variance by about `C`: the
        // features end many orders of magnitude below the bias (~1e-2), whose f32 resolution
        // hides them. Dropping the bias lets the logits show the features.
        model.linear.bias = None;
        let switch = model.switch().clone();
        assert_subnets_differ(model, &switch, |m, x| m.forward(x));
    }

    #[test]
    fn nm_targets_are_rejected_because_of_depthwise_and_stem_inputs() {
        let model = MobileNetV1Config::cifar(10, 3).init::<AD>(&device());
        let layers = masked_layers(&model);
        let depthwise: Vec<_> = layers
            .iter()
            .filter(|l| l.path.ends_with(".depthwise"))
            .collect();
        assert_eq!(depthwise.len(), 13);
        assert!(depthwise.iter().all(|l| l.shape[1] == 1));
        let targets = vec![SubnetTarget::Nm { n: 2, m: 4 }; 3];
        let err =
            AstStep::<AD>::new(AstConfig::new(targets), &model, model.switch(), 1, 10).unwrap_err();
        // The stem (3 input channels) is the first masked layer the check meets.
        let stem = AstError::NmIndivisible {
            layer: "conv1".into(),
            input: 3,
            m: 4,
        };
        assert_eq!(err, stem);
        // Without the stem in the way, the first depthwise layer is named (input 1 per group).
        #[derive(Module, Debug)]
        struct Blocks<B: Backend> {
            blocks: Vec<DepthwiseSeparable<B>>,
        }
        let blocks = Blocks {
            blocks: model.blocks,
        };
        let targets = vec![SubnetTarget::Nm { n: 1, m: 8 }; 3];
        let err =
            AstStep::<AD>::new(AstConfig::new(targets), &blocks, &model.switch, 1, 10).unwrap_err();
        let depthwise = AstError::NmIndivisible {
            layer: "blocks.0.depthwise".into(),
            input: 1,
            m: 8,
        };
        assert_eq!(err, depthwise);
    }
}
