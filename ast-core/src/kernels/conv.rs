//! Masked 2-D convolution on host slices: dense (im2col + GEMM) and sparse (only the active
//! weights), forward, input gradient and weight gradient.
//!
//! Layouts are row-major: input `[N, C_in, H, W]`, weight and mask `[C_out, C_in/groups, kh, kw]`,
//! output `[N, C_out, H_out, W_out]`. Work is split over the batch with rayon; every sum is
//! taken in a fixed order whatever the thread count, so results are bit-identical run to run.

use rayon::prelude::*;

use super::gemm::{matmul, MatRef};

/// Samples per partial sum of a weight gradient: the batch is cut into chunks of this many
/// samples (independent of the thread count, so the sum order is fixed).
const GRAD_CHUNK: usize = 8;

/// Shape and hyper-parameters of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size `N`.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Output channels.
    pub c_out: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Symmetric zero padding.
    pub padding: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
}

impl ConvGeometry {
    /// Output height and width, or `None` when the kernel does not fit the padded input.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let dim = |i: usize| {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            let padded = self.in_hw[i] + 2 * self.padding[i];
            (padded >= span).then(|| (padded - span) / self.stride[i] + 1)
        };
        Some([dim(0)?, dim(1)?])
    }

    /// Whether the kernels here handle this geometry (else: use the generic path).
    pub fn supported(&self) -> bool {
        self.groups >= 1
            && self.c_in % self.groups == 0
            && self.c_out % self.groups == 0
            && self.kernel.iter().all(|&k| k >= 1)
            && self.stride.iter().all(|&s| s >= 1)
            && self.dilation.iter().all(|&d| d >= 1)
            && self.out_hw().is_some()
    }

    fn cin_g(&self) -> usize {
        self.c_in / self.groups
    }

    fn cout_g(&self) -> usize {
        self.c_out / self.groups
    }

    /// Weights per output channel: `C_in/groups · kh · kw`.
    pub fn row_len(&self) -> usize {
        self.cin_g() * self.kernel[0] * self.kernel[1]
    }

    /// Number of weights.
    pub fn weight_len(&self) -> usize {
        self.c_out * self.row_len()
    }

    /// Values of one input sample.
    pub fn in_len(&self) -> usize {
        self.c_in * self.in_hw[0] * self.in_hw[1]
    }

    fn out_plane(&self) -> usize {
        let [h, w] = self.out_hw().expect("geometry checked by `supported`");
        h * w
    }

    /// Values of one output sample.
    pub fn out_len(&self) -> usize {
        self.c_out * self.out_plane()
    }

    /// A 1×1, stride-1, unpadded convolution: its im2col is the input itself.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// For kernel offset `k` along axis `i`: the output range whose input index
    /// `o·stride + k·dilation − padding` lies inside the input, and that index at its start.
    fn valid(&self, i: usize, k: usize, out: usize) -> (usize, usize, usize) {
        let (s, shift, n) = (
            self.stride[i] as isize,
            (k * self.dilation[i]) as isize - self.padding[i] as isize,
            self.in_hw[i] as isize,
        );
        // o·s + shift ≥ 0  ⇔  o ≥ ceil(−shift / s);  o·s + shift < n  ⇔  o ≤ (n − 1 − shift) / s.
        let lo = if shift >= 0 { 0 } else { (-shift + s - 1) / s };
        let hi = if n - 1 - shift < 0 {
            0
        } else {
            ((n - 1 - shift) / s + 1).min(out as isize)
        };
        let lo = lo.min(hi);
        (lo as usize, hi as usize, (lo * s + shift).max(0) as usize)
    }
}

/// The active weights of a masked convolution, row-compressed by output channel: for output
/// channel `co`, entries `row_start[co]..row_start[co + 1]` hold the active positions (input
/// channel within the group, kernel row, kernel column) and their values.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseWeight {
    /// Offsets of each output channel's entries (`C_out + 1` values).
    pub row_start: Vec<usize>,
    /// Flat index of each entry in the weight `[C_out, C_in/groups, kh, kw]`.
    pub index: Vec<usize>,
    /// Each entry's value.
    pub value: Vec<f32>,
}

impl SparseWeight {
    /// Compresses the positions of `weight` where `mask` is true.
    ///
    /// # Panics
    /// If the weight or mask length is not the geometry's weight count.
    pub fn new(geometry: &ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        let len = geometry.weight_len();
        assert!(
            weight.len() == len && mask.len() == len,
            "SparseWeight: weight {} and mask {} values, expected {len}",
            weight.len(),
            mask.len()
        );
        let row = geometry.row_len();
        let mut row_start = Vec::with_capacity(geometry.c_out + 1);
        let mut index = Vec::new();
        row_start.push(0);
        for co in 0..geometry.c_out {
            index.extend((co * row..(co + 1) * row).filter(|&i| mask[i]));
            row_start.push(index.len());
        }
        let value = index.iter().map(|&i| weight[i]).collect();
        Self {
            row_start,
            index,
            value,
        }
    }

    /// Number of active weights.
    pub fn nnz(&self) -> usize {
        self.index.len()
    }
}

/// One active weight, unpacked: input channel (absolute), kernel row, kernel column.
fn unpack(g: &ConvGeometry, co: usize, flat: usize) -> (usize, usize, usize) {
    let [kh, kw] = g.kernel;
    let within = flat % g.row_len();
    let ci = within / (kh * kw) + (co / g.cout_g()) * g.cin_g();
    (ci, within / kw % kh, within % kw)
}

/// Runs `f(o, i, len)` for every output row and input row that kernel offset `(ky, kx)`
/// connects: output plane positions `o..o + len` read input plane positions `i, i + sw, …`.
#[inline]
fn for_rows(g: &ConvGeometry, ky: usize, kx: usize, mut f: impl FnMut(usize, usize, usize)) {
    let [ho, wo] = g.out_hw().expect("geometry checked by `supported`");
    let (oy0, oy1, iy0) = g.valid(0, ky, ho);
    let (ox0, ox1, ix0) = g.valid(1, kx, wo);
    if ox0 >= ox1 {
        return;
    }
    for (step, oy) in (oy0..oy1).enumerate() {
        let iy = iy0 + step * g.stride[0];
        f(oy * wo + ox0, iy * g.in_hw[1] + ix0, ox1 - ox0);
    }
}

/// `out[i] += w · inp[i·stride]` for `i < len`.
#[inline]
fn axpy_gather(out: &mut [f32], inp: &[f32], w: f32, stride: usize) {
    if stride == 1 {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o += w * x;
        }
    } else {
        for (o, &x) in out.iter_mut().zip(inp.iter().step_by(stride)) {
            *o += w * x;
        }
    }
}

/// Writes sample `x`'s columns for group `grp` into `col` (`row_len × H_out·W_out`).
fn im2col(g: &ConvGeometry, x: &[f32], grp: usize, col: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let plane = g.in_hw[0] * g.in_hw[1];
    let p = g.out_plane();
    col.fill(0.0);
    for ci in 0..g.cin_g() {
        let src = &x[(grp * g.cin_g() + ci) * plane..][..plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut col[((ci * kh + ky) * kw + kx) * p..][..p];
                for_rows(g, ky, kx, |o, i, len| {
                    let out = &mut dst[o..o + len];
                    if g.stride[1] == 1 {
                        out.copy_from_slice(&src[i..i + len]);
                    } else {
                        for (d, &s) in out.iter_mut().zip(src[i..].iter().step_by(g.stride[1])) {
                            *d = s;
                        }
                    }
                });
            }
        }
    }
}

/// Adds the columns `col` of group `grp` back into sample gradient `dx` (the adjoint of
/// [`im2col`]).
fn col2im(g: &ConvGeometry, col: &[f32], grp: usize, dx: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let plane = g.in_hw[0] * g.in_hw[1];
    let p = g.out_plane();
    for ci in 0..g.cin_g() {
        let dst = &mut dx[(grp * g.cin_g() + ci) * plane..][..plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let src = &col[((ci * kh + ky) * kw + kx) * p..][..p];
                for_rows(g, ky, kx, |o, i, len| {
                    let s = g.stride[1];
                    for (j, &v) in src[o..o + len].iter().enumerate() {
                        dst[i + j * s] += v;
                    }
                });
            }
        }
    }
}

fn check(g: &ConvGeometry, x: usize, w: usize, y: usize) {
    assert!(g.supported(), "conv kernels: unsupported geometry {g:?}");
    assert_eq!(x, g.batch * g.in_len(), "conv kernels: input length");
    assert_eq!(w, g.weight_len(), "conv kernels: weight length");
    assert_eq!(y, g.batch * g.out_len(), "conv kernels: output length");
}

/// Dense forward: `y = conv(x, w)` (`w` already masked).
pub fn forward_dense(g: &ConvGeometry, x: &[f32], w: &[f32], y: &mut [f32]) {
    check(g, x.len(), w.len(), y.len());
    let (row, p, cog) = (g.row_len(), g.out_plane(), g.cout_g());
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each_init(
            || vec![0.0; if g.pointwise() { 0 } else { row * p }],
            |col, (y, x)| {
                for grp in 0..g.groups {
                    let cols = if g.pointwise() {
                        &x[grp * row * p..][..row * p]
                    } else {
                        im2col(g, x, grp, col);
                        &col[..]
                    };
                    matmul(
                        &mut y[grp * cog * p..][..cog * p],
                        MatRef::row_major(&w[grp * cog * row..][..cog * row], cog, row),
                        MatRef::row_major(cols, row, p),
                        false,
                    );
                }
            },
        );
}

/// Dense input gradient: `dx = convᵀ(dy, w)`.
pub fn input_grad_dense(g: &ConvGeometry, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    check(g, dx.len(), w.len(), dy.len());
    let (row, p, cog) = (g.row_len(), g.out_plane(), g.cout_g());
    dx.par_chunks_mut(g.in_len())
        .zip(dy.par_chunks(g.out_len()))
        .for_each_init(
            || vec![0.0; if g.pointwise() { 0 } else { row * p }],
            |col, (dx, dy)| {
                if !g.pointwise() {
                    dx.fill(0.0);
                }
                for grp in 0..g.groups {
                    let wg = MatRef::row_major(&w[grp * cog * row..][..cog * row], cog, row);
                    let dyg = MatRef::row_major(&dy[grp * cog * p..][..cog * p], cog, p);
                    if g.pointwise() {
                        matmul(&mut dx[grp * row * p..][..row * p], wg.t(), dyg, false);
                    } else {
                        matmul(col, wg.t(), dyg, false);
                        col2im(g, col, grp, dx);
                    }
                }
            },
        );
}

/// Dense weight gradient: `dw = Σ_n dy_n · im2col(x_n)ᵀ`, at every position.
pub fn weight_grad_dense(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    check(g, x.len(), dw.len(), dy.len());
    let (row, p, cog) = (g.row_len(), g.out_plane(), g.cout_g());
    let partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(GRAD_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0.0; dw.len()];
            let mut col = vec![0.0; if g.pointwise() { 0 } else { row * p }];
            let samples = chunk * GRAD_CHUNK..((chunk + 1) * GRAD_CHUNK).min(g.batch);
            for (i, n) in samples.enumerate() {
                let xn = &x[n * g.in_len()..][..g.in_len()];
                let dyn_ = &dy[n * g.out_len()..][..g.out_len()];
                for grp in 0..g.groups {
                    let cols = if g.pointwise() {
                        &xn[grp * row * p..][..row * p]
                    } else {
                        im2col(g, xn, grp, &mut col);
                        &col[..]
                    };
                    matmul(
                        &mut acc[grp * cog * row..][..cog * row],
                        MatRef::row_major(&dyn_[grp * cog * p..][..cog * p], cog, p),
                        MatRef::row_major(cols, row, p).t(),
                        i > 0,
                    );
                }
            }
            acc
        })
        .collect();
    sum_in_order(&partials, dw);
}

fn sum_in_order(partials: &[Vec<f32>], out: &mut [f32]) {
    out.fill(0.0);
    for part in partials {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
}

/// Sparse forward: `y = conv(x, w)` using only the active weights.
pub fn forward_sparse(g: &ConvGeometry, x: &[f32], w: &SparseWeight, y: &mut [f32]) {
    check(g, x.len(), g.weight_len(), y.len());
    let p = g.out_plane();
    let plane = g.in_hw[0] * g.in_hw[1];
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each(|(y, x)| {
            y.fill(0.0);
            for co in 0..g.c_out {
                let out = &mut y[co * p..][..p];
                for e in w.row_start[co]..w.row_start[co + 1] {
                    let (ci, ky, kx) = unpack(g, co, w.index[e]);
                    let (v, src) = (w.value[e], &x[ci * plane..][..plane]);
                    for_rows(g, ky, kx, |o, i, len| {
                        axpy_gather(&mut out[o..o + len], &src[i..], v, g.stride[1]);
                    });
                }
            }
        });
}

/// Sparse input gradient: `dx = convᵀ(dy, w)` using only the active weights.
pub fn input_grad_sparse(g: &ConvGeometry, dy: &[f32], w: &SparseWeight, dx: &mut [f32]) {
    check(g, dx.len(), g.weight_len(), dy.len());
    let p = g.out_plane();
    let plane = g.in_hw[0] * g.in_hw[1];
    dx.par_chunks_mut(g.in_len())
        .zip(dy.par_chunks(g.out_len()))
        .for_each(|(dx, dy)| {
            dx.fill(0.0);
            for co in 0..g.c_out {
                let src = &dy[co * p..][..p];
                for e in w.row_start[co]..w.row_start[co + 1] {
                    let (ci, ky, kx) = unpack(g, co, w.index[e]);
                    let (v, dst) = (w.value[e], &mut dx[ci * plane..][..plane]);
                    let s = g.stride[1];
                    for_rows(g, ky, kx, |o, i, len| {
                        if s == 1 {
                            for (d, &t) in dst[i..i + len].iter_mut().zip(&src[o..o + len]) {
                                *d += v * t;
                            }
                        } else {
                            for (j, &t) in src[o..o + len].iter().enumerate() {
                                dst[i + j * s] += v * t;
                            }
                        }
                    });
                }
            }
        });
}

/// Sampled weight gradient: `dw` at the active positions of `w` (one value per entry, in the
/// entries' order), `Σ_n Σ_pixels dy · x` over the pixels each weight touches.
pub fn weight_grad_sparse(g: &ConvGeometry, x: &[f32], dy: &[f32], w: &SparseWeight) -> Vec<f32> {
    check(g, x.len(), g.weight_len(), dy.len());
    let p = g.out_plane();
    let plane = g.in_hw[0] * g.in_hw[1];
    let s = g.stride[1];
    let partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(GRAD_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0.0; w.nnz()];
            for n in chunk * GRAD_CHUNK..((chunk + 1) * GRAD_CHUNK).min(g.batch) {
                let xn = &x[n * g.in_len()..][..g.in_len()];
                let dyn_ = &dy[n * g.out_len()..][..g.out_len()];
                for co in 0..g.c_out {
                    let d = &dyn_[co * p..][..p];
                    for e in w.row_start[co]..w.row_start[co + 1] {
                        let (ci, ky, kx) = unpack(g, co, w.index[e]);
                        let src = &xn[ci * plane..][..plane];
                        let mut sum = 0.0f32;
                        for_rows(g, ky, kx, |o, i, len| {
                            sum += dot_gather(&d[o..o + len], &src[i..], s);
                        });
                        acc[e] += sum;
                    }
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0; w.nnz()];
    sum_in_order(&partials, &mut out);
    out
}

/// `Σ_i a[i] · b[i·stride]`, with 8 independent partial sums so that it vectorises.
#[inline]
fn dot_gather(a: &[f32], b: &[f32], stride: usize) -> f32 {
    if stride == 1 {
        let b = &b[..a.len()];
        let mut acc = [0.0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for j in 0..8 {
                acc[j] += x[j] * y[j];
            }
        }
        let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
        acc.iter().sum::<f32>() + tail
    } else {
        a.iter()
            .zip(b.iter().step_by(stride))
            .map(|(x, y)| x * y)
            .sum()
    }
}

/// Below this density a masked convolution computes with its active weights only
/// ([`SparseWeight`]); at or above it, with the masked dense weight (im2col + GEMM).
pub const SPARSE_BELOW_DENSITY: f64 = 0.3;

/// The weights a masked convolution computes with, in the form its density calls for.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanWeights {
    /// The masked dense weight `W ⊙ M`.
    Dense(Vec<f32>),
    /// The active weights.
    Sparse(SparseWeight),
}

/// One masked convolution ready to run: its geometry and its weights in dense or sparse form.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedConvPlan {
    /// Shapes and hyper-parameters.
    pub geometry: ConvGeometry,
    /// The weights.
    pub weights: PlanWeights,
}

impl MaskedConvPlan {
    /// Chooses the sparse form below [`SPARSE_BELOW_DENSITY`] and for depthwise-like layers
    /// (one input channel per group, where a GEMM has a single row), else the dense form.
    ///
    /// # Panics
    /// If the geometry is not [`ConvGeometry::supported`] or the lengths do not match it.
    pub fn new(geometry: ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        assert!(
            geometry.supported(),
            "conv kernels: unsupported geometry {geometry:?}"
        );
        let active = mask.iter().filter(|&&m| m).count();
        let density = active as f64 / mask.len().max(1) as f64;
        let weights = if density < SPARSE_BELOW_DENSITY || geometry.cin_g() == 1 {
            PlanWeights::Sparse(SparseWeight::new(&geometry, weight, mask))
        } else {
            assert_eq!(
                weight.len(),
                mask.len(),
                "conv kernels: weight and mask lengths"
            );
            PlanWeights::Dense(
                weight
                    .iter()
                    .zip(mask)
                    .map(|(&w, &m)| if m { w } else { 0.0 })
                    .collect(),
            )
        };
        Self { geometry, weights }
    }

    /// `y = conv(x, W ⊙ M)`, `[N, C_out, H_out, W_out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let mut y = vec![0.0; g.batch * g.out_len()];
        match &self.weights {
            PlanWeights::Dense(w) => forward_dense(g, x, w, &mut y),
            PlanWeights::Sparse(w) => forward_sparse(g, x, w, &mut y),
        }
        y
    }

    /// `∂L/∂x` from `dy = ∂L/∂y`, `[N, C_in, H, W]`.
    pub fn input_grad(&self, dy: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let mut dx = vec![0.0; g.batch * g.in_len()];
        match &self.weights {
            PlanWeights::Dense(w) => input_grad_dense(g, dy, w, &mut dx),
            PlanWeights::Sparse(w) => input_grad_sparse(g, dy, w, &mut dx),
        }
        dx
    }

    /// `∂L/∂(W ⊙ M)`, shaped like the weight: at every position when `dense` (what growth
    /// ranks), else only at the active positions (zero elsewhere), which is all an update
    /// inside the mask needs. A dense-form plan always returns every position.
    pub fn weight_grad(&self, x: &[f32], dy: &[f32], dense: bool) -> Vec<f32> {
        let g = &self.geometry;
        let mut dw = vec![0.0; g.weight_len()];
        match &self.weights {
            PlanWeights::Sparse(w) if !dense => {
                for (&i, v) in w.index.iter().zip(weight_grad_sparse(g, x, dy, w)) {
                    dw[i] = v;
                }
            }
            _ => weight_grad_dense(g, x, dy, &mut dw),
        }
        dw
    }
}
