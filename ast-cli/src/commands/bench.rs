//! `ast-cli bench`: images/s of the AST training step.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ast_core::CorrectionMode;
use ast_models::ModelKind;
use clap::{Args, ValueEnum};

use crate::backend;
use crate::cli::BackendArgs;

/// Gradient correction in the timed step.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BenchCorrection {
    /// No correction (as the PyTorch baseline).
    Off,
    /// Projection onto the previous sub-net's gradient.
    Projection,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// Model (as in `run --model`).
    #[arg(long, default_value = "resnet32")]
    pub(crate) model: ModelKind,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub(crate) batch: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 6)]
    pub(crate) steps: usize,
    /// Untimed steps first (CUDA compiles and tunes kernels on the first ones).
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Number of sub-nets K.
    #[arg(long, default_value_t = 3)]
    pub(crate) subnets: usize,
    /// Density of every sub-net's random mask.
    #[arg(long, default_value_t = 0.05, allow_hyphen_values = true)]
    pub(crate) density: f64,
    /// Gradient correction.
    #[arg(long, value_enum, default_value_t = BenchCorrection::Off)]
    pub(crate) correction: BenchCorrection,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Also write the timings as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Flex: time burn's generic convolution instead of our masked-convolution kernels.
    #[arg(long)]
    pub(crate) generic_conv: bool,
    /// Then time this many plain dense steps of the same model (full masks, burn's SGD).
    #[arg(long, default_value_t = 0)]
    pub(crate) dense_steps: usize,
}

/// The most steps `bench` times in each of its phases.
const MAX_STEPS: usize = 10_000;

pub(crate) fn bench(args: BenchArgs) -> Result<()> {
    let model = args.model;
    for (flag, steps) in [
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--dense-steps", args.dense_steps),
    ] {
        if steps > MAX_STEPS {
            bail!("{flag} {steps}: at most {MAX_STEPS} steps are timed; give fewer");
        }
    }
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
        "model={} batch={} backend={:?} threads={threads} simd={} median_step_s={:.4} \
         images_per_s={:.1} (forward {:.4} s, backward {:.4} s, update {:.4} s; dense-gradient \
         step {:.4} s)",
        timing.model,
        timing.batch,
        args.backend.backend,
        ast_kernels::simd_level(),
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
