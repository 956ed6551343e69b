//! `ast-cli schedule`: every mask event of a configuration, without data or training.

use anyhow::{bail, Result};
use ast_core::SubnetTarget;
use clap::Args;

use crate::recipes::{apply_overrides, load_recipe, Overrides};

#[derive(Args, Debug)]
pub(crate) struct ScheduleArgs {
    /// A shipped recipe name (see `ast-cli recipes`) or a JSON file.
    #[arg(long, default_value = "quickstart")]
    pub(crate) recipe: String,
    /// Training images per epoch (default: the recipe's train_subset, else the dataset's size:
    /// CIFAR 50 000, ImageNet 1 281 167, (Fashion-)MNIST 60 000).
    #[arg(long)]
    pub(crate) train_size: Option<usize>,
    /// One JSON object per event instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) overrides: Overrides,
}

/// The most mask events `schedule` lists (about 100 bytes each in memory).
const MAX_EVENTS: usize = 10_000_000;

pub(crate) fn schedule(args: ScheduleArgs) -> Result<()> {
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
    let total = ast_train::config::total_iterations(steps_per_epoch, config.epochs)?;
    let s = &config.ast.schedule;
    // Each sub-net has an event every `update_frequency` of its iterations at most.
    let at_most = total / s.update_frequency.max(1) + config.ast.subnets.len();
    if at_most > MAX_EVENTS {
        bail!(
            "this timeline may hold {at_most} mask events, more than the {MAX_EVENTS} `schedule` \
             lists: fewer --train-size images or --epochs, or a larger --update-frequency"
        );
    }
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
