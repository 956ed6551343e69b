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

use ast_kernels::conv::{Epilogue, ForwardPlan, ForwardScratch, Placement};
use rayon::prelude::*;

use crate::error::{corrupt, InferError, Result};
use crate::format::{geometry, Header, ModelFile};
use crate::graph::{Graph, Op};

/// One operation, ready to run for one sub-net.
#[derive(Debug)]
// One per layer and sub-net, built once: the padding of the smaller variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Conv {
        /// The module path of the convolution.
        layer: String,
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
        /// The module path of the layer.
        layer: String,
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

    /// Its layer's module path and the form it runs in.
    fn describe(&self) -> (&str, &'static str) {
        match self {
            Step::Conv { layer, plan, .. } => (layer, plan.form_name()),
            Step::Pool { .. } => ("global average pool", "pool"),
            Step::Linear { layer, .. } => (layer, "dense"),
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

/// How a graph buffer holds one image's values: compact, or `[C, H, W]` planes inside a zero
/// border of `pad` that the convolutions reading it with that padding read in place (see
/// [`ForwardPlan::forward_laid_out`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// `[C, H, W]` for a buffer of planes (`None` for vectors).
    shape: Option<[usize; 3]>,
    pad: usize,
    /// Values held, border and slack included.
    len: usize,
}

impl Layout {
    /// Where a padded buffer's planes are, and their shape.
    fn padded(&self) -> Option<(Placement, [usize; 3])> {
        let [c, h, w] = self.shape.filter(|_| self.pad > 0)?;
        Some((Placement::new([h, w], self.pad), [c, h, w]))
    }
}

/// Each buffer's layout. A buffer of planes takes the padding most of the convolutions that
/// read it have, so that they read it in place; a convolution's output and its residual share
/// one layout (the epilogue adds them position by position), so buffers tied by residuals
/// decide together, by all their readers. The image, vectors and buffers no convolution
/// reads are compact.
fn layouts(graph: &Graph) -> Result<Vec<Layout>> {
    let lens = graph.buffer_lens().map_err(corrupt)?;
    // A buffer seen with two shapes (a graph may reuse one) stays compact.
    let mut shapes: Vec<Option<Option<[usize; 3]>>> = vec![None; lens.len()];
    fn shape_of(shapes: &mut [Option<Option<[usize; 3]>>], b: usize, shape: [usize; 3]) {
        shapes[b] = match shapes[b] {
            None => Some(Some(shape)),
            Some(s) if s == Some(shape) => Some(s),
            Some(_) => Some(None),
        };
    }
    shape_of(&mut shapes, 0, graph.input);
    // Buffers tied by residuals: a union-find over buffer indices.
    let mut tie: Vec<usize> = (0..lens.len()).collect();
    fn root(tie: &mut [usize], mut b: usize) -> usize {
        while tie[b] != b {
            tie[b] = tie[tie[b]];
            b = tie[b];
        }
        b
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); lens.len()];
    for op in &graph.ops {
        if let Op::Conv {
            input,
            output,
            conv,
            residual,
            ..
        } = op
        {
            let [ho, wo] = conv.out_hw().expect("checked by buffer_lens");
            shape_of(
                &mut shapes,
                *input,
                [conv.c_in, conv.in_hw[0], conv.in_hw[1]],
            );
            shape_of(&mut shapes, *output, [conv.c_out, ho, wo]);
            let [p, q] = conv.padding;
            readers[*input].push(if p == q { p } else { 0 });
            if let Some(r) = residual {
                let (a, b) = (root(&mut tie, *r), root(&mut tie, *output));
                tie[a] = b;
            }
        }
    }
    // Per group, the paddings its convolutions read with; the most frequent wins (the larger
    // on a tie); none or 0: compact.
    let mut votes: Vec<Vec<usize>> = vec![Vec::new(); lens.len()];
    for (b, r) in readers.iter().enumerate() {
        let g = root(&mut tie, b);
        votes[g].extend(r);
    }
    let pick = |v: &[usize]| {
        let count = |p: usize| v.iter().filter(|&&q| q == p).count();
        v.iter()
            .copied()
            .max_by_key(|&p| (count(p), p))
            .unwrap_or(0)
    };
    let shapes: Vec<Option<[usize; 3]>> = shapes.into_iter().map(Option::flatten).collect();
    // A group with a buffer that is not planes of one shape stays compact as a whole.
    let mut planes = vec![true; lens.len()];
    for (b, shape) in shapes.iter().enumerate() {
        let g = root(&mut tie, b);
        planes[g] &= shape.is_some();
    }
    Ok((0..lens.len())
        .map(|b| {
            let g = root(&mut tie, b);
            let pad = if planes[g] { pick(&votes[g]) } else { 0 };
            let len = match (shapes[b], pad) {
                (Some([c, h, w]), 1..) => Placement::new([h, w], pad).buffer_len(c),
                _ => lens[b],
            };
            Layout {
                shape: shapes[b],
                pad,
                len,
            }
        })
        .collect())
}

/// One step of [`InferenceModel::profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    /// The layer's module path (or what the step is).
    pub layer: String,
    /// The form it runs in: `sparse`, `direct` or `im2col` for a convolution.
    pub form: &'static str,
    /// Its multiply-adds per image.
    pub multiply_adds: u64,
    /// Its median time in microseconds.
    pub median_us: f64,
}

/// A loaded model file: every sub-net ready to run.
#[derive(Debug)]
pub struct InferenceModel {
    header: Header,
    /// Each buffer's layout ([`Layout`]).
    layouts: Vec<Layout>,
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
        let layouts = layouts(&file.header.graph)?;
        let count = if dense { 1 } else { file.header.subnets.len() };
        let subnets = (0..count)
            .map(|j| prepare(&file, j, dense))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            header: file.header,
            layouts,
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

    /// Where one image's pass through sub-net `k` spends its time: per step (each convolution
    /// with the form it runs in, the pooling, the classifier), its multiply-adds and its
    /// median time over `runs` passes (after one warm-up pass), on the calling thread.
    pub fn profile(&self, k: usize, runs: usize) -> Result<Vec<StepTime>> {
        self.check_subnet(k)?;
        let steps = &self.subnets[k];
        let [c, h, w] = self.input_shape();
        let image = crate::pick::test_images(1, [c, h, w]);
        let mut lease = self.lease(k);
        let scratch = lease.scratch.as_mut().expect("leased");
        let mut seconds = vec![Vec::with_capacity(runs); steps.len()];
        for run in 0..=runs.max(1) {
            put_image(&image, &self.layouts[0], &mut scratch.buffers[0]);
            for (i, step) in steps.iter().enumerate() {
                let start = Instant::now();
                run_step(step, i, &self.layouts, scratch);
                if run > 0 {
                    seconds[i].push(start.elapsed().as_secs_f64());
                }
            }
        }
        Ok(steps
            .iter()
            .zip(seconds)
            .map(|(step, mut s)| {
                s.sort_by(f64::total_cmp);
                let (layer, form) = step.describe();
                StepTime {
                    layer: layer.to_string(),
                    form,
                    multiply_adds: step.multiply_adds(),
                    median_us: s[s.len() / 2] * 1e6,
                }
            })
            .collect())
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
                &self.layouts,
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
                        let scratch = lease.scratch.as_mut().expect("leased");
                        run(steps, &self.layouts, image, scratch, out)
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
            buffers: self.layouts.iter().map(|l| vec![0.0; l.len]).collect(),
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
                    layer: layer.clone(),
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
                    layer: layer.clone(),
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
fn run(
    steps: &[Step],
    layouts: &[Layout],
    image: &[f32],
    scratch: &mut Scratch,
    logits: &mut [f32],
) {
    put_image(image, &layouts[0], &mut scratch.buffers[0]);
    let mut last = 0;
    for (i, step) in steps.iter().enumerate() {
        last = run_step(step, i, layouts, scratch);
    }
    logits.copy_from_slice(&scratch.buffers[last]);
}

/// `image` (`[C, H, W]`) into the input buffer, placed as `layout` (its border stays zero).
fn put_image(image: &[f32], layout: &Layout, buffer: &mut [f32]) {
    let Some((place, [_, _, w])) = layout.padded() else {
        buffer.copy_from_slice(image);
        return;
    };
    for (i, row) in image.chunks_exact(w).enumerate() {
        let (c, r) = (i / place.rows, i % place.rows);
        let at = c * place.plane + place.origin + r * place.pitch;
        buffer[at..at + w].copy_from_slice(row);
    }
}

/// Step `i` of a pass, on the buffers of `scratch` laid out as `layouts`; returns the buffer
/// it wrote.
fn run_step(step: &Step, i: usize, layouts: &[Layout], scratch: &mut Scratch) -> usize {
    let Scratch { buffers, convs } = scratch;
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
            let conv = convs[i].as_mut().expect("a convolution's scratch");
            let pads = (layouts[input].pad, layouts[output].pad);
            plan.forward_laid_out(x, pads.0, &mut out, pads.1, conv, Some(epilogue));
        }
        Step::Pool { channels, .. } => match layouts[input].padded() {
            None => {
                let plane = x.len() / channels;
                for (o, values) in out.iter_mut().zip(x.chunks_exact(plane)) {
                    *o = values.iter().sum::<f32>() / plane as f32;
                }
            }
            Some((place, [_, h, w])) => {
                // The same additions in the same order as over the compact plane.
                for (c, o) in out.iter_mut().enumerate() {
                    let mut sum = 0.0f32;
                    for r in 0..h {
                        let at = c * place.plane + place.origin + r * place.pitch;
                        sum = x[at..at + w].iter().fold(sum, |a, &v| a + v);
                    }
                    *o = sum / (h * w) as f32;
                }
            }
        },
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
    output
}
