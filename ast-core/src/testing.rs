//! A tiny AST model and a learnable synthetic image task, for tests, examples and benchmarks.
//!
//! Not a model zoo (that is `ast-models`): just enough network to exercise every piece of the
//! method quickly and deterministically.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::PaddingConfig2d;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;

use crate::config::{AstConfig, MaskScheduleConfig, SubnetTarget};
use crate::layers::{
    MaskedConv2d, MaskedConv2dConfig, MaskedLinear, MaskedLinearConfig, SubnetSwitch,
    SwitchableBatchNorm, SwitchableBatchNormConfig,
};
use crate::rng::MaskRng;
use crate::step::{AstStep, Iteration, StepReport};

/// Side of the synthetic images.
pub const SIDE: usize = 8;
/// Classes of the synthetic task.
pub const CLASSES: usize = 4;

/// A plain stem conv, two masked convs with switchable BatchNorm, a masked linear head.
#[derive(Module, Debug)]
pub struct TinyNet<B: Backend> {
    stem: Conv2d<B>,
    conv1: MaskedConv2d<B>,
    bn1: SwitchableBatchNorm<B>,
    conv2: MaskedConv2d<B>,
    bn2: SwitchableBatchNorm<B>,
    head: MaskedLinear<B>,
}

impl<B: Backend> TinyNet<B> {
    /// `subnets` sub-nets switched by `switch`.
    pub fn new(subnets: usize, switch: &SubnetSwitch, device: &B::Device) -> Self {
        let conv = |c_in, c_out, stride| {
            MaskedConv2dConfig::new([c_in, c_out], [3, 3])
                .with_subnets(subnets)
                .with_stride([stride, stride])
                .with_padding([1, 1])
                .init(switch, device)
        };
        let bn = |c| {
            SwitchableBatchNormConfig::new(c)
                .with_subnets(subnets)
                .init(switch, device)
        };
        Self {
            stem: Conv2dConfig::new([1, 8], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
            conv1: conv(8, 16, 2),
            bn1: bn(16),
            conv2: conv(16, 16, 1),
            bn2: bn(16),
            head: MaskedLinearConfig::new(16, CLASSES)
                .with_subnets(subnets)
                .init(switch, device),
        }
    }

    /// Logits `[batch, CLASSES]` of images `[batch, 1, SIDE, SIDE]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = relu(self.stem.forward(x));
        let x = relu(self.bn1.forward(self.conv1.forward(x)));
        let x = relu(self.bn2.forward(self.conv2.forward(x)));
        let [b, c, h, w] = x.dims();
        let pooled = x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]);
        self.head.forward(pooled)
    }
}

/// A batch of the synthetic task, fully determined by `seed`: class 0/1 is a bright row near the
/// top/bottom, class 2/3 a bright column near the left/right, under uniform noise in `±0.5`.
pub fn synthetic_batch<B: Backend>(
    batch: usize,
    seed: u64,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let mut rng = MaskRng::new(seed, 0x5EED);
    let mut pixels = Vec::with_capacity(batch * SIDE * SIDE);
    let mut labels = Vec::with_capacity(batch);
    for _ in 0..batch {
        let label = (rng.next_u64() % CLASSES as u64) as usize;
        let line = if label.is_multiple_of(2) { 1 } else { SIDE - 2 };
        for r in 0..SIDE {
            for c in 0..SIDE {
                let on = if label < 2 { r == line } else { c == line };
                let noise = rng.next_f64() as f32 - 0.5;
                pixels.push(if on { 1.0 } else { 0.0 } + noise);
            }
        }
        labels.push(label as i64);
    }
    (
        Tensor::from_data(TensorData::new(pixels, [batch, 1, SIDE, SIDE]), device),
        Tensor::from_data(TensorData::new(labels, [batch]), device),
    )
}

/// The AST config of the tiny-model tests: a ramp over epochs 0..3, mask events every 4 own
/// iterations, sub-net offset 2, weight decay 1e-4, mask seed 11.
pub fn tiny_config(subnets: Vec<SubnetTarget>) -> AstConfig {
    let mut config = AstConfig::new(subnets);
    config.schedule = MaskScheduleConfig {
        update_frequency: 6,
        init_prune_epoch: 0,
        final_prune_epoch: 3,
        subnet_offset: 2,
        ..MaskScheduleConfig::default()
    };
    config.sgd.weight_decay = 1e-4;
    config.seed = 11;
    config
}

/// Trains [`TinyNet`] for `steps` AST iterations (10 per epoch, batch 16, lr 0.05) after seeding
/// the backend with `seed`; returns the model, the losses and the step reports.
///
/// The weights are drawn from the backend's process-wide generator: two runs are bit-identical
/// only if nothing else draws from it meanwhile (run such comparisons in their own process).
pub fn train_tiny<B: AutodiffBackend>(
    config: AstConfig,
    steps: usize,
    seed: u64,
    device: &B::Device,
) -> (TinyNet<B>, Vec<f32>, Vec<StepReport>) {
    train_tiny_by(
        config,
        steps,
        seed,
        device,
        |ast, model, grads, iteration, lr| ast.step_params(model, grads, iteration, lr),
    )
}

/// [`train_tiny`] with a burn optimizer of the caller's in place of the configured one
/// ([`AstStep::step_with`]).
pub fn train_tiny_with<B: AutodiffBackend, O: Optimizer<TinyNet<B>, B>>(
    config: AstConfig,
    steps: usize,
    seed: u64,
    device: &B::Device,
    optimizer: &mut O,
) -> (TinyNet<B>, Vec<f32>, Vec<StepReport>) {
    train_tiny_by(
        config,
        steps,
        seed,
        device,
        |ast, model, grads, iteration, lr| ast.step_with(model, grads, iteration, lr, optimizer),
    )
}

fn train_tiny_by<B: AutodiffBackend>(
    config: AstConfig,
    steps: usize,
    seed: u64,
    device: &B::Device,
    mut step: impl FnMut(
        &mut AstStep<B>,
        TinyNet<B>,
        GradientsParams,
        Iteration,
        f64,
    ) -> (TinyNet<B>, StepReport),
) -> (TinyNet<B>, Vec<f32>, Vec<StepReport>) {
    B::seed(device, seed);
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(config.subnets.len(), &switch, device);
    let mut ast = AstStep::new(config, &model, &switch, 10, steps).expect("valid tiny config");
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let (mut losses, mut reports) = (Vec::new(), Vec::new());
    for t in 0..steps {
        let iteration = ast.begin();
        let (x, y) = synthetic_batch::<B>(16, t as u64, device);
        let loss = loss_fn.forward(model.forward(x), y);
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (m, report) = step(&mut ast, model, grads, iteration, 0.05);
        model = m;
        reports.push(report);
    }
    (model, losses, reports)
}
