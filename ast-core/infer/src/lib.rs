//! # ast-infer — the K sub-nets of an AST run, outside the run
//!
//! One training run gives `K` sparse sub-nets sharing one weight set; an application picks one
//! at run time for the latency it can afford ("dynamic inference"). This crate is that
//! application's side, with no burn and no training stack:
//!
//! - [`format`](mod@format): the file, one safetensors file holding every exported sub-net with each
//!   layer's weights stored once (the values at the union of the masks, packed-bit or index
//!   masks per sub-net, BatchNorms folded), a JSON header with the [`graph`] of the forward
//!   pass, the sub-nets' densities and accuracies, and a checksum; [`format::export`] writes
//!   it (`ast-cli export` calls it);
//! - [`InferenceModel`]: the runtime. Loads a file once, builds each sub-net's kernels
//!   ([`ast_kernels`], sparse or dense per layer), switches sub-nets in O(1) and runs forward
//!   passes, batch 1 on the calling thread, larger batches over the current rayon pool;
//! - [`pick`]: each sub-net's latency here, and the most accurate one within a budget.
//!
//! ```no_run
//! use ast_infer::InferenceModel;
//! let mut model = InferenceModel::load("model.safetensors".as_ref())?;
//! model.set_subnet(2)?; // the sparsest, say
//! let [c, h, w] = model.input_shape();
//! let image = vec![0.0f32; c * h * w]; // normalised as in training
//! let class = model.classify(&image, 1)?[0];
//! # Ok::<(), ast_infer::InferError>(())
//! ```

pub mod bits;
pub mod error;
pub mod format;
pub mod graph;
mod model;
pub mod pick;

pub use error::InferError;
pub use format::{export, with_header, Calibration, Header, Params, SubnetInfo, Values};
pub use graph::{ConvSpec, Graph, NormRef, Op};
pub use model::{argmax, InferenceModel, StepTime};
pub use pick::{best_within_budget, Latency};
