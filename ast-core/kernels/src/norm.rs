//! Training-mode batch normalisation of `[N, C, H, W]` activations on host slices, with the
//! residual add and ReLU that follow it in the models fused in:
//! `y = act(γ·x̂ + β + r)`, `x̂ = (x − μ)/√(σ² + ε)`, `act` ReLU or the identity.
//!
//! `μ`, `σ²` are the batch mean and biased variance of each channel over its `N·H·W` values,
//! summed in two passes (mean, then squared deviations): per plane in `f32` lanes, the lanes
//! added up in `f64` across the planes. The backward pass is
//! `g = dy·[y > 0]` (ReLU) or `dy`, `∂r = g`, `∂β = Σg`, `∂γ = Σg·x̂` and
//! `∂x = γ/√(σ² + ε) · (g − ∂β/M − x̂·∂γ/M)` with `M = N·H·W`.
//!
//! Sums run per channel and element-wise passes per plane, split with rayon; every sum is taken
//! in a fixed order, so results are bit-identical whatever the thread count. One forward reads
//! `x` three times and writes `y` once, one backward reads `x` and `dy` twice: burn's composed
//! operations take about four times as many passes (and as many temporary tensors).

use rayon::prelude::*;

/// The layout of a `[N, C, H, W]` activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// Batch size `N`.
    pub batch: usize,
    /// Channels `C`.
    pub channels: usize,
    /// Values per plane, `H·W`.
    pub plane: usize,
}

impl NormShape {
    /// Values in the activation.
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Whether the activation holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per channel, `M = N·H·W`.
    fn count(&self) -> f64 {
        (self.batch * self.plane) as f64
    }

    /// Channel `c`'s planes, sample by sample.
    fn planes<'a, T>(&self, data: &'a [T], c: usize) -> impl Iterator<Item = &'a [T]> + 'a {
        let [channels, plane] = [self.channels, self.plane];
        (0..self.batch).map(move |n| &data[(n * channels + c) * plane..][..plane])
    }

    /// Planes per rayon task of an element-wise pass (about 4 096 values per task).
    fn planes_per_task(&self) -> usize {
        (4096 / self.plane.max(1)).max(1)
    }

    /// The per-channel `values` of each plane in the flat `range` (whole planes).
    fn per_plane<T: Copy>(&self, values: &[T], range: &core::ops::Range<usize>) -> Vec<T> {
        let p = self.plane.max(1);
        (range.start / p..range.end / p)
            .map(|i| values[i % self.channels])
            .collect()
    }

    fn check(&self, name: &str, len: usize) {
        assert_eq!(len, self.len(), "{name} does not match {self:?}");
    }
}

/// Per-channel batch statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean `μ` of each channel.
    pub mean: Vec<f32>,
    /// Biased variance `σ²` of each channel.
    pub var: Vec<f32>,
}

/// What [`backward`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGrads {
    /// `∂L/∂x`, shaped as `x`.
    pub x: Vec<f32>,
    /// `∂L/∂γ`, one per channel.
    pub gamma: Vec<f32>,
    /// `∂L/∂β`, one per channel.
    pub beta: Vec<f32>,
    /// `∂L/∂r`, shaped as `x`, when asked for.
    pub residual: Option<Vec<f32>>,
}

/// Lanes of the partial sums: wide enough for the compiler to vectorise the loops, and a fixed
/// summation order.
const LANES: usize = 16;

/// Lanes of the backward's gated sums: four vectors of independent partial sums, so that the
/// additions do not wait on each other (16 lanes: one chain per sum, 10–14 % slower backward at
/// density 0.02; 64 lanes in the statistics' sums made the forward slower).
const GATED_LANES: usize = 64;

/// One rayon task's share of a pass, run through `pulp`'s dispatch so that the loops are
/// compiled for the widest SIMD set this CPU has (chosen at run time). The loops and their
/// helpers are `#[inline(always)]` so that they are compiled inside the dispatched function.
enum Pass<'a> {
    /// `(Σx, Σ(x − μ)²)` over the planes of one channel (`μ` computed from the first sum).
    Stats { planes: Vec<&'a [f32]> },
    /// `(Σg, Σg·(x − μ))` over the planes of one channel (planes of `dy`, gate source, `x`).
    GatedSums {
        planes: Vec<[&'a [f32]; 3]>,
        /// The gate's bytes of each plane (`GateMode::Mask` only, else empty).
        masks: Vec<&'a [u8]>,
        mean: f32,
        gate: GateMode,
        affine: [f32; 2],
    },
    /// `out = act(a·x + b + r)` plane by plane, `(a, b)` per plane.
    Normalize {
        out: &'a mut [f32],
        /// Receives the gate `[out > 0]` as bytes, when given (after a ReLU).
        mask: Option<&'a mut [u8]>,
        x: &'a [f32],
        residual: Option<&'a [f32]>,
        coefficients: Vec<[f32; 2]>,
        relu: bool,
    },
    /// `∂x = k·g + r·x + q` (and `∂r = g`) plane by plane, `[k, r, q, a, b]` per plane
    /// (`a`, `b`: the forward's affine map, for a recomputed gate), in place: `grad` holds
    /// `dy` and receives `∂x`.
    Backward {
        grad: &'a mut [f32],
        dr: Option<&'a mut [f32]>,
        source: &'a [f32],
        /// The gate's bytes (`GateMode::Mask` only, else empty).
        mask: &'a [u8],
        x: &'a [f32],
        coefficients: Vec<[f32; 5]>,
        gate: GateMode,
    },
}

impl pulp::WithSimd for Pass<'_> {
    type Output = [f64; 2];

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> [f64; 2] {
        match self {
            Pass::Stats { planes } => {
                let count = planes.iter().map(|p| p.len()).sum::<usize>().max(1) as f64;
                let sum = sum_planes(&planes, |v| v);
                let mean = (sum / count) as f32;
                let squares = sum_planes(&planes, |v| (v - mean) * (v - mean));
                [sum, squares]
            }
            Pass::GatedSums {
                planes,
                masks,
                mean,
                gate,
                affine,
            } => {
                // Each plane's f32 lanes, added up lane by lane in f64 across the planes.
                let mut lanes = [[0.0f64; GATED_LANES]; 2];
                let mut tails = [0.0f64; 2];
                for (i, [dy, s, x]) in planes.iter().enumerate() {
                    let (plane, tail) = match gate {
                        GateMode::None => gated_sums::<NO_GATE, _>(dy, s, x, mean, affine),
                        GateMode::Output => gated_sums::<OUTPUT_GATE, _>(dy, s, x, mean, affine),
                        GateMode::Input => gated_sums::<INPUT_GATE, _>(dy, s, x, mean, affine),
                        GateMode::Mask => gated_sums::<MASK_GATE, _>(dy, masks[i], x, mean, affine),
                    };
                    for (sums, plane) in lanes.iter_mut().zip(plane) {
                        add_lanes(sums, &plane);
                    }
                    tails = [tails[0] + tail[0], tails[1] + tail[1]];
                }
                [0, 1].map(|k| lanes[k].iter().sum::<f64>() + tails[k])
            }
            Pass::Normalize {
                out,
                mut mask,
                x,
                residual,
                coefficients,
                relu,
            } => {
                let p = out.len() / coefficients.len().max(1);
                for (i, &[a, b]) in coefficients.iter().enumerate() {
                    let (o, xv) = (&mut out[i * p..][..p], &x[i * p..][..p]);
                    let r = residual.map_or(&[][..], |r| &r[i * p..][..p]);
                    match (mask.as_deref_mut(), relu) {
                        (Some(m), _) => normalize_plane_gated(o, &mut m[i * p..][..p], xv, r, a, b),
                        (None, true) => normalize_plane::<true>(o, xv, r, a, b),
                        (None, false) => normalize_plane::<false>(o, xv, r, a, b),
                    }
                }
                [0.0; 2]
            }
            Pass::Backward {
                grad,
                mut dr,
                source,
                mask,
                x,
                coefficients,
                gate,
            } => {
                let p = grad.len() / coefficients.len().max(1);
                for (i, &c) in coefficients.iter().enumerate() {
                    let (g, s, xv) = (
                        &mut grad[i * p..][..p],
                        &source[i * p..][..p],
                        &x[i * p..][..p],
                    );
                    let m = match gate {
                        GateMode::Mask => &mask[i * p..][..p],
                        _ => &[],
                    };
                    // ∂r first: it reads `dy`, which ∂x then overwrites.
                    if let Some(dr) = dr.as_deref_mut() {
                        let o = &mut dr[i * p..][..p];
                        match gate {
                            GateMode::None => o.copy_from_slice(g),
                            GateMode::Output => gate_plane::<OUTPUT_GATE, _>(o, g, s, c),
                            GateMode::Input => gate_plane::<INPUT_GATE, _>(o, g, s, c),
                            GateMode::Mask => gate_plane::<MASK_GATE, _>(o, g, m, c),
                        }
                    }
                    match gate {
                        GateMode::None => backward_plane::<NO_GATE, _>(g, s, xv, c),
                        GateMode::Output => backward_plane::<OUTPUT_GATE, _>(g, s, xv, c),
                        GateMode::Input => backward_plane::<INPUT_GATE, _>(g, s, xv, c),
                        GateMode::Mask => backward_plane::<MASK_GATE, _>(g, m, xv, c),
                    }
                }
                [0.0; 2]
            }
        }
    }
}

impl Pass<'_> {
    fn run(self) -> [f64; 2] {
        crate::dispatch(self)
    }
}

/// `Σ f(a_i)` over the planes of one channel: per plane `f32` lanes ([`lane_sums`]), added up
/// lane by lane in `f64` across the planes, then across the lanes. (Reducing each plane's
/// lanes to one `f64` was a chain of dependent additions per plane: on 64-value planes it
/// took longer than the sums.)
#[inline(always)]
fn sum_planes(planes: &[&[f32]], f: impl Fn(f32) -> f32 + Copy) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut tail = 0.0f64;
    for plane in planes {
        let (sums, rest) = lane_sums(plane, f);
        add_lanes(&mut lanes, &sums);
        tail += rest;
    }
    lanes.iter().sum::<f64>() + tail
}

/// `lanes[i] += f64(values[i])`.
#[inline(always)]
fn add_lanes<const N: usize>(lanes: &mut [f64; N], values: &[f32; N]) {
    for (l, &v) in lanes.iter_mut().zip(values) {
        *l += f64::from(v);
    }
}

/// `Σ f(a_i)` over one plane in `f32` lanes, and its values past the last whole vector in
/// `f64`.
#[inline(always)]
fn lane_sums(a: &[f32], f: impl Fn(f32) -> f32) -> ([f32; LANES], f64) {
    let mut acc = [0.0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(f(v))).sum();
    for chunk in chunks {
        for i in 0..LANES {
            acc[i] += f(chunk[i]);
        }
    }
    (acc, tail)
}

/// Where the backward pass reads the ReLU's gate `[y > 0]` from.
#[derive(Debug, Clone, Copy)]
pub enum ReluGate<'a> {
    /// No ReLU followed the normalisation.
    None,
    /// The saved output `y`.
    Output(&'a [f32]),
    /// The gate `[y > 0]` as one byte per value, written by [`forward_masked`]: a quarter of
    /// the bytes of `y` to read in each of the two passes, and `y` need not be kept for the
    /// backward (the gate of a residual block, where it cannot be recomputed from the input).
    Mask(&'a [u8]),
    /// Recomputed from the input as the forward computed it, `y = max(a·x + b, 0)` with
    /// `a = γ/σ`, `b = β − μ·a` (the same operations in the same order, so the same decisions),
    /// saving a read of `y` in each of the two passes. Only without a residual.
    Recompute {
        /// `β`, one per channel.
        beta: &'a [f32],
    },
}

/// [`ReluGate`] inside a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateMode {
    None,
    Output,
    Input,
    Mask,
}

/// The gate modes as const parameters of the per-plane loops.
const NO_GATE: u8 = 0;
const OUTPUT_GATE: u8 = 1;
const INPUT_GATE: u8 = 2;
const MASK_GATE: u8 = 3;

/// What a gate is read from: the output or input values (`f32`), or the gate's bytes (`u8`).
trait GateSource: Copy {
    /// Whether the gate lets the gradient through: `y > 0` with `y` the source
    /// (`OUTPUT_GATE`), `max(a·x + b, 0)` of the source (`INPUT_GATE`), or a non-zero byte.
    fn open<const MODE: u8>(self, affine: [f32; 2]) -> bool;
}

impl GateSource for f32 {
    #[inline(always)]
    fn open<const MODE: u8>(self, [a, b]: [f32; 2]) -> bool {
        let y = match MODE {
            OUTPUT_GATE => self,
            _ => (a * self + b).max(0.0),
        };
        // `y` comes out of a ReLU (`max(·, 0)`), never NaN: the gate is open where it is
        // positive, as the forward's bytes say.
        y > 0.0
    }
}

impl GateSource for u8 {
    #[inline(always)]
    fn open<const MODE: u8>(self, _: [f32; 2]) -> bool {
        self != 0
    }
}

/// The gradient reaching the normalisation: `dy·[y > 0]` after a ReLU, else `dy`; `y` is
/// `source` (`OUTPUT_GATE`) or recomputed from `x = source` with the forward's `[a, b]`
/// (`INPUT_GATE`), or the gate is `source`'s byte (`MASK_GATE`).
#[inline(always)]
fn gate<const MODE: u8, T: GateSource>(dy: f32, source: T, affine: [f32; 2]) -> f32 {
    if MODE == NO_GATE || source.open::<MODE>(affine) {
        dy
    } else {
        0.0
    }
}

/// `[Σg, Σg·(x − μ)]` over one plane, `g = gate(dy, source)`: `f32` lanes, and the values
/// past the last whole block of lanes in `f64`.
#[inline(always)]
fn gated_sums<const MODE: u8, T: GateSource>(
    dy: &[f32],
    source: &[T],
    x: &[f32],
    mean: f32,
    affine: [f32; 2],
) -> ([[f32; GATED_LANES]; 2], [f64; 2]) {
    let mut acc_g = [0.0f32; GATED_LANES];
    let mut acc_gx = [0.0f32; GATED_LANES];
    let n = dy.len() / GATED_LANES * GATED_LANES;
    for ((d, sv), xv) in (dy[..n].chunks_exact(GATED_LANES))
        .zip(source[..n].chunks_exact(GATED_LANES))
        .zip(x[..n].chunks_exact(GATED_LANES))
    {
        for i in 0..GATED_LANES {
            let g = gate::<MODE, T>(d[i], sv[i], affine);
            acc_g[i] += g;
            acc_gx[i] += g * (xv[i] - mean);
        }
    }
    let (mut tail_g, mut tail_gx) = (0.0f64, 0.0f64);
    for i in n..dy.len() {
        let g = gate::<MODE, T>(dy[i], source[i], affine);
        tail_g += f64::from(g);
        tail_gx += f64::from(g * (x[i] - mean));
    }
    ([acc_g, acc_gx], [tail_g, tail_gx])
}

/// `out = act(a·x + b + r)` over one plane (`r` empty: no residual).
#[inline(always)]
fn normalize_plane<const RELU: bool>(out: &mut [f32], x: &[f32], r: &[f32], a: f32, b: f32) {
    let act = |v: f32| if RELU { v.max(0.0) } else { v };
    if r.is_empty() {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = act(a * v + b);
        }
    } else {
        for ((o, &v), &r) in out.iter_mut().zip(x).zip(r) {
            *o = act(a * v + b + r);
        }
    }
}

/// `out = max(a·x + b + r, 0)` over one plane (`r` empty: no residual), and the gate
/// `[out > 0]` as bytes into `mask`, in the same loop.
#[inline(always)]
fn normalize_plane_gated(out: &mut [f32], mask: &mut [u8], x: &[f32], r: &[f32], a: f32, b: f32) {
    let gated = |o: &mut f32, m: &mut u8, v: f32| {
        *o = v.max(0.0);
        *m = u8::from(*o > 0.0);
    };
    if r.is_empty() {
        for ((o, m), &v) in out.iter_mut().zip(mask.iter_mut()).zip(x) {
            gated(o, m, a * v + b);
        }
    } else {
        for (((o, m), &v), &r) in out.iter_mut().zip(mask.iter_mut()).zip(x).zip(r) {
            gated(o, m, a * v + b + r);
        }
    }
}

/// `∂x = k·g + r·x + q` over one plane, in place of `dy`, `c = [k, r, q, a, b]`.
#[inline(always)]
fn backward_plane<const MODE: u8, T: GateSource>(
    grad: &mut [f32],
    source: &[T],
    x: &[f32],
    c: [f32; 5],
) {
    let [k, r, q, a, b] = c;
    for ((o, &s), &xv) in grad.iter_mut().zip(source).zip(x) {
        *o = k * gate::<MODE, T>(*o, s, [a, b]) + r * xv + q;
    }
}

/// `out = g = gate(dy, source)` over one plane, `c = [_, _, _, a, b]`.
#[inline(always)]
fn gate_plane<const MODE: u8, T: GateSource>(
    out: &mut [f32],
    dy: &[f32],
    source: &[T],
    c: [f32; 5],
) {
    for ((o, &d), &s) in out.iter_mut().zip(dy).zip(source) {
        *o = gate::<MODE, T>(d, s, [c[3], c[4]]);
    }
}

/// Per-channel mean and biased variance of `x`.
///
/// # Panics
/// If `x` does not hold `shape.len()` values.
pub fn batch_stats(shape: &NormShape, x: &[f32]) -> BatchStats {
    shape.check("the input", x.len());
    let count = shape.count();
    let (mean, var) = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let [sum, squares] = Pass::Stats {
                planes: shape.planes(x, c).collect(),
            }
            .run();
            ((sum / count) as f32, (squares / count) as f32)
        })
        .unzip();
    BatchStats { mean, var }
}

/// `1/√(σ² + ε)` per channel.
pub fn inv_std(var: &[f32], epsilon: f32) -> Vec<f32> {
    var.iter().map(|&v| 1.0 / (v + epsilon).sqrt()).collect()
}

/// The forward pass: `y = act(γ·x̂ + β + r)` with the batch statistics of `x`, which it also
/// returns.
///
/// # Panics
/// If `x` or `residual` do not hold `shape.len()` values, or `gamma`/`beta` not one per channel.
pub fn forward(
    shape: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    residual: Option<&[f32]>,
    relu: bool,
) -> (Vec<f32>, BatchStats) {
    let affine = [gamma, beta];
    forward_with(shape, x, affine, epsilon, residual, relu, None)
}

/// [`forward`] with a ReLU, which also returns the gate `[y > 0]` as one byte per value, for
/// the backward's [`ReluGate::Mask`].
///
/// # Panics
/// As [`forward`].
pub fn forward_masked(
    shape: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    residual: Option<&[f32]>,
) -> (Vec<f32>, Vec<u8>, BatchStats) {
    // Every byte is written by the pass.
    let mut mask = super::pool::take_overwritten_bytes(shape.len());
    let affine = [gamma, beta];
    let (y, stats) = forward_with(shape, x, affine, epsilon, residual, true, Some(&mut mask));
    (y, mask, stats)
}

/// [`forward`], writing the gate into `mask` when given.
fn forward_with(
    shape: &NormShape,
    x: &[f32],
    [gamma, beta]: [&[f32]; 2],
    epsilon: f32,
    residual: Option<&[f32]>,
    relu: bool,
    mask: Option<&mut [u8]>,
) -> (Vec<f32>, BatchStats) {
    let stats = batch_stats(shape, x);
    let inv_std = inv_std(&stats.var, epsilon);
    let coefficients = Coefficients {
        gamma,
        beta,
        mean: &stats.mean,
        inv_std: &inv_std,
    };
    let y = normalize_with(shape, x, coefficients, residual, relu, mask);
    (y, stats)
}

/// The per-channel values [`normalize`] applies.
#[derive(Clone, Copy)]
struct Coefficients<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    mean: &'a [f32],
    inv_std: &'a [f32],
}

/// `act(γ·(x − μ)·s + β + r)` with given per-channel `μ` and `s = 1/√(σ² + ε)` (the batch's in
/// training, the running statistics' in inference).
///
/// # Panics
/// If `x` or `residual` do not hold `shape.len()` values, or a per-channel slice is not one per
/// channel.
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    shape: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let coefficients = Coefficients {
        gamma,
        beta,
        mean,
        inv_std,
    };
    normalize_with(shape, x, coefficients, residual, relu, None)
}

/// [`normalize`], writing the gate `[y > 0]` into `mask` when given.
fn normalize_with(
    shape: &NormShape,
    x: &[f32],
    c: Coefficients<'_>,
    residual: Option<&[f32]>,
    relu: bool,
    mask: Option<&mut [u8]>,
) -> Vec<f32> {
    shape.check("the input", x.len());
    if let Some(r) = residual {
        shape.check("the residual", r.len());
    }
    if let Some(m) = &mask {
        shape.check("the gate", m.len());
    }
    let per_channel = [
        ("γ", c.gamma),
        ("β", c.beta),
        ("μ", c.mean),
        ("1/σ", c.inv_std),
    ];
    for (name, v) in per_channel {
        assert_eq!(v.len(), shape.channels, "{name} is not one per channel");
    }
    let coefficients = affine(c.gamma, c.beta, c.mean, c.inv_std);
    let mut y = super::pool::take_overwritten(shape.len());
    let task = (shape.planes_per_task() * shape.plane).max(1);
    let masks: Vec<Option<&mut [u8]>> = match mask {
        Some(m) => m.chunks_mut(task).map(Some).collect(),
        None => y.chunks(task).map(|_| None).collect(),
    };
    y.par_chunks_mut(task)
        .zip(masks)
        .enumerate()
        .for_each(|(t, (out, mask))| {
            let start = t * task;
            let range = start..start + out.len();
            Pass::Normalize {
                coefficients: shape.per_plane(&coefficients, &range),
                mask,
                x: &x[range.clone()],
                residual: residual.map(|r| &r[range]),
                out,
                relu,
            }
            .run();
        });
    y
}

/// The forward's per-channel affine map `[a, b]`: `a = γ·s`, `b = β − μ·a`.
fn affine(gamma: &[f32], beta: &[f32], mean: &[f32], inv_std: &[f32]) -> Vec<[f32; 2]> {
    (0..gamma.len())
        .map(|c| {
            let scale = gamma[c] * inv_std[c];
            [scale, beta[c] - mean[c] * scale]
        })
        .collect()
}

/// The backward pass of [`forward`] from the saved input `x`, the ReLU's gate (if one
/// followed), the batch statistics and `γ`. `residual` says whether `∂L/∂r` is wanted. `∂x`
/// is written over `dy` (no new buffer to allocate and clear).
///
/// # Panics
/// If a slice does not match `shape`, or the gate is recomputed for a residual block.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &NormShape,
    x: &[f32],
    relu: ReluGate<'_>,
    dy: Vec<f32>,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    residual: bool,
) -> NormGrads {
    shape.check("the input", x.len());
    shape.check("the gradient", dy.len());
    let (gate, source, beta) = match relu {
        ReluGate::None => (GateMode::None, &dy[..], None),
        ReluGate::Output(y) => {
            shape.check("the output", y.len());
            (GateMode::Output, y, None)
        }
        ReluGate::Mask(m) => {
            shape.check("the gate", m.len());
            (GateMode::Mask, x, None)
        }
        ReluGate::Recompute { beta } => {
            assert!(
                !residual,
                "the ReLU gate of a residual block cannot be recomputed"
            );
            (GateMode::Input, x, Some(beta))
        }
    };
    let affine = match beta {
        Some(beta) => affine(gamma, beta, mean, inv_std),
        None => vec![[0.0; 2]; shape.channels],
    };
    // Per channel: ∂β = Σg and Σg·(x − μ) (∂γ = that times 1/σ).
    let mask = match relu {
        ReluGate::Mask(m) => m,
        _ => &[],
    };
    let (beta_grad, centred): (Vec<f64>, Vec<f64>) = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let planes = (shape.planes(&dy, c))
                .zip(shape.planes(source, c))
                .zip(shape.planes(x, c))
                .map(|((d, s), x)| [d, s, x])
                .collect();
            let masks = match gate {
                GateMode::Mask => shape.planes(mask, c).collect(),
                _ => Vec::new(),
            };
            let [g, gx] = Pass::GatedSums {
                planes,
                masks,
                mean: mean[c],
                gate,
                affine: affine[c],
            }
            .run();
            (g, gx)
        })
        .unzip();
    let count = shape.count();
    // ∂x = k·(g − ∂β/M − (x − μ)·s²·Σg(x − μ)/M), k = γ·s: ∂x = k·g + r·x + q per channel.
    let coefficients: Vec<[f32; 5]> = (0..shape.channels)
        .map(|c| {
            let s = f64::from(inv_std[c]);
            let k = f64::from(gamma[c]) * s;
            let a = beta_grad[c] / count;
            let b = s * s * centred[c] / count;
            let m = f64::from(mean[c]);
            let [fa, fb] = affine[c];
            [k as f32, (-k * b) as f32, (k * (b * m - a)) as f32, fa, fb]
        })
        .collect();
    // The gate's source for the write pass (`x`, unused, when there is no gate: `dy` is
    // overwritten there).
    let source = match relu {
        ReluGate::Output(y) => y,
        ReluGate::None | ReluGate::Recompute { .. } | ReluGate::Mask(_) => x,
    };
    let mut dx = dy;
    let mut dr = residual.then(|| super::pool::take_overwritten(shape.len()));
    let task = (shape.planes_per_task() * shape.plane).max(1);
    let pass = |t: usize, grad: &mut [f32], dr: Option<&mut [f32]>| {
        let start = t * task;
        let range = start..start + grad.len();
        Pass::Backward {
            coefficients: shape.per_plane(&coefficients, &range),
            source: &source[range.clone()],
            mask: match gate {
                GateMode::Mask => &mask[range.clone()],
                _ => &[],
            },
            x: &x[range],
            grad,
            dr,
            gate,
        }
        .run();
    };
    match dr.as_mut() {
        Some(dr) => (dx.par_chunks_mut(task).zip(dr.par_chunks_mut(task)))
            .enumerate()
            .for_each(|(t, (dx, dr))| pass(t, dx, Some(dr))),
        None => (dx.par_chunks_mut(task))
            .enumerate()
            .for_each(|(t, dx)| pass(t, dx, None)),
    }
    NormGrads {
        x: dx,
        gamma: (centred.iter().zip(inv_std))
            .map(|(&v, &s)| (v * f64::from(s)) as f32)
            .collect(),
        beta: beta_grad.iter().map(|&v| v as f32).collect(),
        residual: dr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn one_channel_by_hand() {
        // x = 1, 3, 5, 7 (two samples of two values): μ = 4, σ² = 5, x̂ = (−3, −1, 1, 3)/√5.
        // γ = 2, β = 1, ε = 0: y = 1 + 2·x̂; after the ReLU the first value is 0.
        let shape = NormShape {
            batch: 2,
            channels: 1,
            plane: 2,
        };
        let x = [1.0, 3.0, 5.0, 7.0];
        let r5 = 5.0f32.sqrt();
        let (y, stats) = forward(&shape, &x, &[2.0], &[1.0], 0.0, None, true);
        assert_eq!(
            stats,
            BatchStats {
                mean: vec![4.0],
                var: vec![5.0]
            }
        );
        close(&y, &[0.0, 1.0 - 2.0 / r5, 1.0 + 2.0 / r5, 1.0 + 6.0 / r5]);
        // dy = 1 everywhere, gated to g = (0, 1, 1, 1): ∂β = 3, ∂γ = Σg·x̂ = 3/√5,
        // ∂x_i = (2/√5)·(g_i − 3/4 − x̂_i·(3/√5)/4) = (−0.6, 0.8, 0.2, −0.4)/√5; ∂r = g.
        let (mean, inv_std, dy) = ([4.0], [1.0 / r5], [1.0; 4]);
        let g = backward(
            &shape,
            &x,
            ReluGate::Output(&y),
            dy.to_vec(),
            &mean,
            &inv_std,
            &[2.0],
            true,
        );
        close(&g.beta, &[3.0]);
        close(&g.gamma, &[3.0 / r5]);
        close(&g.x, &[-0.6 / r5, 0.8 / r5, 0.2 / r5, -0.4 / r5]);
        close(g.residual.as_ref().unwrap(), &[0.0, 1.0, 1.0, 1.0]);
        // The gate recomputed from x (no residual) is the same.
        let recompute = ReluGate::Recompute { beta: &[1.0] };
        let h = backward(
            &shape,
            &x,
            recompute,
            dy.to_vec(),
            &mean,
            &inv_std,
            &[2.0],
            false,
        );
        assert_eq!((&h.x, &h.gamma, &h.beta), (&g.x, &g.gamma, &g.beta));
        assert!(h.residual.is_none());
        // The gate as bytes, written by the forward: the same output and gradients.
        let (ym, mask, masked_stats) = forward_masked(&shape, &x, &[2.0], &[1.0], 0.0, None);
        assert_eq!((&ym, &mask, &masked_stats), (&y, &vec![0, 1, 1, 1], &stats));
        let bytes = ReluGate::Mask(&mask);
        let m = backward(
            &shape,
            &x,
            bytes,
            dy.to_vec(),
            &mean,
            &inv_std,
            &[2.0],
            true,
        );
        assert_eq!(m, g);
        // Without the ReLU a constant dy moves nothing but β.
        let g = backward(
            &shape,
            &x,
            ReluGate::None,
            dy.to_vec(),
            &mean,
            &inv_std,
            &[2.0],
            false,
        );
        close(&g.beta, &[4.0]);
        close(&g.gamma, &[0.0]);
        close(&g.x, &[0.0; 4]);
        assert!(g.residual.is_none());
    }

    #[test]
    #[should_panic(expected = "the residual does not match")]
    fn a_residual_of_another_length_is_refused() {
        let shape = NormShape {
            batch: 1,
            channels: 1,
            plane: 2,
        };
        forward(
            &shape,
            &[1.0, 2.0],
            &[1.0],
            &[0.0],
            0.0,
            Some(&[1.0]),
            false,
        );
    }
}
