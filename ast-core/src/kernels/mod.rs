//! CPU kernels for masked layers, on host slices: the Flex backend trains with them
//! ([`crate::backend`]), and an exported sub-net can run inference with them.
//!
//! - [`conv`]: masked 2-D convolution, dense (im2col + GEMM) or sparse (active weights only),
//!   forward, input gradient, and weight gradient at every or only the active positions;
//! - [`gemm`]: the safe front of the GEMM they use.

pub mod conv;
pub mod gemm;
#[cfg(test)]
mod tests;
