//! Same seed ⇒ the same AST run, bit for bit: losses, weights and every sub-net's masks.
//!
//! In its own test binary (one test, one process): model weights come from the backend's
//! process-wide generator, which tests running in parallel threads would otherwise share.

use ast_core::subnet::{masked_layers, read_masks, read_params};
use ast_core::testing::{tiny_config, train_tiny, TinyNet};
use ast_core::SubnetTarget;
use burn::backend::{Autodiff, Flex};
use burn::tensor::TensorData;

type B = Autodiff<Flex>;

fn weights(model: &TinyNet<B>) -> Vec<TensorData> {
    let ids: Vec<_> = masked_layers(model).iter().map(|l| l.weight_id).collect();
    read_params(model, &ids)
}

#[test]
fn same_seed_same_run_bit_for_bit() {
    let targets = vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.2),
        SubnetTarget::Nm { n: 2, m: 4 },
    ];
    let device = Default::default();
    let (a, la, _) = train_tiny::<B>(tiny_config(targets.clone()), 50, 5, &device);
    let (b, lb, _) = train_tiny::<B>(tiny_config(targets), 50, 5, &device);
    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&la), bits(&lb));
    assert_eq!(weights(&a), weights(&b));
    for k in 0..3 {
        assert_eq!(read_masks(&a, k).unwrap(), read_masks(&b, k).unwrap());
    }
    // A different seed gives a different run (the comparison above can fail).
    let (_, lc, _) = train_tiny::<B>(
        tiny_config(vec![SubnetTarget::Density(0.5); 3]),
        5,
        6,
        &device,
    );
    let (_, ld, _) = train_tiny::<B>(
        tiny_config(vec![SubnetTarget::Density(0.5); 3]),
        5,
        7,
        &device,
    );
    assert_ne!(bits(&lc), bits(&ld));
}
