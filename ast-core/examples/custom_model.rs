//! Putting ast-core's layers into your own burn model and training it with the AST step.
//!
//! ```sh
//! cargo run -p ast-core --release --example custom_model
//! ```
//! Trains two sub-nets (50 % and 10 % dense) of a small CNN on the synthetic bar-image task and
//! prints each sub-net's accuracy and density.

use ast_core::subnet::density;
use ast_core::testing::{synthetic_batch, CLASSES};
use ast_core::{
    AstConfig, AstStep, MaskScheduleConfig, MaskedConv2d, MaskedConv2dConfig, MaskedLinear,
    MaskedLinearConfig, SubnetSwitch, SwitchableBatchNorm, SwitchableBatchNormConfig,
};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Your model: masked layers where you want sparsity, a switchable BatchNorm after each, all
/// built with one shared `SubnetSwitch`.
#[derive(Module, Debug)]
struct MyNet<B: Backend> {
    conv: MaskedConv2d<B>,
    norm: SwitchableBatchNorm<B>,
    head: MaskedLinear<B>,
}

impl<B: Backend> MyNet<B> {
    fn new(subnets: usize, switch: &SubnetSwitch, device: &B::Device) -> Self {
        Self {
            conv: MaskedConv2dConfig::new([1, 16], [3, 3])
                .with_subnets(subnets)
                .with_padding([1, 1])
                .init(switch, device),
            norm: SwitchableBatchNormConfig::new(16)
                .with_subnets(subnets)
                .init(switch, device),
            head: MaskedLinearConfig::new(16, CLASSES)
                .with_subnets(subnets)
                .init(switch, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = relu(self.norm.forward(self.conv.forward(x)));
        let [b, c, h, w] = x.dims();
        self.head
            .forward(x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]))
    }
}

fn main() {
    type B = Autodiff<Flex>;
    let device = Default::default();
    B::seed(&device, 7);
    let switch = SubnetSwitch::new();
    let model = MyNet::<B>::new(2, &switch, &device);

    // Two sub-nets, 50 % and 10 % dense; a short schedule (the defaults are the original's).
    let config = AstConfig::densities(&[0.5, 0.1]).with_schedule(
        MaskScheduleConfig::default()
            .with_update_frequency(5)
            .with_final_prune_epoch(5)
            .with_subnet_offset(2),
    );
    let (steps_per_epoch, epochs) = (20, 10);
    let total = steps_per_epoch * epochs;
    let mut ast =
        AstStep::new(config, &model, &switch, steps_per_epoch, total).expect("valid config");
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    for t in 0..total {
        let iteration = ast.begin(); // switch to sub-net t mod K
        let (x, y) = synthetic_batch::<B>(32, t as u64, &device);
        let loss = loss_fn.forward(model.forward(x), y);
        let (next, report) = ast.step(model, loss.backward(), iteration, 0.05);
        model = next;
        if let Some(update) = report.mask_update {
            println!(
                "iteration {t}: sub-net {} mask update, density {:.3}",
                report.subnet, update.density
            );
        }
    }

    let eval = model.valid();
    for k in 0..2 {
        switch.set(k);
        let (x, y) = synthetic_batch::<Flex>(256, 99_999, &device);
        let correct: i32 = eval
            .forward(x)
            .argmax(1)
            .reshape([256])
            .equal(y)
            .int()
            .sum()
            .into_scalar();
        let d = density(&model, k).expect("sub-net exists");
        println!(
            "sub-net {k}: density {d:.3}, accuracy {:.3}",
            correct as f64 / 256.0
        );
    }
}
