//! Backend dispatch: the same training code on Flex, NdArray or CUDA.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use ast_models::{AstModel, ModelKind};
use ast_train::bench::{step_throughput, StepBench, StepTiming};
use ast_train::metrics::SubnetMetrics;
use ast_train::train::{evaluate, load_run_model};
use ast_train::{RunOptions, RunSummary, TrainConfig};
use burn::backend::Autodiff;
use burn::prelude::{Backend, Tensor, TensorData};
use burn::tensor::backend::{AutodiffBackend, Device, DeviceId};

use crate::report;
use crate::{BackendArgs, BackendKind, Precision, Switch};
use clap::ValueEnum;

/// The built-in model a run's configuration names.
pub fn builtin_model(config: &TrainConfig) -> Result<ModelKind> {
    config.model.parse::<ModelKind>().map_err(|_| {
        anyhow::anyhow!(
            "the run's model `{}` is not one of ast-cli's ({}): it was trained by a program of \
             its own; evaluate, export or resume it with that program (ast-train's functions take \
             its ModelSpec)",
            config.model,
            ModelKind::names()
        )
    })
}

/// [`load_run_model`] of a run of a built-in model.
pub fn load_builtin<B: AutodiffBackend>(
    run: &Path,
    device: &B::Device,
) -> Result<(TrainConfig, AstModel<B>, usize)> {
    let kind = builtin_model(&ast_train::read_run_config(run)?)?;
    Ok(load_run_model::<B, _>(&kind, run, device)?)
}

#[cfg_attr(all(feature = "ndarray", feature = "cuda"), allow(dead_code))]
fn not_compiled(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "backend `{name}` is not compiled into this binary; rebuild with `cargo build --release -p ast-cli --features {name}`"
    )
}

/// Refuses CUDA-only options on the CPU backends.
fn check_cpu_options(args: &BackendArgs) -> Result<()> {
    if args.precision != Precision::F32 {
        bail!(
            "--precision {} needs --backend cuda: the CPU backends train in f32; drop the flag",
            args.precision
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        );
    }
    if args.fusion != Switch::On || args.kernel_cache.is_some() {
        bail!("--fusion and --kernel-cache apply to --backend cuda only; drop them");
    }
    Ok(())
}

/// Checks that the chosen backend is compiled in and (CUDA) that its device works, before
/// anything is written.
pub fn check(args: &BackendArgs) -> Result<()> {
    if args.backend != BackendKind::Cuda {
        check_cpu_options(args)?;
    }
    match args.backend {
        BackendKind::Flex => {
            #[cfg(feature = "flex")]
            return Ok(());
            #[cfg(not(feature = "flex"))]
            Err(not_compiled("flex"))
        }
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            return Ok(());
            #[cfg(not(feature = "ndarray"))]
            Err(not_compiled("ndarray"))
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            return match args.fusion {
                Switch::On => cuda::device::<cuda::CudaFused>(args).map(|_| ()),
                Switch::Off => cuda::device::<cuda::CudaUnfused>(args).map(|_| ()),
            };
            #[cfg(not(feature = "cuda"))]
            Err(not_compiled("cuda"))
        }
    }
}

/// The device memory the CUDA backend holds (its peak, see
/// `ast_core::backend::cuda::memory_reserved`); `None` on the CPU backends.
pub fn gpu_memory_reserved(args: &BackendArgs) -> Option<u64> {
    if args.backend != BackendKind::Cuda {
        return None;
    }
    #[cfg(feature = "cuda")]
    return ast_core::backend::cuda::memory_reserved(&cuda::CudaDevice { index: args.device });
    #[cfg(not(feature = "cuda"))]
    None
}

/// What `run` says before its first iteration on a GPU backend, and the marker file that tells
/// a later run of the same model, batch size and settings that its kernels are cached.
pub fn first_step_note(
    args: &BackendArgs,
    model: &str,
    batch: usize,
) -> (Option<String>, Option<std::path::PathBuf>) {
    if args.backend != BackendKind::Cuda {
        return (None, None);
    }
    #[cfg(feature = "cuda")]
    {
        let cache = args
            .kernel_cache
            .clone()
            .or_else(ast_core::backend::cuda::default_cache_dir);
        let Some(cache) = cache else {
            return (
                Some(format!(
                    "compiling GPU kernels for {model} (no cache directory: set --kernel-cache DIR to keep them)…"
                )),
                None,
            );
        };
        let marker = cache.join(format!(
            "warm-{model}-b{batch}-{:?}-fusion-{:?}",
            args.precision, args.fusion
        ));
        let note = if marker.exists() {
            format!("loading GPU kernels for {model} from {}…", cache.display())
        } else {
            format!(
                "compiling GPU kernels for {model}, first run only (cached in {})…",
                cache.display()
            )
        };
        (Some(note), Some(marker))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, batch);
        (None, None)
    }
}

/// Work that runs on whichever backend the user picked: [`dispatch`] instantiates it for the
/// backend type once, so every command shares one place that knows the backends.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B`.
    fn run<B>(self, device: &B::Device) -> Result<Self::Output>
    where
        B: AutodiffBackend;
}

/// Runs `job` on the backend and device of `args`.
pub fn dispatch<J: BackendJob>(args: &BackendArgs, job: J) -> Result<J::Output> {
    if args.backend != BackendKind::Cuda {
        check_cpu_options(args)?;
    }
    match args.backend {
        BackendKind::Flex => {
            #[cfg(feature = "flex")]
            return job.run::<Autodiff<burn::backend::Flex>>(&Default::default());
            #[cfg(not(feature = "flex"))]
            Err(not_compiled("flex"))
        }
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            return job.run::<Autodiff<burn::backend::NdArray>>(&Default::default());
            #[cfg(not(feature = "ndarray"))]
            Err(not_compiled("ndarray"))
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                // A failure inside burn's CUDA runtime (a kernel NVRTC cannot compile, a launch
                // error) panics, often in a worker thread: it becomes one error line.
                let outcome = match args.fusion {
                    Switch::On => {
                        let device = cuda::device::<cuda::CudaFused>(args)?;
                        cuda::first_panic(|| job.run::<Autodiff<cuda::CudaFused>>(&device))
                    }
                    Switch::Off => {
                        let device = cuda::device::<cuda::CudaUnfused>(args)?;
                        cuda::first_panic(|| job.run::<Autodiff<cuda::CudaUnfused>>(&device))
                    }
                };
                outcome.unwrap_or_else(|first| {
                    Err(anyhow::anyhow!(
                        "the CUDA backend failed: {first} (with --fusion on, --fusion off may \
                         avoid a failing fused kernel; RUST_BACKTRACE=1 CUBECL_DEBUG_LOG=stderr \
                         show more)"
                    ))
                })
            }
            #[cfg(not(feature = "cuda"))]
            Err(not_compiled("cuda"))
        }
    }
}

/// Trains (or resumes) a run.
pub struct Train<'a> {
    /// The resolved config.
    pub config: TrainConfig,
    /// Run directory and options.
    pub opts: &'a RunOptions,
    /// `--devices`: one data-parallel worker per index; `None`: one device, no workers.
    pub devices: Option<Vec<usize>>,
    /// The other processes of a run on several machines.
    pub nodes: Option<std::sync::Arc<dyn ast_train::parallel::CrossNode>>,
}

impl BackendJob for Train<'_> {
    type Output = RunSummary;

    fn run<B>(self, device: &B::Device) -> Result<RunSummary>
    where
        B: AutodiffBackend,
    {
        let kind = builtin_model(&self.config)?;
        let indices = match (self.devices, &self.nodes) {
            (Some(indices), _) => indices,
            (None, Some(_)) => vec![device.to_id().index_id as usize],
            (None, None) => {
                return Ok(ast_train::train::<B, _>(
                    self.config,
                    &kind,
                    self.opts,
                    device,
                )?)
            }
        };
        // Devices of the same kind as `device`, by index (the CPU backends have one device).
        let device_kind = device.to_id().type_id;
        let devices: Vec<B::Device> = indices
            .iter()
            .map(|&i| B::Device::from_id(DeviceId::new(device_kind, i as u16)))
            .collect();
        Ok(ast_train::train::train_data_parallel::<B, _>(
            self.config,
            &kind,
            self.opts,
            &devices,
            self.nodes,
        )?)
    }
}

/// Evaluates every sub-net of a run's last checkpoint.
pub struct Eval<'a> {
    /// The run directory.
    pub run: &'a Path,
    /// Another dataset directory than the run's.
    pub data_path: Option<&'a Path>,
    /// Where to write the JSON results (default `<run>/eval.json`).
    pub json: Option<&'a Path>,
    /// A latency budget in seconds and the images per timed forward pass: time each
    /// sub-net's inference and pick the most accurate one within the budget.
    pub latency: Option<(f64, usize)>,
}

/// Forward passes timed per sub-net for `eval --latency-budget-ms`.
const LATENCY_RUNS: usize = 20;

impl BackendJob for Eval<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend,
    {
        let (mut config, model, epochs) = load_builtin::<B>(self.run, device)?;
        if let Some(p) = self.data_path {
            config.data.path = p.to_path_buf();
        }
        let sources = ast_train::load_data(&config, &builtin_model(&config)?)?;
        let loader =
            ast_train::data::Loader::new(sources.test, config.eval_batch_size, config.seed, false);
        if let Some(first) = ast_core::subnet::non_finite_params(&model).first() {
            anyhow::bail!(
                "{}: the last checkpoint's weights are not finite (e.g. `{first}`): the run \
                 diverged; retrain it with a lower --lr",
                self.run.display()
            );
        }
        let inner = burn::module::AutodiffModule::valid(&model);
        let metrics = evaluate(&inner, &loader, device)?;
        report::print_eval(&config, epochs, &metrics);
        if let Some(m) = metrics.iter().find(|m| !m.loss.is_finite()) {
            anyhow::bail!(
                "sub-net {}'s test loss is {}: its outputs are not finite; nothing written",
                m.subnet,
                m.loss
            );
        }
        let latency = match self.latency {
            Some((budget, batch)) => Some(pick_within_budget(
                &inner, &loader, &metrics, budget, batch, device,
            )?),
            None => None,
        };
        let out = self
            .json
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.run.join("eval.json"));
        let mut results = serde_json::json!({
            "run": self.run,
            "epochs": epochs,
            "data": config.data.path,
            "targets": config.ast.subnets,
            "subnets": metrics,
        });
        if let Some((budget, batch, latencies, chosen)) = latency {
            results["latency"] = serde_json::json!({
                "budget_s": budget,
                "batch": batch,
                "median_s": latencies,
                "chosen": chosen,
            });
        }
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(&out, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        println!("results written to {}", out.display());
        Ok(())
    }
}

/// Times each sub-net's inference on the first `batch` test images ([`LATENCY_RUNS`] passes,
/// median), prints them and the most accurate sub-net within `budget` seconds. Returns the
/// budget, the batch, the latencies and the chosen sub-net; an error line when no sub-net fits.
fn pick_within_budget<B: Backend>(
    model: &AstModel<B>,
    loader: &ast_train::data::Loader,
    metrics: &[SubnetMetrics],
    budget: f64,
    batch: usize,
    device: &B::Device,
) -> Result<(f64, usize, Vec<f64>, usize)> {
    let first = loader
        .epoch(0, 0)
        .next()
        .ok_or_else(|| anyhow::anyhow!("the test set is empty: no images to time"))??;
    let available = first.labels.len();
    if batch > available {
        anyhow::bail!(
            "--latency-batch {batch} is more than the {available} images of one evaluation \
             batch: give at most {available}"
        );
    }
    let x = Tensor::<B, 4>::from_data(TensorData::new(first.images, first.shape), device)
        .narrow(0, 0, batch);
    let latencies = ast_train::latency::subnet_latencies(model, &x, LATENCY_RUNS, device)?;
    println!("inference latency, batch {batch}, median of {LATENCY_RUNS} passes:");
    for (m, t) in metrics.iter().zip(&latencies) {
        println!(
            "  sub-net {}  density {:.4}  top-1 {:6.2}%  {:9.3} ms",
            m.subnet,
            m.density,
            100.0 * m.top1,
            t * 1000.0
        );
    }
    let Some(chosen) = ast_train::latency::best_within_budget(metrics, &latencies, budget) else {
        let (fastest, t) = latencies
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one sub-net");
        anyhow::bail!(
            "no sub-net runs within {} ms (the fastest, sub-net {fastest}, takes {:.3} ms): \
             raise --latency-budget-ms or lower --latency-batch; nothing written",
            budget * 1000.0,
            t * 1000.0
        );
    };
    let m = &metrics[chosen];
    println!(
        "within {:.3} ms: sub-net {chosen} (density {:.4}, top-1 {:.2}%, {:.3} ms)",
        budget * 1000.0,
        m.density,
        100.0 * m.top1,
        latencies[chosen] * 1000.0
    );
    Ok((budget, batch, latencies, chosen))
}

/// Times the AST training step.
pub struct Bench(pub StepBench);

impl BackendJob for Bench {
    type Output = StepTiming;

    fn run<B>(self, device: &B::Device) -> Result<StepTiming>
    where
        B: AutodiffBackend,
    {
        Ok(step_throughput::<B>(&self.0, device)?)
    }
}

/// The same AST steps on Flex and on the chosen backend.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub struct CheckBackend {
    /// Iterations.
    pub steps: usize,
    /// Seed of the weights and inputs.
    pub seed: u64,
}

impl BackendJob for CheckBackend {
    type Output = ast_train::consistency::Consistency;

    fn run<B>(self, device: &B::Device) -> Result<Self::Output>
    where
        B: AutodiffBackend,
    {
        #[cfg(feature = "flex")]
        return Ok(ast_train::consistency::compare_backends::<
            Autodiff<burn::backend::Flex>,
            B,
        >(
            self.steps, self.seed, &Default::default(), device
        )?);
        #[cfg(not(feature = "flex"))]
        {
            let _ = (self, device);
            Err(not_compiled("flex"))
        }
    }
}

/// Runs `f`; a panic in it, or in any thread while it runs (burn's CUDA runtime panics in
/// its worker threads, e.g. when NVRTC rejects a kernel, and the caller then sees only a
/// closed channel), becomes the first line of the first panic's message, printed nowhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn first_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let first = Arc::new(Mutex::new(None::<String>));
    let hook = std::panic::take_hook();
    let record = Arc::clone(&first);
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        let mut first = record.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(text);
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|_| {
        let reason = first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "unknown error".into());
        reason.lines().next().unwrap_or("").to_string()
    })
}

/// The backend `stats` reads checkpoints with: a CPU one when compiled in.
#[cfg(feature = "flex")]
type StatsBackend = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
type StatsBackend = burn::backend::NdArray;
#[cfg(all(not(feature = "flex"), not(feature = "ndarray"), feature = "cuda"))]
type StatsBackend = ast_core::backend::cuda::CudaFused;

/// Per-layer densities and overlaps of a run's last checkpoint (computed on the CPU when a CPU
/// backend is compiled in).
pub fn stats(run: &Path, csv: Option<&Path>) -> Result<()> {
    let (config, model, _) = load_builtin::<Autodiff<StatsBackend>>(run, &Default::default())?;
    let k = config.ast.subnets.len();
    if k == 0 {
        bail!("the run has no sub-nets");
    }
    let out = csv
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.join("stats.csv"));
    let text = report::stats(&model, k)?;
    std::fs::write(&out, text)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    println!("per-layer table written to {}", out.display());
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    pub(super) use super::first_panic;
    use anyhow::{anyhow, Result};
    pub use ast_core::backend::cuda::{CudaDevice, CudaFused, CudaUnfused};
    use burn::prelude::*;
    use burn::tensor::backend::{set_default_float_dtype, DeviceError};
    use burn::tensor::FloatDType;

    use crate::{BackendArgs, Precision};

    /// The CUDA device of `args`, prepared once per process: the kernel caches configured, the
    /// precision set, and the device checked by a tiny computation. Without a GPU or driver
    /// burn panics during initialisation (often in a worker thread, the caller then sees only a
    /// closed channel), which becomes an error naming the first panic of any thread.
    pub fn device<B: Backend<Device = CudaDevice>>(args: &BackendArgs) -> Result<CudaDevice> {
        let index = args.device;
        let device = CudaDevice { index };
        let cache = match &args.kernel_cache {
            Some(dir) => Some(dir.clone()),
            None => ast_core::backend::cuda::default_cache_dir(),
        };
        if let Some(dir) = cache {
            ast_core::backend::cuda::configure_caches(&dir).map_err(|e| anyhow!(e))?;
        }
        let dtype = match args.precision {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
            Precision::F16 => FloatDType::F16,
        };
        let probe = first_panic(|| {
            // Settings are fixed by the first tensor of the device: a second preparation in the
            // same process (check, then dispatch) finds them set, which is not an error when
            // they are the ones asked for.
            let set = set_default_float_dtype::<B>(&device, dtype);
            let t = Tensor::<B, 1>::from_floats([1.0, 2.0], &device);
            let v = t.clone().sum().into_data().convert::<f32>().to_vec::<f32>();
            (set, t.dtype(), v)
        });
        match probe {
            Ok((Err(e @ DeviceError::UnsupportedDType { .. }), _, _)) => Err(anyhow!(
                "CUDA device {index} cannot train in {dtype:?}: {e}; use --precision f32"
            )),
            Ok((_, got, _)) if got != dtype.into() => Err(anyhow!(
                "CUDA device {index} is already set to {got:?} in this process; cannot switch to {:?}",
                dtype
            )),
            Ok((_, _, Ok(v))) if v == [3.0] => Ok(device),
            Ok((_, _, v)) => Err(anyhow!("CUDA device {index} computed 1 + 2 = {v:?}")),
            Err(first) => Err(anyhow!(
                "CUDA device {index} is not usable (no NVIDIA GPU, driver or CUDA runtime \
                 libraries such as libnvrtc on the library path?): {first}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::first_panic;

    #[test]
    fn a_panic_in_a_worker_thread_becomes_the_first_line_of_its_message() {
        let failed: Result<(), String> = first_panic(|| {
            let worker =
                std::thread::spawn(|| panic!("kernel conv2d [128, 16, 32, 32] failed\ndetails"));
            assert!(worker.join().is_err());
            panic!("the channel to the worker closed");
        });
        assert_eq!(
            failed,
            Err("kernel conv2d [128, 16, 32, 32] failed".to_string())
        );
        assert_eq!(first_panic(|| 5), Ok(5));
    }
}
