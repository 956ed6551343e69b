//! Errors a user can cause: invalid configurations and masks that do not fit a layer.

/// Everything in `ast-core` that a user (a config, a file, a mask) can get wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AstError {
    /// A configuration field holds a value outside its valid range.
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field, as spelled in the config.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A mask does not have the shape of the layer it is meant for.
    #[error("mask for layer `{layer}` has shape {got:?}, expected {expected:?}")]
    MaskShape {
        /// Path of the layer in the model.
        layer: String,
        /// The weight's shape.
        expected: Vec<usize>,
        /// The mask's shape.
        got: Vec<usize>,
    },
    /// The number of masks given does not match the number of masked layers.
    #[error("expected masks for {expected} masked layers, got {got}")]
    MaskCount {
        /// Masked layers in the model.
        expected: usize,
        /// Masks given.
        got: usize,
    },
    /// An N:M pattern cannot be applied because the layer's input size is not a multiple of M.
    #[error(
        "layer `{layer}`: input size {input} is not divisible by M = {m} \
         (N:M groups run along input channels)"
    )]
    NmIndivisible {
        /// Path of the layer in the model.
        layer: String,
        /// Input channels (or features) of the layer.
        input: usize,
        /// The group size M.
        m: usize,
    },
    /// A sub-net index beyond the number of sub-nets.
    #[error("sub-net {index} out of range: the model has {count} sub-nets")]
    SubnetOutOfRange {
        /// The index asked for.
        index: usize,
        /// Sub-nets in the model.
        count: usize,
    },
    /// The model's masked layers disagree with the configuration.
    #[error("model does not fit the configuration: {0}")]
    Model(String),
}

/// Shorthand for results in this crate.
pub type Result<T> = core::result::Result<T, AstError>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> AstError {
    AstError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}
