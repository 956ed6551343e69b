//! A small masked CNN with three sub-nets (densities 0.5 / 0.2 / 0.1) learns the synthetic task:
//! every sub-net reaches ≥ 90 % accuracy on the training distribution.

use ast_core::subnet::density;
use ast_core::testing::{synthetic_batch, TinyNet};
use ast_core::{AstConfig, AstStep, MaskScheduleConfig, SubnetSwitch, SubnetTarget};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

type B = Autodiff<Flex>;

#[test]
fn three_subnets_each_reach_ninety_percent_train_accuracy() {
    let device = Default::default();
    B::seed(&device, 0);
    let targets = vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.2),
        SubnetTarget::Density(0.1),
    ];
    let mut config = AstConfig::new(targets.clone());
    // 20 iterations per epoch, 15 epochs; ramp over epochs 0..8, mask updates every 5 own steps.
    config.schedule = MaskScheduleConfig {
        update_frequency: 5,
        init_prune_epoch: 0,
        final_prune_epoch: 8,
        subnet_offset: 2,
        ..MaskScheduleConfig::default()
    };
    config.sgd.weight_decay = 1e-4;
    let (steps_per_epoch, epochs) = (20, 15);
    let total = steps_per_epoch * epochs;
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(3, &switch, &device);
    let mut ast = AstStep::new(config, &model, &switch, steps_per_epoch, total).unwrap();
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for t in 0..total {
        let iteration = ast.begin();
        let (x, y) = synthetic_batch::<B>(32, t as u64, &device);
        let loss = loss_fn.forward(model.forward(x), y);
        let lr = 0.05 * 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos());
        model = ast.step(model, loss.backward(), iteration, lr).0;
    }
    let eval = model.valid();
    for (k, target) in targets.iter().enumerate() {
        switch.set(k);
        let (x, y) = synthetic_batch::<Flex>(512, 1_000_000 + k as u64, &device);
        let predicted = eval.forward(x).argmax(1).reshape([512]);
        let correct: i32 = predicted.equal(y).int().sum().into_scalar();
        let accuracy = correct as f64 / 512.0;
        let d = density(&model, k).unwrap();
        println!("sub-net {k}: density {d:.3}, accuracy {accuracy:.3}");
        assert!(
            (d - target.density()).abs() < 0.01,
            "sub-net {k} density {d}"
        );
        assert!(accuracy >= 0.9, "sub-net {k} accuracy {accuracy}");
    }
}
