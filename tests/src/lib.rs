//! Helpers shared by the workspace-level tests in `tests/tests/`: locating and running the
//! `ast-cli` binary, and writing small datasets in the real file formats.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `ast-cli` binary that `cargo test --workspace` built next to the test executables.
///
/// Cargo builds a package's binaries only for that package's own integration tests; the
/// `ast-cli/tests/binary.rs` test is what makes `cargo test --workspace` build this one.
/// `cargo test -p ast-tests` alone does not rebuild it, so a binary older than any source it is
/// built from is refused rather than tested.
///
/// # Panics
/// If the binary is missing or older than a source file of the workspace (run the tests
/// through `cargo test --workspace`).
pub fn cli_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join(format!("ast-cli{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace`",
        bin.display()
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .expect("binary mtime");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    if let Some(newer) = newer_source(workspace, built) {
        panic!(
            "{} is older than {}: it was not rebuilt; run `cargo test --workspace`",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// A source file (`.rs`, `.toml`, `.json` under the crates and `recipes/`) modified after
/// `time`, if any.
fn newer_source(workspace: &Path, time: std::time::SystemTime) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["ast-core", "ast-models", "ast-train", "ast-cli", "recipes"]
        .iter()
        .map(|d| workspace.join(d))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("target") {
                    dirs.push(path);
                }
                continue;
            }
            let source = path
                .extension()
                .is_some_and(|e| e == "rs" || e == "toml" || e == "json");
            let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
            if source && modified > time {
                return Some(path);
            }
        }
    }
    None
}

/// Runs `ast-cli` with `args` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(cli_path())
        .args(args)
        .output()
        .expect("ast-cli runs")
}

/// stderr of an output as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Where Debian's `dataset-fashion-mnist` package installs the IDX files.
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Whether what a test needs is there; when it is not, the test fails where the environment
/// requires it (`CI` or `AST_REQUIRE_<what>` set: `.ci/run` sets `AST_REQUIRE_DATA`), and
/// otherwise says SKIPPED on stderr so that a pass is not mistaken for a run.
///
/// # Panics
/// If `present` is false and the environment requires it.
pub fn require(present: bool, what: &str, test: &str, fix: &str) -> bool {
    if present {
        return true;
    }
    let variable = format!("AST_REQUIRE_{what}");
    let required = std::env::var_os(&variable).is_some() || std::env::var_os("CI").is_some();
    assert!(
        !required,
        "{test}: {fix} (required here: CI or {variable} is set)"
    );
    eprintln!("\n*** SKIPPED {test}: {fix} ***\n");
    false
}

/// Whether the real Fashion-MNIST files are installed (CI installs them; see [`require`]).
///
/// # Panics
/// If they are not and the environment requires them.
pub fn fashion_mnist_available(test: &str) -> bool {
    let present = Path::new(FASHION_MNIST)
        .join("train-images-idx3-ubyte.gz")
        .exists();
    let fix = format!("{FASHION_MNIST} is not installed (`apt-get install dataset-fashion-mnist`)");
    require(present, "DATA", test, &fix)
}

/// A tiny deterministic pixel pattern: `n` images of `c×h×w` whose class is visible.
pub fn pattern_images(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    classes: usize,
) -> (Vec<u8>, Vec<u8>) {
    let mut pixels = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % classes) as u8;
        for ch in 0..c {
            for r in 0..h {
                for col in 0..w {
                    let on = (r + col + ch) % classes == label as usize;
                    pixels.push(if on {
                        220
                    } else {
                        (i * 7 + r * 3 + col) as u8 % 40
                    });
                }
            }
        }
        labels.push(label);
    }
    (pixels, labels)
}

/// Writes an IDX image file (magic 0x803) and a label file (magic 0x801).
pub fn write_idx(dir: &Path, prefix: &str, n: usize, side: usize) {
    let (pixels, labels) = pattern_images(n, 1, side, side, 10);
    let mut images = Vec::new();
    for v in [0x0803u32, n as u32, side as u32, side as u32] {
        images.extend_from_slice(&v.to_be_bytes());
    }
    images.extend_from_slice(&pixels);
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    let mut lab = Vec::new();
    for v in [0x0801u32, n as u32] {
        lab.extend_from_slice(&v.to_be_bytes());
    }
    lab.extend_from_slice(&labels);
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

/// Writes a CIFAR-10 binary directory with `per_file` records in each of the six files.
pub fn write_cifar10(dir: &Path, per_file: usize) {
    let names = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ];
    for (f, name) in names.iter().enumerate() {
        let (pixels, labels) = pattern_images(per_file, 3, 32, 32, 10);
        let mut bytes = Vec::new();
        for i in 0..per_file {
            bytes.push(labels[(i + f) % per_file]);
            bytes.extend_from_slice(&pixels[i * 3072..(i + 1) * 3072]);
        }
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}

/// `<root>/data` holding a small IDX dataset (`train` training and `test` test images, 28×28).
pub fn tiny_idx_data(root: &Path, train: usize, test: usize) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", train, 28);
    write_idx(&data, "t10k", test, 28);
    data
}

/// Arguments of a quickstart run of dense sub-nets on the 256 training images of `data` (16
/// iterations per epoch) into `out`, followed by `extra`.
pub fn dense_run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let fixed = [
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
    ];
    with_paths(
        fixed.iter().map(|s| s.to_string()).collect(),
        data,
        out,
        extra,
    )
}

/// `args` followed by `--data-path data --out out` and then `extra`.
pub fn with_paths(mut args: Vec<String>, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    args.extend([
        "--data-path".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits (up to 60 s) until process `pid` holds the lock of run directory `out` and has
/// written the run's `config.json` (the lock is taken first, so a test that went on at the lock
/// alone could find no config yet).
///
/// # Panics
/// If it does not within 60 s.
pub fn wait_for_lock(out: &Path, pid: u32) {
    let lock = out.join(".lock");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid.to_string()
        || !out.join("config.json").is_file()
    {
        assert!(
            start.elapsed().as_secs() < 60,
            "process {pid} took no lock on {}",
            out.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Arguments of a 3-epoch quickstart run for the data-parallel tests: 96 training images of
/// `data` in batches of 18 (five full batches and a last of 6, so 2 or 3 workers split every
/// batch), mask events every 3 iterations, into `out`, followed by `extra`.
pub fn parallel_run_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let fixed = [
        "run",
        "--recipe",
        "quickstart",
        "--quiet",
        "--train-subset",
        "96",
        "--test-subset",
        "40",
        "--batch-size",
        "18",
        "--epochs",
        "3",
        "--final-prune-epoch",
        "1",
        "--update-frequency",
        "3",
        "--subnet-offset",
        "1",
        "--data-threads",
        "1",
    ];
    with_paths(
        fixed.iter().map(|s| s.to_string()).collect(),
        data,
        out,
        extra,
    )
}

/// What a run directory holds at the end: the last checkpoint's tensor files (name, SHA-256 of
/// the bytes) and the metrics without their timings.
///
/// # Panics
/// If the run has no checkpoint or no metrics.
pub fn run_results(dir: &Path) -> (Vec<(String, String)>, Vec<serde_json::Value>) {
    let last = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .max()
        .expect("a checkpoint");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&last)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| {
            use sha2::Digest;
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let digest = sha2::Sha256::digest(std::fs::read(&p).unwrap());
            let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
            (name, hex)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no tensors", last.display());
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect();
    (files, metrics)
}

/// The `AST_KILL_AT` points (`<point>:<n>`) of a 3-epoch run: every gap between the writes of
/// the second checkpoint and of the second epoch's metrics, the first checkpoint's last one,
/// and the gaps of the finish after the last iteration (the last checkpoint, then the summary).
pub const KILL_POINTS: [&str; 10] = [
    "epoch-metrics-written:2",
    "checkpoint-started:2",
    "checkpoint-model-written:2",
    "checkpoint-optimizer-written:2",
    "checkpoint-state-written:2",
    "checkpoint-renamed:2",
    "checkpoint-latest-written:1",
    "checkpoint-renamed:3",
    "checkpoint-latest-written:3",
    "run-tidied:1",
];
