//! Flex's masked-convolution kernels against burn's generic convolution in a real AST run:
//! a small CIFAR ResNet (ResNet-8, widths 8/16/32, stride-2 stages with 1×1 projection
//! shortcuts) with three sub-nets (densities 0.5 / 0.2 / 0.05, so both the dense and the sparse
//! kernels run), 30 iterations with ramp and prune-and-regrow events, once on each path.
//!
//! The model is small on purpose: the kernels and burn round differently (~1e-7 relative), and
//! in a layer of n weights the magnitudes or gradients at a top-k boundary are ~1/n apart, so
//! a model of ResNet-20's size (270 000 weights) can flip a boundary position and the runs
//! then part ways.
//!
//! In its own test binary: the kernels are switched on and off for the whole process, and the
//! model's weights come from the backend's process-wide generator.

use ast_core::kernels::set_flex_kernels;
use ast_core::rng::MaskRng;
use ast_core::subnet::read_masks;
use ast_core::{AstConfig, AstStep, MaskScheduleConfig, SubnetTarget};
use ast_models::CifarResNetConfig;
use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

type B = Autodiff<Flex>;

const STEPS: usize = 30;

/// Losses, the number of mask events, and every sub-net's final masks.
fn run(fast: bool) -> (Vec<f32>, usize, Vec<Vec<TensorData>>) {
    set_flex_kernels(fast);
    let device = Default::default();
    B::seed(&device, 3);
    let model = CifarResNetConfig::new(10, 3, [8, 16, 32], 1, true)
        .with_classifier_std(Some(0.01))
        .init::<B>(&device);
    let switch = model.switch().clone();
    let mut config = AstConfig::new(vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.2),
        SubnetTarget::Density(0.05),
    ]);
    // 10 iterations per epoch, ramp over 2 epochs, events every 6 (every other iteration of a
    // sub-net, so that the others compute the weight gradient at active positions only):
    // sub-net k's ramp ends at t = 18 + 4k; sub-net 0 and 1 regrow once more (t = 24, 28).
    config.schedule = MaskScheduleConfig {
        update_frequency: 6,
        init_prune_epoch: 0,
        final_prune_epoch: 2,
        subnet_offset: 1,
        ..MaskScheduleConfig::default()
    };
    let mut ast = AstStep::<B>::new(config, &model, &switch, 10, STEPS).unwrap();
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = MaskRng::new(9, 0);
    let (batch, side) = (8, 16);
    let (mut losses, mut events) = (Vec::new(), 0);
    for _ in 0..STEPS {
        ast.begin();
        let pixels: Vec<f32> = (0..batch * 3 * side * side)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect();
        let labels: Vec<i64> = (0..batch).map(|_| (rng.next_u64() % 10) as i64).collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(pixels, [batch, 3, side, side]), &device);
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), &device);
        let loss = loss_fn.forward(model.forward(x), y);
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let (m, report) = ast.step(model, loss.backward(), 0.05);
        model = m;
        events += usize::from(report.mask_update.is_some());
    }
    let masks = (0..3).map(|k| read_masks(&model, k).unwrap()).collect();
    (losses, events, masks)
}

#[test]
fn a_resnet_trains_the_same_on_the_kernels_and_on_burns_convolution() {
    let (generic, generic_events, generic_masks) = run(false);
    let (fast, fast_events, fast_masks) = run(true);
    assert_eq!(generic_events, 11);
    assert_eq!(fast_events, generic_events);
    for (t, (a, b)) in fast.iter().zip(&generic).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "iteration {t}: loss {a} on the kernels, {b} on burn's convolution"
        );
    }
    assert_eq!(fast_masks, generic_masks, "final masks differ");
}
