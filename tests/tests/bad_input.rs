//! Bad input gets one clear error line naming the problem, a non-zero exit, no panic, and
//! leaves what the user had untouched. Table-driven over the CLI.

use std::path::{Path, PathBuf};

use ast_tests::{cli, stderr, tiny_idx_data, with_paths, write_cifar10, write_idx};

struct Case {
    name: &'static str,
    args: Vec<String>,
    expect: &'static str,
}

fn case(name: &'static str, args: &[&str], expect: &'static str) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        expect,
    }
}

/// Every file under `dir` (recursively) with its bytes; empty when `dir` does not exist.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    files
}

fn check(case: &Case) {
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    // The directories the command names (--out, --run, --data-path) hold the same files, with
    // the same bytes, after it fails (a failed new run may add its own, never change one).
    let named: Vec<&Path> = args
        .windows(2)
        .filter(|w| matches!(w[0], "--out" | "--run" | "--data-path"))
        .map(|w| Path::new(w[1]))
        .collect();
    let before: Vec<_> = named.iter().map(|d| snapshot(d)).collect();
    check_error(case);
    for files in before {
        for (path, bytes) in files {
            let now = std::fs::read(&path).ok();
            assert!(
                now.as_ref() == Some(&bytes) || path.ends_with(".lock"),
                "{}: {} changed or vanished",
                case.name,
                path.display()
            );
        }
    }
}

/// Runs the case: a non-zero exit, no panic, the expected message; returns the output.
fn check_error(case: &Case) -> std::process::Output {
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let output = cli(&args);
    let err = stderr(&output);
    assert!(
        !output.status.success(),
        "{}: exited with success\n{err}",
        case.name
    );
    assert!(!err.contains("panicked"), "{}: panicked\n{err}", case.name);
    assert!(
        err.contains(case.expect),
        "{}: expected `{}` in\n{err}",
        case.name,
        case.expect
    );
    output
}

/// Arguments of a tiny quickstart run on `data` into `out`; `extra` flags replace the defaults.
/// The sub-nets stay dense: two iterations cannot reach a pruned sub-net's density, which
/// `run` refuses.
fn quick(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let defaults = [
        ("--epochs", "1"),
        ("--final-prune-epoch", "1"),
        ("--train-subset", "32"),
        ("--test-subset", "16"),
        ("--batch-size", "16"),
        ("--densities", "1,1,1"),
    ];
    let mut args: Vec<String> = ["run", "--recipe", "quickstart", "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, value) in defaults {
        let replaced = extra.contains(&flag) || (flag == "--densities" && extra.contains(&"--nm"));
        if !replaced {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    with_paths(args, data, out, extra)
}

/// `<root>/run`: a finished tiny quickstart run (`quick` defaults) on data under `root`.
fn finished_quick_run(root: &Path) -> PathBuf {
    let data = tiny_idx_data(root, 32, 16);
    let out = root.join("run");
    let args = quick(&data, &out, &[]);
    let first = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(first.status.success(), "{}", stderr(&first));
    out
}

fn with_args(name: &'static str, args: Vec<String>, expect: &'static str) -> Case {
    Case { name, args, expect }
}

#[test]
fn every_bad_input_is_one_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A good IDX dataset, and broken copies of it.
    let good = w.join("good");
    std::fs::create_dir_all(&good).unwrap();
    write_idx(&good, "train", 40, 28);
    write_idx(&good, "t10k", 20, 28);
    let bad_magic = w.join("bad_magic");
    std::fs::create_dir_all(&bad_magic).unwrap();
    write_idx(&bad_magic, "train", 40, 28);
    write_idx(&bad_magic, "t10k", 20, 28);
    let mut bytes = std::fs::read(bad_magic.join("train-images-idx3-ubyte")).unwrap();
    bytes[3] = 0x02;
    std::fs::write(bad_magic.join("train-images-idx3-ubyte"), &bytes).unwrap();
    let truncated = w.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    write_idx(&truncated, "train", 40, 28);
    write_idx(&truncated, "t10k", 20, 28);
    let bytes = std::fs::read(truncated.join("t10k-images-idx3-ubyte")).unwrap();
    std::fs::write(
        truncated.join("t10k-images-idx3-ubyte"),
        &bytes[..bytes.len() - 100],
    )
    .unwrap();
    // CIFAR with a torn file.
    let cifar = w.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    write_cifar10(&cifar, 2);
    std::fs::write(cifar.join("data_batch_3.bin"), vec![0u8; 3073 + 10]).unwrap();
    // Image folders: no classes; an undecodable image.
    let empty = w.join("empty_folder");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    std::fs::create_dir_all(empty.join("val")).unwrap();
    let garbage = w.join("garbage_folder");
    for split in ["train", "val"] {
        std::fs::create_dir_all(garbage.join(split).join("cat")).unwrap();
        std::fs::write(
            garbage.join(split).join("cat").join("x.JPEG"),
            b"not a jpeg",
        )
        .unwrap();
    }
    // An output path below a regular file cannot be created.
    let file = w.join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let out = |n: &str| w.join("runs").join(n);
    // An output path that is a symbolic link to nothing.
    let dangling = w.join("dangling");
    std::os::unix::fs::symlink(w.join("gone"), &dangling).unwrap();

    let cases = vec![
        with_args(
            "missing data directory",
            quick(&w.join("nope"), &out("a"), &[]),
            "does not exist",
        ),
        with_args(
            "data path that is a file",
            quick(&file, &out("a0"), &[]),
            "a_file is not a directory (a file, device or pipe)",
        ),
        with_args(
            "CIFAR size",
            quick(
                &cifar,
                &out("b"),
                &["--dataset", "cifar10", "--model", "resnet20"],
            ),
            "not a whole number",
        ),
        with_args("IDX magic", quick(&bad_magic, &out("c"), &[]), "magic"),
        with_args(
            "IDX truncated",
            quick(&truncated, &out("d"), &[]),
            "truncated",
        ),
        with_args(
            "folder without classes",
            quick(
                &empty,
                &out("e"),
                &["--dataset", "imagenet", "--model", "resnet50-imagenet"],
            ),
            "no class",
        ),
        with_args(
            "unreadable image",
            quick(
                &garbage,
                &out("f"),
                &[
                    "--dataset",
                    "imagenet",
                    "--model",
                    "resnet50-imagenet",
                    "--batch-size",
                    "1",
                    "--train-subset",
                    "1",
                ],
            ),
            "cannot decode image",
        ),
        case(
            "unknown model",
            &["run", "--model", "resnet7", "--out", "/tmp/x"],
            "invalid value 'resnet7' for '--model <MODEL>'",
        ),
        case(
            "unknown dataset",
            &["run", "--dataset", "svhn", "--out", "/tmp/x"],
            "invalid value 'svhn' for '--dataset <DATASET>'",
        ),
        case(
            "unknown recipe",
            &["run", "--recipe", "imagenet-22k"],
            "unknown recipe `imagenet-22k`",
        ),
        case(
            "unknown backend",
            &["run", "--backend", "tpu"],
            "invalid value 'tpu'",
        ),
        with_args(
            "backend not compiled",
            quick(&good, &out("g"), &["--backend", "cuda"]),
            "not compiled",
        ),
        with_args(
            "low precision on a CPU backend",
            quick(&good, &out("p"), &["--precision", "f16"]),
            "--precision f16 needs --backend cuda",
        ),
        with_args(
            "density 0",
            quick(&good, &out("h"), &["--densities", "0.5,0"]),
            "`subnets.density` must lie in (0, 1], got 0",
        ),
        with_args(
            "density above 1",
            quick(&good, &out("i"), &["--densities", "1.5"]),
            "`subnets.density` must lie in (0, 1], got 1.5",
        ),
        with_args(
            "a schedule that never reaches the densities",
            quick(&good, &out("s"), &["--densities", "0.5,0.2,0.1"]),
            "`schedule` never gives sub-net 0 its final density",
        ),
        with_args(
            "unknown augmentation",
            quick(&good, &out("t"), &["--augment", "autoaugment"]),
            "invalid value 'autoaugment' for '--augment <AUGMENT>'",
        ),
        with_args(
            "unknown update scope",
            quick(&good, &out("u"), &["--update-scope", "sparse"]),
            "invalid value 'sparse' for '--update-scope <UPDATE_SCOPE>'",
        ),
        with_args(
            "unknown correction",
            quick(&good, &out("c1"), &["--correction", "pcgrad"]),
            "[possible values: off, projection, ema]",
        ),
        with_args(
            "unknown LR schedule",
            quick(&good, &out("c2"), &["--lr-schedule", "linear"]),
            "invalid value 'linear' for '--lr-schedule <LR_SCHEDULE>'",
        ),
        with_args(
            "unknown optimizer",
            quick(&good, &out("o1"), &["--optimizer", "lamb"]),
            "invalid value 'lamb' for '--optimizer <OPTIMIZER>'",
        ),
        with_args(
            "Adam with momentum",
            quick(
                &good,
                &out("o2"),
                &["--optimizer", "adam", "--momentum", "0.9"],
            ),
            "--momentum and --nesterov are SGD settings; adam uses --betas",
        ),
        with_args(
            "SGD with betas",
            quick(&good, &out("o3"), &["--betas", "0.9,0.99"]),
            "--betas is an Adam/AdamW setting",
        ),
        with_args(
            "three betas",
            quick(
                &good,
                &out("o5"),
                &["--optimizer", "adamw", "--betas", "0.9,0.9,0.9"],
            ),
            "--betas takes two numbers",
        ),
        with_args(
            "Adam beta of 1",
            quick(
                &good,
                &out("o4"),
                &["--optimizer", "adam", "--betas", "1,0.999"],
            ),
            "`adam.beta_1` must lie in [0, 1), got 1",
        ),
        with_args(
            "N above M",
            quick(&good, &out("j"), &["--nm", "5:4"]),
            "1 ≤ N ≤ M, got 5:4",
        ),
        with_args(
            "negative lr",
            quick(&good, &out("k"), &["--lr", "-0.1"]),
            "`lr` must be a finite number > 0",
        ),
        with_args(
            "zero epochs",
            quick(&good, &out("l"), &["--epochs", "0"]),
            "`epochs` must be ≥ 1",
        ),
        with_args(
            "final prune epoch after the end",
            quick(&good, &out("m"), &["--final-prune-epoch", "5"]),
            "final_prune_epoch` 5 is after the last epoch",
        ),
        with_args(
            "unwritable output",
            quick(&good, &file.join("run"), &[]),
            "cannot write to output directory",
        ),
        with_args(
            "output that is a dangling symbolic link",
            quick(&good, &dangling, &[]),
            "which does not exist; create that directory or choose another --out",
        ),
        with_args(
            "output that is a file",
            quick(&good, &file, &[]),
            "it exists and is not a directory (a file or a device)",
        ),
        with_args(
            "output that is a device",
            quick(&good, Path::new("/dev/null"), &[]),
            "it exists and is not a directory (a file or a device)",
        ),
        case(
            "resume without a run",
            &[
                "run",
                "--resume",
                "--out",
                w.join("runs/none").to_str().unwrap(),
            ],
            "holds no run (no config.json)",
        ),
        with_args(
            "N:M on an indivisible layer",
            quick(&good, &out("n"), &["--model", "mobilenetv1", "--nm", "1:4"]),
            "is not divisible by M = 4",
        ),
        case(
            "bench-infer: N:M on an indivisible layer",
            &["bench-infer", "--synthetic", "mobilenetv1", "--nm", "1:8"],
            "has 3 input channels, not a multiple of 8",
        ),
        case(
            "bench-infer: N above M",
            &["bench-infer", "--synthetic", "resnet20", "--nm", "5:4"],
            "--nm 5:4: N must be 1 to M",
        ),
        case(
            "bench-infer: a synthetic model without sub-nets",
            &["bench-infer", "--synthetic", "resnet20"],
            "--synthetic needs its sub-nets: give --densities",
        ),
        case(
            "bench: unknown model",
            &["bench", "--model", "resnet33"],
            "invalid value 'resnet33' for '--model <MODEL>'",
        ),
        case(
            "bench: absurd batch",
            &[
                "bench",
                "--model",
                "small-cnn",
                "--batch",
                "4611686018427387904",
            ],
            "`batch` must be ≤ 65536",
        ),
        case(
            "bench: warm-up that never ends",
            &["bench", "--model", "small-cnn", "--warmup", "1000000000000"],
            "--warmup 1000000000000: at most 10000 steps are timed",
        ),
        case(
            "schedule: a timeline too long to list",
            &["schedule", "--train-size", "1000000000000000"],
            "exceed the 1000000000 iterations a run may take",
        ),
        case(
            "schedule: too many events",
            &[
                "schedule",
                "--train-size",
                "2000000000",
                "--update-frequency",
                "3",
            ],
            "mask events, more than the 10000000 `schedule` lists",
        ),
        with_args(
            "epochs beyond the limit",
            quick(&good, &out("e0"), &["--epochs", "18446744073709551615"]),
            "`epochs` must be ≤ 100000, got 18446744073709551615",
        ),
        with_args(
            "empty test subset",
            quick(&good, &out("e1"), &["--test-subset", "0"]),
            "`data.test_subset` must hold at least one image",
        ),
        with_args(
            "prune rate below the final one",
            quick(&good, &out("e2"), &["--prune-rate", "0"]),
            "`schedule.prune_rate` 0 is below schedule.final_prune_rate 0.005",
        ),
        case(
            "bench: more sub-nets than memory holds",
            &["bench", "--model", "resnet32", "--subnets", "100000"],
            "available: lower --batch or --subnets",
        ),
        case(
            "bench: a batch beyond memory",
            &["bench", "--model", "resnet32", "--batch", "65536"],
            "available: lower --batch or --subnets",
        ),
        case(
            "bench: density 0",
            &["bench", "--model", "small-cnn", "--density", "0"],
            "`density` must lie in (0, 1], got 0",
        ),
        case(
            "bench: zero batch",
            &["bench", "--batch", "0"],
            "`batch` must be ≥ 1",
        ),
        case(
            "bench: timings into a missing directory",
            &[
                "bench",
                "--json",
                w.join("nowhere/t.json").to_str().unwrap(),
            ],
            "is not a directory",
        ),
        case(
            "bench: backend not compiled in",
            &["bench", "--backend", "cuda"],
            "not compiled into this binary",
        ),
        case(
            "bench: low precision on a CPU backend",
            &["bench", "--model", "small-cnn", "--precision", "bf16"],
            "--precision bf16 needs --backend cuda: the CPU backends train in f32",
        ),
        case(
            "bench: fusion switch on a CPU backend",
            &["bench", "--model", "small-cnn", "--fusion", "off"],
            "--fusion and --kernel-cache apply to --backend cuda only",
        ),
        case(
            "check-backend: backend not compiled in",
            &["check-backend", "--backend", "cuda"],
            "not compiled into this binary",
        ),
        case(
            "check-backend: zero steps",
            &["check-backend", "--backend", "ndarray", "--steps", "0"],
            "`steps` must be ≥ 1",
        ),
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn an_existing_run_is_never_overwritten_without_consent() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    let out = work.path().join("run");
    let first = cli(&quick(&data, &out, &[])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(first.status.success(), "{}", stderr(&first));
    let config = std::fs::read(out.join("config.json")).unwrap();
    let model = std::fs::read(out.join("checkpoints/epoch-0001/model.safetensors")).unwrap();

    check(&with_args(
        "run exists",
        quick(&data, &out, &["--lr", "0.5"]),
        "already holds a run",
    ));
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), config);
    assert_eq!(
        std::fs::read(out.join("checkpoints/epoch-0001/model.safetensors")).unwrap(),
        model
    );

    // A corrupt checkpoint is refused on resume (extending the finished run), and named; the
    // extension is not recorded.
    let ckpt = out.join("checkpoints/epoch-0001/model.safetensors");
    std::fs::write(&ckpt, b"garbage").unwrap();
    check(&case(
        "corrupt checkpoint",
        &[
            "run",
            "--resume",
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "2",
        ],
        "cannot load",
    ));
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), config);
}

#[test]
fn a_directory_that_is_not_a_run_keeps_the_users_files() {
    // A directory of the user's, with a `checkpoints/` of their own: refused without
    // --overwrite; with it, the run writes its files and the user's stay as they were.
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    let out = work.path().join("mine");
    std::fs::create_dir_all(out.join("checkpoints")).unwrap();
    std::fs::write(out.join("checkpoints/model.pt"), b"w").unwrap();
    std::fs::write(out.join("notes.txt"), b"n").unwrap();
    check(&with_args(
        "not a run",
        quick(&data, &out, &[]),
        "is not empty and holds no run (e.g. `checkpoints`)",
    ));
    assert!(!out.join("config.json").exists());
    let args = quick(&data, &out, &["--overwrite"]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        std::fs::read(out.join("checkpoints/model.pt")).unwrap(),
        b"w"
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"n");
    assert!(out
        .join("checkpoints/epoch-0001/model.safetensors")
        .is_file());
    // Replacing the run (--overwrite again) replaces its checkpoints, not the user's file.
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        std::fs::read(out.join("checkpoints/model.pt")).unwrap(),
        b"w"
    );
}

#[test]
fn a_resume_removes_what_the_interrupted_run_left_half_written() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    let out = work.path().join("run");
    let args = quick(
        &data,
        &out,
        &["--epochs", "3", "--stop-after-iterations", "3"],
    );
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    // Left by a second signal during a checkpoint, and by a full disk during a rewrite.
    let stray = out.join("checkpoints/.tmp-epoch-0001-iter-000000003");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("model.safetensors"), b"half").unwrap();
    std::fs::write(out.join("metrics.jsonl.tmp"), b"half").unwrap();
    // Resumed, and stopped again before the end: the strays are gone already.
    let o = out.to_str().unwrap();
    let output = cli(&[
        "run",
        "--resume",
        "--quiet",
        "--out",
        o,
        "--stop-after-iterations",
        "5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stray.exists());
    assert!(!out.join("metrics.jsonl.tmp").exists());
}

#[test]
fn a_huge_checkpoint_interval_does_not_wrap_to_every_iteration() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    let out = work.path().join("run");
    // Stopped abruptly in its second epoch, after 3 of its 4 iterations: a checkpoint taken
    // at every iteration would be there.
    let args = quick(
        &data,
        &out,
        &[
            "--checkpoint-every-minutes",
            "4611686018427387904",
            "--epochs",
            "2",
            "--stop-after-iterations",
            "3",
        ],
    );
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["epoch-0001", "latest"]);
}

#[test]
fn a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 64, 16);
    let out = work.path().join("run");
    // Epoch 1 trains normally and checkpoints; resumed with lr 1e30 the loss overflows within
    // a few iterations, and the run stops without writing a checkpoint after it.
    let first = cli(&quick(&data, &out, &["--epochs", "2"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(first.status.success(), "{}", stderr(&first));
    let config = out.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["lr"] = serde_json::json!(1e30);
    value["epochs"] = serde_json::json!(4);
    std::fs::write(&config, serde_json::to_string(&value).unwrap()).unwrap();
    std::fs::remove_dir_all(out.join("checkpoints/epoch-0002")).unwrap();
    std::fs::write(out.join("checkpoints/latest"), "epoch-0001").unwrap();
    // Not a bad input: the resumed run trains (rewriting its metrics) until it diverges.
    check_error(&case(
        "non-finite loss",
        &["run", "--resume", "--out", out.to_str().unwrap()],
        "training stopped, the last good checkpoint (epoch-000",
    ));
    // The run stopped before its end; the checkpoint `latest` names is complete and good.
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert!(
        ["epoch-0001", "epoch-0002", "epoch-0003"].contains(&latest.as_str()),
        "{latest}"
    );
    assert!(out
        .join("checkpoints")
        .join(&latest)
        .join("model.safetensors")
        .exists());
    assert!(!out.join("checkpoints/epoch-0004").exists());
}

#[test]
fn a_diverged_model_is_an_error_never_a_result() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    // lr 1e30: the weights overflow; the run must fail, not report a top-1 (NaN logits used to
    // count as correct: 100 %), and keep no checkpoint of the diverged weights.
    let out = work.path().join("diverged");
    let args = quick(&data, &out, &["--lr", "1e30"]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = stderr(&output);
    assert!(!output.status.success(), "exited with success\n{err}");
    assert!(
        err.contains("the model diverged") || err.contains("loss became"),
        "{err}"
    );
    // Nothing was checkpointed before: the message does not promise a checkpoint.
    assert!(err.contains("no checkpoint had been written yet"), "{err}");
    assert!(!out.join("checkpoints/latest").exists());
    assert!(!out.join("summary.json").exists());

    // A checkpoint whose weights are NaN (written by hand) is refused by `eval`.
    let out = work.path().join("good");
    let args = quick(&data, &out, &[]);
    let output = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let file = out
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let weight = tensors
        .iter_mut()
        .find(|t| t.0.ends_with("weight") && t.1 == safetensors::Dtype::F32)
        .expect("a float weight");
    weight.3 = f32::NAN.to_le_bytes().repeat(weight.3.len() / 4);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let written = safetensors::serialize(views, None).unwrap();
    std::fs::write(&file, &written).unwrap();
    // Flipped bytes are caught by the checksum first...
    check(&case(
        "changed checkpoint",
        &["eval", "--run", out.to_str().unwrap()],
        "its SHA-256 differs from the one SHA256SUMS recorded",
    ));
    // ...and weights diverged before they were written are refused as such.
    let sums_file = file.with_file_name("SHA256SUMS");
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(&written)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let sums: String = std::fs::read_to_string(&sums_file)
        .unwrap()
        .lines()
        .map(|l| match l.ends_with("  model.safetensors") {
            true => format!("{digest}  model.safetensors\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&sums_file, sums).unwrap();
    check(&case(
        "eval of NaN weights",
        &["eval", "--run", out.to_str().unwrap()],
        "weights are not finite",
    ));
    assert!(!out.join("eval.json").exists());
}

#[test]
fn a_start_that_failed_or_was_killed_before_its_first_checkpoint_can_simply_start_again() {
    let work = tempfile::tempdir().unwrap();
    let data = tiny_idx_data(work.path(), 32, 16);
    let out = work.path().join("run");
    let run = |extra: &[&str]| {
        let args = quick(&data, &out, extra);
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // The schedule check fails after config.json is written: the failed start removes what it
    // wrote, and the directory it created.
    let failed = run(&["--densities", "0.5,0.2,0.1"]);
    assert!(!failed.status.success());
    assert!(!out.exists(), "a failed start left {}", out.display());
    // Killed before its first checkpoint: resume says what to do.
    let killed = run(&["--stop-after-iterations", "1"]);
    assert!(killed.status.success(), "{}", stderr(&killed));
    check(&case(
        "resume before the first checkpoint",
        &["run", "--resume", "--out", out.to_str().unwrap()],
        "has no checkpoint yet (it stopped before its first checkpoint); start it again with --overwrite",
    ));
    // Neither left "a run" behind: a plain start (no --overwrite) works.
    let again = run(&[]);
    assert!(again.status.success(), "{}", stderr(&again));
}

#[test]
fn resume_keeps_a_runs_settings_extends_it_on_request_and_leaves_a_finished_run_alone() {
    let work = tempfile::tempdir().unwrap();
    let out = finished_quick_run(work.path());
    let snapshot = |name: &str| std::fs::read(out.join(name)).unwrap();
    let files = [
        "config.json",
        "summary.json",
        "metrics.jsonl",
        "metrics.csv",
    ];
    let before: Vec<Vec<u8>> = files.iter().map(|f| snapshot(f)).collect();
    let o = out.to_str().unwrap();

    // A finished run: says so, exits 0, changes nothing.
    let again = cli(&["run", "--resume", "--quiet", "--out", o]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("has already trained its 1 epochs; nothing changed"));
    // Settings a resumed run cannot change are refused, listed by name.
    check(&case(
        "resume with another lr and model",
        &[
            "run", "--resume", "--out", o, "--lr", "0.5", "--model", "resnet20",
        ],
        "cannot change lr, model of a run being resumed",
    ));
    check(&case(
        "resume with a recipe",
        &["run", "--resume", "--out", o, "--recipe", "quickstart"],
        "a resumed run keeps its own configuration",
    ));
    check(&case(
        "resume to an absurd epoch count",
        &[
            "run",
            "--resume",
            "--out",
            o,
            "--epochs",
            "18446744073709551615",
        ],
        "`epochs` must be ≤ 100000, got 18446744073709551615",
    ));
    let after: Vec<Vec<u8>> = files.iter().map(|f| snapshot(f)).collect();
    assert_eq!(before, after, "a refused or empty resume changed the run");

    // config.json edited by hand so that the checkpoint no longer fits its iteration count.
    let config = out.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    value["batch_size"] = serde_json::json!(8);
    value["epochs"] = serde_json::json!(2);
    std::fs::write(&config, serde_json::to_vec(&value).unwrap()).unwrap();
    check(&case(
        "edited batch size",
        &["run", "--resume", "--out", o],
        "gives 4 iterations per epoch: batch_size, train_subset or the data changed",
    ));
    std::fs::write(&config, &before[0]).unwrap();

    // --epochs extends the run and is recorded.
    let extended = cli(&["run", "--resume", "--quiet", "--out", o, "--epochs", "2"]);
    assert!(extended.status.success(), "{}", stderr(&extended));
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(value["epochs"], 2);
    let records = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 2, "{records}");
}

#[test]
fn a_finished_run_with_a_damaged_checkpoint_is_not_nothing_changed() {
    let work = tempfile::tempdir().unwrap();
    let out = finished_quick_run(work.path());
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let model = out
        .join("checkpoints")
        .join(latest.trim())
        .join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let o = out.to_str().unwrap();
    for args in [
        &["run", "--resume", "--quiet", "--out", o][..],
        &["eval", "--run", o][..],
    ] {
        check(&case(
            "damaged checkpoint of a finished run",
            args,
            "its SHA-256 differs from the one SHA256SUMS recorded",
        ));
    }
}

#[test]
fn a_checkpoint_of_another_model_is_one_line_naming_the_cause() {
    let work = tempfile::tempdir().unwrap();
    let out = finished_quick_run(work.path());
    let config = out.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"small-cnn\"", "\"resnet20\"")).unwrap();
    let expect = "its tensors do not fit the run's model";
    check(&case(
        "another model",
        &["eval", "--run", out.to_str().unwrap()],
        expect,
    ));
    let output = cli(&["eval", "--run", out.to_str().unwrap()]);
    let err = stderr(&output);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Fewer sub-nets than the checkpoint holds: refused, not evaluated on the first two.
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["ast"]["subnets"].as_array_mut().unwrap().pop();
    std::fs::write(&config, serde_json::to_vec(&value).unwrap()).unwrap();
    check(&case(
        "fewer sub-nets",
        &["eval", "--run", out.to_str().unwrap()],
        "tensors the run's model does not have",
    ));
}

#[test]
fn a_reader_that_goes_away_ends_the_output_without_a_panic() {
    // `ast-cli stats --run R | head -1`: the reader closes its end while stats loads the
    // checkpoint, so every line stats prints meets a broken pipe.
    let tmp = tempfile::tempdir().unwrap();
    let run = finished_quick_run(tmp.path());
    let mut child = std::process::Command::new(ast_tests::cli_path())
        .args(["stats", "--run", run.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // 141 as a process SIGPIPE ended; 0 only if stats printed before the reader went away.
    assert!(
        matches!(out.status.code(), Some(141) | Some(0)),
        "{:?}: {err}",
        out.status
    );
}
