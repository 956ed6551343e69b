//! # ast-core — Alternating Sparse Training on burn
//!
//! One dense weight set shared by `K` sparse sub-nets, each with its own masks and its own
//! BatchNorm statistics, trained by alternating one sub-net per iteration ("Get More at Once:
//! Alternating Sparse Training with Gradient Correction", NeurIPS 2022).
//!
//! The crate is split by concern:
//! - [`layers`]: [`MaskedConv2d`], [`MaskedLinear`], [`SwitchableBatchNorm`] and the
//!   [`SubnetSwitch`] handle that selects the active sub-net in all of them at once;
//! - [`model`]: what a model offers to a training loop other than your own ([`AstModule`],
//!   [`ModelSpec`]);
//! - [`subnet`]: model-level operations on any burn `Module` holding these layers
//!   (list masked layers, read/replace masks, densities, overlaps);
//! - [`schedule`]: *when* and *how much* (cubic ramp, offsets, cosine prune rate);
//! - [`density`]: *how much per layer* (ERK);
//! - [`mask`]: mask calculation (deterministic top-k, N:M groups) and one mask event of a
//!   sub-net as a pure function ([`mask::update`]);
//! - [`criteria`]: drop/grow scores and prune-and-regrow;
//! - [`correction`]: gradient correction between sub-nets;
//! - [`optimizer`]: SGD, Adam or AdamW on the dense shared weights or the active positions;
//! - [`step`]: the AST step tying these together; [`record`]: its state as a burn `Record`;
//! - [`testing`]: a tiny model and a learnable synthetic task, for tests, examples and
//!   benchmarks;
//! - [`backend`]: the backend-extension seam where fast sparse kernels plug in; on Flex they are
//!   the [`kernels`] (the `ast-kernels` crate, re-exported with the `flex` feature).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

#[macro_use]
mod choices;

pub mod backend;
pub mod config;
pub mod correction;
pub mod criteria;
pub mod density;
pub mod error;
pub mod layers;
pub mod mask;
pub mod model;
pub mod optimizer;
pub mod record;
pub mod rng;
pub mod schedule;
pub mod step;
pub mod subnet;
pub mod testing;

#[cfg(feature = "flex")]
pub use ast_kernels as kernels;
pub use backend::{NormOptions, NormOutput};
pub use config::{
    AdamSettings, AstConfig, CorrectionKind, CorrectionMode, MaskScheduleConfig, OptimizerKind,
    SgdSettings, SubnetTarget, UpdateScope,
};
pub use error::AstError;
pub use layers::{
    MaskedConv2d, MaskedConv2dConfig, MaskedLinear, MaskedLinearConfig, SubnetSwitch,
    SwitchableBatchNorm, SwitchableBatchNormConfig,
};
pub use model::{AstModule, ModelSpec};
pub use record::AstStepRecord;
pub use step::{AstStep, Iteration, StepReport};

#[cfg(test)]
pub(crate) mod tests {
    //! The backend every unit test runs on.
    pub type TestBackend = burn::backend::Flex;

    pub fn device() -> <TestBackend as burn::tensor::backend::BackendTypes>::Device {
        Default::default()
    }
}
