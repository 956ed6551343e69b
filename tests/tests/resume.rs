//! A run killed in the middle of an epoch and resumed ends bit-identical to the same run
//! uninterrupted: same checkpoint bytes (weights, masks, BatchNorms, optimizer state, correction
//! references) and the same metrics — with SGD and with AdamW, after a kill at an iteration,
//! a kill inside a checkpoint write, or a graceful stop.

use std::path::Path;

use ast_tests::{cli, stderr, write_idx};

fn run(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = run_args(data, out, extra);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The arguments of a 3-epoch run (6 iterations per epoch) on `data` into `out`.
fn run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
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
    args.into_iter().map(String::from).collect()
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

/// The step counts of Adam's state (`time/<path>` u64 tensors) in an optimizer file.
fn step_counts(path: &Path) -> Vec<u64> {
    tensors(path)
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("time/"))
        .map(|(_, _, bytes)| u64::from_le_bytes(bytes.try_into().unwrap()))
        .collect()
}

#[test]
fn killed_mid_epoch_and_resumed_equals_uninterrupted() {
    killed_and_resumed_equals_uninterrupted(&[]);
}

#[test]
fn stopped_gracefully_mid_epoch_and_resumed_equals_uninterrupted() {
    // As a SIGINT would: the run finishes iteration 9 (mid-epoch), writes a mid-epoch
    // checkpoint with its epoch's running sums, and exits non-zero saying how to resume.
    killed_and_resumed_equals_uninterrupted(&["--stop-gracefully-after", "9"]);
}

#[test]
fn adamw_in_the_active_scope_resumes_exactly() {
    let times = killed_and_resumed_equals_uninterrupted(&[
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--weight-decay",
        "0.01",
        "--update-scope",
        "active",
    ]);
    // 18 iterations: the stem is trained at every one of them.
    assert!(times.contains(&18), "{times:?}");
}

/// Runs 3 epochs uninterrupted and killed at iteration 9 then resumed; returns the step counts
/// in the last optimizer checkpoint.
fn killed_and_resumed_equals_uninterrupted(extra: &[&str]) -> Vec<u64> {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), "train", 96, 28);
    write_idx(data.path(), "t10k", 40, 28);
    let work = tempfile::tempdir().unwrap();
    let (full, killed) = (work.path().join("full"), work.path().join("killed"));

    let graceful = extra.contains(&"--stop-gracefully-after");
    let settings: Vec<&str> = match graceful {
        true => extra[..extra.len() - 2].to_vec(),
        false => extra.to_vec(),
    };
    let output = run(data.path(), &full, &settings);
    assert!(output.status.success(), "{}", stderr(&output));
    // 6 iterations per epoch: stop at iteration 9, in the middle of the second epoch.
    let stop = match graceful {
        true => extra.to_vec(),
        false => [extra, &["--stop-after-iterations", "9"]].concat(),
    };
    let output = run(data.path(), &killed, &stop);
    if graceful {
        let err = stderr(&output);
        assert!(!output.status.success(), "{err}");
        assert!(err.contains("stopped at iteration 9"), "{err}");
        assert!(
            err.contains("resume with `ast-cli run --resume --out"),
            "{err}"
        );
        assert!(killed
            .join("checkpoints/epoch-0001-iter-000000009")
            .is_dir());
    } else {
        assert!(output.status.success(), "{}", stderr(&output));
    }
    assert!(!killed.join("checkpoints/epoch-0002").exists());
    let output = cli(&[
        "run",
        "--resume",
        "--quiet",
        "--out",
        killed.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    assert_same_run(&full, &killed);
    step_counts(&full.join("checkpoints/epoch-0003/optimizer.safetensors"))
}

/// The last checkpoint (whole files), the metrics, the events and the summary of two 3-epoch
/// runs are the same (times of day aside).
fn assert_same_run(full: &Path, killed: &Path) {
    let (a, b) = (
        full.join("checkpoints/epoch-0003"),
        killed.join("checkpoints/epoch-0003"),
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(!tensors(&a.join(file)).is_empty());
        // Whole files, headers included: checkpoints are byte-deterministic.
        assert!(
            std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
            "{file} differs"
        );
    }
    assert_eq!(
        std::fs::read(a.join("state.json")).unwrap(),
        std::fs::read(b.join("state.json")).unwrap()
    );
    assert_eq!(metrics_without_time(full), metrics_without_time(killed));
    // The mask events the killed run wrote after its checkpoint were dropped and redone.
    let events = |dir: &Path| std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    assert!(events(full).lines().count() >= 4, "{}", events(full));
    assert_eq!(events(full), events(killed));
    let summary = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("summary.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    assert_eq!(summary(full), summary(killed));
    // Nothing left over: the same files in the run directory and among the checkpoints.
    let names = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(full), names(killed));
    assert_eq!(
        names(&full.join("checkpoints")),
        names(&killed.join("checkpoints"))
    );
}

#[test]
fn killed_anywhere_even_inside_a_checkpoint_write_and_resumed_equals_uninterrupted() {
    let data = tempfile::tempdir().unwrap();
    write_idx(data.path(), "train", 96, 28);
    write_idx(data.path(), "t10k", 40, 28);
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full");
    let output = run(data.path(), &full, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    // Three iterations (6 per epoch) and, through the AST_KILL_AT hook (exit 137, no cleanup),
    // every one of `KILL_POINTS`.
    let iterations = ["4", "9", "14"].map(|t| (None, Some(t)));
    let hooks = ast_tests::KILL_POINTS.map(|h| (Some(h), None));
    for (i, (hook, iteration)) in iterations.into_iter().chain(hooks).enumerate() {
        let killed = work.path().join(format!("killed-{i}"));
        let mut args = run_args(data.path(), &killed, &[]);
        if let Some(t) = iteration {
            args.extend(["--stop-after-iterations".into(), t.into()]);
        }
        let mut command = std::process::Command::new(ast_tests::cli_path());
        command.args(&args);
        if let Some(h) = hook {
            command.env("AST_KILL_AT", h);
        }
        let output = command.output().unwrap();
        let point = hook.or(iteration).unwrap();
        match hook {
            Some(_) => assert_eq!(
                output.status.code(),
                Some(137),
                "{point}: {}",
                stderr(&output)
            ),
            None => assert!(output.status.success(), "{point}: {}", stderr(&output)),
        }
        let k = killed.to_str().unwrap();
        let mut output = cli(&["run", "--resume", "--quiet", "--out", k]);
        if point == "4" {
            // Killed before its first checkpoint: nothing to resume, and a plain new start in
            // the same directory is allowed.
            assert!(
                stderr(&output).contains("has no checkpoint yet"),
                "{}",
                stderr(&output)
            );
            output = run(data.path(), &killed, &[]);
        }
        assert!(output.status.success(), "{point}: {}", stderr(&output));
        assert_same_run(&full, &killed);
    }
}
