//! Errors of a training run, each a one-line message naming the problem.

use std::path::PathBuf;

use ast_core::AstError;

use crate::data::DataError;

/// What a run stopped by a diverging model leaves to resume from (filled in when the error
/// leaves the worker, which knows the run directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// Not looked up yet.
    Unknown,
    /// The newest complete checkpoint, by name.
    Checkpoint(String),
    /// No checkpoint was written before.
    Nothing,
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Unknown => write!(f, "the checkpoints written before are kept"),
            Kept::Checkpoint(name) => write!(f, "the last good checkpoint ({name}) is kept"),
            Kept::Nothing => write!(f, "no checkpoint had been written yet"),
        }
    }
}

/// Everything that can stop a run, evaluation or checkpoint operation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A dataset could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The AST configuration or the model does not fit.
    #[error(transparent)]
    Ast(#[from] AstError),
    /// A training-config field is out of range.
    #[error("invalid config: `{field}` {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The data-parallel workers failed or disagree.
    #[error("data-parallel workers: {0}")]
    Workers(String),
    /// This worker stopped because another worker of the run failed (that failure is the one
    /// to report).
    #[error("data-parallel workers: stopped because another worker failed")]
    PeerFailed,
    /// The compute device failed.
    #[error("device error: {0}")]
    Device(String),
    /// The output directory already holds a run.
    #[error(
        "{0} already holds a run (config.json); pass --resume to continue it or --overwrite to replace it"
    )]
    RunExists(PathBuf),
    /// The directory holds no run.
    #[error("{0} holds no run (no config.json); start one there with `ast-cli run --out {0}`")]
    NoRun(PathBuf),
    /// A run directory's lock is a symbolic link or not a plain file.
    #[error(
        "{0} is a symbolic link or not a plain file: a run's lock is a plain file it creates; \
         remove it and start again"
    )]
    LockNotAFile(PathBuf),
    /// The output directory holds files, but not a run.
    #[error(
        "{dir} is not empty and holds no run (e.g. `{example}`): choose another --out, or pass \
         --overwrite to write the run there (it replaces only the files a run writes)"
    )]
    NotARun {
        /// The directory.
        dir: PathBuf,
        /// One of its entries.
        example: String,
    },
    /// A run directory without a finished epoch: nothing to plot.
    #[error(
        "{0} has no finished epoch yet (metrics.jsonl is missing or empty): plot once the run \
         has evaluated its first epoch"
    )]
    NoEpochYet(PathBuf),
    /// The output directory cannot be created or written.
    #[error("cannot write to output directory {path}: {reason}")]
    Unwritable {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// A checkpoint is missing, unreadable or does not fit the model.
    #[error("cannot load {path}: {reason}")]
    Checkpoint {
        /// The checkpoint or run directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint of the original code cannot be imported.
    #[error("cannot import {path}: {reason}")]
    Import {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The loss stopped being a finite number.
    #[error(
        "loss became {value} at epoch {epoch}, iteration {iteration} (sub-net {subnet}); \
         training stopped, {kept}"
    )]
    NonFiniteLoss {
        /// The loss value.
        value: f32,
        /// Epoch (from 0).
        epoch: usize,
        /// Global iteration.
        iteration: usize,
        /// Sub-net trained.
        subnet: usize,
        /// What the run keeps.
        kept: Kept,
    },
    /// The run was asked to stop (SIGINT/SIGTERM) and wrote a checkpoint.
    #[error(
        "stopped at iteration {iteration}, checkpoint {checkpoint} written; resume with \
         `ast-cli run --resume --out {dir}`"
    )]
    Stopped {
        /// Global iterations done.
        iteration: usize,
        /// The checkpoint written.
        checkpoint: PathBuf,
        /// The run directory.
        dir: PathBuf,
    },
    /// A resumed run has already trained all its epochs.
    #[error(
        "the run in {dir} has already trained its {epochs} epochs; nothing changed (extend it \
         with --resume --epochs N)"
    )]
    RunFinished {
        /// The run directory.
        dir: PathBuf,
        /// Epochs trained.
        epochs: usize,
    },
    /// Another process holds the run directory.
    #[error(
        "{dir} is in use by {holder} (another ast-cli run, resume or overwrite); wait for it \
         to end or choose another --out"
    )]
    RunLocked {
        /// The run directory.
        dir: PathBuf,
        /// Who holds it: "process `<PID>`".
        holder: String,
    },
    /// The model's weights or outputs stopped being finite numbers.
    #[error(
        "the model diverged by the end of epoch {epoch}: {what} not finite; training \
         stopped, {kept} (lower --lr)"
    )]
    NonFiniteModel {
        /// Epoch (from 0).
        epoch: usize,
        /// What is not finite.
        what: String,
        /// What the run keeps.
        kept: Kept,
    },
    /// A file of the run could not be written or read.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        TrainError::Io {
            path: path.into(),
            reason: err.to_string(),
        }
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        TrainError::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T> = core::result::Result<T, TrainError>;
