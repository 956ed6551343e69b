//! `ast-cli check-backend`: the same AST steps on Flex and on another backend, compared.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::backend;
use crate::cli::BackendArgs;

#[derive(Args, Debug)]
pub(crate) struct CheckBackendArgs {
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// AST iterations.
    #[arg(long, default_value_t = 20)]
    pub(crate) steps: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// Loss tolerance (relative, per iteration) and largest share of differing mask positions of
/// `check-backend`.
pub(crate) const LOSS_TOLERANCE: f32 = 1e-3;

pub(crate) const MASK_TOLERANCE: f64 = 1e-3;

pub(crate) fn check_backend(args: CheckBackendArgs) -> Result<()> {
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
