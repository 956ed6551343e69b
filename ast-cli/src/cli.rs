//! The command line: its commands and the flags several of them share.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::schedule::ScheduleArgs;
use crate::commands::{self, bench::BenchArgs, check::CheckBackendArgs, run::RunArgs};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "ast-cli",
    version,
    about = "Alternating Sparse Training: K sparse sub-nets sharing one set of weights",
    after_help = "Examples:\n  ast-cli run --recipe quickstart\n  ast-cli run --recipe cifar-unstructured --data-path ~/cifar-10-batches-bin --out runs/wrn\n  ast-cli run --resume --out runs/wrn\n  ast-cli eval --run runs/wrn\n  ast-cli stats --run runs/wrn\n  ast-cli export --run runs/wrn --out wrn.safetensors\n  ast-cli bench-infer --model wrn.safetensors"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Train (or resume) a run.
    Run(Box<RunArgs>),
    /// Evaluate every sub-net of a run's last checkpoint.
    Eval(EvalArgs),
    /// Per-layer density of each sub-net and mask overlap between sub-nets.
    Stats(StatsArgs),
    /// Plots of a run as SVG files: top-1 against density, per-epoch top-1, loss and
    /// learning rate (other runs overlaid with --compare), density over iterations with the
    /// mask events, per-layer density.
    Plot(commands::plot::PlotArgs),
    /// A run's report as one self-contained HTML page (plots inline, the sub-nets' last
    /// evaluation, mask overlap, mask events, configuration); a run writes it after every
    /// epoch, and the page of a running run reloads itself.
    Report(commands::report::ReportArgs),
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
    /// Top-1/top-5 of an exported file's sub-nets on a labelled test set, or the predicted
    /// class of each image of a directory (`--images`); `--subnet auto --budget-ms X` picks the
    /// most accurate sub-net within a latency budget on this machine.
    Infer(commands::deploy::InferArgs),
    /// Latency and images/s of each sub-net of an exported file, and of the same model dense,
    /// through the inference runtime.
    BenchInfer(commands::deploy::BenchInferArgs),
    /// Times each sub-net of an exported file on this machine and stores the latencies in the
    /// file, for `infer --subnet auto` and the library's pick to read instead of measuring.
    Calibrate(commands::deploy::CalibrateArgs),
    /// A training checkpoint of the original PyTorch code (CIFAR ResNets, every sub-net's
    /// masks and BatchNorms) as a run directory that eval, stats, export and run --init-from
    /// take.
    Import(commands::import::ImportArgs),
}

/// Where to compute.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendKind {
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
    pub(crate) backend: BackendKind,
    /// GPU index (CUDA only).
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Floating-point precision of the whole model (CUDA only; the CPU backends run f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub(crate) precision: Precision,
    /// Kernel fusion (CUDA only): element-wise chains compiled into one kernel.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub(crate) fusion: Switch,
    /// Where compiled GPU kernels and autotune results are kept between runs (CUDA only;
    /// default: $AST_KERNEL_CACHE, else ~/.cache/ast/cuda).
    #[arg(long, value_name = "DIR")]
    pub(crate) kernel_cache: Option<PathBuf>,
}

/// Floating-point precision of the model's tensors.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Precision {
    /// 32-bit floats.
    F32,
    /// bfloat16 (CUDA).
    Bf16,
    /// IEEE half precision (CUDA).
    F16,
}

/// On or off.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// Run directory.
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// Evaluate on this dataset directory instead of the run's.
    #[arg(long)]
    pub(crate) data_path: Option<PathBuf>,
    /// Write the results as JSON here (default: eval.json in the run directory).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Also time each sub-net's inference on this machine and backend, and pick the most
    /// accurate sub-net whose forward pass takes at most this many milliseconds.
    #[arg(long, value_name = "MS", value_parser = parse_budget, allow_hyphen_values = true)]
    pub(crate) latency_budget_ms: Option<f64>,
    /// Images per timed forward pass (taken from the test set).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096), requires = "latency_budget_ms")]
    pub(crate) latency_batch: u64,
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
pub(crate) struct StatsArgs {
    /// Run directory.
    #[arg(long)]
    pub(crate) run: PathBuf,
    /// Write the per-layer table as CSV here (default: stats.csv in the run directory).
    #[arg(long)]
    pub(crate) csv: Option<PathBuf>,
}
