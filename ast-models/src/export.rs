//! The models as [`ast_infer`] sees them: each forward pass as an inference [`Graph`] (the same
//! operations, BatchNorms named where they follow a convolution) and the parameters by module
//! path, which `ast_infer::export` turns into a sub-net file.
//!
//! Graphs exist for every CIFAR model (the small CNN, ResNet-20/32/56, wide ResNet-32,
//! ResNet-18/50, MobileNet-V1); the ImageNet ResNet-50 (its max-pooling stem is not in the
//! runtime) is refused with a message naming it.

use ast_core::subnet::mask_vec;
use ast_core::{MaskedConv2d, MaskedLinear, SwitchableBatchNorm};
use ast_infer::{ConvSpec, Graph, NormRef, Op, Params};
use burn::module::{ModuleVisitor, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::prelude::*;

use crate::mobilenet::MobileNetV1;
use crate::resnet::{BasicBlock, Block, Bottleneck, Classifier, Norm, ResNet, Shortcut, Stem};
use crate::resnet_cifar::CifarResNet;
use crate::small_cnn::SmallCnn;
use crate::AstModel;

/// A buffer of the graph and its shape `[C, H, W]`.
type Activation = (usize, [usize; 3]);

/// Builds a [`Graph`] operation by operation.
struct Builder {
    input: [usize; 3],
    ops: Vec<Op>,
    buffers: usize,
}

impl Builder {
    fn new(input: [usize; 3]) -> (Self, Activation) {
        let builder = Self {
            input,
            ops: Vec::new(),
            buffers: 1,
        };
        (builder, (0, input))
    }

    fn buffer(&mut self) -> usize {
        self.buffers += 1;
        self.buffers - 1
    }

    fn conv(
        &mut self,
        layer: String,
        masked: bool,
        conv: ConvSpec,
        (input, _): Activation,
        norm: Option<NormRef>,
        residual: Option<usize>,
        relu: bool,
    ) -> Activation {
        let [h, w] = conv
            .out_hw()
            .expect("the model's own convolution fits its input");
        let output = self.buffer();
        self.ops.push(Op::Conv {
            input,
            output,
            layer,
            masked,
            conv,
            norm,
            residual,
            relu,
        });
        (output, [conv.c_out, h, w])
    }

    fn masked_conv<B: Backend>(
        &mut self,
        path: &str,
        conv: &MaskedConv2d<B>,
        x: Activation,
        norm: Option<NormRef>,
        residual: Option<usize>,
        relu: bool,
    ) -> Activation {
        let spec = ConvSpec {
            padding: conv.padding,
            bias: conv.bias.is_some(),
            ..spec(&conv.weight, x, conv.stride, conv.dilation, conv.groups)
        };
        self.conv(path.into(), true, spec, x, norm, residual, relu)
    }

    fn plain_conv<B: Backend>(
        &mut self,
        path: &str,
        conv: &Conv2d<B>,
        x: Activation,
        norm: Option<NormRef>,
        relu: bool,
    ) -> Result<Activation, String> {
        let PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
            return Err(format!("`{path}`: only explicit padding is exported"));
        };
        if top != bottom || left != right {
            return Err(format!("`{path}`: only symmetric padding is exported"));
        }
        let spec = ConvSpec {
            padding: [top, left],
            bias: conv.bias.is_some(),
            ..spec(&conv.weight, x, conv.stride, conv.dilation, conv.groups)
        };
        Ok(self.conv(path.into(), false, spec, x, norm, None, relu))
    }

    fn pool(&mut self, (input, [c, _, _]): Activation) -> Activation {
        let output = self.buffer();
        self.ops.push(Op::GlobalAvgPool {
            input,
            output,
            channels: c,
        });
        (output, [c, 1, 1])
    }

    fn masked_linear<B: Backend>(
        mut self,
        path: &str,
        linear: &MaskedLinear<B>,
        x: Activation,
    ) -> Graph {
        let [d_in, d_out] = linear.weight.shape().dims();
        let output = self.buffer();
        self.ops.push(Op::Linear {
            input: x.0,
            output,
            layer: path.into(),
            masked: true,
            d_in,
            d_out,
            bias: linear.bias.is_some(),
        });
        Graph {
            input: self.input,
            classes: d_out,
            ops: self.ops,
        }
    }
}

/// The convolution of `weight` (`[C_out, C_in/groups, kh, kw]`) on activation `x`, unpadded and
/// without bias (the callers set those).
fn spec<B: Backend>(
    weight: &Param<Tensor<B, 4>>,
    x: Activation,
    stride: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> ConvSpec {
    let [c_out, cin_g, kh, kw] = weight.shape().dims();
    ConvSpec {
        c_in: cin_g * groups,
        c_out,
        in_hw: [x.1[1], x.1[2]],
        kernel: [kh, kw],
        stride,
        padding: [0, 0],
        dilation,
        groups,
        bias: false,
    }
}

fn switchable<B: Backend>(path: String, bn: &SwitchableBatchNorm<B>) -> NormRef {
    NormRef {
        path,
        switchable: true,
        epsilon: bn.norms.first().map_or(1e-5, |n| n.epsilon),
    }
}

fn shared<B: Backend>(path: String, bn: &BatchNorm<B>) -> NormRef {
    NormRef {
        path,
        switchable: false,
        epsilon: bn.epsilon,
    }
}

impl<B: Backend> SmallCnn<B> {
    /// The forward pass for `[3, H, W]` images as an inference graph.
    pub fn inference_graph(&self, hw: [usize; 2]) -> Result<Graph, String> {
        let (mut g, x) = Builder::new([3, hw[0], hw[1]]);
        let stem_norm = Some(shared("stem_norm".into(), &self.stem_norm));
        let mut x = g.plain_conv("stem", &self.stem, x, stem_norm, true)?;
        for (i, (conv, norm)) in self.convs.iter().zip(&self.norms).enumerate() {
            let norm = Some(switchable(format!("norms.{i}"), norm));
            x = g.masked_conv(&format!("convs.{i}"), conv, x, norm, None, true);
        }
        let x = g.pool(x);
        Ok(g.masked_linear("linear", &self.linear, x))
    }
}

impl<B: Backend> CifarResNet<B> {
    /// The forward pass for `[3, H, W]` images as an inference graph.
    pub fn inference_graph(&self, hw: [usize; 2]) -> Result<Graph, String> {
        let (mut g, x) = Builder::new([3, hw[0], hw[1]]);
        let mut x = g.plain_conv(
            "conv1",
            &self.conv1,
            x,
            Some(shared("bn1".into(), &self.bn1)),
            true,
        )?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = basic_block(&mut g, &format!("blocks.{i}"), block, x);
        }
        let x = g.pool(x);
        Ok(g.masked_linear("linear", &self.linear, x))
    }
}

fn basic_block<B: Backend>(
    g: &mut Builder,
    path: &str,
    block: &BasicBlock<B>,
    x: Activation,
) -> Activation {
    let shortcut = shortcut_of(g, path, &block.shortcut, x);
    let bn1 = Some(switchable(format!("{path}.bn1"), &block.bn1));
    let out = g.masked_conv(&format!("{path}.conv1"), &block.conv1, x, bn1, None, true);
    let bn2 = Some(switchable(format!("{path}.bn2"), &block.bn2));
    g.masked_conv(
        &format!("{path}.conv2"),
        &block.conv2,
        out,
        bn2,
        Some(shortcut),
        true,
    )
}

/// The shortcut of a residual block: the input itself, or its masked 1×1 convolution and
/// BatchNorm.
fn shortcut_of<B: Backend>(
    g: &mut Builder,
    path: &str,
    shortcut: &Option<Shortcut<B>>,
    x: Activation,
) -> usize {
    let Some(s) = shortcut else { return x.0 };
    let norm = match &s.norm {
        Norm::Shared(bn) => shared(format!("{path}.shortcut.norm.Shared"), bn),
        Norm::Switchable(bn) => switchable(format!("{path}.shortcut.norm.Switchable"), bn),
    };
    let conv = format!("{path}.shortcut.conv");
    g.masked_conv(&conv, &s.conv, x, Some(norm), None, false).0
}

fn bottleneck<B: Backend>(
    g: &mut Builder,
    path: &str,
    block: &Bottleneck<B>,
    x: Activation,
) -> Activation {
    let shortcut = shortcut_of(g, path, &block.shortcut, x);
    let mut out = x;
    for (i, (conv, bn)) in [(&block.conv1, &block.bn1), (&block.conv2, &block.bn2)]
        .into_iter()
        .enumerate()
    {
        let norm = Some(switchable(format!("{path}.bn{}", i + 1), bn));
        out = g.masked_conv(
            &format!("{path}.conv{}", i + 1),
            conv,
            out,
            norm,
            None,
            true,
        );
    }
    let bn3 = Some(switchable(format!("{path}.bn3"), &block.bn3));
    g.masked_conv(
        &format!("{path}.conv3"),
        &block.conv3,
        out,
        bn3,
        Some(shortcut),
        true,
    )
}

/// The global average pooling a model's fixed `pool`×`pool` average pooling is on the input
/// size it was built for; an error naming the size otherwise.
fn global_pool(
    g: &mut Builder,
    x: Activation,
    pool: usize,
    hw: [usize; 2],
) -> Result<Activation, String> {
    let [_, h, w] = x.1;
    if [h, w] != [pool, pool] {
        return Err(format!(
            "on {}×{} images the last feature map is {h}×{w}, not the {pool}×{pool} the model \
             pools: export it for the image size it was trained on",
            hw[0], hw[1]
        ));
    }
    Ok(g.pool(x))
}

impl<B: Backend> ResNet<B> {
    /// The forward pass for `[3, H, W]` images as an inference graph (the CIFAR stem; the
    /// ImageNet stem's max pooling is not in the runtime).
    pub fn inference_graph(&self, hw: [usize; 2]) -> Result<Graph, String> {
        if self.stem == Stem::ImageNet {
            return Err(not_yet("the ImageNet ResNet-50 (its max-pooling stem)"));
        }
        let Classifier::Masked(fc) = &self.fc else {
            return Err(not_yet("a ResNet with a plain classifier"));
        };
        let (mut g, x) = Builder::new([3, hw[0], hw[1]]);
        let bn1 = Some(shared("bn1".into(), &self.bn1));
        let mut x = g.plain_conv("conv1", &self.conv1, x, bn1, true)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = match block {
                Block::Basic(b) => basic_block(&mut g, &format!("blocks.{i}.Basic"), b, x),
                Block::Bottleneck(b) => bottleneck(&mut g, &format!("blocks.{i}.Bottleneck"), b, x),
            };
        }
        let x = global_pool(&mut g, x, self.stem.pool_size(), hw)?;
        Ok(g.masked_linear("fc.Masked", fc, x))
    }
}

impl<B: Backend> MobileNetV1<B> {
    /// The forward pass for `[3, H, W]` images as an inference graph.
    pub fn inference_graph(&self, hw: [usize; 2]) -> Result<Graph, String> {
        let (mut g, x) = Builder::new([3, hw[0], hw[1]]);
        let bn1 = Some(switchable("bn1".into(), &self.bn1));
        let mut x = g.masked_conv("conv1", &self.conv1, x, bn1, None, true);
        for (i, block) in self.blocks.iter().enumerate() {
            let path = format!("blocks.{i}");
            let bn1 = Some(switchable(format!("{path}.bn1"), &block.bn1));
            x = g.masked_conv(
                &format!("{path}.depthwise"),
                &block.depthwise,
                x,
                bn1,
                None,
                true,
            );
            let bn2 = Some(switchable(format!("{path}.bn2"), &block.bn2));
            x = g.masked_conv(
                &format!("{path}.pointwise"),
                &block.pointwise,
                x,
                bn2,
                None,
                true,
            );
        }
        let x = global_pool(&mut g, x, 2, hw)?;
        Ok(g.masked_linear("linear", &self.linear, x))
    }
}

impl<B: Backend> AstModel<B> {
    /// The forward pass for `[3, H, W]` images as an inference graph, or why this model has
    /// none yet.
    pub fn inference_graph(&self, hw: [usize; 2]) -> Result<Graph, String> {
        match self {
            Self::CifarResNet(m) => m.inference_graph(hw),
            Self::SmallCnn(m) => m.inference_graph(hw),
            Self::ResNet(m) => m.inference_graph(hw),
            Self::MobileNet(m) => m.inference_graph(hw),
        }
    }

    /// Every parameter, buffer and mask by its path in the model (the paths of
    /// [`AstModel::inference_graph`]).
    pub fn export_params(&self) -> Params {
        match self {
            Self::CifarResNet(m) => params(m),
            Self::ResNet(m) => params(m),
            Self::MobileNet(m) => params(m),
            Self::SmallCnn(m) => params(m),
        }
    }
}

fn not_yet(model: &str) -> String {
    format!(
        "exporting {model} is not built yet (every CIFAR model is): use the checkpoint with \
         ast-cli eval"
    )
}

/// Collects float tensors and masks by dotted module path.
#[derive(Default)]
struct Collector {
    path: Vec<String>,
    params: Params,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let values = param
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 after conversion");
        self.params.floats.insert(self.path.join("."), values);
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        let mask = mask_vec(param.val().into_data());
        self.params.masks.insert(self.path.join("."), mask);
    }
}

/// The float tensors and masks of `model` by dotted module path (`blocks.0.conv1.weight`,
/// `blocks.0.conv1.masks.2`).
pub fn params<B: Backend, M: Module<B>>(model: &M) -> Params {
    let mut collector = Collector::default();
    model.visit(&mut collector);
    collector.params
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mobilenet::MobileNetV1Config;
    use crate::resnet::ResNetConfig;
    use crate::resnet_cifar::CifarResNetConfig;
    use crate::small_cnn::SmallCnnConfig;
    use crate::tests::{device, images, TB};
    use ast_core::subnet::{masked_layers, replace_masks};
    use ast_core::SubnetSwitch;
    use ast_infer::{InferError, InferenceModel, SubnetInfo, Values};
    use burn::module::ModuleMapper;

    /// Gives every 1-D float (BatchNorm γ, β, running statistics, biases) distinct positive
    /// values, so that folding the BatchNorms is tested on more than γ = 1, β = 0, μ = 0.
    pub(crate) struct Perturb(pub(crate) u64);

    impl<B: Backend> ModuleMapper<B> for Perturb {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if D != 1 {
                return param;
            }
            param.map(|t| {
                let n = t.shape().num_elements();
                let values: Vec<f32> = (0..n)
                    .map(|_| {
                        self.0 = self
                            .0
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        0.5 + (self.0 >> 40) as f32 / (1u64 << 24) as f32
                    })
                    .collect();
                Tensor::from_data(TensorData::new(values, t.shape()), &t.device())
            })
        }
    }

    /// Sub-net `k` of `K` keeps about `1/(k + 2)` of every masked layer's weights.
    pub(crate) fn random_masks<M: Module<TB>>(mut model: M, subnets: usize) -> M {
        let mut state = 7u64;
        for k in 0..subnets {
            let masks = masked_layers(&model)
                .iter()
                .map(|l| {
                    let bits: Vec<bool> = (0..l.numel())
                        .map(|_| {
                            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                            (state >> 33).is_multiple_of(k as u64 + 2)
                        })
                        .collect();
                    TensorData::new(bits, l.shape.clone())
                })
                .collect();
            model = replace_masks(model, k, masks).unwrap();
        }
        model
    }

    fn infos(subnets: usize) -> Vec<SubnetInfo> {
        (0..subnets)
            .map(|k| SubnetInfo {
                trained_index: k,
                target: format!("{}", 1.0 / (k as f64 + 2.0)),
                density: 0.0,
                top1: None,
                top5: None,
                evaluated_on: None,
            })
            .collect()
    }

    /// Exports every sub-net of `model` and checks that the runtime's logits equal the burn
    /// model's (inference mode) for each, within `tolerance` relative to the largest logit.
    fn assert_runtime_equals_model(
        model: AstModel<TB>,
        subnets: usize,
        values: Values,
        tolerance: f32,
    ) {
        let switch: SubnetSwitch = model.switch().clone();
        let graph = model.inference_graph([32, 32]).unwrap();
        let (bytes, header) = ast_infer::export(
            "test",
            &graph,
            &model.export_params(),
            infos(subnets),
            values,
            serde_json::Value::Null,
        )
        .unwrap();
        assert_eq!(header.subnets.len(), subnets);
        let runtime = InferenceModel::from_bytes(&bytes).unwrap();
        let x = images::<TB>(3, 32, 11);
        let pixels = x.clone().into_data().to_vec::<f32>().unwrap();
        for k in 0..subnets {
            switch.set(k);
            let expected = model
                .forward(x.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let got = runtime.forward_subnet(k, &pixels, 3).unwrap();
            let scale = expected.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&expected)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(
                err <= tolerance,
                "sub-net {k}: relative error {err}\n{got:?}\n{expected:?}"
            );
            // One image at a time gives the same logits as the batch.
            let one = runtime
                .forward_subnet(k, &pixels[..3 * 32 * 32], 1)
                .unwrap();
            assert_eq!(one, got[..one.len()]);
            // The per-layer profile: every step, with the pass's multiply-adds.
            let steps = runtime.profile(k, 2).unwrap();
            assert_eq!(steps.len(), graph.ops.len());
            let work: u64 = steps.iter().map(|s| s.multiply_adds).sum();
            assert_eq!(work, runtime.multiply_adds(k).unwrap());
            let forms = ["sparse", "direct", "im2col", "pool", "dense"];
            assert!(steps
                .iter()
                .all(|s| forms.contains(&s.form) && s.median_us.is_finite()));
        }
        // The density recorded is the masks' (sub-net 0 keeps about half).
        assert!(
            (header.subnets[0].density - 0.5).abs() < 0.02,
            "{:?}",
            header.subnets[0]
        );
    }

    #[test]
    fn small_cnn_sub_nets_through_the_runtime_equal_the_model() {
        let model = SmallCnnConfig::new(10, 3).init::<TB>(&device());
        let model = random_masks(model, 3).map(&mut Perturb(1));
        assert_runtime_equals_model(AstModel::SmallCnn(model), 3, Values::F32, 1e-4);
    }

    #[test]
    fn cifar_resnets_through_the_runtime_equal_the_model() {
        // ResNet-20 (shared shortcut BatchNorms) and the wide ResNet-32 (switchable ones).
        for config in [
            CifarResNetConfig::resnet20(10, 2),
            CifarResNetConfig::wide_resnet32(10, 2),
        ] {
            let model = random_masks(config.init::<TB>(&device()), 2).map(&mut Perturb(2));
            assert_runtime_equals_model(AstModel::CifarResNet(model), 2, Values::F32, 1e-4);
        }
    }

    #[test]
    fn resnet18_50_and_mobilenet_through_the_runtime_equal_the_model() {
        // Basic and bottleneck blocks with switchable shortcut BatchNorms, and the depthwise
        // (grouped) convolutions of MobileNet-V1.
        let device = device();
        for model in [
            AstModel::ResNet(ResNetConfig::resnet18_cifar(10, 2).init::<TB>(&device)),
            AstModel::ResNet(ResNetConfig::resnet50_cifar(10, 2).init::<TB>(&device)),
            AstModel::MobileNet(MobileNetV1Config::cifar(10, 2).init::<TB>(&device)),
        ] {
            let model = random_masks(model, 2).map(&mut Perturb(4));
            assert_runtime_equals_model(model, 2, Values::F32, 1e-4);
        }
    }

    #[test]
    fn half_precision_values_stay_close() {
        let model = SmallCnnConfig::new(10, 2).init::<TB>(&device());
        let model = random_masks(model, 2).map(&mut Perturb(3));
        for values in [Values::F16, Values::Bf16] {
            let tolerance = if values == Values::F16 { 5e-3 } else { 3e-2 };
            assert_runtime_equals_model(AstModel::SmallCnn(model.clone()), 2, values, tolerance);
        }
    }

    #[test]
    fn models_without_a_graph_are_refused_by_name() {
        let model = AstModel::<TB>::new(crate::ModelKind::Resnet50Imagenet, 10, 1, &device());
        let err = model.inference_graph([224, 224]).unwrap_err();
        assert!(
            err.contains("exporting the ImageNet ResNet-50 (its max-pooling stem) is not built"),
            "{err}"
        );
        // A CIFAR model on images of another size: its fixed pooling would not be global.
        let model = AstModel::<TB>::new(crate::ModelKind::Mobilenetv1, 10, 1, &device());
        let err = model.inference_graph([64, 64]).unwrap_err();
        assert!(
            err.contains("on 64×64 images the last feature map is 4×4, not the 2×2"),
            "{err}"
        );
        let _ = InferError::Foreign;
    }
}
