//! # ast-train — data, the alternating training loop, evaluation, checkpoints and metrics
//!
//! [`train::train`] runs (or resumes) an AST run described by a [`config::TrainConfig`] in a run
//! directory: it reads the dataset ([`data`]), alternates sub-nets through `ast-core`'s step,
//! evaluates every sub-net each epoch ([`train::evaluate`]), appends metrics
//! ([`metrics`]) and writes atomic checkpoints ([`checkpoint`]) from which a killed run resumes
//! bit-identically. [`train::train_data_parallel`] runs the same loop on several devices
//! ([`parallel`]), and with the `mpi` feature on several machines.
#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod consistency;
pub mod data;
pub mod error;
pub mod import;
pub mod latency;
pub mod lock;
pub mod metrics;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod parallel;
pub mod plot;
pub mod report;
pub mod train;
mod trainer;

pub use config::{Augment, DataConfig, DatasetKind, LrSchedule, LrScheduleKind, TrainConfig};
pub use error::{Kept, Result, TrainError};
pub use lock::RunLock;
pub use train::{
    discard_unstarted_run, evaluate, load_data, prepare_run_dir, read_run_config, train,
    train_data_parallel, train_on, DataSources, RunOptions, RunSummary,
};
