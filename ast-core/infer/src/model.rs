//! The runtime: a model file loaded once into every sub-net's ready kernels (BatchNorm folded
//! into the convolution's weights and bias, each convolution in the form the kernels' cost
//! model picks for its sub-net), then forward passes with no autodiff and no per-call weight
//! work; switching the active sub-net is an index.
//!
//! A batch runs image by image, in parallel over the images on the current rayon pool (call
//! it inside `pool.install` to choose the threads): each image goes through the whole network
//! while its activations stay in the cache. One image runs on the calling thread.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use ast_kernels::conv::{Epilogue, ForwardPlan, ForwardScratch};
use rayon::prelude::*;

use crate::error::{corrupt, InferError, Result};
use crate::format::{geometry, Header, ModelFile};
use crate::graph::Op;

/// One operation, ready to run for one sub-net.
#[derive(Debug)]
// One per layer and sub-net, built once: the padding of the smaller variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Conv {
        input: usize,
        output: usize,
        plan: ForwardPlan,
        /// Per output channel: the folded BatchNorm's shift plus the scaled bias.
        bias: Vec<f32>,
        residual: Option<usize>,
        relu: bool,
        /// Multiply-adds per image: active weights × output positions.
        multiply_adds: u64,
    },
    Pool {
        input: usize,
        output: usize,
        channels: usize,
    },
    Linear {
        input: usize,
        output: usize,
        /// `[d_in, d_out]`, zero outside the sub-net's mask.
        weight: Vec<f32>,
        bias: Vec<f32>,
        /// Active weights (multiply-adds per image of a sparse product).
        multiply_adds: u64,
    },
}

/// What one image's pass through a sub-net writes: every graph buffer, and each
/// convolution's kernel buffers.
#[derive(Debug)]
struct Scratch {
    buffers: Vec<Vec<f32>>,
    convs: Vec<Option<ForwardScratch>>,
}

impl Step {
    /// Multiply-adds per image of its active weights (none for a pooling).
    fn multiply_adds(&self) -> u64 {
        match self {
            Step::Conv { multiply_adds, .. } | Step::Linear { multiply_adds, .. } => *multiply_adds,
            Step::Pool { .. } => 0,
        }
    }

    /// The buffers it reads and writes.
    fn io(&self) -> (usize, usize) {
        match self {
            Step::Conv { input, output, .. }
            | Step::Pool { input, output, .. }
            | Step::Linear { input, output, .. } => (*input, *output),
        }
    }
}

/// A loaded model file: every sub-net ready to run.
#[derive(Debug)]
pub struct InferenceModel {
    header: Header,
    lens: Vec<usize>,
    subnets: Vec<Vec<Step>>,
    /// Per sub-net, the scratch of passes that ended, for the next ones: a call allocates and
    /// clears nothing once the pool holds one per thread.
    scratch: Vec<Mutex<Vec<Scratch>>>,
    active: usize,
    load_seconds: f64,
}

/// A [`Scratch`] taken from its sub-net's pool, handed back when dropped.
struct Lease<'a> {
    pool: &'a Mutex<Vec<Scratch>>,
    scratch: Option<Scratch>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.scratch.take() {
            self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }
    }
}

impl InferenceModel {
    /// Reads and prepares the file at `path` (see [`InferenceModel::from_bytes`]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| InferError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes)
    }

    /// Checks the file (format, version, checksum, graph) and builds every sub-net's kernels.
    /// The active sub-net starts at 0.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::build(bytes, false)
    }

    /// The same model with every mask all-ones (weights outside the stored union are zero):
    /// the dense computation the sparse sub-nets' speed is measured against, one sub-net.
    pub fn dense_reference(bytes: &[u8]) -> Result<Self> {
        Self::build(bytes, true)
    }

    fn build(bytes: &[u8], dense: bool) -> Result<Self> {
        let start = Instant::now();
        let file = ModelFile::parse(bytes)?;
        let lens = file.header.graph.buffer_lens().map_err(corrupt)?;
        let count = if dense { 1 } else { file.header.subnets.len() };
        let subnets = (0..count)
            .map(|j| prepare(&file, j, dense))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            header: file.header,
            lens,
            scratch: subnets.iter().map(|_| Mutex::default()).collect(),
            subnets,
            active: 0,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The file's header (model, sub-nets with their densities and accuracies, report).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Seconds [`InferenceModel::load`] took to check the file and build the kernels.
    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }

    /// Number of sub-nets.
    pub fn subnets(&self) -> usize {
        self.subnets.len()
    }

    /// The active sub-net.
    pub fn subnet(&self) -> usize {
        self.active
    }

    /// Makes sub-net `k` the active one (an index: no weight work).
    pub fn set_subnet(&mut self, k: usize) -> Result<()> {
        self.check_subnet(k)?;
        self.active = k;
        Ok(())
    }

    fn check_subnet(&self, k: usize) -> Result<()> {
        if k < self.subnets.len() {
            Ok(())
        } else {
            Err(InferError::NoSubnet {
                index: k,
                count: self.subnets.len(),
            })
        }
    }

    /// Multiply-adds of one image through sub-net `k`: its active weights times the output
    /// positions they are applied at. Against the dense reference's
    /// ([`InferenceModel::dense_reference`]) it bounds the speed-up sparsity can give: ERK
    /// keeps the small high-resolution layers, which hold most of the work, the densest.
    pub fn multiply_adds(&self, k: usize) -> Result<u64> {
        self.check_subnet(k)?;
        Ok(self.subnets[k].iter().map(Step::multiply_adds).sum())
    }

    /// `[C, H, W]` of an input image.
    pub fn input_shape(&self) -> [usize; 3] {
        self.header.graph.input
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.header.graph.classes
    }

    /// Logits `[batch, classes]` of the active sub-net for `batch` images laid out
    /// `[batch, C, H, W]` (preprocessed as in training).
    pub fn forward(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.forward_subnet(self.active, images, batch)
    }

    /// [`InferenceModel::forward`] with sub-net `k`.
    pub fn forward_subnet(&self, k: usize, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.check_subnet(k)?;
        let [c, h, w] = self.input_shape();
        let sample = c * h * w;
        if images.len() != batch * sample || batch == 0 {
            return Err(InferError::Input {
                values: images.len(),
                batch,
                shape: self.input_shape(),
            });
        }
        let steps = &self.subnets[k];
        let classes = self.classes();
        let mut logits = vec![0.0; batch * classes];
        if batch == 1 {
            let mut lease = self.lease(k);
            run(
                steps,
                images,
                lease.scratch.as_mut().expect("leased"),
                &mut logits,
            );
        } else {
            images
                .par_chunks(sample)
                .zip(logits.par_chunks_mut(classes))
                .for_each_init(
                    || self.lease(k),
                    |lease, (image, out)| {
                        run(steps, image, lease.scratch.as_mut().expect("leased"), out)
                    },
                );
        }
        Ok(logits)
    }

    /// The most likely class of each image (see [`InferenceModel::forward`]).
    pub fn classify(&self, images: &[f32], batch: usize) -> Result<Vec<usize>> {
        let logits = self.forward(images, batch)?;
        Ok(logits.chunks_exact(self.classes()).map(argmax).collect())
    }

    /// A scratch for sub-net `k` from its pool, or a new one.
    fn lease(&self, k: usize) -> Lease<'_> {
        let pool = &self.scratch[k];
        let kept = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let scratch = kept.unwrap_or_else(|| Scratch {
            buffers: self.lens.iter().map(|&n| vec![0.0; n]).collect(),
            convs: self.subnets[k]
                .iter()
                .map(|step| match step {
                    Step::Conv { plan, .. } => Some(plan.scratch()),
                    _ => None,
                })
                .collect(),
        });
        Lease {
            pool,
            scratch: Some(scratch),
        }
    }
}

/// The index of the largest value (the first of equal ones).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Sub-net `j`'s steps (every mask all-ones when `dense`).
fn prepare(file: &ModelFile<'_>, j: usize, dense: bool) -> Result<Vec<Step>> {
    let graph = &file.header.graph;
    let mut steps = Vec::with_capacity(graph.ops.len());
    for op in &graph.ops {
        steps.push(match op {
            Op::Conv {
                input,
                output,
                layer,
                masked,
                conv,
                norm,
                residual,
                relu,
            } => {
                let g = geometry(conv);
                if !g.supported() {
                    return Err(corrupt(format!(
                        "`{layer}`: a convolution the kernels cannot run"
                    )));
                }
                let len = conv.weight_len();
                let (mut weight, mut mask) = layer_weight(file, layer, *masked, len, j)?;
                if dense {
                    mask = vec![true; len];
                }
                let mut bias = match conv.bias {
                    true => file.f32s(&format!("{layer}.bias"), conv.c_out)?,
                    false => vec![0.0; conv.c_out],
                };
                if let Some(norm) = norm {
                    let (scale, shift) = file.norm(norm, conv.c_out, if dense { 0 } else { j })?;
                    let row = len / conv.c_out;
                    for (co, w) in weight.chunks_exact_mut(row).enumerate() {
                        w.iter_mut().for_each(|v| *v *= scale[co]);
                        bias[co] = bias[co] * scale[co] + shift[co];
                    }
                }
                let positions = (g.out_len() / conv.c_out) as u64;
                Step::Conv {
                    input: *input,
                    output: *output,
                    plan: ForwardPlan::new(g, &weight, &mask),
                    bias,
                    residual: *residual,
                    relu: *relu,
                    multiply_adds: active(&mask) * positions,
                }
            }
            Op::GlobalAvgPool {
                input,
                output,
                channels,
            } => Step::Pool {
                input: *input,
                output: *output,
                channels: *channels,
            },
            Op::Linear {
                input,
                output,
                layer,
                masked,
                d_in,
                d_out,
                bias,
            } => {
                let (weight, mask) = layer_weight(file, layer, *masked, d_in * d_out, j)?;
                let multiply_adds = match dense {
                    true => (d_in * d_out) as u64,
                    false => active(&mask),
                };
                let weight = match dense {
                    true => weight,
                    false => weight
                        .iter()
                        .zip(&mask)
                        .map(|(&w, &m)| if m { w } else { 0.0 })
                        .collect(),
                };
                Step::Linear {
                    input: *input,
                    output: *output,
                    weight,
                    bias: match bias {
                        true => file.f32s(&format!("{layer}.bias"), *d_out)?,
                        false => vec![0.0; *d_out],
                    },
                    multiply_adds,
                }
            }
        });
    }
    Ok(steps)
}

/// The number of set bits of `mask`.
fn active(mask: &[bool]) -> u64 {
    mask.iter().filter(|&&m| m).count() as u64
}

/// A layer's dense weight for sub-net `j` and its mask (all-ones for a plain layer).
fn layer_weight(
    file: &ModelFile<'_>,
    layer: &str,
    masked: bool,
    len: usize,
    j: usize,
) -> Result<(Vec<f32>, Vec<bool>)> {
    if masked {
        file.subnet_weight(layer, len, j)
    } else {
        Ok((
            file.weights(&format!("{layer}.weight"), len)?,
            vec![true; len],
        ))
    }
}

/// One image through `steps`; the logits into `logits`.
fn run(steps: &[Step], image: &[f32], scratch: &mut Scratch, logits: &mut [f32]) {
    let Scratch { buffers, convs } = scratch;
    buffers[0].copy_from_slice(image);
    let mut last = 0;
    for (step, conv) in steps.iter().zip(convs.iter_mut()) {
        let (input, output) = step.io();
        let mut out = std::mem::take(&mut buffers[output]);
        let x = &buffers[input];
        match step {
            Step::Conv {
                plan,
                bias,
                residual,
                relu,
                ..
            } => {
                let epilogue = Epilogue {
                    bias,
                    residual: residual.map(|r| buffers[r].as_slice()),
                    relu: *relu,
                };
                let conv = conv.as_mut().expect("a convolution's scratch");
                plan.forward(x, &mut out, conv, Some(epilogue));
            }
            Step::Pool { channels, .. } => {
                let plane = x.len() / channels;
                for (o, values) in out.iter_mut().zip(x.chunks_exact(plane)) {
                    *o = values.iter().sum::<f32>() / plane as f32;
                }
            }
            Step::Linear { weight, bias, .. } => {
                out.copy_from_slice(bias);
                let d_out = out.len();
                for (&v, row) in x.iter().zip(weight.chunks_exact(d_out)) {
                    for (o, &w) in out.iter_mut().zip(row) {
                        *o += v * w;
                    }
                }
            }
        }
        buffers[output] = out;
        last = output;
    }
    logits.copy_from_slice(&buffers[last]);
}
