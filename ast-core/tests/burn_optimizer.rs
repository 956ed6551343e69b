//! Any burn optimizer in the dense scope: `AstStep::step_with` hands it the masked, corrected
//! gradients.
//!
//! In its own test binary (one test, one process): model weights come from the backend's
//! process-wide generator, which tests running in parallel threads would otherwise share.

use ast_core::subnet::{density, masked_layers, read_masks, read_params};
use ast_core::testing::{tiny_config, train_tiny, train_tiny_with, TinyNet};
use ast_core::SubnetTarget;
use burn::backend::{Autodiff, Flex};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{RmsPropConfig, SgdConfig};
use burn::tensor::{TensorData, Tolerance};

type B = Autodiff<Flex>;

fn weights(model: &TinyNet<B>) -> Vec<TensorData> {
    let ids: Vec<_> = masked_layers(model).iter().map(|l| l.weight_id).collect();
    read_params(model, &ids)
}

#[test]
fn burns_own_optimizers_train_through_step_with() {
    // burn's SGD set as the built-in one (momentum 0.9, dampening 0, the tiny config's weight
    // decay 1e-4) trains as the built-in step does over the whole ramp: the same mask events
    // with the same changes, the same masks at the end, weights within float noise. A gradient
    // that reached it unmasked or uncorrected would move the weights elsewhere.
    let targets = vec![SubnetTarget::Density(0.5), SubnetTarget::Density(0.2)];
    let config = tiny_config(targets.clone());
    let device = Default::default();
    let steps = 40;
    let (ours, our_losses, our_reports) = train_tiny::<B>(config.clone(), steps, 4, &device);
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
        ))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-4)))
        .init();
    let (theirs, their_losses, their_reports) =
        train_tiny_with::<B, _>(config.clone(), steps, 4, &device, &mut sgd);
    assert_eq!(our_reports, their_reports);
    assert!(our_reports.iter().any(|r| r.mask_update.is_some()));
    for k in 0..targets.len() {
        assert_eq!(
            read_masks(&ours, k).unwrap(),
            read_masks(&theirs, k).unwrap()
        );
    }
    for (a, b) in weights(&ours).iter().zip(&weights(&theirs)) {
        a.assert_approx_eq::<f32>(b, Tolerance::absolute(1e-5));
    }
    for (a, b) in our_losses.iter().zip(&their_losses) {
        assert!((a - b).abs() < 1e-4, "losses {a} and {b}");
    }

    // burn's RMSProp, which the built-in optimizers do not offer: the sub-nets still reach their
    // densities, and the run learns (the task's loss falls).
    let mut rms = RmsPropConfig::new().init();
    let (model, losses, _) = train_tiny_with::<B, _>(config, 60, 4, &device, &mut rms);
    for (k, target) in targets.iter().enumerate() {
        let d = density(&model, k).unwrap();
        assert!(
            (d - target.density()).abs() < 0.01,
            "sub-net {k}: density {d}"
        );
    }
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    assert!(
        mean(&losses[50..]) < mean(&losses[..10]),
        "loss {} → {}",
        mean(&losses[..10]),
        mean(&losses[50..])
    );
}
