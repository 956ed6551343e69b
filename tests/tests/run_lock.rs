//! Two real processes on one run directory: while one trains, a second `run --resume` or
//! `run --overwrite` is refused with the holder's PID and changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ast_tests::{cli, cli_path, stderr, write_idx};

fn run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--recipe",
        "quickstart",
        "--quiet",
        "--densities",
        "1,1,1",
        "--train-subset",
        "256",
        "--test-subset",
        "16",
        "--batch-size",
        "16",
        "--final-prune-epoch",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--data-path".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_second_process_on_a_running_run_directory_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 256, 28);
    write_idx(&data, "t10k", 16, 28);
    let out = work.path().join("run");

    // The first process trains for a while (many epochs of 16 iterations).
    let mut first = Command::new(cli_path())
        .args(run_args(&data, &out, &["--epochs", "200"]))
        .spawn()
        .unwrap();
    let lock = out.join(".lock");
    let start = Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != first.id().to_string() {
        assert!(start.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = std::fs::read(out.join("config.json")).unwrap();
    let holder = format!("in use by process {}", first.id());

    let resume = cli(&["run", "--resume", "--quiet", "--out", out.to_str().unwrap()]);
    let overwrite = run_args(&data, &out, &["--epochs", "1", "--overwrite"]);
    let overwrite = cli(&overwrite.iter().map(String::as_str).collect::<Vec<_>>());
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        still_running,
        "the first run ended before the second process was checked"
    );
    for (name, output) in [("resume", resume), ("overwrite", overwrite)] {
        let err = stderr(&output);
        assert!(
            !output.status.success(),
            "{name}: exited with success\n{err}"
        );
        assert!(
            err.contains(&holder),
            "{name}: expected `{holder}` in\n{err}"
        );
    }
    // The refused overwrite changed nothing; after the holder's death the lock is free.
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), config);
    let again = run_args(&data, &out, &["--epochs", "1", "--overwrite"]);
    let again = cli(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success(), "{}", stderr(&again));
}
