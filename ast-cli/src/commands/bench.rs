//! `ast-cli bench`: images/s of the AST training step.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ast_core::CorrectionMode;
use ast_models::ModelKind;
use clap::{Args, ValueEnum};

use crate::backend;
use crate::cli::BackendArgs;
use crate::BackendKind;

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
    if args.backend.backend != BackendKind::Cuda {
        check_memory(&args, &job)?;
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

/// Refuses a bench whose step cannot fit in this machine's available memory, before the
/// step allocates it (a failed allocation aborts the process).
///
/// The need is measured, not modelled: one step of the same model at batch 1 with one
/// sub-net, then with two sub-nets, then at batch 3, each by how far it raises the process's
/// peak resident memory (Linux's VmHWM, reset in between through `/proc/self/clear_refs`).
/// Freed memory stays mapped (see `main`'s `MIMALLOC_PURGE_DELAY`), so each later probe grows
/// the peak by what it needs beyond the earlier ones: the second by one sub-net, the third by
/// two images. Where `/proc` cannot say, nothing is refused.
const PROBE_BATCH: usize = 4;

fn check_memory(args: &BenchArgs, job: &ast_train::bench::StepBench) -> Result<()> {
    job.validate()?;
    let Some(available) = proc_memory::available() else {
        return Ok(());
    };
    let mut grown = [0u64; 3];
    for (slot, (subnets, batch)) in
        grown
            .iter_mut()
            .zip([(1, PROBE_BATCH), (2, PROBE_BATCH), (1, 4 * PROBE_BATCH)])
    {
        let probe = ast_train::bench::StepBench {
            batch,
            subnets,
            steps: 1,
            warmup: 0,
            dense_steps: 0,
            progress: false,
            ..job.clone()
        };
        let Some(before) = proc_memory::reset_peak() else {
            return Ok(());
        };
        backend::dispatch(&args.backend, backend::Bench(probe))?;
        let Some(peak) = proc_memory::peak() else {
            return Ok(());
        };
        *slot = peak.saturating_sub(before);
    }
    let [base, per_subnet, more_images] = grown;
    let per_image = more_images / (3 * PROBE_BATCH) as u64;
    let need = (base as f64)
        + (job.subnets - 1) as f64 * per_subnet as f64
        + job.batch.saturating_sub(PROBE_BATCH) as f64 * per_image as f64;
    if need > available as f64 {
        bail!(
            "bench of {} at batch {} with {} sub-nets needs about {} (measured: {} at batch {PROBE_BATCH}, \
             {} per image, {} per sub-net), this machine has {} available: lower --batch or \
             --subnets",
            job.model,
            job.batch,
            job.subnets,
            proc_memory::human(need),
            proc_memory::human(base as f64),
            proc_memory::human(per_image as f64),
            proc_memory::human(per_subnet as f64),
            proc_memory::human(available as f64)
        );
    }
    eprintln!(
        "memory: about {} needed (measured: {} at batch {PROBE_BATCH}, {} per image, {} per sub-net), {} available",
        proc_memory::human(need),
        proc_memory::human(base as f64),
        proc_memory::human(per_image as f64),
        proc_memory::human(per_subnet as f64),
        proc_memory::human(available as f64)
    );
    Ok(())
}

/// This process's memory as Linux reports it in `/proc` (`None` elsewhere).
mod proc_memory {
    fn status_kib(field: &str) -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        kib_field(&text, field)
    }

    fn kib_field(text: &str, field: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line[field.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Resets the peak resident memory to the current one and returns that, in bytes.
    pub(super) fn reset_peak() -> Option<u64> {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        status_kib("VmRSS:")
    }

    /// The peak resident memory since the last reset, in bytes.
    pub(super) fn peak() -> Option<u64> {
        status_kib("VmHWM:")
    }

    /// The memory the kernel says new work can use without swapping, in bytes.
    pub(super) fn available() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        kib_field(&text, "MemAvailable:")
    }

    pub(super) fn human(bytes: f64) -> String {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        match bytes {
            b if b >= 1024.0 * GIB => format!("{:.1} TiB", b / (1024.0 * GIB)),
            b if b >= GIB => format!("{:.1} GiB", b / GIB),
            b => format!("{:.0} MiB", b / (1024.0 * 1024.0)),
        }
    }
}
