//! `ast-cli`: run, evaluate and inspect Alternating Sparse Training runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ast_core::{CorrectionKind, CorrectionMode, OptimizerKind, SubnetTarget, UpdateScope};
use ast_models::ModelKind;
use ast_train::{Augment, DatasetKind, LrSchedule, LrScheduleKind, RunOptions, TrainConfig};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod backend;
mod commands;
mod report;

/// Tensors are allocated and freed at a high rate, many of them megabytes large: glibc maps
/// each of those afresh (a page fault per 4 KiB touched); mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The recipes shipped with the binary: name → JSON, and how the original ran it when that
/// takes more than one device.
const RECIPES: [(&str, &str, &str); 4] = [
    (
        "quickstart",
        include_str!("../../recipes/quickstart.json"),
        "",
    ),
    (
        "cifar-unstructured",
        include_str!("../../recipes/cifar-unstructured.json"),
        "",
    ),
    ("cifar-nm", include_str!("../../recipes/cifar-nm.json"), ""),
    (
        "imagenet-unstructured",
        include_str!("../../recipes/imagenet-unstructured.json"),
        // The original split 256 unevenly (nn.DataParallel: 86/85/85); shards here are equal.
        "; the original on 3 GPUs: --backend cuda --devices 0,1,2 --batch-size 255",
    ),
];

#[derive(Parser, Debug)]
#[command(
    name = "ast-cli",
    version,
    about = "Alternating Sparse Training: K sparse sub-nets sharing one set of weights",
    after_help = "Examples:\n  ast-cli run --recipe quickstart\n  ast-cli run --recipe cifar-unstructured --data-path ~/cifar-10-batches-bin --out runs/wrn\n  ast-cli run --resume --out runs/wrn\n  ast-cli eval --run runs/wrn\n  ast-cli stats --run runs/wrn\n  ast-cli export --run runs/wrn --out wrn.safetensors\n  ast-cli bench-infer --model wrn.safetensors"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train (or resume) a run.
    Run(Box<RunArgs>),
    /// Evaluate every sub-net of a run's last checkpoint.
    Eval(EvalArgs),
    /// Per-layer density of each sub-net and mask overlap between sub-nets.
    Stats(StatsArgs),
    /// List the shipped recipes.
    Recipes,
    /// Images/s of the AST training step (random inputs and masks; no run directory).
    Bench(BenchArgs),
    /// Every mask event of a run (iteration, sub-net, ramp or regrow, target density, prune
    /// rate), computed from the configuration alone: no data, no training.
    Schedule(Box<ScheduleArgs>),
    /// Runs the same 20 AST steps (a small ResNet, three sub-nets, ramp and regrow events) on
    /// Flex and on the chosen backend from the same weights; compares losses and masks.
    CheckBackend(CheckBackendArgs),
    /// Writes sub-nets of a run's last checkpoint into one compact file (safetensors) that
    /// `infer`, `bench-infer` and the ast-infer library load.
    Export(Box<commands::deploy::ExportArgs>),
    /// Top-1/top-5 of an exported file's sub-nets on a labelled test set; `--subnet auto
    /// --budget-ms X` picks the most accurate sub-net within a latency budget on this machine.
    Infer(commands::deploy::InferArgs),
    /// Latency and images/s of each sub-net of an exported file, and of the same model dense,
    /// through the inference runtime.
    BenchInfer(commands::deploy::BenchInferArgs),
    /// Times each sub-net of an exported file on this machine and stores the latencies in the
    /// file, for `infer --subnet auto` and the library's pick to read instead of measuring.
    Calibrate(commands::deploy::CalibrateArgs),
}

#[derive(Args, Debug)]
struct CheckBackendArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// AST iterations.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ScheduleArgs {
    /// A shipped recipe name (see `ast-cli recipes`) or a JSON file.
    #[arg(long, default_value = "quickstart")]
    recipe: String,
    /// Training images per epoch (default: the recipe's train_subset, else the dataset's size:
    /// CIFAR 50 000, ImageNet 1 281 167, (Fashion-)MNIST 60 000).
    #[arg(long)]
    train_size: Option<usize>,
    /// One JSON object per event instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    overrides: Overrides,
}

/// Where to compute.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// CPU, burn's Flex backend (default).
    Flex,
    /// CPU, burn's NdArray backend.
    Ndarray,
    /// NVIDIA GPU through CUDA.
    Cuda,
}

impl BackendArgs {
    /// The CPU backend of this build with its defaults (Flex where built, else NdArray).
    pub(crate) fn cpu() -> Self {
        Self {
            backend: if cfg!(feature = "flex") {
                BackendKind::Flex
            } else {
                BackendKind::Ndarray
            },
            device: 0,
            precision: Precision::F32,
            fusion: Switch::On,
            kernel_cache: None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BackendArgs {
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Flex)]
    backend: BackendKind,
    /// GPU index (CUDA only).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Floating-point precision of the whole model (CUDA only; the CPU backends run f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Kernel fusion (CUDA only): element-wise chains compiled into one kernel.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    fusion: Switch,
    /// Where compiled GPU kernels and autotune results are kept between runs (CUDA only;
    /// default: $AST_KERNEL_CACHE, else ~/.cache/ast/cuda).
    #[arg(long, value_name = "DIR")]
    kernel_cache: Option<PathBuf>,
}

/// Floating-point precision of the model's tensors.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// bfloat16 (CUDA).
    Bf16,
    /// IEEE half precision (CUDA).
    F16,
}

/// On or off.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// A shipped recipe name (see `ast-cli recipes`) or a JSON file.
    #[arg(long)]
    recipe: Option<String>,
    /// Run directory (default: runs/RECIPE, the recipe's name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace a run already in --out.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// Stop abruptly after this many iterations, writing nothing more (tests a kill).
    #[arg(long, hide = true)]
    stop_after_iterations: Option<usize>,
    /// Stop gracefully (as on SIGINT) after this many iterations (tests).
    #[arg(long, hide = true)]
    stop_gracefully_after: Option<usize>,
    /// Data-parallel training on these devices, e.g. `0,1,2`: one worker each, on an equal
    /// shard of every batch (the batch size stays the global one). CUDA: GPU indices; CPU
    /// backends: workers sharing the CPU (at most 16). One device here (`--devices 0`) runs
    /// the data-parallel machinery with one worker (to measure what it costs).
    #[arg(long, value_name = "LIST", value_parser = parse_devices, conflicts_with = "device")]
    devices: Option<DeviceList>,
    /// Several machines: this process is one of N started by `mpirun -np N` (one per machine,
    /// each with the same --devices count); needs a binary built with `--features mpi`.
    #[arg(long, value_name = "N")]
    nodes: Option<usize>,
    #[command(flatten)]
    overrides: Overrides,
}

/// Most workers `--devices` starts on a CPU backend.
const MAX_CPU_WORKERS: usize = 16;

/// The other processes of a run on several machines (`--nodes`), checked against `mpirun`'s.
fn nodes(
    requested: Option<usize>,
) -> Result<Option<std::sync::Arc<dyn ast_train::parallel::CrossNode>>> {
    let Some(n) = requested else {
        return Ok(None);
    };
    if n == 0 {
        bail!("--nodes 0: give the number of processes (machines), at least 1");
    }
    #[cfg(feature = "mpi")]
    {
        use ast_train::parallel::CrossNode;
        if !mpi::environment::is_initialized() {
            bail!("--nodes: MPI could not be initialised; launch with `mpirun -np {n}`");
        }
        if mpi::environment::threading_support() < mpi::Threading::Serialized {
            bail!(
                "--nodes: this MPI library gives no thread support (MPI_THREAD_SERIALIZED is \
                 needed); use an MPI built with threads (Debian's Open MPI is)"
            );
        }
        let world = ast_train::mpi::MpiNodes::world();
        if world.size() != n {
            bail!(
                "--nodes {n}, but mpirun started {} process(es): launch with `mpirun -np {n} \
                 ast-cli run --nodes {n} …` (one process per machine)",
                world.size()
            );
        }
        Ok(Some(std::sync::Arc::new(world)))
    }
    #[cfg(not(feature = "mpi"))]
    bail!(
        "--nodes needs a binary built with MPI: `cargo build --release -p ast-cli --features mpi` \
         (Debian: apt install libopenmpi-dev libclang-dev), launched by `mpirun -np {n}`"
    )
}

/// Ends a process of a run on several machines that cannot go on: the others would wait for
/// it for ever, so it prints `message` and asks MPI to end the whole job (`MPI_Abort`).
fn abort_nodes(message: &str) {
    #[cfg(feature = "mpi")]
    {
        use mpi::traits::Communicator;
        eprintln!(
            "{message}; ending the other processes of the run (resume them all with --resume)"
        );
        mpi::topology::SimpleCommunicator::world().abort(1);
    }
    #[cfg(not(feature = "mpi"))]
    let _ = message;
}

/// The indices of `--devices`.
#[derive(Debug, Clone)]
struct DeviceList(Vec<usize>);

/// Parses `--devices`: distinct indices separated by commas.
fn parse_devices(text: &str) -> std::result::Result<DeviceList, String> {
    let mut devices = Vec::new();
    for part in text.split(',') {
        let index: usize = part.trim().parse().map_err(|_| {
            format!("`{part}` is not a device index: give distinct indices separated by commas, e.g. 0,1,2")
        })?;
        if devices.contains(&index) {
            return Err(format!(
                "device {index} is listed twice: give each device once"
            ));
        }
        devices.push(index);
    }
    Ok(DeviceList(devices))
}

/// Flags overriding the recipe (every hyper-parameter of the original scripts).
#[derive(Args, Debug, Default)]
struct Overrides {
    /// Model.
    #[arg(long)]
    model: Option<ModelKind>,
    /// Dataset.
    #[arg(long)]
    dataset: Option<DatasetKind>,
    /// Dataset directory.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// Train on the first N training images.
    #[arg(long)]
    train_subset: Option<usize>,
    /// Evaluate on the first N test images.
    #[arg(long)]
    test_subset: Option<usize>,
    /// Weights the optimizer moves: all (dense, the original's) or the sub-net's (active).
    #[arg(long)]
    update_scope: Option<UpdateScope>,
    /// Training augmentation (standard: random crop + flip, the original's).
    #[arg(long)]
    augment: Option<Augment>,
    /// Base learning rate.
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// LR schedule.
    #[arg(long)]
    lr_schedule: Option<LrScheduleKind>,
    /// Epochs of the step schedule's ×0.1 decays, comma-separated (default 50 % and 75 %).
    #[arg(long, value_delimiter = ',')]
    milestones: Option<Vec<usize>>,
    /// Optimizer (sgd is the original's).
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// SGD momentum.
    #[arg(long, allow_hyphen_values = true)]
    momentum: Option<f64>,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    nesterov: bool,
    /// Adam/AdamW betas, comma-separated (default 0.9,0.999).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    betas: Option<Vec<f64>>,
    /// Weight decay (SGD and Adam: added to the gradient; AdamW: decoupled).
    #[arg(long, allow_hyphen_values = true)]
    weight_decay: Option<f64>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Initial prune-and-regrow rate.
    #[arg(long, allow_hyphen_values = true)]
    prune_rate: Option<f64>,
    /// Initial (ERK) density of every sub-net.
    #[arg(long, allow_hyphen_values = true)]
    init_density: Option<f64>,
    /// Mask update every N global iterations of a sub-net's prune counter (as the original).
    #[arg(long)]
    update_frequency: Option<usize>,
    /// First epoch of the density ramp.
    #[arg(long)]
    init_prune_epoch: Option<usize>,
    /// Last epoch of the density ramp.
    #[arg(long)]
    final_prune_epoch: Option<usize>,
    /// Sub-net k's prune counter is delayed by k·(K·N + 1) global iterations (as the original).
    #[arg(long)]
    subnet_offset: Option<usize>,
    /// Unstructured sub-nets: final densities, comma-separated (e.g. 0.1,0.05,0.02).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        conflicts_with = "nm"
    )]
    densities: Option<Vec<f64>>,
    /// N:M sub-nets, comma-separated (e.g. 2:4,1:4,1:8).
    #[arg(long, value_delimiter = ',')]
    nm: Option<Vec<String>>,
    /// Gradient correction.
    #[arg(long)]
    correction: Option<CorrectionKind>,
    /// EMA coefficient of the `ema` correction.
    #[arg(long)]
    ema_beta: Option<f64>,
    /// Label smoothing.
    #[arg(long, allow_hyphen_values = true)]
    label_smoothing: Option<f64>,
    /// Seed (weights, data order, masks).
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N epochs.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Also checkpoint mid-epoch every N minutes (long epochs).
    #[arg(long)]
    checkpoint_every_minutes: Option<u64>,
    /// Threads preparing batches.
    #[arg(long)]
    data_threads: Option<usize>,
    /// Refresh BatchNorm statistics with N forward passes per sub-net before each evaluation.
    #[arg(long)]
    bn_recalibration_batches: Option<usize>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
    /// Evaluate on this dataset directory instead of the run's.
    #[arg(long)]
    data_path: Option<PathBuf>,
    /// Write the results as JSON here (default: eval.json in the run directory).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also time each sub-net's inference on this machine and backend, and pick the most
    /// accurate sub-net whose forward pass takes at most this many milliseconds.
    #[arg(long, value_name = "MS", value_parser = parse_budget, allow_hyphen_values = true)]
    latency_budget_ms: Option<f64>,
    /// Images per timed forward pass (taken from the test set).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096), requires = "latency_budget_ms")]
    latency_batch: u64,
}

pub(crate) fn parse_budget(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
        _ => Err(format!(
            "`{text}` is not a latency budget: give a positive number of milliseconds, e.g. 5"
        )),
    }
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
    /// Write the per-layer table as CSV here (default: stats.csv in the run directory).
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// Gradient correction in the timed step.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchCorrection {
    /// No correction (as the PyTorch baseline).
    Off,
    /// Projection onto the previous sub-net's gradient.
    Projection,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Model (as in `run --model`).
    #[arg(long, default_value = "resnet32")]
    model: ModelKind,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Untimed steps first (CUDA compiles and tunes kernels on the first ones).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Number of sub-nets K.
    #[arg(long, default_value_t = 3)]
    subnets: usize,
    /// Density of every sub-net's random mask.
    #[arg(long, default_value_t = 0.05, allow_hyphen_values = true)]
    density: f64,
    /// Gradient correction.
    #[arg(long, value_enum, default_value_t = BenchCorrection::Off)]
    correction: BenchCorrection,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the timings as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Flex: time burn's generic convolution instead of our masked-convolution kernels.
    #[arg(long)]
    generic_conv: bool,
    /// Then time this many plain dense steps of the same model (full masks, burn's SGD).
    #[arg(long, default_value_t = 0)]
    dense_steps: usize,
}

fn bench(args: BenchArgs) -> Result<()> {
    let model = args.model;
    #[cfg(feature = "flex")]
    ast_core::backend::set_flex_kernels(!args.generic_conv);
    if let Some(dir) = args.json.as_deref().and_then(Path::parent) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!(
                "cannot write the timings: {} is not a directory",
                dir.display()
            );
        }
    }
    let job = ast_train::bench::StepBench {
        model,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        subnets: args.subnets,
        density: args.density,
        correction: match args.correction {
            BenchCorrection::Off => CorrectionMode::Off,
            BenchCorrection::Projection => CorrectionMode::Projection,
        },
        seed: args.seed,
        dense_steps: args.dense_steps,
        progress: true,
    };
    backend::check(&args.backend)?;
    if let (Some(note), _) = backend::first_step_note(&args.backend, &model.to_string(), args.batch)
    {
        eprintln!("{note}");
    }
    let timing = backend::dispatch(&args.backend, backend::Bench(job))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model={} batch={} backend={:?} threads={threads} median_step_s={:.4} images_per_s={:.1} \
         (forward {:.4} s, backward {:.4} s, update {:.4} s; dense-gradient step {:.4} s)",
        timing.model,
        timing.batch,
        args.backend.backend,
        timing.median_step_s,
        timing.images_per_s,
        timing.median_forward_s,
        timing.median_backward_s,
        timing.median_update_s,
        timing.median_dense_grad_step_s
    );
    println!("first_step_s={:.3}", timing.first_step_s);
    if let (Some(ips), Some(first)) = (timing.dense_images_per_s, timing.dense_first_step_s) {
        println!("plain dense step: images_per_s={ips:.1} first_step_s={first:.3}");
    }
    let mut json = serde_json::to_value(&timing)?;
    if let Some(bytes) = backend::gpu_memory_reserved(&args.backend) {
        println!(
            "peak GPU memory (cubecl's pools) {:.1} MiB",
            bytes as f64 / 1048576.0
        );
        json["gpu_memory_reserved_bytes"] = bytes.into();
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Loss tolerance (relative, per iteration) and largest share of differing mask positions of
/// `check-backend`.
const LOSS_TOLERANCE: f32 = 1e-3;
const MASK_TOLERANCE: f64 = 1e-3;

fn check_backend(args: CheckBackendArgs) -> Result<()> {
    backend::check(&args.backend)?;
    let c = backend::dispatch(
        &args.backend,
        backend::CheckBackend {
            steps: args.steps,
            seed: args.seed,
        },
    )?;
    println!(
        "{:?} against flex, {} iterations: largest loss difference {:.2e} (tolerance {LOSS_TOLERANCE:.0e}), \
         mask events {} / {}, mask positions differing {} of {}",
        args.backend.backend,
        c.losses.len(),
        c.max_loss_difference,
        c.events[1],
        c.events[0],
        c.mask_differences,
        c.mask_positions
    );
    for (k, kept) in c.kept.iter().enumerate() {
        println!("sub-net {k}: kept {} (flex {})", kept[1], kept[0]);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&c)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !c.agrees(LOSS_TOLERANCE, MASK_TOLERANCE) {
        bail!(
            "{:?} does not train like flex (losses {:?} vs {:?})",
            args.backend.backend,
            c.losses,
            c.reference_losses
        );
    }
    println!("consistent");
    Ok(())
}

fn schedule(args: ScheduleArgs) -> Result<()> {
    let config = apply_overrides(load_recipe(&args.recipe)?, args.overrides)?;
    config.validate()?;
    let train_size = match args.train_size {
        Some(0) => bail!("--train-size must be ≥ 1"),
        Some(n) => n,
        None => {
            let full = config.data.kind.train_size();
            config.data.train_subset.map_or(full, |n| n.min(full))
        }
    };
    let steps_per_epoch = train_size.div_ceil(config.batch_size);
    let total = steps_per_epoch * config.epochs;
    let s = &config.ast.schedule;
    let events = ast_core::schedule::timeline(s, &config.ast.subnets, steps_per_epoch, total);
    let mut text = String::new();
    if args.json {
        for e in &events {
            text += &serde_json::to_string(e)?;
            text.push('\n');
        }
    } else {
        text += &format!(
            "{} epochs × {steps_per_epoch} iterations ({train_size} images, batch {}); \
             {} mask events\n",
            config.epochs,
            config.batch_size,
            events.len()
        );
        text += "iteration  sub-net  counter  event   progress  target density  prune rate\n";
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        for e in &events {
            text += &format!(
                "{:>9}  {:>7}  {:>7}  {:<6}  {:>8}  {:>14}  {:>10.6}\n",
                e.iteration,
                e.subnet,
                e.prune_counter,
                e.kind,
                opt(e.progress),
                opt(e.target_density),
                e.prune_rate
            );
        }
    }
    // A closed pipe (`| head`) is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        written => written?,
    }
    let subnets = config.ast.subnets.len();
    let pruned: Vec<usize> = (0..subnets)
        .filter(|&k| match config.ast.subnets[k] {
            SubnetTarget::Density(d) => d < s.init_density,
            SubnetTarget::Nm { .. } => true,
        })
        .collect();
    ast_core::schedule::check_reaches_final_density(s, subnets, &pruned, steps_per_epoch, total)?;
    Ok(())
}

fn load_recipe(name: &str) -> Result<TrainConfig> {
    let (text, origin) = match RECIPES.iter().find(|(n, _, _)| *n == name) {
        Some((_, json, _)) => (json.to_string(), format!("recipe `{name}`")),
        None if name.ends_with(".json") || Path::new(name).exists() => (
            std::fs::read_to_string(name)
                .with_context(|| format!("cannot read recipe file {name}"))?,
            format!("recipe file {name}"),
        ),
        None => {
            let names: Vec<&str> = RECIPES.iter().map(|(n, _, _)| *n).collect();
            bail!(
                "unknown recipe `{name}` (shipped: {}; or give a .json file)",
                names.join(", ")
            );
        }
    };
    serde_json::from_str(&text).map_err(|e| anyhow!("{origin} is not a valid configuration: {e}"))
}

fn parse_nm(s: &str) -> Result<SubnetTarget> {
    let (n, m) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("--nm `{s}`: expected N:M, e.g. 2:4"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| anyhow!("--nm `{s}`: N is not a number"))?;
    let m: usize = m
        .trim()
        .parse()
        .map_err(|_| anyhow!("--nm `{s}`: M is not a number"))?;
    Ok(SubnetTarget::Nm { n, m })
}

/// `*slot = value` when a flag gave one.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn apply_overrides(mut c: TrainConfig, o: Overrides) -> Result<TrainConfig> {
    set(&mut c.model, o.model.map(|m| m.to_string()));
    set(&mut c.data.kind, o.dataset);
    set(&mut c.data.path, o.data_path);
    set(&mut c.data.train_subset, o.train_subset.map(Some));
    set(&mut c.data.test_subset, o.test_subset.map(Some));
    set(&mut c.data.augment, o.augment);
    set(&mut c.lr, o.lr);
    set(&mut c.epochs, o.epochs);
    match o.lr_schedule {
        None => {}
        Some(LrScheduleKind::Cosine) => c.lr_schedule = LrSchedule::Cosine,
        Some(LrScheduleKind::Step) => c.lr_schedule = LrSchedule::half_and_three_quarters(c.epochs),
    }
    if let Some(milestones) = o.milestones {
        c.lr_schedule = LrSchedule::Step {
            milestones,
            gamma: 0.1,
        };
    }
    set(&mut c.ast.update_scope, o.update_scope);
    set(&mut c.ast.optimizer, o.optimizer);
    if c.ast.optimizer == OptimizerKind::Sgd {
        if o.betas.is_some() {
            bail!(
                "--betas is an Adam/AdamW setting; with SGD use --momentum (or --optimizer adam)"
            );
        }
        set(&mut c.ast.sgd.momentum, o.momentum);
        c.ast.sgd.nesterov |= o.nesterov;
        set(&mut c.ast.sgd.weight_decay, o.weight_decay);
    } else {
        if o.momentum.is_some() || o.nesterov {
            bail!(
                "--momentum and --nesterov are SGD settings; {} uses --betas",
                c.ast.optimizer.name()
            );
        }
        if let Some(b) = o.betas {
            let [b1, b2] = b[..] else {
                bail!("--betas takes two numbers, e.g. --betas 0.9,0.999");
            };
            (c.ast.adam.beta_1, c.ast.adam.beta_2) = (b1, b2);
        }
        set(&mut c.ast.adam.weight_decay, o.weight_decay);
    }
    set(&mut c.batch_size, o.batch_size);
    let s = &mut c.ast.schedule;
    set(&mut s.prune_rate, o.prune_rate);
    set(&mut s.init_density, o.init_density);
    set(&mut s.update_frequency, o.update_frequency);
    set(&mut s.init_prune_epoch, o.init_prune_epoch);
    set(&mut s.final_prune_epoch, o.final_prune_epoch);
    set(&mut s.subnet_offset, o.subnet_offset);
    if let Some(d) = o.densities {
        c.ast.subnets = d.into_iter().map(SubnetTarget::Density).collect();
    }
    if let Some(nm) = o.nm {
        c.ast.subnets = nm.iter().map(|s| parse_nm(s)).collect::<Result<_>>()?;
    }
    match o.correction {
        None => {
            if let (Some(b), CorrectionMode::Ema { .. }) = (o.ema_beta, c.ast.correction) {
                c.ast.correction = CorrectionMode::Ema { beta: b };
            }
        }
        Some(kind) => {
            c.ast.correction = CorrectionMode::from_kind(kind, o.ema_beta.unwrap_or(0.9));
        }
    }
    set(&mut c.label_smoothing, o.label_smoothing);
    if let Some(v) = o.seed {
        c.seed = v;
        c.ast.seed = v;
    }
    set(&mut c.checkpoint_every, o.checkpoint_every);
    set(
        &mut c.checkpoint_every_minutes,
        o.checkpoint_every_minutes.map(Some),
    );
    set(&mut c.data_threads, o.data_threads.map(Some));
    set(&mut c.bn_recalibration_batches, o.bn_recalibration_batches);
    Ok(c)
}

fn run(args: RunArgs) -> Result<()> {
    let devices = match &args.devices {
        Some(DeviceList(list)) => list.clone(),
        None => vec![args.backend.device],
    };
    if args.backend.backend != BackendKind::Cuda && devices.len() > MAX_CPU_WORKERS {
        bail!(
            "--devices lists {} workers; the CPU backends take at most {MAX_CPU_WORKERS}",
            devices.len()
        );
    }
    let nodes = nodes(args.nodes)?;
    for &device in &devices {
        backend::check(&BackendArgs {
            device,
            ..args.backend.clone()
        })?;
    }
    let out = match (&args.out, &args.recipe) {
        (Some(out), _) => out.clone(),
        (None, Some(recipe)) if !args.resume => {
            let stem = Path::new(recipe)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("run");
            PathBuf::from("runs").join(stem)
        }
        _ => bail!("--out is required (the run directory)"),
    };
    let config = if args.resume {
        if let Some(recipe) = &args.recipe {
            bail!("--recipe {recipe} with --resume: a resumed run keeps its own configuration");
        }
        // The flags given are applied to the saved configuration; the library refuses the
        // ones a resumed run cannot change.
        match ast_train::read_run_config(&out) {
            Ok(saved) => Some(apply_overrides(saved, args.overrides)?),
            Err(_) => None,
        }
    } else {
        let recipe = args.recipe.as_deref().unwrap_or("quickstart");
        Some(apply_overrides(load_recipe(recipe)?, args.overrides)?)
    };
    let (first_step_note, first_step_marker) = match &config {
        Some(c) => backend::first_step_note(&args.backend, &c.model.to_string(), c.batch_size),
        None => (None, None),
    };
    let opts = RunOptions {
        first_step_note,
        first_step_marker,
        dir: out,
        resume: args.resume,
        overwrite: args.overwrite,
        progress: !args.quiet,
        stop_after: args.stop_after_iterations,
        stop: Some(graceful_stop()?),
        stop_gracefully_after: args.stop_gracefully_after,
    };
    // The lock on the run directory is held until this function returns.
    let (config, _lock) = match ast_train::prepare_run_dir(config, &opts) {
        Err(e @ ast_train::TrainError::RunFinished { .. }) => {
            eprintln!("{e}");
            return Ok(());
        }
        prepared => prepared?,
    };
    if !args.quiet {
        eprintln!(
            "run {}: {} on {} ({}), {} sub-nets, {} epochs, backend {:?}",
            opts.dir.display(),
            config.model,
            config.data.kind.name(),
            config.data.path.display(),
            config.ast.subnets.len(),
            config.epochs,
            args.backend.backend
        );
    }
    let several_nodes = nodes.is_some();
    let summary = match backend::dispatch(
        &args.backend,
        backend::Train {
            config,
            opts: &opts,
            devices: args.devices.map(|DeviceList(list)| list),
            nodes,
        },
    ) {
        Ok(summary) => summary,
        Err(e) => {
            if !opts.resume {
                // A new run that failed before its first checkpoint leaves nothing behind.
                ast_train::discard_unstarted_run(&opts.dir)?;
            }
            if several_nodes {
                abort_nodes(&format!("error: {e:#}"));
            }
            return Err(e);
        }
    };
    if summary.interrupted {
        if several_nodes {
            abort_nodes("stopped after the requested number of iterations");
        }
        eprintln!("stopped after the requested number of iterations");
        return Ok(());
    }
    report::print_summary(&summary);
    println!("run directory: {}", opts.dir.display());
    Ok(())
}

/// The flag SIGINT and SIGTERM raise: the run finishes its iteration, checkpoints and stops.
/// A second signal, with the flag already raised, exits at once (status 130).
fn graceful_stop() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so that it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())
            .context("cannot install the signal handler")?;
        signal_hook::flag::register(signal, flag.clone())
            .context("cannot install the signal handler")?;
    }
    Ok(flag)
}

/// mimalloc returns freed memory to the OS after a delay (`purge_delay`, 1 s in mimalloc 3),
/// and a training step frees and re-allocates the same large tensors: each return costs page
/// faults on the next use (sys time 10–20 % of the CPU time). mimalloc reads its options from
/// the environment once, when the process starts, and setting one from the program needs an
/// `unsafe` call; so the program starts itself again, in place (`exec`: same PID, arguments
/// and descriptors), with `MIMALLOC_PURGE_DELAY=-1` (never return freed memory; the peak stays
/// what it was). A value the user set is kept. Back to back on 2 cores: wide ResNet-32 at
/// density 0.1 245 → 263–265 img/s, sys time 1.1–2.2 → 0.1–0.3 s per 12 steps.
#[cfg(unix)]
fn keep_freed_memory_mapped() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(OPTION).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(name) = args.next() {
        again.arg0(name);
    }
    // `exec` returns only when it failed: then this process goes on with mimalloc's default.
    let _failed = again.args(args).env(OPTION, "-1").exec();
}

fn main() -> ExitCode {
    #[cfg(unix)]
    keep_freed_memory_mapped();
    let cli = Cli::parse();
    // The command runs on a worker of the rayon pool the kernels use, not beside it: a
    // parallel region then starts on the calling worker, and no third thread competes with the
    // pool's for the cores between regions (Flex training step +4–8 % on 2 cores, measured
    // back to back). Workers get the main thread's stack size (burn's backward recurses).
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ast-worker-{i}"))
        .stack_size(8 << 20)
        .build_global();
    // Data-parallel workers are threads of their own that block in their exchanges: none of
    // them may hold a pool thread, so that command stays outside (its workers use the pool).
    let data_parallel = matches!(&cli.command, Command::Run(r)
        if r.devices.is_some() || r.nodes.is_some());
    // MPI lives for the whole process; each process's worker 0 calls it from its own thread.
    #[cfg(feature = "mpi")]
    let _mpi = match &cli.command {
        Command::Run(r) if r.nodes.is_some() => {
            mpi::initialize_with_threading(mpi::Threading::Serialized)
        }
        _ => None,
    };
    let result = if pool.is_ok() && !data_parallel {
        rayon::scope(|_| command(cli))
    } else {
        // No threads to be had: the command runs on the main thread, the kernels serially.
        command(cli)
    };
    finish(result)
}

fn command(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Eval(args) => backend::dispatch(
            &args.backend,
            backend::Eval {
                run: &args.run,
                data_path: args.data_path.as_deref(),
                json: args.json.as_deref(),
                latency: args
                    .latency_budget_ms
                    .map(|ms| (ms / 1000.0, args.latency_batch as usize)),
            },
        ),
        Command::Bench(args) => bench(args),
        Command::Schedule(args) => schedule(*args),
        Command::CheckBackend(args) => check_backend(args),
        Command::Stats(args) => backend::stats(&args.run, args.csv.as_deref()),
        Command::Export(args) => backend::dispatch(&args.backend, commands::deploy::Export(&args)),
        Command::Infer(args) => commands::deploy::infer(&args),
        Command::BenchInfer(args) => commands::deploy::bench_infer(&args),
        Command::Calibrate(args) => commands::deploy::calibrate(&args),
        Command::Recipes => {
            for (name, json, launch) in RECIPES {
                let c: TrainConfig = serde_json::from_str(json).expect("shipped recipes parse");
                println!(
                    "{name:<22} {} on {}, {} sub-nets, {} epochs{launch}",
                    c.model,
                    c.data.kind.name(),
                    c.ast.subnets.len(),
                    c.epochs
                );
            }
            Ok(())
        }
    }
}

fn finish(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_recipes_parse_and_validate() {
        for (name, json, _) in RECIPES {
            let c: TrainConfig =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn flags_override_the_recipe() {
        let o = Overrides {
            nm: Some(vec!["2:4".into(), "1:8".into()]),
            lr: Some(0.05),
            correction: Some(CorrectionKind::Ema),
            ema_beta: Some(0.5),
            ..Default::default()
        };
        let c = apply_overrides(load_recipe("quickstart").unwrap(), o).unwrap();
        assert_eq!(
            c.ast.subnets,
            vec![
                SubnetTarget::Nm { n: 2, m: 4 },
                SubnetTarget::Nm { n: 1, m: 8 }
            ]
        );
        assert_eq!(c.lr, 0.05);
        assert_eq!(c.ast.correction, CorrectionMode::Ema { beta: 0.5 });
        assert!(parse_nm("2-4")
            .unwrap_err()
            .to_string()
            .contains("expected N:M"));
    }
}
