//! A model of your own through ast-train (`ast-train/examples/own_model.rs`, its spec and model
//! used as they are): the loop, a killed run resumed bit for bit, evaluation of the run
//! directory, a data-parallel run, a spec of another model refused, and ast-cli's commands
//! refusing a model they do not know.
//!
//! In its own test binary (one test, one process): model weights come from the backend's
//! process-wide generator, which tests running in parallel threads would otherwise share.

#[allow(dead_code)] // its `main` is the example's own
#[path = "../../ast-train/examples/own_model.rs"]
mod own_model;

use std::path::Path;

use ast_models::ModelKind;
use ast_tests::{cli, fashion_mnist_available, stderr, FASHION_MNIST};
use ast_train::checkpoint::{latest, MODEL_FILE};
use ast_train::data::Loader;
use ast_train::train::{load_run_model, train_data_parallel};
use ast_train::{evaluate, load_data, prepare_run_dir, train, RunOptions, RunSummary, TrainConfig};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use own_model::TwoConvSpec;

type B = Autodiff<Flex>;

/// The quickstart recipe on the example's model, small: 32 iterations per epoch, 3 epochs.
fn small_config() -> TrainConfig {
    let recipe = include_str!("../../recipes/quickstart.json");
    let mut config: TrainConfig = serde_json::from_str(recipe).unwrap();
    config.model = "two-conv".into();
    config.data.path = FASHION_MNIST.into();
    (config.data.train_subset, config.data.test_subset) = (Some(2048), Some(256));
    (config.epochs, config.bn_recalibration_batches) = (3, 2);
    config.ast.schedule.update_frequency = 3;
    config.ast.schedule.subnet_offset = 1;
    config
}

fn options(dir: &Path, resume: bool, stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        dir: dir.to_path_buf(),
        resume,
        stop_after,
        ..RunOptions::default()
    }
}

/// Trains (or resumes) the run in `dir` alone, or on `workers` data-parallel workers.
fn run(opts: &RunOptions, workers: Option<usize>) -> RunSummary {
    let config = (!opts.resume).then(small_config);
    let (config, _lock) = prepare_run_dir(config, opts).unwrap();
    let device = Default::default();
    match workers {
        None => train::<B, _>(config, &TwoConvSpec, opts, &device).unwrap(),
        Some(n) => {
            let devices = vec![device; n];
            train_data_parallel::<B, _>(config, &TwoConvSpec, opts, &devices, None).unwrap()
        }
    }
}

fn final_weights(dir: &Path) -> Vec<u8> {
    std::fs::read(latest(dir).unwrap().unwrap().join(MODEL_FILE)).unwrap()
}

#[test]
fn a_model_of_your_own_trains_resumes_evaluates_and_runs_data_parallel() {
    if !fashion_mnist_available("own_model") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let whole = root.path().join("whole");
    let summary = run(&options(&whole, false, None), None);
    for (m, target) in summary.subnets.iter().zip([0.5, 0.2, 0.1]) {
        assert!((m.density - target).abs() < 0.01, "{m:?}");
        assert!(m.top1 > 0.3, "sub-net {} learned nothing: {m:?}", m.subnet);
    }

    // Killed in its last epoch (iteration 80 of 96), resumed from the second epoch's
    // checkpoint: the same run, bit for bit.
    let killed = root.path().join("killed");
    assert!(run(&options(&killed, false, Some(80)), None).interrupted);
    let resumed = run(&options(&killed, true, None), None);
    assert_eq!(resumed.subnets, summary.subnets);
    assert_eq!(final_weights(&killed), final_weights(&whole));

    // The run directory evaluates as the run did at its end.
    let device = Default::default();
    let (config, model, epochs) = load_run_model::<B, _>(&TwoConvSpec, &whole, &device).unwrap();
    assert_eq!(epochs, 3);
    let test = load_data(&config, &TwoConvSpec).unwrap().test;
    let loader = Loader::new(test, config.eval_batch_size, config.seed, false);
    let metrics = evaluate(&model.valid(), &loader, &device).unwrap();
    assert_eq!(metrics, summary.subnets);

    // A spec of another model is refused, naming both.
    let err = load_run_model::<B, _>(&ModelKind::SmallCnn, &whole, &device)
        .expect_err("another model's spec is refused")
        .to_string();
    assert!(
        err.contains("two-conv") && err.contains("small-cnn"),
        "{err}"
    );

    // ast-cli knows only its built-in models: one line naming the model and what to do.
    let (run_dir, out) = (
        whole.to_str().unwrap(),
        root.path().join("export.safetensors"),
    );
    let export = ["export", "--run", run_dir, "--out", out.to_str().unwrap()];
    for args in [&["eval", "--run", run_dir][..], &export[..]] {
        let output = cli(args);
        let message = stderr(&output);
        assert!(!output.status.success(), "{args:?}: {message}");
        assert!(
            message.contains("`two-conv` is not one of ast-cli's") && message.lines().count() == 1,
            "{args:?}: {message}"
        );
    }
    assert!(!out.exists());

    // Two data-parallel workers on the CPU device.
    let parallel = root.path().join("parallel");
    let summary = run(&options(&parallel, false, None), Some(2));
    for (m, target) in summary.subnets.iter().zip([0.5, 0.2, 0.1]) {
        assert!((m.density - target).abs() < 0.01, "{m:?}");
        assert!(m.top1 > 0.3, "{m:?}");
    }
    assert!(latest(&parallel).unwrap().is_some());
}
