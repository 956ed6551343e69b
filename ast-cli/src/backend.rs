//! Backend dispatch: the same training code on Flex, NdArray or CUDA.

use std::path::Path;

use anyhow::{bail, Result};
use ast_core::AstBackend;
use ast_train::bench::{step_throughput, StepBench, StepTiming};
use ast_train::train::{evaluate, load_run_model};
use ast_train::{RunOptions, RunSummary, TrainConfig};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;

use crate::report;
use crate::{BackendArgs, BackendKind};

#[cfg_attr(all(feature = "ndarray", feature = "cuda"), allow(dead_code))]
fn not_compiled(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "backend `{name}` is not compiled into this binary; rebuild with `cargo build --release -p ast-cli --features {name}`"
    )
}

/// Checks that the chosen backend is compiled in and (CUDA) that its device works, before
/// anything is written.
pub fn check(args: &BackendArgs) -> Result<()> {
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
            return cuda::device(args.device).map(|_| ());
            #[cfg(not(feature = "cuda"))]
            Err(not_compiled("cuda"))
        }
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
        B: AutodiffBackend + AstBackend,
        B::InnerBackend: AstBackend;
}

/// Runs `job` on the backend and device of `args`.
pub fn dispatch<J: BackendJob>(args: &BackendArgs, job: J) -> Result<J::Output> {
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
                let device = cuda::device(args.device)?;
                job.run::<Autodiff<burn::backend::Cuda>>(&device)
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
}

impl BackendJob for Train<'_> {
    type Output = RunSummary;

    fn run<B>(self, device: &B::Device) -> Result<RunSummary>
    where
        B: AutodiffBackend + AstBackend,
        B::InnerBackend: AstBackend,
    {
        Ok(ast_train::train::<B>(self.config, self.opts, device)?)
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
}

impl BackendJob for Eval<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend + AstBackend,
        B::InnerBackend: AstBackend,
    {
        let (mut config, model, epochs) = load_run_model::<B>(self.run, device)?;
        if let Some(p) = self.data_path {
            config.data.path = p.to_path_buf();
        }
        let sources = ast_train::load_data(&config)?;
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
        let out = self
            .json
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.run.join("eval.json"));
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "run": self.run,
            "epochs": epochs,
            "data": config.data.path,
            "targets": config.ast.subnets,
            "subnets": metrics,
        }))?;
        std::fs::write(&out, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
        println!("results written to {}", out.display());
        Ok(())
    }
}

/// Times the AST training step.
pub struct Bench(pub StepBench);

impl BackendJob for Bench {
    type Output = StepTiming;

    fn run<B>(self, device: &B::Device) -> Result<StepTiming>
    where
        B: AutodiffBackend + AstBackend,
        B::InnerBackend: AstBackend,
    {
        Ok(step_throughput::<B>(&self.0, device)?)
    }
}

/// The backend `stats` reads checkpoints with: a CPU one when compiled in.
#[cfg(feature = "flex")]
type StatsBackend = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
type StatsBackend = burn::backend::NdArray;
#[cfg(all(not(feature = "flex"), not(feature = "ndarray"), feature = "cuda"))]
type StatsBackend = burn::backend::Cuda;

/// Per-layer densities and overlaps of a run's last checkpoint (computed on the CPU when a CPU
/// backend is compiled in).
pub fn stats(run: &Path, csv: Option<&Path>) -> Result<()> {
    let (config, model, _) = load_run_model::<Autodiff<StatsBackend>>(run, &Default::default())?;
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
    use std::sync::{Arc, Mutex};

    use anyhow::{anyhow, Result};
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use burn::prelude::*;

    /// The CUDA device `index`, checked by a tiny computation: without a GPU or driver burn
    /// panics during initialisation (often in a worker thread, the caller then sees only a
    /// closed channel), which becomes an error naming the first panic of any thread.
    pub fn device(index: usize) -> Result<CudaDevice> {
        let device = CudaDevice { index };
        let first_panic = Arc::new(Mutex::new(None::<String>));
        let hook = std::panic::take_hook();
        let record = Arc::clone(&first_panic);
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
        let probe = std::panic::catch_unwind(|| {
            let t = Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device);
            t.sum().into_scalar()
        });
        std::panic::set_hook(hook);
        match probe {
            Ok(3.0) => Ok(device),
            Ok(v) => Err(anyhow!("CUDA device {index} computed 1 + 2 = {v}")),
            Err(_) => {
                let reason = first_panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| "unknown error".into());
                let first = reason.lines().next().unwrap_or("").to_string();
                Err(anyhow!(
                    "CUDA device {index} is not usable (no NVIDIA GPU, driver or CUDA runtime \
                     libraries such as libnvrtc on the library path?): {first}"
                ))
            }
        }
    }
}
