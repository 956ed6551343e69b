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

use ast_core::backend::set_flex_kernels;
use ast_core::rng::MaskRng;
use ast_train::consistency::{small_resnet, train_small, SmallRun};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

type B = Autodiff<Flex>;

/// 10 iterations per epoch, ramp over 2 epochs, events every 6 (every other iteration of a
/// sub-net, so that the others compute the weight gradient at active positions only): sub-net
/// k's ramp ends at t = 18 + 4k; sub-net 0 and 1 regrow once more (t = 24, 28).
fn run(fast: bool) -> SmallRun {
    set_flex_kernels(fast);
    let device = Default::default();
    B::seed(&device, 3);
    train_small(
        small_resnet::<B>(&device),
        30,
        10,
        MaskRng::new(9, 0),
        &device,
    )
    .unwrap()
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
