//! # ast-models — the model families of Alternating Sparse Training
//!
//! The networks of the AST paper's experiments, built on `ast-core`'s masked layers: every
//! prunable convolution or linear layer is a [`MaskedConv2d`](ast_core::MaskedConv2d) /
//! [`MaskedLinear`](ast_core::MaskedLinear) holding one dense weight and `K` masks, and every
//! BatchNorm after a masked layer is a [`SwitchableBatchNorm`](ast_core::SwitchableBatchNorm).
//! Each model creates one [`SubnetSwitch`], shares it with all its
//! layers and exposes it through `switch()`.
//!
//! | model | module | masked layers | prunable weights |
//! |---|---|---|---|
//! | ResNet-20/32/56 | [`resnet_cifar`] | 21 / 33 / 57 | 270 464 / 464 000 / 851 072 |
//! | wide ResNet-32 | [`resnet_cifar`] | 33 | 1 854 720 |
//! | ResNet-18 / ResNet-50 (CIFAR) | [`resnet`] | 20 / 53 | 11 162 624 / 23 465 984 |
//! | MobileNet-V1 (CIFAR) | [`mobilenet`] | 28 | 3 195 328 |
//! | ResNet-50 (ImageNet) | [`resnet`] | 52 | 23 445 504 |
//!
//! Layers outside the table's counts are plain burn layers shared by all sub-nets (the ResNet
//! stems, the shortcut BatchNorms of ResNet-20/32/56, the ImageNet classifier).
//! [`ModelKind`] names the models on a command line and builds them ([`ModelSpec`](ast_core::ModelSpec)), [`AstModel`]
//! holds any of them (each is an [`AstModule`]), and
//! [`trainable_params`] counts parameters the way the paper does (no running statistics, no
//! masks).
#![warn(missing_docs)]

mod build;
pub mod export;
pub mod mobilenet;
pub mod original;
pub mod resnet;
pub mod resnet_cifar;
pub mod small_cnn;

use ast_core::{AstModule, SubnetSwitch};
use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;

pub use mobilenet::{MobileNetV1, MobileNetV1Config};
pub use resnet::{ResNet, ResNetConfig};
pub use resnet_cifar::{CifarResNet, CifarResNetConfig};
pub use small_cnn::{SmallCnn, SmallCnnConfig};

ast_core::named_choices! {
    /// The models, by their command-line names.
    pub enum ModelKind("model") {
        /// ResNet-20 for CIFAR.
        Resnet20 = "resnet20",
        /// ResNet-32 for CIFAR.
        Resnet32 = "resnet32",
        /// ResNet-56 for CIFAR.
        Resnet56 = "resnet56",
        /// Wide ResNet-32 for CIFAR.
        WideResnet32 = "wide-resnet32",
        /// ResNet-18 with the CIFAR stem.
        Resnet18 = "resnet18",
        /// ResNet-50 with the CIFAR stem.
        Resnet50 = "resnet50",
        /// MobileNet-V1 for CIFAR.
        Mobilenetv1 = "mobilenetv1",
        /// ResNet-50 with the ImageNet stem.
        Resnet50Imagenet = "resnet50-imagenet",
        /// A small CNN for quick runs, not from the paper.
        SmallCnn = "small-cnn",
    }
}

impl ModelKind {
    /// Side of the square input images the model is built for (32 or 224).
    pub fn image_size(self) -> usize {
        match self {
            ModelKind::Resnet50Imagenet => 224,
            _ => 32,
        }
    }
}

/// Any of the models, chosen at run time.
#[derive(Module, Debug)]
pub enum AstModel<B: Backend> {
    /// ResNet-20/32/56 or wide ResNet-32.
    CifarResNet(CifarResNet<B>),
    /// ResNet-18/50 (CIFAR) or ResNet-50 (ImageNet).
    ResNet(ResNet<B>),
    /// MobileNet-V1.
    MobileNet(MobileNetV1<B>),
    /// The small quick-run CNN.
    SmallCnn(SmallCnn<B>),
}

impl<B: Backend> AstModel<B> {
    /// Builds `kind` with `num_classes` outputs and `subnets` dense sub-nets.
    pub fn new(kind: ModelKind, num_classes: usize, subnets: usize, device: &B::Device) -> Self {
        let (n, k) = (num_classes, subnets);
        match kind {
            ModelKind::Resnet20 => {
                Self::CifarResNet(CifarResNetConfig::resnet20(n, k).init(device))
            }
            ModelKind::Resnet32 => {
                Self::CifarResNet(CifarResNetConfig::resnet32(n, k).init(device))
            }
            ModelKind::Resnet56 => {
                Self::CifarResNet(CifarResNetConfig::resnet56(n, k).init(device))
            }
            ModelKind::WideResnet32 => {
                Self::CifarResNet(CifarResNetConfig::wide_resnet32(n, k).init(device))
            }
            ModelKind::Resnet18 => Self::ResNet(ResNetConfig::resnet18_cifar(n, k).init(device)),
            ModelKind::Resnet50 => Self::ResNet(ResNetConfig::resnet50_cifar(n, k).init(device)),
            ModelKind::Mobilenetv1 => Self::MobileNet(MobileNetV1Config::cifar(n, k).init(device)),
            ModelKind::Resnet50Imagenet => {
                Self::ResNet(ResNetConfig::resnet50_imagenet(n, k).init(device))
            }
            ModelKind::SmallCnn => Self::SmallCnn(SmallCnnConfig::new(n, k).init(device)),
        }
    }

    /// The handle selecting the active sub-net.
    pub fn switch(&self) -> &SubnetSwitch {
        match self {
            Self::CifarResNet(m) => m.switch(),
            Self::ResNet(m) => m.switch(),
            Self::MobileNet(m) => m.switch(),
            Self::SmallCnn(m) => m.switch(),
        }
    }
}

impl<B: Backend> AstModel<B> {
    /// Logits of the active sub-net.
    ///
    /// # Shapes
    /// - input `[batch, 3, S, S]` with `S` = [`ModelKind::image_size`]
    /// - output `[batch, num_classes]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        match self {
            Self::CifarResNet(m) => m.forward(x),
            Self::ResNet(m) => m.forward(x),
            Self::MobileNet(m) => m.forward(x),
            Self::SmallCnn(m) => m.forward(x),
        }
    }
}

/// Each built-in model, and [`AstModel`], is an [`AstModule`] through its own `forward` and
/// `switch`.
macro_rules! ast_modules {
    ($($model:ident),*) => {$(
        impl<B: Backend> AstModule<B> for $model<B> {
            fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
                $model::forward(self, images)
            }

            fn switch(&self) -> &SubnetSwitch {
                $model::switch(self)
            }
        }
    )*};
}

ast_modules!(CifarResNet, ResNet, MobileNetV1, SmallCnn, AstModel);

/// A model kind builds its model ([`AstModel`]) for runs of `ast-train`.
// Named in full: in scope, its `name(&self)` would shadow the inherent `name(self)` for the
// `&ModelKind` receivers of `named_choices!`.
impl ast_core::ModelSpec for ModelKind {
    type Model<B: Backend> = AstModel<B>;

    fn name(&self) -> &str {
        ModelKind::name(*self)
    }

    fn image_size(&self) -> usize {
        ModelKind::image_size(*self)
    }

    fn build<B: Backend>(&self, classes: usize, subnets: usize, device: &B::Device) -> AstModel<B> {
        AstModel::new(*self, classes, subnets, device)
    }
}

/// Counts float parameters, skipping BatchNorm running statistics.
#[derive(Default)]
struct TrainableCounter {
    field: Vec<(String, String)>,
    count: usize,
}

impl<B: Backend> ModuleVisitor<B> for TrainableCounter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.field
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.field.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let running = matches!(
            self.field.last(),
            Some((name, container)) if container == "Struct:BatchNorm" && name.starts_with("running_")
        );
        if !running {
            self.count += param.lazy_shape().num_elements();
        }
    }
}

/// The number of trainable parameters of `module`: every float parameter, without BatchNorm
/// running statistics (which burn's `Module::num_params` counts) and without masks (boolean).
///
/// Uses the parameters' lazy shapes, so counting does not materialise lazily initialised
/// weights.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    let mut counter = TrainableCounter::default();
    module.visit(&mut counter);
    counter.count
}

#[cfg(test)]
pub(crate) mod tests {
    //! Helpers shared by the models' tests, all on Flex.
    use super::*;
    use ast_core::subnet::{masked_layers, read_params, replace_masks, weight_vec};
    use ast_core::{AstConfig, AstStep, SubnetTarget, UpdateScope};
    use burn::module::AutodiffModule;
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::tensor::Distribution;
    use std::time::Instant;

    pub type TB = burn::backend::Flex;
    pub type AD = burn::backend::Autodiff<TB>;

    pub fn device() -> <TB as burn::tensor::backend::BackendTypes>::Device {
        Default::default()
    }

    /// Random normal images `[batch, 3, side, side]`, seeded.
    pub fn images<B: Backend>(batch: usize, side: usize, seed: u64) -> Tensor<B, 4> {
        let device = Default::default();
        B::seed(&device, seed);
        Tensor::random(
            [batch, 3, side, side],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
    }

    /// Checks (trainable parameters, masked layers, prunable weights).
    pub fn assert_counts<B: Backend, M: Module<B>>(model: &M, expected: (usize, usize, usize)) {
        let layers = masked_layers(model);
        let prunable: usize = layers.iter().map(|l| l.numel()).sum();
        let measured = (trainable_params(model), layers.len(), prunable);
        println!("(params, masked layers, prunable) = {measured:?}");
        assert_eq!(measured, expected);
        assert!(layers.iter().all(|l| l.mask_ids.len() == 3));
    }

    /// Pseudo-random masks keeping about half of every masked layer's weights.
    fn half_masks<B: Backend, M: Module<B>>(model: &M) -> Vec<TensorData> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        masked_layers(model)
            .iter()
            .map(|l| {
                let bits = (0..l.numel())
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        state >> 63 == 1
                    })
                    .collect::<Vec<bool>>();
                TensorData::new(bits, l.shape.clone())
            })
            .collect()
    }

    /// The masked layers' weights, flat, in layer order.
    fn masked_weights<B: Backend, M: Module<B>>(model: &M) -> Vec<Vec<f32>> {
        let ids: Vec<_> = masked_layers(model).iter().map(|l| l.weight_id).collect();
        read_params(model, &ids)
            .into_iter()
            .map(weight_vec)
            .collect()
    }

    /// One AST step of sub-net 0 (sub-nets at densities 0.5/0.2/0.1, sub-net 0 given a 50 %
    /// mask, the active update scope) on a batch of 2: the loss is finite, no weight outside
    /// the mask moves, and most weights inside it do (a gradient of exactly zero is rare).
    pub fn assert_one_ast_step_moves_only_the_active_weights<M: AutodiffModule<AD>>(
        model: M,
        switch: &SubnetSwitch,
        forward: impl Fn(&M, Tensor<AD, 4>) -> Tensor<AD, 2>,
        side: usize,
    ) {
        let start = Instant::now();
        let device = device();
        let targets = [0.5, 0.2, 0.1].map(SubnetTarget::Density).to_vec();
        let config = AstConfig {
            update_scope: UpdateScope::Active,
            ..AstConfig::new(targets)
        };
        let mut ast = AstStep::<AD>::new(config, &model, switch, 1, 10).unwrap();
        let model = ast.init_masks(model);
        let half = half_masks(&model);
        let masks: Vec<Vec<bool>> = half.iter().map(|m| m.to_vec().unwrap()).collect();
        let model = replace_masks(model, 0, half).unwrap();
        let before = masked_weights(&model);
        let iteration = ast.begin();
        assert_eq!(iteration.subnet(), 0);
        let logits = forward(&model, images(2, side, 7));
        let labels = Tensor::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits, labels);
        let value: f32 = loss.clone().into_scalar();
        assert!(value.is_finite(), "loss {value}");
        let (model, report) = ast.step(model, loss.backward(), iteration, 0.01);
        assert_eq!((report.subnet, report.mask_update), (0, None));
        let after = masked_weights(&model);
        let (mut inside, mut moved) = (0, 0);
        for ((mask, b), a) in masks.iter().zip(&before).zip(&after) {
            for ((&m, x), y) in mask.iter().zip(b).zip(a) {
                if m {
                    inside += 1;
                    moved += usize::from(x != y);
                } else {
                    assert_eq!(x.to_bits(), y.to_bits(), "a weight outside the mask moved");
                }
            }
        }
        assert!(
            moved * 2 > inside,
            "{moved} of {inside} active weights moved"
        );
        println!(
            "loss {value}, {moved} of {inside} active weights moved, step took {:?}",
            start.elapsed()
        );
    }

    /// Gives sub-net 1 a pseudo-random 50 % mask and checks, in inference mode, that its output
    /// differs from sub-net 0's and that switching back reproduces sub-net 0's bit for bit.
    pub fn assert_subnets_differ<M: Module<TB>>(
        model: M,
        switch: &SubnetSwitch,
        forward: impl Fn(&M, Tensor<TB, 4>) -> Tensor<TB, 2>,
    ) {
        let x = images::<TB>(2, 32, 3);
        let masks = half_masks(&model);
        let model = replace_masks(model, 1, masks).unwrap();
        let out = |k: usize| {
            switch.set(k);
            forward(&model, x.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let (first, other, again) = (out(0), out(1), out(0));
        assert!(first.iter().chain(&other).all(|v| v.is_finite()));
        assert_ne!(first, other);
        assert_eq!(first, again);
    }

    #[test]
    fn model_kind_names_round_trip_and_unknown_names_list_the_valid_ones() {
        for &kind in ModelKind::ALL {
            assert_eq!(kind.to_string().parse::<ModelKind>(), Ok(kind));
        }
        assert_eq!("wide-resnet32".parse(), Ok(ModelKind::WideResnet32));
        let err = "resnet19".parse::<ModelKind>().unwrap_err().to_string();
        for &kind in ModelKind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
        assert!(err.contains("`resnet19`"), "{err}");
    }

    #[test]
    fn ast_model_dispatches_to_the_chosen_model() {
        let device = device();
        let model = AstModel::<TB>::new(ModelKind::Resnet20, 10, 3, &device);
        assert!(matches!(model, AstModel::CifarResNet(_)));
        assert_eq!(masked_layers(&model).len(), 21);
        assert_eq!(model.forward(images(2, 32, 1)).dims(), [2, 10]);
        let AstModel::CifarResNet(inner) = &model else {
            unreachable!()
        };
        assert!(model.switch().same_as(inner.switch()));
        assert!(inner.blocks[0].conv1.switch.same_as(model.switch()));
        assert_eq!(ModelKind::Resnet50Imagenet.image_size(), 224);
    }
}
