//! Two real processes on one run directory: while one trains, a second `run --resume` or
//! `run --overwrite` is refused with the holder's PID and changes nothing.

use std::process::Command;

use ast_tests::{cli, cli_path, dense_run_args as run_args, stderr, tiny_idx_data, wait_for_lock};

#[test]
fn a_second_process_on_a_running_run_directory_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 256, 16);
    let out = work.path().join("run");

    // The first process trains for a while (many epochs of 16 iterations).
    let mut first = Command::new(cli_path())
        .args(run_args(&data, &out, &["--epochs", "200"]))
        .spawn()
        .unwrap();
    wait_for_lock(&out, first.id());
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
