//! Images per second of the AST training step (switch, forward, cross-entropy, backward,
//! gradient masking, masked SGD) for ResNet-32 and wide ResNet-32 on Flex, the counterpart of
//! `torch_ast_step.py` (PyTorch CPU baseline).
//!
//! ```sh
//! cargo bench -p ast-models --bench train_step -- [batch] [steps]
//! ```
//! Masks are updated outside the timed window (they change once per ~1000 iterations).

use std::time::Instant;

use ast_core::{AstConfig, AstStep, CorrectionMode, MaskScheduleConfig, SubnetTarget};
use ast_models::{AstModel, ModelKind};
use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

type B = Autodiff<Flex>;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let batch = args.first().copied().unwrap_or(128);
    let steps = args.get(1).copied().unwrap_or(6);
    let device = Default::default();
    B::seed(&device, 0);
    for kind in [ModelKind::Resnet32, ModelKind::WideResnet32] {
        let model = AstModel::<B>::new(kind, 10, 3, &device);
        let switch = model.switch().clone();
        let mut config = AstConfig::new(vec![
            SubnetTarget::Density(0.1),
            SubnetTarget::Density(0.05),
            SubnetTarget::Density(0.02),
        ]);
        config.correction = CorrectionMode::Off;
        config.schedule = MaskScheduleConfig {
            update_frequency: 1_000_000,
            ..Default::default()
        };
        let mut ast =
            AstStep::<B>::new(config, &model, &switch, 1000, 100_000).expect("valid config");
        let mut model = model;
        let x = Tensor::<B, 4>::random(
            [batch, 3, 32, 32],
            burn::tensor::Distribution::Default,
            &device,
        );
        let y = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                (0..batch as i64).map(|i| i % 10).collect::<Vec<_>>(),
                [batch],
            ),
            &device,
        );
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let mut times = Vec::new();
        for i in 0..steps + 1 {
            let start = Instant::now();
            ast.begin();
            let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
            model = ast.step(model, loss.backward(), 0.1).0;
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "model={} batch={batch} threads={} median_step_s={median:.3} images_per_s={:.1}",
            kind,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            batch as f64 / median
        );
    }
}
