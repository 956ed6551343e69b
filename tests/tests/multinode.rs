//! Several machines through MPI (`ast-cli run --nodes N` under `mpirun`), as two processes on
//! this machine: Open MPI's MPMD form (`mpirun -np 1 A : -np 1 B`) gives each its own run
//! directory. Needs `mpirun` and an `ast-cli` built with `--features mpi` (`.ci/run` installs
//! Open MPI and builds it before running this test with `--features mpi`).
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output};

use ast_tests::{cli, cli_path, parallel_run_args, run_results, stderr, tiny_idx_data};

/// `mpirun` with one process per argument list, bounded to `limit` seconds.
fn mpirun(ranks: &[Vec<String>], limit: u32) -> Output {
    let mut command = Command::new("timeout");
    command.args([limit.to_string(), "mpirun".into(), "--oversubscribe".into()]);
    // Containers often run as root, which Open MPI refuses unless told.
    command
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (i, args) in ranks.iter().enumerate() {
        if i > 0 {
            command.arg(":");
        }
        command.args(["-np", "1"]).arg(cli_path()).args(args);
    }
    command
        .output()
        .expect("mpirun runs (install Open MPI: apt install openmpi-bin)")
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(output)
    )
}

#[test]
fn two_machines_end_equal_to_each_other_and_to_two_devices_in_one_process() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| work.path().join(n));
    let ranks: Vec<Vec<String>> = [&a, &b]
        .iter()
        .map(|out| parallel_run_args(&data, out, &["--nodes", "2"]))
        .collect();
    let output = mpirun(&ranks, 300);
    assert!(output.status.success(), "{}", all_output(&output));
    let args = parallel_run_args(&data, &c, &["--devices", "0,1"]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let first = run_results(&a);
    assert_eq!(first.1.len(), 3, "three epochs of metrics");
    // Same weights, masks, BatchNorm statistics, optimizer state and metrics on both machines,
    // and the same bits as one process with two workers (the sum a + b either way).
    assert_eq!(run_results(&b), first, "the two processes' runs differ");
    assert_eq!(
        run_results(&c),
        first,
        "two processes differ from two devices in one"
    );
}

#[test]
fn processes_that_disagree_stop_with_one_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let [a, b] = ["a", "b"].map(|n| work.path().join(n));
    // Another learning rate on the second machine.
    let ranks = vec![
        parallel_run_args(&data, &a, &["--nodes", "2"]),
        parallel_run_args(&data, &b, &["--nodes", "2", "--lr", "0.05"]),
    ];
    let output = mpirun(&ranks, 120);
    let text = all_output(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("configuration differs from process"),
        "{text}"
    );
    // More nodes announced than mpirun started.
    let ranks = vec![parallel_run_args(
        &data,
        &a,
        &["--nodes", "3", "--overwrite"],
    )];
    let output = mpirun(&ranks, 60);
    let text = all_output(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("--nodes 3, but mpirun started 1 process"),
        "{text}"
    );
}

#[test]
fn a_killed_process_stops_the_run_and_both_resume() {
    let root = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(root.path(), 96, 40);
    let work = tempfile::tempdir().unwrap();
    let [a, b, full] = ["a", "b", "full"].map(|n| work.path().join(n));
    // The second process dies (as a kill would, writing nothing more) at iteration 9, in the
    // middle of the second epoch: mpirun ends the job instead of leaving the first one waiting.
    let ranks = vec![
        parallel_run_args(&data, &a, &["--nodes", "2"]),
        parallel_run_args(&data, &b, &["--nodes", "2", "--stop-after-iterations", "9"]),
    ];
    let output = mpirun(&ranks, 120);
    assert_ne!(
        output.status.code(),
        Some(124),
        "the job hung: {}",
        all_output(&output)
    );
    assert!(
        !a.join("summary.json").exists(),
        "the first process went on alone"
    );
    let resume = |out: &Path| -> Vec<String> {
        [
            "run",
            "--resume",
            "--quiet",
            "--nodes",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let output = mpirun(&[resume(&a), resume(&b)], 300);
    assert!(output.status.success(), "{}", all_output(&output));
    let args = parallel_run_args(&data, &full, &["--devices", "0,1"]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = run_results(&full);
    assert_eq!(run_results(&a), expected, "process 0 after the resume");
    assert_eq!(run_results(&b), expected, "process 1 after the resume");
}
