//! The configuration of a training run: a serde type saved in the run directory, read from
//! JSON recipes and overridden by CLI flags.

use std::path::PathBuf;

use ast_core::AstConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

ast_core::named_choices! {
    /// The datasets a run can use.
    pub enum DatasetKind("dataset") {
        /// Fashion-MNIST IDX files (gzipped or not).
        FashionMnist = "fashion-mnist",
        /// MNIST IDX files.
        Mnist = "mnist",
        /// CIFAR-10 binary batches.
        Cifar10 = "cifar10",
        /// CIFAR-100 binary files, fine labels (100 classes).
        Cifar100 = "cifar100",
        /// CIFAR-100 binary files, coarse labels (20 classes).
        Cifar100Coarse = "cifar100-coarse",
        /// An ImageNet-style folder with `train/<class>/` and `val/<class>/`.
        Imagenet = "imagenet",
    }
}

impl DatasetKind {
    /// Training images of the full dataset (ImageNet: ILSVRC-2012's train split).
    pub fn train_size(self) -> usize {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => 60_000,
            DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Cifar100Coarse => 50_000,
            DatasetKind::Imagenet => 1_281_167,
        }
    }
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Which dataset.
    pub kind: DatasetKind,
    /// Its directory.
    pub path: PathBuf,
    /// Train on the first this-many training images only.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate on the first this-many test images only.
    #[serde(default)]
    pub test_subset: Option<usize>,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: Augment,
}

ast_core::named_choices! {
    /// Training-time augmentation of the images.
    #[derive(Default)]
    pub enum Augment("augmentation") {
        /// The original's: CIFAR-style random crop (padding 4) and horizontal flip; ImageNet
        /// random-resized crop 224 and flip.
        #[default]
        Standard = "standard",
        /// None: training images go through the evaluation pipeline (normalisation; ImageNet
        /// resize 256 and centre crop 224).
        None = "none",
    }
}

ast_core::named_choices! {
    /// The learning-rate schedules by name (see [`LrSchedule`]).
    pub enum LrScheduleKind("LR schedule") {
        /// [`LrSchedule::Cosine`].
        Cosine = "cosine",
        /// [`LrSchedule::Step`] (by default at 50 % and 75 % of the epochs).
        Step = "step",
    }
}

/// The learning-rate schedule, applied per epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum LrSchedule {
    /// `lr·(1 + cos(π·epoch/epochs))/2`: from `lr` at epoch 0 towards 0.
    Cosine,
    /// `lr·gamma^(milestones passed)`; milestones are epochs (from 0).
    Step {
        /// Epochs at which the rate is multiplied by `gamma`.
        milestones: Vec<usize>,
        /// The factor.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
}

fn default_gamma() -> f64 {
    0.1
}

impl LrSchedule {
    /// The step schedule with milestones at 50 % and 75 % of the epochs.
    pub fn half_and_three_quarters(epochs: usize) -> Self {
        LrSchedule::Step {
            milestones: vec![epochs / 2, epochs * 3 / 4],
            gamma: 0.1,
        }
    }

    /// The learning rate of `epoch` (from 0) of `epochs`, from base rate `lr`.
    pub fn lr(&self, lr: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Cosine => {
                lr * 0.5
                    * (1.0 + (core::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos())
            }
            LrSchedule::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| epoch >= m).count() as i32;
                lr * gamma.powi(passed)
            }
        }
    }
}

fn default_eval_batch() -> usize {
    256
}

fn default_every() -> usize {
    1
}

/// A complete training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model's name: a built-in [`ast_models::ModelKind`], or the
    /// [`ModelSpec::name`](ast_core::ModelSpec::name) of a model of your own.
    pub model: String,
    /// The data.
    pub data: DataConfig,
    /// Epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: usize,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// Label smoothing of the cross-entropy, in `[0, 1)`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Sub-nets, mask schedule, correction, SGD settings, mask seed.
    pub ast: AstConfig,
    /// Seed of weight initialisation and data order.
    #[serde(default)]
    pub seed: u64,
    /// Write a checkpoint every this many epochs (and always after the last).
    #[serde(default = "default_every")]
    pub checkpoint_every: usize,
    /// Also write a mid-epoch checkpoint when this many minutes have passed since the last
    /// checkpoint (long epochs: ImageNet's take hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every_minutes: Option<u64>,
    /// Threads preparing batches (default: all cores).
    #[serde(default)]
    pub data_threads: Option<usize>,
    /// Before each evaluation, refresh every sub-net's BatchNorm running statistics with this
    /// many training-mode forward passes (0: off). A sub-net's statistics are only updated in
    /// its own iterations while the other sub-nets keep moving the shared weights, so with a
    /// high learning rate and few epochs they lag behind the weights they normalise.
    #[serde(default)]
    pub bn_recalibration_batches: usize,
    /// The devices of a data-parallel run (`ast-cli run --devices`), one worker each; `None`
    /// for a run on one device. The worker count is part of the trajectory (each worker
    /// normalises its own shard), so a resumed run keeps them unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<usize>>,
    /// Start from the weights, masks and BatchNorms of this run directory's last checkpoint
    /// (same model, classes and number of sub-nets: fine-tuning, or going on from `ast-cli
    /// import`) instead of the seeded initialisation; the optimizer, the schedules and the data
    /// order start afresh. The masks change only at the configuration's mask events, and the
    /// sub-nets need not reach their targets through them (they start there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

/// The most epochs a run may have.
pub const MAX_EPOCHS: usize = 100_000;
/// The most iterations a run may take (CIFAR's 200 epochs are 78 200, ImageNet's 100 epochs
/// at batch 256 are 500 400).
pub const MAX_ITERATIONS: usize = 1_000_000_000;

/// `steps_per_epoch · epochs`, or the error that says it exceeds [`MAX_ITERATIONS`].
pub fn total_iterations(steps_per_epoch: usize, epochs: usize) -> Result<usize> {
    steps_per_epoch
        .checked_mul(epochs)
        .filter(|&t| t <= MAX_ITERATIONS)
        .ok_or_else(|| {
            TrainError::config(
                "epochs",
                format!(
                    "{epochs} epochs of {steps_per_epoch} iterations exceed the \
                     {MAX_ITERATIONS} iterations a run may take: fewer epochs, fewer images or \
                     a larger batch"
                ),
            )
        })
}

impl TrainConfig {
    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(TrainError::config("epochs", "must be ≥ 1"));
        }
        if self.epochs > MAX_EPOCHS {
            return Err(TrainError::config(
                "epochs",
                format!("must be ≤ {MAX_EPOCHS}, got {}", self.epochs),
            ));
        }
        if self.batch_size == 0 {
            return Err(TrainError::config("batch_size", "must be ≥ 1"));
        }
        if self.eval_batch_size == 0 {
            return Err(TrainError::config("eval_batch_size", "must be ≥ 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(TrainError::config(
                "lr",
                format!("must be a finite number > 0, got {}", self.lr),
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(TrainError::config(
                "label_smoothing",
                format!("must lie in [0, 1), got {}", self.label_smoothing),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(TrainError::config("checkpoint_every", "must be ≥ 1"));
        }
        if self.checkpoint_every_minutes == Some(0) {
            return Err(TrainError::config(
                "checkpoint_every_minutes",
                "must be ≥ 1",
            ));
        }
        if let LrSchedule::Step { gamma, .. } = &self.lr_schedule {
            if !(gamma.is_finite() && *gamma > 0.0) {
                return Err(TrainError::config(
                    "lr_schedule.gamma",
                    format!("must be > 0, got {gamma}"),
                ));
            }
        }
        if self.data_threads == Some(0) {
            return Err(TrainError::config("data_threads", "must be ≥ 1"));
        }
        for (field, subset) in [
            ("data.train_subset", self.data.train_subset),
            ("data.test_subset", self.data.test_subset),
        ] {
            if subset == Some(0) {
                return Err(TrainError::config(field, "must hold at least one image"));
            }
        }
        self.ast.validate()?;
        let schedule = &self.ast.schedule;
        if schedule.final_prune_epoch > self.epochs {
            return Err(TrainError::config(
                "ast.schedule.final_prune_epoch",
                format!(
                    "{} is after the last epoch ({} epochs)",
                    schedule.final_prune_epoch, self.epochs
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_step_learning_rates() {
        let c = LrSchedule::Cosine;
        assert_eq!(c.lr(0.1, 0, 10), 0.1);
        assert!((c.lr(0.1, 5, 10) - 0.05).abs() < 1e-12);
        assert!(c.lr(0.1, 9, 10) < 0.003);
        let s = LrSchedule::half_and_three_quarters(200);
        assert_eq!(
            s,
            LrSchedule::Step {
                milestones: vec![100, 150],
                gamma: 0.1
            }
        );
        assert_eq!(s.lr(0.1, 99, 200), 0.1);
        assert!((s.lr(0.1, 100, 200) - 0.01).abs() < 1e-12);
        assert!((s.lr(0.1, 150, 200) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn dataset_names_round_trip() {
        for &kind in DatasetKind::ALL {
            let name = kind.name();
            assert_eq!(name.parse::<DatasetKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
        }
        assert!("cifar11"
            .parse::<DatasetKind>()
            .unwrap_err()
            .contains("valid: fashion-mnist"));
    }
}
