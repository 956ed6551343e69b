//! Import of the original PyTorch code's checkpoints (`ast-cli import`): a ResNet-20 checkpoint
//! of three sub-nets made by the original's model definition (`tests/fixtures/original/
//! make_fixtures.py`) becomes a run directory whose every sub-net gives the original's logits
//! (through the training stack and through an export to the inference runtime), which `eval`,
//! `stats` and `export` take; files that are not such a checkpoint are refused in one line,
//! nothing written.

use std::io::Read;
use std::path::{Path, PathBuf};

use ast_models::ModelKind;
use ast_tests::{cli, stderr, write_cifar10};
use ast_train::train::load_run_model;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use safetensors::SafeTensors;

type B = Autodiff<Flex>;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/original");

/// The fixture checkpoint, unzipped into `dir`.
fn checkpoint(dir: &Path) -> PathBuf {
    let gz = std::fs::read(Path::new(FIXTURES).join("resnet20-k3.pth.gz")).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut bytes)
        .unwrap();
    let path = dir.join("checkpoint.pth.tar");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The fixture's input images and the original's logits per sub-net.
fn original_logits() -> (Vec<f32>, Vec<Vec<f32>>) {
    let bytes = std::fs::read(Path::new(FIXTURES).join("resnet20-k3.logits.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let floats = |name: &str| -> Vec<f32> {
        (file.tensor(name).unwrap().data().chunks_exact(4))
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let logits = floats("logits");
    let per_subnet = logits.len() / 3;
    (
        floats("input"),
        logits.chunks(per_subnet).map(<[f32]>::to_vec).collect(),
    )
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn import(from: &Path, out: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["import", "--from", from.to_str().unwrap()];
    if !extra.contains(&"--model") {
        args.extend(["--model", "resnet20"]);
    }
    args.extend([
        "--data-path",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    cli(&args)
}

#[test]
fn every_sub_net_of_an_original_checkpoint_gives_the_original_s_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data, 20);
    let from = checkpoint(tmp.path());
    let run = tmp.path().join("imported");
    let out = import(&from, &run, &data, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("3 sub-nets"), "{said}");
    assert!(said.contains("160 epochs done"), "{said}");

    // Through the training stack: the run's model, each sub-net in inference mode.
    let (input, theirs) = original_logits();
    let device = Default::default();
    let (config, model, epochs) =
        load_run_model::<B, _>(&ModelKind::Resnet20, &run, &device).unwrap();
    assert_eq!(epochs, 160);
    // The targets are the densities the masks keep (the fixture draws 30 / 15 / 5 %).
    let targets = serde_json::to_value(&config.ast.subnets).unwrap();
    for (k, expected) in [0.3, 0.15, 0.05].into_iter().enumerate() {
        let d = targets[k]["density"].as_f64().unwrap();
        assert!((d - expected).abs() < 0.01, "sub-net {k}: density {d}");
    }
    let model = model.valid();
    let x = Tensor::<Flex, 4>::from_data(TensorData::new(input.clone(), [4, 3, 32, 32]), &device);
    for (k, theirs) in theirs.iter().enumerate() {
        model.switch().set(k);
        let ours: Vec<f32> = model.forward(x.clone()).into_data().to_vec().unwrap();
        let diff = max_difference(&ours, theirs);
        assert!(diff <= 1e-4, "sub-net {k}: logits differ by {diff}");
    }

    // eval, stats and export take the run; the exported file gives the same logits.
    let run_arg = run.to_str().unwrap();
    for args in [
        vec!["eval", "--run", run_arg],
        vec!["stats", "--run", run_arg],
    ] {
        let out = cli(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let file = tmp.path().join("imported.safetensors");
    let out = cli(&["export", "--run", run_arg, "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runtime = ast_infer::InferenceModel::load(&file).unwrap();
    for (k, theirs) in theirs.iter().enumerate() {
        let ours = runtime.forward_subnet(k, &input, 4).unwrap();
        let diff = max_difference(&ours, theirs);
        assert!(
            diff <= 1e-4,
            "exported sub-net {k}: logits differ by {diff}"
        );
    }
}

#[test]
fn files_that_are_not_an_original_checkpoint_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let from = checkpoint(tmp.path());
    let truncated = tmp.path().join("truncated.pth");
    std::fs::write(&truncated, &std::fs::read(&from).unwrap()[..4096]).unwrap();
    let fixture = |name: &str| Path::new(FIXTURES).join(name);
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (
            fixture("whole-module.pth"),
            vec![],
            "not a PyTorch checkpoint this reader can take",
        ),
        (fixture("no-masks.pth"), vec![], "holds no mask buffers"),
        (
            truncated,
            vec![],
            "not a PyTorch checkpoint this reader can take",
        ),
        (tmp.path().join("absent.pth"), vec![], "no such file"),
        (
            fixture("make_fixtures.py"),
            vec![],
            "not a PyTorch checkpoint this reader can take",
        ),
        (
            from.clone(),
            vec!["--model", "resnet32"],
            "it has no `stage_1.3.conv_a.weight`",
        ),
        (
            from.clone(),
            vec!["--model", "wide-resnet32"],
            "tensors the model does not have",
        ),
        (
            from.clone(),
            vec!["--model", "resnet18"],
            "tensors the model does not have",
        ),
        (
            from.clone(),
            vec!["--model", "mobilenetv1"],
            "tensors the model does not have",
        ),
        (
            from.clone(),
            vec!["--model", "small-cnn"],
            "cannot import small-cnn: the original's names are mapped for its CIFAR models",
        ),
        (
            from.clone(),
            vec!["--densities", "0.1,0.05"],
            "gives 2 sub-nets, the checkpoint holds 3",
        ),
        (
            from.clone(),
            vec!["--dataset", "cifar100"],
            "classifier has 10 outputs, cifar100 has 100",
        ),
    ];
    for (i, (file, extra, expected)) in cases.into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("out-{i}"));
        let out = import(&file, &out_dir, &data, &extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(err.contains(expected), "case {i}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "case {i}: {err}");
        assert!(!out_dir.exists(), "case {i} wrote {}", out_dir.display());
    }
    // A run already in --out is kept unless --overwrite.
    let run = tmp.path().join("run");
    assert!(import(&from, &run, &data, &[]).status.success());
    let before = std::fs::read(run.join("config.json")).unwrap();
    let out = import(&from, &run, &data, &["--densities", "0.3,0.2,0.1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), before);
    let out = import(
        &from,
        &run,
        &data,
        &["--densities", "0.3,0.2,0.1", "--overwrite"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_run_started_from_an_imported_checkpoint_keeps_its_masks_and_trains_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data, 20);
    let imported = tmp.path().join("imported");
    assert!(import(&checkpoint(tmp.path()), &imported, &data, &[])
        .status
        .success());
    let tuned = tmp.path().join("tuned");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--init-from",
            imported.to_str().unwrap(),
            "--recipe",
            "cifar-unstructured",
            "--data-path",
            data.to_str().unwrap(),
            "--out",
            tuned.to_str().unwrap(),
            "--epochs",
            "1",
            "--train-subset",
            "40",
            "--test-subset",
            "20",
            "--batch-size",
            "20",
            // The ramp is over: no mask event.
            "--final-prune-epoch",
            "0",
            "--quiet",
        ];
        if !extra.contains(&"--model") {
            args.extend(["--model", "resnet20"]);
        }
        if !extra.contains(&"--densities") {
            args.extend(["--densities", "0.3,0.15,0.05"]);
        }
        args.extend_from_slice(extra);
        cli(&args)
    };
    let out = run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let latest = |dir: &Path| {
        let name = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
        dir.join("checkpoints").join(name.trim())
    };
    let (before, after) = (latest(&imported), latest(&tuned));
    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    assert_eq!(
        read(&before, "masks.safetensors"),
        read(&after, "masks.safetensors"),
        "the masks changed"
    );
    assert_ne!(
        read(&before, "model.safetensors"),
        read(&after, "model.safetensors"),
        "the weights did not train"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tuned.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["init_from"].as_str(), imported.to_str());

    // Another model or sub-net count than the run started from: one line naming it.
    for (extra, expected) in [
        (
            vec!["--model", "resnet32", "--overwrite"],
            "has model resnet20, this run resnet32: give --model resnet20",
        ),
        (
            vec!["--densities", "0.1,0.05", "--overwrite"],
            "has sub-nets: 3, this run 2",
        ),
    ] {
        let out = run(&extra);
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err = stderr(&out);
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
