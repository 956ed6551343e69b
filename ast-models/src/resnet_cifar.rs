//! The CIFAR ResNets of He et al. (2016, §4.2) as in the AST code: ResNet-20/32/56 (widths
//! 16/32/64) and the wide ResNet-32 (widths 32/64/128), `6n + 2` layers deep.
//!
//! The stem (3×3 convolution and BatchNorm) is plain; the [`BasicBlock`]s are masked with
//! switchable BatchNorms; the first block of stages 2 and 3 halves the resolution through a
//! masked 1×1 projection shortcut whose BatchNorm is shared (ResNet-20/32/56) or switchable
//! (wide ResNet-32); global average pooling feeds a masked linear classifier. Convolutions are
//! Kaiming-normal with fan-out; the classifier as in the original (Kaiming-normal with fan-in,
//! or normal(0, 0.01) for the wide ResNet-32; bias zero).

use ast_core::layers::{batch_norm_act, plain_conv2d};
use ast_core::{MaskedLinear, SubnetSwitch};
use burn::module::Initializer;
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::prelude::*;
use burn::tensor::module::adaptive_avg_pool2d;

use crate::build::LayerBuilder;
use crate::resnet::BasicBlock;

/// Configuration of a [`CifarResNet`].
#[derive(Config, Debug)]
pub struct CifarResNetConfig {
    /// Output classes.
    pub num_classes: usize,
    /// Number of sub-nets `K`.
    pub subnets: usize,
    /// Channels of the three stages; the stem outputs the first.
    pub widths: [usize; 3],
    /// Basic blocks per stage (`n`; the depth is `6n + 2`).
    pub blocks_per_stage: usize,
    /// Whether the projection shortcuts' BatchNorm is switchable rather than shared.
    pub switchable_shortcut_norm: bool,
    /// Standard deviation of the classifier's normal init; `None`: Kaiming-normal with fan-in
    /// (gain √2). The bias starts at zero either way, as in the original.
    #[config(default = "None")]
    pub classifier_std: Option<f64>,
}

impl CifarResNetConfig {
    /// ResNet-20: widths 16/32/64, 3 blocks per stage, shared shortcut BatchNorm.
    pub fn resnet20(num_classes: usize, subnets: usize) -> Self {
        Self::new(num_classes, subnets, [16, 32, 64], 3, false)
    }

    /// ResNet-32: widths 16/32/64, 5 blocks per stage, shared shortcut BatchNorm.
    pub fn resnet32(num_classes: usize, subnets: usize) -> Self {
        Self::new(num_classes, subnets, [16, 32, 64], 5, false)
    }

    /// ResNet-56: widths 16/32/64, 9 blocks per stage, shared shortcut BatchNorm.
    pub fn resnet56(num_classes: usize, subnets: usize) -> Self {
        Self::new(num_classes, subnets, [16, 32, 64], 9, false)
    }

    /// Wide ResNet-32: widths 32/64/128, 5 blocks per stage, switchable shortcut BatchNorm.
    pub fn wide_resnet32(num_classes: usize, subnets: usize) -> Self {
        Self::new(num_classes, subnets, [32, 64, 128], 5, true).with_classifier_std(Some(0.01))
    }

    /// The original's classifier init: `kaiming_normal_` in `uspars_cifar_resnet.py`,
    /// `normal_(0, 0.01)` in `uspars_cifar_wide_resnet.py`.
    fn classifier_init(&self) -> Initializer {
        match self.classifier_std {
            Some(std) => Initializer::Normal { mean: 0.0, std },
            None => Initializer::KaimingNormal {
                gain: core::f64::consts::SQRT_2,
                fan_out_only: false,
            },
        }
    }

    /// Builds the model with every sub-net dense and a new [`SubnetSwitch`] set to sub-net 0.
    pub fn init<B: Backend>(&self, device: &B::Device) -> CifarResNet<B> {
        let switch = SubnetSwitch::new();
        let b = LayerBuilder {
            switch: &switch,
            subnets: self.subnets,
            fan_out: true,
            device,
        };
        let mut c_in = self.widths[0];
        let mut blocks = Vec::new();
        for (stage, &width) in self.widths.iter().enumerate() {
            for i in 0..self.blocks_per_stage {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let switchable = self.switchable_shortcut_norm;
                blocks.push(BasicBlock::new(&b, [c_in, width], stride, switchable));
                c_in = width;
            }
        }
        CifarResNet {
            conv1: b.plain_conv([3, self.widths[0]], 3, 1),
            bn1: b.plain_norm(self.widths[0]),
            blocks,
            linear: b.classifier(c_in, self.num_classes, self.classifier_init()),
            switch,
        }
    }
}

/// ResNet-20/32/56 or wide ResNet-32 for AST (see [`CifarResNetConfig`]).
#[derive(Module, Debug)]
pub struct CifarResNet<B: Backend> {
    /// Plain stem convolution.
    pub conv1: Conv2d<B>,
    /// Plain stem BatchNorm.
    pub bn1: BatchNorm<B>,
    /// The basic blocks of all three stages, in order.
    pub blocks: Vec<BasicBlock<B>>,
    /// Masked classifier.
    pub linear: MaskedLinear<B>,
    /// Selects the active sub-net in every masked layer and switchable BatchNorm.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl<B: Backend> CifarResNet<B> {
    /// The handle selecting the active sub-net.
    pub fn switch(&self) -> &SubnetSwitch {
        &self.switch
    }
}

impl<B: Backend> CifarResNet<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, H, W]` (32×32 for CIFAR; pooling is global)
    /// - output `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = batch_norm_act(&self.bn1, plain_conv2d(&self.conv1, x), None, true);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        self.linear
            .forward(adaptive_avg_pool2d(x, [1, 1]).flatten(1, 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resnet::Norm;
    use crate::tests::{
        assert_counts, assert_one_ast_step_moves_only_the_active_weights, assert_subnets_differ,
        device, images, AD, TB,
    };

    #[test]
    fn parameter_and_prunable_counts_match_the_original_models() {
        let device = device();
        let cases = [
            (CifarResNetConfig::resnet20(10, 3), (275_162, 21, 270_464)),
            (CifarResNetConfig::resnet32(10, 3), (471_386, 33, 464_000)),
            (CifarResNetConfig::resnet56(10, 3), (863_834, 57, 851_072)),
            (
                CifarResNetConfig::wide_resnet32(10, 3),
                (1_870_250, 33, 1_854_720),
            ),
        ];
        for (config, expected) in cases {
            assert_counts(&config.init::<TB>(&device), expected);
        }
    }

    #[test]
    fn shortcut_norm_is_shared_in_resnet20_and_switchable_in_wide_resnet32() {
        let device = device();
        let shortcut_norms = |config: CifarResNetConfig| {
            let model = config.init::<TB>(&device);
            let norms: Vec<bool> = model
                .blocks
                .iter()
                .filter_map(|b| b.shortcut.as_ref())
                .map(|s| matches!(s.norm, Norm::Switchable(_)))
                .collect();
            norms
        };
        assert_eq!(
            shortcut_norms(CifarResNetConfig::resnet20(10, 3)),
            [false, false]
        );
        assert_eq!(
            shortcut_norms(CifarResNetConfig::wide_resnet32(10, 3)),
            [true, true]
        );
    }

    #[test]
    fn the_classifier_starts_as_in_the_original() {
        // ResNet-20: kaiming_normal_ (fan-in 64, gain √2: std 0.177); wide ResNet-32:
        // normal_(0, 0.01); both with a zero bias.
        let device = device();
        for (config, std) in [
            (CifarResNetConfig::resnet20(10, 3), (2.0f64 / 64.0).sqrt()),
            (CifarResNetConfig::wide_resnet32(10, 3), 0.01),
        ] {
            let linear = config.init::<TB>(&device).linear;
            let w: Vec<f32> = linear.weight.val().into_data().to_vec().unwrap();
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let sd = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!((sd / std - 1.0).abs() < 0.1, "std {sd}, expected {std}");
            let b: Vec<f32> = linear.bias.unwrap().val().into_data().to_vec().unwrap();
            assert!(b.iter().all(|&v| v == 0.0), "{b:?}");
        }
    }

    #[test]
    fn forward_gives_logits_for_a_cifar_batch() {
        let device = device();
        for config in [
            CifarResNetConfig::resnet20(10, 3),
            CifarResNetConfig::resnet32(100, 3),
            CifarResNetConfig::resnet56(10, 3),
            CifarResNetConfig::wide_resnet32(10, 3),
        ] {
            let model = config.init::<TB>(&device);
            assert_eq!(
                model.forward(images(2, 32, 1)).dims(),
                [2, config.num_classes]
            );
        }
    }

    #[test]
    fn one_ast_step_moves_only_the_active_weights() {
        for config in [
            CifarResNetConfig::resnet20(10, 3),
            CifarResNetConfig::wide_resnet32(10, 3),
        ] {
            let model = config.init::<AD>(&device());
            let switch = model.switch().clone();
            assert_one_ast_step_moves_only_the_active_weights(
                model,
                &switch,
                |m, x| m.forward(x),
                32,
            );
        }
    }

    #[test]
    fn subnets_with_different_masks_differ_and_switching_back_is_exact() {
        let model = CifarResNetConfig::resnet20(10, 3).init::<TB>(&device());
        let switch = model.switch().clone();
        assert_subnets_differ(model, &switch, |m, x| m.forward(x));
    }
}
