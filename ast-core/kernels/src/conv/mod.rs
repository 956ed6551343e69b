//! Masked 2-D convolution on host slices: dense (the direct kernel, or im2col + GEMM) and
//! sparse (only the active weights), forward, input gradient and weight gradient.
//!
//! Layouts are row-major: input `[N, C_in, H, W]`, weight and mask `[C_out, C_in/groups, kh, kw]`,
//! output `[N, C_out, H_out, W_out]`. Work is split over the batch with rayon; every sum is
//! taken in a fixed order whatever the thread count, so results are bit-identical run to run.
//!
//! One file per job, dependencies in one direction:
//! - [`geometry`]: shapes, output size and the buffer sizes every form derives from them;
//! - `layout`: padded and wide planes, row copies, the fixed-order sum of partial gradients;
//! - `im2col`: columns of a tile of output rows, and their adjoint;
//! - [`dense`]: the dense form (im2col + GEMM, or the [`direct`] kernels where they are faster);
//! - [`sparse`]: the sparse form on row-compressed active weights ([`SparseWeight`]);
//! - [`plan`]: the cost model that picks a form per layer, and [`MaskedConvPlan`], which runs it;
//! - [`forward`]: [`ForwardPlan`], one layer laid out once for inference, one sample per call.

pub mod dense;
pub mod direct;
pub mod forward;
pub mod geometry;
mod im2col;
mod layout;
pub mod plan;
pub mod sparse;

pub use forward::{ForwardPlan, ForwardScratch};
pub use geometry::ConvGeometry;
pub use layout::{Epilogue, Placement, ACTIVATION_SLACK};
pub use plan::{sparse_is_faster, MaskedConvPlan, PlanWeights};
pub use sparse::{GradBuffers, SparseWeight};
