//! Runs the built `ast-cli` binary.
//!
//! Besides checking the commands below, this integration test is what makes
//! `cargo test --workspace` build `target/<profile>/ast-cli` on a clean checkout: cargo builds a
//! package's binaries only for that package's own integration tests, and the end-to-end tests in
//! `tests/` drive that same binary.

use std::process::Command;

fn ast_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ast-cli"))
        .args(args)
        .output()
        .expect("ast-cli runs")
}

#[test]
fn recipes_lists_every_shipped_recipe() {
    let out = ast_cli(&["recipes"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "quickstart",
        "cifar-unstructured",
        "cifar-nm",
        "imagenet-unstructured",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing in:\n{text}"
        );
    }
}

#[test]
fn an_unknown_command_is_refused_with_a_usage_error() {
    let out = ast_cli(&["train-everything"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'train-everything'"),
        "{err}"
    );
}
