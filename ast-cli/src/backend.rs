//! Backend dispatch: the same training code on Flex, NdArray or CUDA.

use std::path::Path;

use anyhow::{bail, Result};
use ast_core::AstBackend;
use ast_train::train::{evaluate, load_run_model};
use ast_train::{RunOptions, RunSummary, TrainConfig};
use burn::backend::{Autodiff, Flex};
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
        BackendKind::Flex => Ok(()),
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

/// Trains `config` on the chosen backend.
pub fn train(args: &BackendArgs, config: TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    match args.backend {
        BackendKind::Flex => Ok(ast_train::train::<Autodiff<Flex>>(
            config,
            opts,
            &Default::default(),
        )?),
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            return Ok(ast_train::train::<Autodiff<burn::backend::NdArray>>(
                config,
                opts,
                &Default::default(),
            )?);
            #[cfg(not(feature = "ndarray"))]
            Err(not_compiled("ndarray"))
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let device = cuda::device(args.device)?;
                return Ok(ast_train::train::<Autodiff<burn::backend::Cuda>>(
                    config, opts, &device,
                )?);
            }
            #[cfg(not(feature = "cuda"))]
            Err(not_compiled("cuda"))
        }
    }
}

fn eval_on<B>(
    run: &Path,
    data_path: Option<&Path>,
    json: Option<&Path>,
    device: &B::Device,
) -> Result<()>
where
    B: AutodiffBackend + AstBackend,
    B::InnerBackend: AstBackend,
{
    let (mut config, model, epochs) = load_run_model::<B>(run, device)?;
    if let Some(p) = data_path {
        config.data.path = p.to_path_buf();
    }
    let sources = ast_train::load_data(&config)?;
    let loader =
        ast_train::data::Loader::new(sources.test, config.eval_batch_size, config.seed, false);
    let inner = burn::module::AutodiffModule::valid(&model);
    let metrics = evaluate(&inner, &loader, device)?;
    report::print_eval(&config, epochs, &metrics);
    let out = json
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.join("eval.json"));
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "run": run,
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

/// Evaluates every sub-net of a run's last checkpoint.
pub fn eval(
    args: &BackendArgs,
    run: &Path,
    data_path: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    match args.backend {
        BackendKind::Flex => eval_on::<Autodiff<Flex>>(run, data_path, json, &Default::default()),
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            return eval_on::<Autodiff<burn::backend::NdArray>>(
                run,
                data_path,
                json,
                &Default::default(),
            );
            #[cfg(not(feature = "ndarray"))]
            Err(not_compiled("ndarray"))
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let device = cuda::device(args.device)?;
                return eval_on::<Autodiff<burn::backend::Cuda>>(run, data_path, json, &device);
            }
            #[cfg(not(feature = "cuda"))]
            Err(not_compiled("cuda"))
        }
    }
}

/// Per-layer densities and overlaps of a run's last checkpoint (computed on the CPU).
pub fn stats(run: &Path, csv: Option<&Path>) -> Result<()> {
    let (config, model, _) = load_run_model::<Autodiff<Flex>>(run, &Default::default())?;
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
    use anyhow::{anyhow, Result};
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use burn::prelude::*;

    /// The CUDA device `index`, checked by a tiny computation: without a GPU or driver burn
    /// panics during initialisation, which becomes an error here.
    pub fn device(index: usize) -> Result<CudaDevice> {
        let device = CudaDevice { index };
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let probe = std::panic::catch_unwind(|| {
            let t = Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device);
            t.sum().into_scalar()
        });
        std::panic::set_hook(hook);
        match probe {
            Ok(v) if v == 3.0 => Ok(device),
            Ok(v) => Err(anyhow!("CUDA device {index} computed 1 + 2 = {v}")),
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".into());
                let first = reason.lines().next().unwrap_or("").to_string();
                Err(anyhow!(
                    "CUDA device {index} is not usable (no NVIDIA GPU or driver?): {first}"
                ))
            }
        }
    }
}
