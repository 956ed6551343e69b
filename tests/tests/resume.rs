//! A run killed in the middle of an epoch and resumed ends bit-identical to the same run
//! uninterrupted: same checkpoint bytes (weights, masks, BatchNorms, velocities, correction
//! references) and the same metrics.

use std::path::Path;

use ast_tests::{cli, stderr, write_idx};

fn run(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--recipe",
        "quickstart",
        "--quiet",
        "--data-path",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--train-subset",
        "96",
        "--test-subset",
        "40",
        "--batch-size",
        "16",
        "--epochs",
        "3",
        "--final-prune-epoch",
        "1",
        "--update-frequency",
        "2",
        "--subnet-offset",
        "1",
        "--correction",
        "ema",
        "--data-threads",
        "2",
    ];
    args.extend_from_slice(extra);
    cli(&args)
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), view.data().to_vec()))
        .collect();
    out.sort();
    out
}

fn metrics_without_time(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

#[test]
fn killed_mid_epoch_and_resumed_equals_uninterrupted() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), "train", 96, 28);
    write_idx(data.path(), "t10k", 40, 28);
    let work = tempfile::tempdir().unwrap();
    let (full, killed) = (work.path().join("full"), work.path().join("killed"));

    let output = run(data.path(), &full, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    // 6 iterations per epoch: stop at iteration 9, in the middle of the second epoch.
    let output = run(data.path(), &killed, &["--stop-after-iterations", "9"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!killed.join("checkpoints/epoch-0002").exists());
    let output = cli(&[
        "run",
        "--resume",
        "--quiet",
        "--out",
        killed.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    let (a, b) = (
        full.join("checkpoints/epoch-0003"),
        killed.join("checkpoints/epoch-0003"),
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        // Compare tensors (names, shapes, bytes); the header's metadata map has no fixed order.
        assert_eq!(
            tensors(&a.join(file)),
            tensors(&b.join(file)),
            "{file} differs"
        );
    }
    assert_eq!(
        std::fs::read(a.join("state.json")).unwrap(),
        std::fs::read(b.join("state.json")).unwrap()
    );
    assert_eq!(metrics_without_time(&full), metrics_without_time(&killed));
    // The mask events the killed run wrote after its checkpoint were dropped and redone.
    let events = |dir: &Path| std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events(&full).lines().count() >= 4, "{}", events(&full));
    assert_eq!(events(&full), events(&killed));
}
