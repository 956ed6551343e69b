//! ResNet-18 and ResNet-50 with the CIFAR stem, and ResNet-50 with the ImageNet stem, as in
//! the AST code; also the residual blocks that the CIFAR ResNets of
//! [`resnet_cifar`](crate::resnet_cifar) reuse.
//!
//! Every block convolution and shortcut convolution is masked and followed by a switchable
//! BatchNorm; the stem is plain (shared by all sub-nets). The CIFAR variants end in a masked
//! linear layer, the ImageNet variant in a plain one.

use ast_core::layers::{batch_norm_2d, batch_norm_act, plain_conv2d};
use ast_core::{MaskedConv2d, MaskedLinear, SubnetSwitch, SwitchableBatchNorm};
use burn::module::Initializer;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::{avg_pool2d, max_pool2d};
use serde::{Deserialize, Serialize};

use crate::build::LayerBuilder;

/// A BatchNorm either shared by all sub-nets or switchable (one per sub-net).
// Built once per model: the padding of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Norm<B: Backend> {
    /// One BatchNorm shared by every sub-net.
    Shared(BatchNorm<B>),
    /// One BatchNorm per sub-net.
    Switchable(SwitchableBatchNorm<B>),
}

impl<B: Backend> Norm<B> {
    /// Normalises with the shared BatchNorm or the active sub-net's.
    ///
    /// # Shapes
    /// - input `[batch, channels, H, W]`, output the same.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Norm::Shared(bn) => batch_norm_2d(bn, x),
            Norm::Switchable(bn) => bn.forward(x),
        }
    }
}

/// The projection shortcut used when a block changes the shape: a masked 1×1 convolution
/// (with the block's stride, no bias) and a BatchNorm.
#[derive(Module, Debug)]
pub struct Shortcut<B: Backend> {
    /// Masked 1×1 convolution.
    pub conv: MaskedConv2d<B>,
    /// Its BatchNorm.
    pub norm: Norm<B>,
}

impl<B: Backend> Shortcut<B> {
    /// Projects the block input to the block output's shape.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, C_out, H / stride, W / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.norm.forward(self.conv.forward(x))
    }
}

fn shortcut<B: Backend>(
    b: &LayerBuilder<B>,
    channels: [usize; 2],
    stride: usize,
    switchable: bool,
) -> Option<Shortcut<B>> {
    (stride != 1 || channels[0] != channels[1]).then(|| Shortcut {
        conv: b.conv(channels, 1, stride),
        norm: match switchable {
            true => Norm::Switchable(b.norm(channels[1])),
            false => Norm::Shared(b.plain_norm(channels[1])),
        },
    })
}

fn residual<B: Backend>(shortcut: &Option<Shortcut<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match shortcut {
        Some(s) => s.forward(x),
        None => x,
    }
}

/// The basic residual block: conv 3×3 (stride) – BN – ReLU – conv 3×3 – BN, plus the shortcut,
/// then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    /// First 3×3 convolution, carrying the block's stride.
    pub conv1: MaskedConv2d<B>,
    /// BatchNorm after `conv1`.
    pub bn1: SwitchableBatchNorm<B>,
    /// Second 3×3 convolution.
    pub conv2: MaskedConv2d<B>,
    /// BatchNorm after `conv2`.
    pub bn2: SwitchableBatchNorm<B>,
    /// Projection shortcut when the block changes the shape, identity otherwise.
    pub shortcut: Option<Shortcut<B>>,
}

impl<B: Backend> BasicBlock<B> {
    pub(crate) fn new(
        b: &LayerBuilder<B>,
        channels: [usize; 2],
        stride: usize,
        switchable_shortcut: bool,
    ) -> Self {
        let out = channels[1];
        Self {
            conv1: b.conv(channels, 3, stride),
            bn1: b.norm(out),
            conv2: b.conv([out, out], 3, 1),
            bn2: b.norm(out),
            shortcut: shortcut(b, channels, stride, switchable_shortcut),
        }
    }
}

impl<B: Backend> BasicBlock<B> {
    /// Applies the block with the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, C_out, H / stride, W / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = (self.bn1).forward_act(self.conv1.forward(x.clone()), None, true);
        let shortcut = residual(&self.shortcut, x);
        (self.bn2).forward_act(self.conv2.forward(out), Some(shortcut), true)
    }
}

/// The bottleneck block (expansion 4): conv 1×1 – BN – ReLU – conv 3×3 (stride) – BN – ReLU –
/// conv 1×1 – BN, plus the shortcut, then ReLU.
#[derive(Module, Debug)]
pub struct Bottleneck<B: Backend> {
    /// 1×1 reduction to `planes` channels.
    pub conv1: MaskedConv2d<B>,
    /// BatchNorm after `conv1`.
    pub bn1: SwitchableBatchNorm<B>,
    /// 3×3 convolution carrying the block's stride.
    pub conv2: MaskedConv2d<B>,
    /// BatchNorm after `conv2`.
    pub bn2: SwitchableBatchNorm<B>,
    /// 1×1 expansion to `4 · planes` channels.
    pub conv3: MaskedConv2d<B>,
    /// BatchNorm after `conv3` (γ = 0 at init in the ImageNet ResNet-50).
    pub bn3: SwitchableBatchNorm<B>,
    /// Projection shortcut when the block changes the shape, identity otherwise.
    pub shortcut: Option<Shortcut<B>>,
}

impl<B: Backend> Bottleneck<B> {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 4;

    fn new(
        b: &LayerBuilder<B>,
        c_in: usize,
        planes: usize,
        stride: usize,
        zero_init: bool,
    ) -> Self {
        let out = planes * Self::EXPANSION;
        let mut bn3 = b.norm(out);
        if zero_init {
            for bn in &mut bn3.norms {
                bn.gamma = Initializer::Zeros.init([out], b.device);
            }
        }
        Self {
            conv1: b.conv([c_in, planes], 1, 1),
            bn1: b.norm(planes),
            conv2: b.conv([planes, planes], 3, stride),
            bn2: b.norm(planes),
            conv3: b.conv([planes, out], 1, 1),
            bn3,
            shortcut: shortcut(b, [c_in, out], stride, true),
        }
    }
}

impl<B: Backend> Bottleneck<B> {
    /// Applies the block with the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, 4 · planes, H / stride, W / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = (self.bn1).forward_act(self.conv1.forward(x.clone()), None, true);
        let out = (self.bn2).forward_act(self.conv2.forward(out), None, true);
        let shortcut = residual(&self.shortcut, x);
        (self.bn3).forward_act(self.conv3.forward(out), Some(shortcut), true)
    }
}

/// A residual block of a [`ResNet`].
// A few blocks per model: the padding of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Block<B: Backend> {
    /// A [`BasicBlock`] (ResNet-18).
    Basic(BasicBlock<B>),
    /// A [`Bottleneck`] (ResNet-50).
    Bottleneck(Bottleneck<B>),
}

impl<B: Backend> Block<B> {
    /// Applies the block with the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, C_out, H / stride, W / stride]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Block::Basic(block) => block.forward(x),
            Block::Bottleneck(block) => block.forward(x),
        }
    }
}

/// The final linear layer: masked (CIFAR) or plain and shared (ImageNet).
// Built once per model: the padding of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Classifier<B: Backend> {
    /// A masked linear layer, prunable per sub-net.
    Masked(MaskedLinear<B>),
    /// A plain linear layer shared by all sub-nets.
    Plain(Linear<B>),
}

impl<B: Backend> Classifier<B> {
    /// Logits of pooled features.
    ///
    /// # Shapes
    /// - input `[batch, features]`
    /// - output `[batch, classes]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Classifier::Masked(linear) => linear.forward(x),
            Classifier::Plain(linear) => linear.forward(x),
        }
    }
}

/// Which residual block a [`ResNet`] stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// [`BasicBlock`], expansion 1.
    Basic,
    /// [`Bottleneck`], expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a stage per its base width.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The input stem of a [`ResNet`], and with it the rest of the recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 32×32 inputs: plain 3×3 convolution 3→64 (stride 1) and BatchNorm; average pooling 4
    /// (global on the final 4×4 map); masked classifier; convolutions Kaiming-normal fan-out.
    Cifar,
    /// 224×224 inputs: plain 7×7/2 convolution 3→64 (padding 3), BatchNorm, ReLU, 3×3/2 max
    /// pooling (padding 1); average pooling 7 (global on the final 7×7 map); plain classifier;
    /// convolutions Kaiming-normal fan-in; the last BatchNorm γ of every bottleneck zero in
    /// every sub-net.
    ImageNet,
}

impl Stem {
    /// Kernel (and stride) of the average pooling before the classifier.
    pub fn pool_size(self) -> usize {
        match self {
            Stem::Cifar => 4,
            Stem::ImageNet => 7,
        }
    }
}

/// Configuration of a [`ResNet`] with stages of 64, 128, 256, 512 base channels (strides
/// 1, 2, 2, 2).
#[derive(Config, Debug)]
pub struct ResNetConfig {
    /// Output classes.
    pub num_classes: usize,
    /// Number of sub-nets `K`.
    pub subnets: usize,
    /// The residual block.
    pub block: BlockKind,
    /// Blocks in each of the four stages.
    pub blocks_per_stage: [usize; 4],
    /// The stem (and the recipe that comes with it).
    pub stem: Stem,
}

impl ResNetConfig {
    /// ResNet-18 for CIFAR: basic blocks `[2, 2, 2, 2]`, CIFAR stem.
    pub fn resnet18_cifar(num_classes: usize, subnets: usize) -> Self {
        Self::new(
            num_classes,
            subnets,
            BlockKind::Basic,
            [2, 2, 2, 2],
            Stem::Cifar,
        )
    }

    /// ResNet-50 for CIFAR: bottlenecks `[3, 4, 6, 3]`, CIFAR stem.
    pub fn resnet50_cifar(num_classes: usize, subnets: usize) -> Self {
        Self::new(
            num_classes,
            subnets,
            BlockKind::Bottleneck,
            [3, 4, 6, 3],
            Stem::Cifar,
        )
    }

    /// ResNet-50 for ImageNet: bottlenecks `[3, 4, 6, 3]`, ImageNet stem.
    pub fn resnet50_imagenet(num_classes: usize, subnets: usize) -> Self {
        Self::new(
            num_classes,
            subnets,
            BlockKind::Bottleneck,
            [3, 4, 6, 3],
            Stem::ImageNet,
        )
    }

    /// Builds the model with every sub-net dense and a new [`SubnetSwitch`] set to sub-net 0.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResNet<B> {
        let switch = SubnetSwitch::new();
        let imagenet = self.stem == Stem::ImageNet;
        let b = LayerBuilder {
            switch: &switch,
            subnets: self.subnets,
            fan_out: !imagenet,
            device,
        };
        let conv1 = match self.stem {
            Stem::Cifar => b.plain_conv([3, 64], 3, 1),
            Stem::ImageNet => b.plain_conv([3, 64], 7, 2),
        };
        let mut c_in = 64;
        let mut blocks = Vec::new();
        for (stage, &count) in self.blocks_per_stage.iter().enumerate() {
            let planes = 64 << stage;
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(match self.block {
                    BlockKind::Basic => {
                        Block::Basic(BasicBlock::new(&b, [c_in, planes], stride, true))
                    }
                    BlockKind::Bottleneck => {
                        Block::Bottleneck(Bottleneck::new(&b, c_in, planes, stride, imagenet))
                    }
                });
                c_in = planes * self.block.expansion();
            }
        }
        let fc = match self.stem {
            Stem::Cifar => Classifier::Masked(b.linear(c_in, self.num_classes)),
            Stem::ImageNet => {
                Classifier::Plain(LinearConfig::new(c_in, self.num_classes).init(device))
            }
        };
        ResNet {
            conv1,
            bn1: b.plain_norm(64),
            blocks,
            fc,
            stem: self.stem,
            switch,
        }
    }
}

/// ResNet-18/50 for AST (see [`ResNetConfig`]).
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    /// Plain stem convolution.
    pub conv1: Conv2d<B>,
    /// Plain stem BatchNorm.
    pub bn1: BatchNorm<B>,
    /// The residual blocks of all four stages, in order.
    pub blocks: Vec<Block<B>>,
    /// The classifier.
    pub fc: Classifier<B>,
    /// The stem variant.
    #[module(skip)]
    pub stem: Stem,
    /// Selects the active sub-net in every masked layer and switchable BatchNorm.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl<B: Backend> ResNet<B> {
    /// The handle selecting the active sub-net.
    pub fn switch(&self) -> &SubnetSwitch {
        &self.switch
    }
}

impl<B: Backend> ResNet<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, H, W]` with `H = W = 32` ([`Stem::Cifar`]) or `224`
    ///   ([`Stem::ImageNet`]): the final average pooling expects a 4×4 resp. 7×7 map
    /// - output `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = batch_norm_act(&self.bn1, plain_conv2d(&self.conv1, x), None, true);
        let x = match self.stem {
            Stem::Cifar => x,
            Stem::ImageNet => max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false),
        };
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        let p = self.stem.pool_size();
        let x = avg_pool2d(x, [p, p], [p, p], [0, 0], true, false);
        self.fc.forward(x.flatten(1, 3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{
        assert_counts, assert_one_ast_step_moves_only_the_active_weights, assert_subnets_differ,
        device, images, AD, TB,
    };
    use ast_core::{AstConfig, AstStep, SubnetTarget};

    fn gammas(bn: &SwitchableBatchNorm<TB>) -> Vec<f32> {
        bn.norms
            .iter()
            .flat_map(|n| n.gamma.val().into_data().to_vec::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn resnet18_counts_match_the_original_model() {
        let model = ResNetConfig::resnet18_cifar(10, 3).init::<TB>(&device());
        assert_counts(&model, (11_192_906, 20, 11_162_624));
    }

    #[test]
    fn resnet50_cifar_counts_match_the_original_model() {
        let model = ResNetConfig::resnet50_cifar(10, 3).init::<TB>(&device());
        assert_counts(&model, (23_626_826, 53, 23_465_984));
    }

    #[test]
    fn resnet50_imagenet_counts_match_the_original_model() {
        let model = ResNetConfig::resnet50_imagenet(1000, 3).init::<TB>(&device());
        assert_counts(&model, (25_663_016, 52, 23_445_504));
    }

    #[test]
    fn cifar_forward_gives_logits_for_a_cifar_batch() {
        let device = device();
        for config in [
            ResNetConfig::resnet18_cifar(10, 3),
            ResNetConfig::resnet50_cifar(100, 3),
        ] {
            let model = config.init::<TB>(&device);
            assert_eq!(
                model.forward(images(2, 32, 1)).dims(),
                [2, config.num_classes]
            );
        }
    }

    #[test]
    fn imagenet_forward_gives_logits_for_a_224_image() {
        let model = ResNetConfig::resnet50_imagenet(1000, 3).init::<TB>(&device());
        assert_eq!(model.forward(images(1, 224, 1)).dims(), [1, 1000]);
    }

    #[test]
    fn imagenet_bottlenecks_start_with_zero_last_bn_gamma_in_every_subnet() {
        let bn3 = |config: ResNetConfig| {
            let model = config.init::<TB>(&device());
            let blocks: Vec<Vec<f32>> = model
                .blocks
                .iter()
                .map(|b| match b {
                    Block::Bottleneck(b) => gammas(&b.bn3),
                    Block::Basic(_) => unreachable!("ResNet-50 has bottlenecks"),
                })
                .collect();
            assert_eq!(blocks.len(), 16);
            blocks
        };
        assert!(bn3(ResNetConfig::resnet50_imagenet(10, 3))
            .iter()
            .all(|g| g.iter().all(|&v| v == 0.0)));
        assert!(bn3(ResNetConfig::resnet50_cifar(10, 3))
            .iter()
            .all(|g| g.iter().all(|&v| v == 1.0)));
    }

    #[test]
    fn one_ast_step_of_resnet18_moves_only_the_active_weights() {
        let model = ResNetConfig::resnet18_cifar(10, 3).init::<AD>(&device());
        let switch = model.switch().clone();
        assert_one_ast_step_moves_only_the_active_weights(model, &switch, |m, x| m.forward(x), 32);
    }

    #[test]
    fn one_ast_step_of_resnet50_cifar_moves_only_the_active_weights() {
        let model = ResNetConfig::resnet50_cifar(10, 3).init::<AD>(&device());
        let switch = model.switch().clone();
        assert_one_ast_step_moves_only_the_active_weights(model, &switch, |m, x| m.forward(x), 32);
    }

    #[test]
    fn one_ast_step_of_resnet50_imagenet_at_224_moves_only_the_active_weights() {
        let model = ResNetConfig::resnet50_imagenet(10, 3).init::<AD>(&device());
        let switch = model.switch().clone();
        assert_one_ast_step_moves_only_the_active_weights(model, &switch, |m, x| m.forward(x), 224);
    }

    #[test]
    fn subnets_with_different_masks_differ_and_switching_back_is_exact() {
        let model = ResNetConfig::resnet18_cifar(10, 3).init::<TB>(&device());
        let switch = model.switch().clone();
        assert_subnets_differ(model, &switch, |m, x| m.forward(x));
    }

    #[test]
    fn every_masked_layer_of_resnet18_accepts_2_4_1_4_and_1_8() {
        let model = ResNetConfig::resnet18_cifar(10, 3).init::<AD>(&device());
        let targets = [(2, 4), (1, 4), (1, 8)]
            .map(|(n, m)| SubnetTarget::Nm { n, m })
            .to_vec();
        let ast =
            AstStep::<AD>::new(AstConfig::new(targets), &model, model.switch(), 1, 10).unwrap();
        assert_eq!(ast.layers().len(), 20);
        assert!(ast
            .layers()
            .iter()
            .all(|l| l.shape[l.input_axis()] % 8 == 0));
    }
}
