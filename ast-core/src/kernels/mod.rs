//! CPU kernels for masked layers, on host slices: the Flex backend trains with them
//! ([`crate::backend`]), and an exported sub-net can run inference with them.
//!
//! - [`conv`]: masked 2-D convolution, dense (im2col + GEMM) or sparse (active weights only),
//!   forward, input gradient, and weight gradient at every or only the active positions;
//! - [`norm`]: training-mode batch norm with the residual add and ReLU after it fused in;
//! - [`gemm`]: the safe front of the GEMM they use;
//! - [`pool`]: recycled activation buffers, which the kernels' outputs take without clearing.

use std::sync::atomic::{AtomicBool, Ordering};

pub mod conv;
pub mod direct;
pub mod gemm;
pub mod norm;
pub mod pool;
#[cfg(test)]
mod tests;

static FLEX_KERNELS: AtomicBool = AtomicBool::new(true);

/// Whether Flex's masked layers run on these kernels (the default) or on burn's generic
/// operations (the reference; for comparisons and benchmarks). Process-wide.
pub fn flex_kernels_enabled() -> bool {
    FLEX_KERNELS.load(Ordering::Relaxed)
}

/// Turns Flex's use of these kernels on or off for the whole process.
pub fn set_flex_kernels(enabled: bool) {
    FLEX_KERNELS.store(enabled, Ordering::Relaxed);
}
