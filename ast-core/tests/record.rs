//! The AST state as a burn record in a loop of one's own: train, save the model's record and
//! the step's record with a burn recorder, load both into a new model and step, continue — the
//! same weights, masks and losses as the run that was never interrupted. In its own test binary:
//! the weights are drawn from burn's process-wide generator.

use ast_core::testing::{synthetic_batch, tiny_config, TinyNet};
use ast_core::{
    AstConfig, AstStep, AstStepRecord, CorrectionMode, OptimizerKind, SubnetSwitch, SubnetTarget,
};
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};

type B = Autodiff<Flex>;
const STEPS: usize = 24;

/// Iterations `from..to` of the tiny task; the losses.
fn train(model: &mut TinyNet<B>, ast: &mut AstStep<B>, from: usize, to: usize) -> Vec<f32> {
    let device = Default::default();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    (from..to)
        .map(|t| {
            let iteration = ast.begin();
            let (x, y) = synthetic_batch::<B>(16, t as u64, &device);
            let loss = loss_fn.forward(model.forward(x), y);
            let value = loss.clone().into_scalar();
            *model = ast.step(model.clone(), loss.backward(), iteration, 0.05).0;
            value
        })
        .collect()
}

/// The model's record as bytes: every weight, mask and BatchNorm tensor with its id.
fn record_bytes(model: &TinyNet<B>) -> Vec<u8> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(model.valid().into_record(), ())
        .unwrap()
}

fn resumes_exactly(config: AstConfig) {
    let device = Default::default();
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    B::seed(&device, 5);
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(2, &switch, &device);
    let mut ast = AstStep::new(config.clone(), &model, &switch, 10, STEPS).unwrap();
    let mut model = ast.init_masks(model);
    let mut losses = train(&mut model, &mut ast, 0, STEPS / 2);

    // Save both records, then finish the uninterrupted run.
    let model_bytes = recorder.record(model.clone().into_record(), ()).unwrap();
    let step_bytes = recorder.record(ast.record(), ()).unwrap();
    losses.extend(train(&mut model, &mut ast, STEPS / 2, STEPS));

    // A new model and step (other initial weights), loaded from the records, continue.
    let switch = SubnetSwitch::new();
    let fresh = TinyNet::<B>::new(2, &switch, &device);
    let mut resumed = fresh.load_record(recorder.load(model_bytes, &device).unwrap());
    let mut step = AstStep::new(config, &resumed, &switch, 10, STEPS).unwrap();
    let record: AstStepRecord<Flex> = recorder.load(step_bytes.clone(), &device).unwrap();
    step.load_record(record).unwrap();
    assert_eq!(step.iteration(), STEPS / 2);
    // Everything the record held is back in the step (the correction references too, which
    // change the next update only where it conflicts with the previous sub-net's).
    assert!(recorder.record(step.record(), ()).unwrap() == step_bytes);
    let tail = train(&mut resumed, &mut step, STEPS / 2, STEPS);

    assert_eq!(tail, losses[STEPS / 2..], "losses after the resume");
    assert!(
        record_bytes(&resumed) == record_bytes(&model),
        "weights, masks and BatchNorms differ"
    );
}

#[test]
fn a_run_saved_and_loaded_with_burn_recorders_continues_exactly() {
    let targets = vec![SubnetTarget::Density(0.5), SubnetTarget::Density(0.25)];
    // SGD with momentum and the projection correction (the mask ramp runs through the save).
    let sgd = tiny_config(targets.clone()).with_correction(CorrectionMode::Projection);
    resumes_exactly(sgd);
    // AdamW with the EMA correction.
    let adamw = tiny_config(targets)
        .with_optimizer(OptimizerKind::AdamW)
        .with_correction(CorrectionMode::Ema { beta: 0.5 });
    resumes_exactly(adamw);
}

#[test]
fn a_record_of_another_optimizer_is_refused() {
    let device = Default::default();
    let targets = vec![SubnetTarget::Density(0.5), SubnetTarget::Density(0.25)];
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(2, &switch, &device);
    let mut sgd = AstStep::new(tiny_config(targets.clone()), &model, &switch, 10, STEPS).unwrap();
    let mut model = sgd.init_masks(model);
    train(&mut model, &mut sgd, 0, 2);
    let adam = tiny_config(targets).with_optimizer(OptimizerKind::Adam);
    let mut other = AstStep::new(adam, &model, &switch, 10, STEPS).unwrap();
    let err = other.load_record(sgd.record()).unwrap_err().to_string();
    assert!(
        err.contains("the saved state is sgd's, the run's optimizer is adam"),
        "{err}"
    );
}
