//! One AST step against one plain dense step of the same small model on Flex, and the mask
//! memory per sub-net.
//!
//! ```sh
//! cargo bench -p ast-core --bench step
//! ```
//! The dense step is the same model with every mask all-ones and burn's own SGD (momentum 0.9,
//! dampening 0) — what a user would run without AST. Prints median seconds per step over the
//! repetitions and the ratio AST / dense.

use std::time::Instant;

use ast_core::subnet::masked_layers;
use ast_core::testing::{synthetic_batch, TinyNet};
use ast_core::{
    AstConfig, AstStep, CorrectionMode, MaskScheduleConfig, SubnetSwitch, SubnetTarget,
};
use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;

type B = Autodiff<Flex>;
const BATCH: usize = 64;
const WARMUP: usize = 5;
const REPS: usize = 40;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let device = Default::default();
    B::seed(&device, 0);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let (x, y) = synthetic_batch::<B>(BATCH, 1, &device);

    // Dense baseline: one sub-net, all-ones mask, burn's SGD.
    let switch = SubnetSwitch::new();
    let mut dense = TinyNet::<B>::new(1, &switch, &device);
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
        ))
        .init::<B, TinyNet<B>>();
    let mut dense_times = Vec::new();
    for i in 0..WARMUP + REPS {
        let start = Instant::now();
        let loss = loss_fn.forward(dense.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &dense);
        dense = sgd.step(0.05, dense, grads);
        if i >= WARMUP {
            dense_times.push(start.elapsed().as_secs_f64());
        }
    }

    // AST: three sub-nets, correction on, no mask event inside the timed window (mask updates
    // run once per update_frequency iterations and are timed separately below).
    for (label, correction) in [
        ("AST (correction off)", CorrectionMode::Off),
        ("AST (projection)", CorrectionMode::Projection),
    ] {
        let switch = SubnetSwitch::new();
        let model = TinyNet::<B>::new(3, &switch, &device);
        let mut config = AstConfig::new(vec![
            SubnetTarget::Density(0.1),
            SubnetTarget::Density(0.05),
            SubnetTarget::Density(0.02),
        ]);
        config.correction = correction;
        config.schedule = MaskScheduleConfig {
            update_frequency: 1_000_000,
            ..Default::default()
        };
        let mut ast = AstStep::new(config, &model, &switch, 100, 10_000).expect("valid config");
        let mut model = model;
        let mut times = Vec::new();
        for i in 0..WARMUP + REPS {
            let start = Instant::now();
            let iteration = ast.begin();
            let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
            model = ast.step(model, loss.backward(), iteration, 0.05).0;
            if i >= WARMUP {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let (a, d) = (median(times), median(dense_times.clone()));
        println!(
            "{label}: {a:.5} s/step, dense {d:.5} s/step, ratio {:.3}",
            a / d
        );
    }

    // Mask memory per sub-net: one bool tensor per masked layer (Flex stores one byte per bool).
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(3, &switch, &device);
    let weights: usize = masked_layers(&model).iter().map(|l| l.numel()).sum();
    println!("mask memory per sub-net: {weights} masked weights, {weights} bytes (8 bits per weight on Flex)");
}
