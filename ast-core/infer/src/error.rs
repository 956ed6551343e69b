//! What can go wrong with a model file or a call, each with the problem and the fix.

use thiserror::Error;

/// An error of the inference runtime or of an export.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum InferError {
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// The bytes are not a safetensors file (truncated, or another format).
    #[error("not a readable safetensors file ({0}): pass a file written by `ast-cli export`")]
    NotSafetensors(String),
    /// A safetensors file without our header.
    #[error(
        "a safetensors file, but not one of ast's sub-net files (no `ast` header): export one \
         with `ast-cli export`"
    )]
    Foreign,
    /// A file of another format version.
    #[error(
        "format version {found} of ast's sub-net files; this build reads versions 1 to \
         {supported}: export the run again with this build"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The tensors do not match the checksum written with them.
    #[error("the file's tensors do not match its checksum (corrupted or edited): export it again")]
    Checksum,
    /// Something in the file does not fit the rest (a missing tensor, a wrong shape, a
    /// graph that does not chain).
    #[error("the model file is inconsistent: {0}; export it again")]
    Corrupt(String),
    /// A sub-net index past the file's sub-nets.
    #[error("sub-net {index} does not exist: the file holds {count} (0 to {})", count.saturating_sub(1))]
    NoSubnet {
        /// The index asked for.
        index: usize,
        /// Sub-nets in the file.
        count: usize,
    },
    /// Input data of the wrong length for the model's image shape.
    #[error(
        "{values} input values are not a batch of {batch} images of {c}×{h}×{w}: give \
         images of the model's input shape",
        c = shape[0],
        h = shape[1],
        w = shape[2]
    )]
    Input {
        /// Values given.
        values: usize,
        /// Images in the batch.
        batch: usize,
        /// The model's input shape `[C, H, W]`.
        shape: [usize; 3],
    },
    /// What an export needs is missing from the model's parameters or masks.
    #[error("cannot export: {0}")]
    Export(String),
    /// No sub-net meets a latency budget.
    #[error(
        "no sub-net runs within {budget_ms} ms here (the fastest takes {fastest_ms:.3} ms): \
         raise the budget"
    )]
    NoneWithinBudget {
        /// The budget.
        budget_ms: f64,
        /// The fastest sub-net's latency.
        fastest_ms: f64,
    },
}

/// `Result` with an [`InferError`].
pub type Result<T> = std::result::Result<T, InferError>;

pub(crate) fn corrupt(what: impl Into<String>) -> InferError {
    InferError::Corrupt(what.into())
}
