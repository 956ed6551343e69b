//! A real SIGINT/SIGTERM to a training process: it finishes its iteration, writes a checkpoint,
//! exits non-zero saying how to resume, and the run resumes from there. (That a gracefully
//! stopped run resumes bit-identically is proven deterministically in `resume.rs`.)
#![cfg(unix)]

use std::process::{Command, Stdio};
use std::time::Duration;

use ast_tests::{cli, cli_path, dense_run_args, stderr, tiny_idx_data, wait_for_lock};

fn stop_with(signal: &str) {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 256, 16);
    let out = work.path().join("run");
    let o = out.to_str().unwrap();
    let child = Command::new(cli_path())
        .args(dense_run_args(&data, &out, &["--epochs", "200"]))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lock(&out, child.id());
    // Let it train a few iterations, then ask it to stop.
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    // Not done, so not a success (130, as a shell reports an interrupted command), but not an
    // error either.
    assert_eq!(output.status.code(), Some(130), "{signal}: {err}");
    assert!(err.contains("stopped at iteration"), "{signal}: {err}");
    assert!(!err.contains("error"), "{signal}: {err}");
    assert!(
        out.join("checkpoints/latest").exists(),
        "{signal}: no checkpoint"
    );
    // It resumes from the checkpoint it wrote (one more epoch, then done).
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            out.join("checkpoints")
                .join(
                    std::fs::read_to_string(out.join("checkpoints/latest"))
                        .unwrap()
                        .trim(),
                )
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let epochs = (state["next_epoch"].as_u64().unwrap() + 1).to_string();
    let resumed = cli(&[
        "run", "--resume", "--quiet", "--out", o, "--epochs", &epochs,
    ]);
    assert!(resumed.status.success(), "{signal}: {}", stderr(&resumed));
}

#[test]
fn sigint_stops_the_run_gracefully() {
    stop_with("-INT");
}

#[test]
fn sigterm_stops_the_run_gracefully() {
    stop_with("-TERM");
}
