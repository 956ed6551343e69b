//! The recipes shipped with the binary, recipe files, and the flags that override them.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ast_core::{CorrectionKind, CorrectionMode, OptimizerKind, SubnetTarget, UpdateScope};
use ast_models::ModelKind;
use ast_train::{Augment, DatasetKind, LrSchedule, LrScheduleKind, TrainConfig};
use clap::Args;

/// The recipes shipped with the binary: name → JSON, and how the original ran it when that
/// takes more than one device.
pub(crate) const RECIPES: [(&str, &str, &str); 4] = [
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

/// Flags overriding the recipe (every hyper-parameter of the original scripts).
#[derive(Args, Debug, Default)]
pub(crate) struct Overrides {
    /// Model.
    #[arg(long)]
    pub(crate) model: Option<ModelKind>,
    /// Dataset.
    #[arg(long)]
    pub(crate) dataset: Option<DatasetKind>,
    /// Dataset directory.
    #[arg(long)]
    pub(crate) data_path: Option<PathBuf>,
    /// Train on the first N training images.
    #[arg(long)]
    pub(crate) train_subset: Option<usize>,
    /// Evaluate on the first N test images.
    #[arg(long)]
    pub(crate) test_subset: Option<usize>,
    /// Weights the optimizer moves: all (dense, the original's) or the sub-net's (active).
    #[arg(long)]
    pub(crate) update_scope: Option<UpdateScope>,
    /// Training augmentation (standard: random crop + flip, the original's).
    #[arg(long)]
    pub(crate) augment: Option<Augment>,
    /// Base learning rate.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) lr: Option<f64>,
    /// LR schedule.
    #[arg(long)]
    pub(crate) lr_schedule: Option<LrScheduleKind>,
    /// Epochs of the step schedule's ×0.1 decays, comma-separated (default 50 % and 75 %).
    #[arg(long, value_delimiter = ',')]
    pub(crate) milestones: Option<Vec<usize>>,
    /// Optimizer (sgd is the original's).
    #[arg(long)]
    pub(crate) optimizer: Option<OptimizerKind>,
    /// SGD momentum.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) momentum: Option<f64>,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    pub(crate) nesterov: bool,
    /// Adam/AdamW betas, comma-separated (default 0.9,0.999).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub(crate) betas: Option<Vec<f64>>,
    /// Weight decay (SGD and Adam: added to the gradient; AdamW: decoupled).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) weight_decay: Option<f64>,
    /// Epochs.
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Initial prune-and-regrow rate.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) prune_rate: Option<f64>,
    /// Initial (ERK) density of every sub-net.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) init_density: Option<f64>,
    /// Mask update every N global iterations of a sub-net's prune counter (as the original).
    #[arg(long)]
    pub(crate) update_frequency: Option<usize>,
    /// First epoch of the density ramp.
    #[arg(long)]
    pub(crate) init_prune_epoch: Option<usize>,
    /// Last epoch of the density ramp.
    #[arg(long)]
    pub(crate) final_prune_epoch: Option<usize>,
    /// Sub-net k's prune counter is delayed by k·(K·N + 1) global iterations (as the original).
    #[arg(long)]
    pub(crate) subnet_offset: Option<usize>,
    /// Unstructured sub-nets: final densities, comma-separated (e.g. 0.1,0.05,0.02).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        conflicts_with = "nm"
    )]
    pub(crate) densities: Option<Vec<f64>>,
    /// N:M sub-nets, comma-separated (e.g. 2:4,1:4,1:8).
    #[arg(long, value_delimiter = ',')]
    pub(crate) nm: Option<Vec<String>>,
    /// Gradient correction.
    #[arg(long)]
    pub(crate) correction: Option<CorrectionKind>,
    /// EMA coefficient of the `ema` correction.
    #[arg(long)]
    pub(crate) ema_beta: Option<f64>,
    /// Label smoothing.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) label_smoothing: Option<f64>,
    /// Seed (weights, data order, masks).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Checkpoint every N epochs.
    #[arg(long)]
    pub(crate) checkpoint_every: Option<usize>,
    /// Also checkpoint mid-epoch every N minutes (long epochs).
    #[arg(long)]
    pub(crate) checkpoint_every_minutes: Option<u64>,
    /// Threads preparing batches.
    #[arg(long)]
    pub(crate) data_threads: Option<usize>,
    /// Refresh BatchNorm statistics with N forward passes per sub-net before each evaluation.
    #[arg(long)]
    pub(crate) bn_recalibration_batches: Option<usize>,
}

pub(crate) fn load_recipe(name: &str) -> Result<TrainConfig> {
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

pub(crate) fn parse_nm(s: &str) -> Result<SubnetTarget> {
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
pub(crate) fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

pub(crate) fn apply_overrides(mut c: TrainConfig, o: Overrides) -> Result<TrainConfig> {
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
    if let (Some(beta), false) = (
        o.ema_beta,
        matches!(c.ast.correction, CorrectionMode::Ema { .. }),
    ) {
        bail!(
            "--ema-beta {beta} sets the β of the EMA correction, but the run's correction is \
             {}: add --correction ema",
            c.ast.correction.kind().name()
        );
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
        let o = Overrides {
            ema_beta: Some(0.5),
            ..Default::default()
        };
        let err = apply_overrides(load_recipe("quickstart").unwrap(), o).unwrap_err();
        assert!(
            err.to_string()
                .contains("correction is projection: add --correction ema"),
            "{err}"
        );
        assert!(parse_nm("2-4")
            .unwrap_err()
            .to_string()
            .contains("expected N:M"));
    }
}
