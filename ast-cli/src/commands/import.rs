//! `ast-cli import`: a training checkpoint of the original PyTorch code into a run directory
//! (ast_train::import).

use std::path::PathBuf;

use anyhow::Result;
use ast_models::ModelKind;
use ast_train::{DatasetKind, RunOptions};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;

use crate::backend::{self, BackendJob};
use crate::cli::BackendArgs;
use crate::recipes::{apply_overrides, load_recipe, Overrides};

#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// The original's checkpoint (`checkpoint.pth.tar`, `model_best.pth.tar`: its
    /// `state_dict`, or a bare state dict). Read without running any of its pickle.
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// The model it holds (the original's CIFAR ResNets: resnet20, resnet32, resnet56,
    /// wide-resnet32).
    #[arg(long)]
    pub(crate) model: ModelKind,
    /// The dataset it was trained on (fixes the classes).
    #[arg(long, default_value = "cifar10")]
    pub(crate) dataset: DatasetKind,
    /// Its directory, for `eval` and further training (default: the recipe's).
    #[arg(long)]
    pub(crate) data_path: Option<PathBuf>,
    /// Each sub-net's target density, as the original's `--slist` (default: the density its
    /// masks keep).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub(crate) densities: Option<Vec<f64>>,
    /// The recipe whose other settings the run records (default: the original's CIFAR one).
    #[arg(long, default_value = "cifar-unstructured")]
    pub(crate) recipe: String,
    /// The run directory to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Replace a run already in --out.
    #[arg(long)]
    pub(crate) overwrite: bool,
}

pub(crate) fn import(args: ImportArgs) -> Result<()> {
    backend::dispatch(&args.backend, Import(&args))
}

/// Builds the model on the chosen backend and writes the run directory.
struct Import<'a>(&'a ImportArgs);

impl BackendJob for Import<'_> {
    type Output = ();

    fn run<B>(self, device: &B::Device) -> Result<()>
    where
        B: AutodiffBackend,
    {
        let args = self.0;
        let overrides = Overrides {
            model: Some(args.model),
            dataset: Some(args.dataset),
            data_path: args.data_path.clone(),
            ..Default::default()
        };
        let config = apply_overrides(load_recipe(&args.recipe)?, overrides)?;
        let opts = RunOptions {
            dir: args.out.clone(),
            overwrite: args.overwrite,
            ..Default::default()
        };
        let imported = ast_train::import::import_original::<B>(
            &args.from,
            config,
            args.densities.as_deref(),
            &opts,
            device,
        )?;
        let densities: Vec<String> = (imported.densities.iter())
            .map(|d| format!("{d:.4}"))
            .collect();
        println!(
            "{} tensors, {} sub-nets (densities {}), {} epochs done: written to {}",
            imported.tensors,
            imported.subnets,
            densities.join(" / "),
            imported.epochs,
            args.out.display()
        );
        Ok(())
    }
}
