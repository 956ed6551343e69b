//! Masked 2-D convolution on host slices: dense (im2col + GEMM) and sparse (only the active
//! weights), forward, input gradient and weight gradient.
//!
//! Layouts are row-major: input `[N, C_in, H, W]`, weight and mask `[C_out, C_in/groups, kh, kw]`,
//! output `[N, C_out, H_out, W_out]`. Work is split over the batch with rayon; every sum is
//! taken in a fixed order whatever the thread count, so results are bit-identical run to run.

use rayon::prelude::*;

use core::ops::Range;

use super::direct::{forward_direct, weight_grad_direct, DirectWeight};
use super::gemm::{matmul, matmul_col_major, matmul_rows, MatRef};
use super::pool;

/// Which per-sample sparse kernel a [`SparseSample`] runs.
#[derive(Clone, Copy)]
enum SparseKernel {
    Forward,
    InputGrad,
    InputGradByInput,
    InputGradByInputInPlace,
    WeightGrad,
}

/// One sample's sparse kernel with its buffers, run through `pulp`'s dispatch so that the
/// loops are compiled for the widest SIMD set this CPU has (AVX-512, AVX2+FMA, …), chosen at
/// run time. The kernels and their helpers are `#[inline(always)]` so that they are compiled
/// inside the dispatched function.
struct SparseSample<'a> {
    kernel: SparseKernel,
    g: &'a ConvGeometry,
    w: &'a SparseWeight,
    /// The input `x` (forward, weight gradient) or `dy` (input gradient).
    input: &'a [f32],
    /// `dy` (weight gradient only).
    dy: &'a [f32],
    /// `y`, `dx`, or the weight-gradient accumulator.
    out: &'a mut [f32],
    padded: &'a mut [f32],
    wide: &'a mut [f32],
}

impl pulp::WithSimd for SparseSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            kernel,
            g,
            w,
            input,
            dy,
            out,
            padded,
            wide,
        } = self;
        match kernel {
            SparseKernel::Forward => forward_sparse_sample(g, input, w, out, padded, wide),
            SparseKernel::InputGrad => input_grad_sparse_sample(g, input, w, out, padded, wide),
            SparseKernel::InputGradByInput => {
                lay_out_dy(g, input, padded);
                gather_input_grad(g, w, padded, wide, out);
            }
            SparseKernel::InputGradByInputInPlace => {
                lay_out_dy(g, out, padded);
                gather_input_grad(g, w, padded, wide, out);
            }
            SparseKernel::WeightGrad => {
                weight_grad_sparse_sample(g, input, dy, w, out, padded, wide)
            }
        }
    }
}

impl SparseSample<'_> {
    fn run(self) {
        pulp::Arch::new().dispatch(self);
    }
}

/// Samples per partial sum of a weight gradient: the batch is cut into chunks of this many
/// samples (independent of the thread count, so the sum order is fixed).
pub(crate) const GRAD_CHUNK: usize = 8;

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
            && self.c_in.is_multiple_of(self.groups)
            && self.c_out.is_multiple_of(self.groups)
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

    /// Positions of one output plane, `H_out · W_out`.
    pub fn out_plane(&self) -> usize {
        let [h, w] = self.out_hw().expect("geometry checked by `supported`");
        h * w
    }

    /// Values of one output sample.
    pub fn out_len(&self) -> usize {
        self.c_out * self.out_plane()
    }

    /// Height and width of the zero-padded input.
    pub fn padded_hw(&self) -> [usize; 2] {
        [
            self.in_hw[0] + 2 * self.padding[0],
            self.in_hw[1] + 2 * self.padding[1],
        ]
    }

    fn padded_len(&self) -> usize {
        let [hp, wp] = self.padded_hw();
        self.c_in * hp * wp
    }

    /// One output plane with the padded input's row pitch: `H_out × (W + 2p_w)`.
    fn wide_len(&self) -> usize {
        let [ho, _] = self.out_hw().expect("supported geometry");
        ho * self.padded_hw()[1]
    }

    /// Positions of a wide output plane that hold outputs: `(H_out − 1)·(W + 2p_w) + W_out`.
    fn span_len(&self) -> usize {
        let [ho, wo] = self.out_hw().expect("supported geometry");
        (ho - 1) * self.padded_hw()[1] + wo
    }

    /// The span rounded up to whole 16-lane vectors: the sparse kernels' products run over this
    /// many positions, so that no product ends in a scalar tail (spans are short on small
    /// planes: 78 at 8×8). The positions past the span only touch buffer slack, border or
    /// zeros (see [`SparseWeight`]).
    fn lanes_len(&self) -> usize {
        self.span_len().next_multiple_of(16)
    }

    /// The sparse kernels' padded-input buffer: the padded input plus the slack that products
    /// over [`Self::lanes_len`] positions reach past it.
    fn padded_buffer_len(&self) -> usize {
        self.padded_len() + 16 * self.stride[1]
    }

    /// Positions of one stride phase of the padded input (positions `r, r + s, r + 2s, …` for
    /// stride `s`, phase `r`).
    fn phase_len(&self) -> usize {
        self.padded_buffer_len().div_ceil(self.stride[1])
    }

    /// The sparse kernels' padded buffer: the padded input and, for a stride `s > 1`, its `s`
    /// phases one after another (plus the slack products reach past the last one). On the
    /// phases a product of stride `s` is a contiguous one.
    fn sparse_buffer_len(&self) -> usize {
        let s = self.stride[1];
        let phases = if s == 1 {
            0
        } else {
            s * self.phase_len() + self.lanes_len()
        };
        self.padded_buffer_len() + phases
    }

    /// Where the product of an active weight at padded position `offset` starts: the position
    /// itself for stride 1, else its place in the phases (`offset mod s` picks the phase).
    fn phase_offset(&self, offset: usize) -> usize {
        let s = self.stride[1];
        (offset % s) * self.phase_len() + offset / s
    }

    /// The sparse kernels' wide-plane buffer: at least [`Self::lanes_len`] positions.
    fn wide_buffer_len(&self) -> usize {
        self.wide_len().max(self.lanes_len())
    }

    /// The largest in-plane offset of a kernel position in the padded input,
    /// `(kh − 1)·d_h·(W + 2p_w) + (kw − 1)·d_w`: the zero margin in front of each channel of the
    /// stride-1 input gradient's `dy` buffer, so that reading it backwards never leaves it.
    fn dy_margin(&self) -> usize {
        let wp = self.padded_hw()[1];
        (self.kernel[0] - 1) * self.dilation[0] * wp + (self.kernel[1] - 1) * self.dilation[1]
    }

    /// Positions of the padded input plane rounded up to whole 16-value vectors: what the
    /// stride-1 input gradient computes per input channel.
    fn padded_plane_blocks(&self) -> usize {
        let [hp, wp] = self.padded_hw();
        (hp * wp).next_multiple_of(16)
    }

    /// One channel of the stride-1 input gradient's `dy` buffer: the margin, then the wide
    /// `dy` plane (rows `W + 2p_w` apart) with zeros around it, as long as any read reaches.
    fn dy_channel_len(&self) -> usize {
        self.dy_margin() + self.padded_plane_blocks()
    }

    /// The two zeroed buffers of the stride-1 sparse input gradient, per thread: `dy` laid out
    /// behind its margins ([`lay_out_dy`]) and one padded gradient plane.
    fn by_input_buffers(&self) -> (Vec<f32>, Vec<f32>) {
        (
            vec![0.0; self.c_out * self.dy_channel_len()],
            vec![0.0; self.padded_plane_blocks()],
        )
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
/// channel `co`, entries `row_start[co]..row_start[co + 1]` hold the active positions and
/// their values.
///
/// The kernels run on the zero-padded input `[C_in, H + 2p_h, W + 2p_w]` and on output planes
/// laid out with the same row pitch `W + 2p_w` ("wide" planes, extra columns unused). Then the
/// output position `j = oy·(W + 2p_w) + ox` of an active weight at input channel `ci`, kernel
/// offset `(ky, kx)` reads padded input position `j·stride + offset` with
/// `offset = ci·plane + ky·d_h·(W + 2p_w) + kx·d_w`: each active weight is one long strided
/// product over the plane, whatever the padding.
///
/// For a stride `s > 1` the kernels first copy the padded input into its `s` phases
/// (positions `r, r + s, r + 2s, …` one after another): position `j·s + offset` is then
/// position `j` of a contiguous run ([`ConvGeometry::phase_offset`]), so every product is a
/// contiguous, vectorised one (the strided products were scalar).
///
/// Products run over the span rounded up to whole vectors. The extra positions of the forward
/// land in its own wide plane past the outputs (never copied out); the input gradient and the
/// weight gradient read the wide `dy` plane there, which is zero (never written), so they add
/// or sum nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseWeight {
    /// Offsets of each output channel's entries (`C_out + 1` values).
    pub row_start: Vec<usize>,
    /// Flat index of each entry in the weight `[C_out, C_in/groups, kh, kw]`.
    pub index: Vec<usize>,
    /// Each entry's value.
    pub value: Vec<f32>,
    /// Each entry's position in the padded input of one sample (see above).
    pub offset: Vec<usize>,
    /// Where each entry's product starts in what the kernels read: `offset` for stride 1, its
    /// place in the stride phases otherwise (computed once here, not per sample).
    start: Vec<usize>,
    /// The entries by input channel, for the stride-1 input gradient (empty otherwise): input
    /// channel `ci`'s are `by_input_start[ci]..by_input_start[ci + 1]` of `by_input_value` and
    /// `by_input_read` (see [`ConvGeometry::dy_channel_len`]).
    by_input_start: Vec<usize>,
    by_input_value: Vec<f32>,
    by_input_read: Vec<usize>,
    geometry: ConvGeometry,
}

impl SparseWeight {
    /// Compresses the positions of `weight` where `mask` is true.
    ///
    /// # Panics
    /// If the weight or mask length is not the geometry's weight count, or the strides along
    /// the two axes differ.
    pub fn new(geometry: &ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        let len = geometry.weight_len();
        assert!(
            weight.len() == len && mask.len() == len,
            "SparseWeight: weight {} and mask {} values, expected {len}",
            weight.len(),
            mask.len()
        );
        assert_eq!(
            geometry.stride[0], geometry.stride[1],
            "SparseWeight: unequal strides"
        );
        let row = geometry.row_len();
        let [kh, kw] = geometry.kernel;
        let [hp, wp] = geometry.padded_hw();
        let plane = hp * wp;
        // One pass over the weights in their order, with the input channel and kernel offset
        // counted along (no divisions per entry: they cost more than the convolution of a
        // batch-1 inference). Per entry: its input channel and in-plane offset.
        let mut row_start = Vec::with_capacity(geometry.c_out + 1);
        let (mut index, mut value, mut offset) = (Vec::new(), Vec::new(), Vec::new());
        let mut channel_and_shift: Vec<(usize, usize)> = Vec::new();
        let shifts: Vec<usize> = (0..kh)
            .flat_map(|ky| {
                (0..kw).map(move |kx| ky * geometry.dilation[0] * wp + kx * geometry.dilation[1])
            })
            .collect();
        row_start.push(0);
        for co in 0..geometry.c_out {
            let base = co * row;
            let (mut ci, mut k) = (co / geometry.cout_g() * geometry.cin_g(), 0);
            for (t, (&m, &w)) in mask[base..base + row]
                .iter()
                .zip(&weight[base..base + row])
                .enumerate()
            {
                if m {
                    index.push(base + t);
                    value.push(w);
                    offset.push(ci * plane + shifts[k]);
                    channel_and_shift.push((ci, shifts[k]));
                }
                k += 1;
                if k == shifts.len() {
                    (ci, k) = (ci + 1, 0);
                }
            }
            row_start.push(index.len());
        }
        let start = if geometry.stride[1] == 1 {
            offset.clone()
        } else {
            offset.iter().map(|&o| geometry.phase_offset(o)).collect()
        };
        let (mut by_input_start, mut by_input_value, mut by_input_read) =
            (Vec::new(), Vec::new(), Vec::new());
        if geometry.stride == [1, 1] {
            // Entry e reads dy channel co at in-plane offset o_e backwards: dx_pad[ci][q] +=
            // v_e · dy_wide[co][q − o_e], i.e. position `read + q` of the dy channels' buffer.
            let (margin, cl) = (geometry.dy_margin(), geometry.dy_channel_len());
            // A counting sort by input channel (stable: entries keep their order within a
            // channel); it runs per call, and a comparison sort of the entries cost more than
            // the convolution at batch 1.
            by_input_start = vec![0; geometry.c_in + 1];
            for &(ci, _) in &channel_and_shift {
                by_input_start[ci + 1] += 1;
            }
            for ci in 0..geometry.c_in {
                by_input_start[ci + 1] += by_input_start[ci];
            }
            let mut next = by_input_start.clone();
            (by_input_value, by_input_read) = (vec![0.0; index.len()], vec![0; index.len()]);
            for co in 0..geometry.c_out {
                for e in row_start[co]..row_start[co + 1] {
                    let (ci, shift) = channel_and_shift[e];
                    let at = &mut next[ci];
                    by_input_value[*at] = value[e];
                    by_input_read[*at] = co * cl + margin - shift;
                    *at += 1;
                }
            }
        }
        Self {
            row_start,
            index,
            value,
            offset,
            start,
            by_input_start,
            by_input_value,
            by_input_read,
            geometry: *geometry,
        }
    }

    fn check(&self, g: &ConvGeometry) {
        assert_eq!(&self.geometry, g, "SparseWeight built for another geometry");
    }

    /// Number of active weights.
    pub fn nnz(&self) -> usize {
        self.index.len()
    }
}

/// Runs `f(o, i, len)` for every output row and input row that kernel offset `(ky, kx)`
/// connects: output plane positions `o..o + len` read input plane positions `i, i + sw, …`.
#[inline(always)]
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

/// Whether every kernel offset reads the input shifted by a constant: stride 1 and output rows
/// as wide as input rows ("same" padding). Then the columns of a block of output rows are one
/// contiguous copy of the input plane, with zeros only where the offset reaches the padding.
fn shifted_plane(g: &ConvGeometry) -> bool {
    g.stride == [1, 1] && g.out_hw().expect("supported geometry")[1] == g.in_hw[1]
}

/// For kernel offset `(ky, kx)` of a [`shifted_plane`] geometry, restricted to output rows
/// `rows`: the column positions (relative to the tile) that read the input, as one range
/// `block` (output position `o` reads input position `o + shift`), and how many positions
/// between two rows of the block fall in the padding instead (see [`for_gaps`]). `None` when
/// no position reads the input.
fn shifted_block(
    g: &ConvGeometry,
    ky: usize,
    kx: usize,
    rows: &Range<usize>,
) -> Option<(Range<usize>, isize, usize)> {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let (oy0, oy1, iy0) = g.valid(0, ky, ho);
    let (ox0, ox1, ix0) = g.valid(1, kx, wo);
    let (a, b) = (oy0.max(rows.start), oy1.min(rows.end));
    if a >= b || ox0 >= ox1 {
        return None;
    }
    let iy = iy0 + (a - oy0);
    let first = rows.start * wo;
    let block = a * wo + ox0 - first..(b - 1) * wo + ox1 - first;
    let shift = (iy * g.in_hw[1] + ix0) as isize - block.start as isize;
    Some((block, shift, wo - (ox1 - ox0)))
}

/// Zeroes a short run (the gaps of [`for_gaps`]: one or two values for a 3×3 kernel) with
/// plain stores; `fill` becomes a `memset` call, which cost 10 % of a forward on 8×8 planes.
#[inline(always)]
fn zero_short(values: &mut [f32]) {
    match values {
        [] => {}
        [a] => *a = 0.0,
        [a, b] => (*a, *b) = (0.0, 0.0),
        [a, b, c] => (*a, *b, *c) = (0.0, 0.0, 0.0),
        _ => values.fill(0.0),
    }
}

/// Runs `f(range)` for every run of `gap` padding positions inside `block` (see
/// [`shifted_block`]): each row of the block holds `W_out − gap` valid positions, then `gap`
/// padding ones that end before the next row's.
#[inline(always)]
fn for_gaps(block: &Range<usize>, gap: usize, wo: usize, mut f: impl FnMut(Range<usize>)) {
    if gap == 0 {
        return;
    }
    let mut at = block.start + wo - gap;
    while at < block.end {
        f(at..(at + gap).min(block.end));
        at += wo;
    }
}

#[inline(always)]
/// Writes sample `x`'s columns for group `grp` and output rows `rows` into `col`
/// (`row_len × rows.len()·W_out`).
fn im2col(g: &ConvGeometry, x: &[f32], grp: usize, rows: Range<usize>, col: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let plane = g.in_hw[0] * g.in_hw[1];
    let wo = g.out_hw().expect("supported geometry")[1];
    let (first, pt) = (rows.start * wo, rows.len() * wo);
    if shifted_plane(g) {
        for ky in 0..kh {
            for kx in 0..kw {
                let block = shifted_block(g, ky, kx, &rows);
                for ci in 0..g.cin_g() {
                    let dst = &mut col[((ci * kh + ky) * kw + kx) * pt..][..pt];
                    let Some((block, shift, gap)) = block.clone() else {
                        dst.fill(0.0);
                        continue;
                    };
                    let src = &x[(grp * g.cin_g() + ci) * plane..][..plane];
                    let from = (block.start as isize + shift) as usize;
                    zero_short(&mut dst[..block.start]);
                    dst[block.clone()].copy_from_slice(&src[from..from + block.len()]);
                    zero_short(&mut dst[block.end..]);
                    for_gaps(&block, gap, wo, |r| zero_short(&mut dst[r]));
                }
            }
        }
        return;
    }
    col.fill(0.0);
    for ci in 0..g.cin_g() {
        let src = &x[(grp * g.cin_g() + ci) * plane..][..plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let dst = &mut col[((ci * kh + ky) * kw + kx) * pt..][..pt];
                for_rows(g, ky, kx, |o, i, len| {
                    if !rows.contains(&(o / wo)) {
                        return;
                    }
                    let out = &mut dst[o - first..o - first + len];
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

#[inline(always)]
/// Adds the columns `col` of group `grp` and output rows `rows` back into sample gradient `dx`
/// (the adjoint of [`im2col`]). Clobbers `col`'s padding positions.
fn col2im(g: &ConvGeometry, col: &mut [f32], grp: usize, rows: Range<usize>, dx: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let plane = g.in_hw[0] * g.in_hw[1];
    let wo = g.out_hw().expect("supported geometry")[1];
    let (first, pt) = (rows.start * wo, rows.len() * wo);
    if shifted_plane(g) {
        for ky in 0..kh {
            for kx in 0..kw {
                let Some((block, shift, gap)) = shifted_block(g, ky, kx, &rows) else {
                    continue;
                };
                let from = (block.start as isize + shift) as usize;
                for ci in 0..g.cin_g() {
                    let dst = &mut dx[(grp * g.cin_g() + ci) * plane..][..plane];
                    let src = &mut col[((ci * kh + ky) * kw + kx) * pt..][..pt];
                    // The padding positions' gradients belong to no input: drop them, then
                    // the block adds in one contiguous pass.
                    for_gaps(&block, gap, wo, |r| zero_short(&mut src[r]));
                    for (d, &v) in dst[from..from + block.len()]
                        .iter_mut()
                        .zip(&src[block.clone()])
                    {
                        *d += v;
                    }
                }
            }
        }
        return;
    }
    for ci in 0..g.cin_g() {
        let dst = &mut dx[(grp * g.cin_g() + ci) * plane..][..plane];
        for ky in 0..kh {
            for kx in 0..kw {
                let src = &mut col[((ci * kh + ky) * kw + kx) * pt..][..pt];
                for_rows(g, ky, kx, |o, i, len| {
                    if !rows.contains(&(o / wo)) {
                        return;
                    }
                    let s = g.stride[1];
                    for (j, &v) in src[o - first..o - first + len].iter().enumerate() {
                        dst[i + j * s] += v;
                    }
                });
            }
        }
    }
}

/// Output rows per im2col tile, in tiles of equal height: the columns of a tile take at most
/// 512 KiB, so they stay in the cache while the GEMM reads them (whole planes did not: 1.2 MB
/// for 32 channels at 32×32).
fn tiles(g: &ConvGeometry) -> impl Iterator<Item = Range<usize>> {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let rows = if g.pointwise() {
        ho
    } else {
        let most = (131_072 / (g.row_len() * wo).max(1)).clamp(1, ho);
        ho.div_ceil(ho.div_ceil(most))
    };
    (0..ho).step_by(rows).map(move |r| r..(r + rows).min(ho))
}

/// Columns of one tile: the input itself for a pointwise convolution, else [`im2col`].
fn tile_columns<'a>(
    g: &ConvGeometry,
    x: &'a [f32],
    grp: usize,
    rows: Range<usize>,
    col: &'a mut [f32],
) -> &'a [f32] {
    let (row, p) = (g.row_len(), g.out_plane());
    if g.pointwise() {
        &x[grp * row * p..][..row * p]
    } else {
        let wo = g.out_hw().expect("supported geometry")[1];
        let cols = &mut col[..row * rows.len() * wo];
        im2col(g, x, grp, rows, cols);
        cols
    }
}

/// Output positions of the largest im2col tile (the first).
fn tile_positions(g: &ConvGeometry) -> usize {
    let wo = g.out_hw().expect("supported geometry")[1];
    tiles(g).next().map_or(0, |r| r.len()) * wo
}

std::thread_local! {
    /// Each thread's im2col buffer, kept across calls and layers and grown to the largest tile
    /// it served: a fresh zeroed buffer per rayon task cost 16 clears of up to 0.5 MiB per
    /// dense convolution at batch 128. Every path writes the part it reads first (the block
    /// copies and their zero gaps, `fill(0)` before the general im2col, or a GEMM's output).
    static COLUMNS: core::cell::RefCell<Vec<f32>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's im2col buffer of at least one tile. `f` must not start rayon
/// work that could run another convolution on this thread (the GEMMs run single-threaded).
fn with_columns<R>(g: &ConvGeometry, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let len = if g.pointwise() {
        0
    } else {
        g.row_len() * tile_positions(g)
    };
    COLUMNS.with(|columns| {
        let mut columns = columns.borrow_mut();
        if columns.len() < len {
            columns.resize(len, 0.0);
        }
        f(&mut columns[..len])
    })
}

fn check(g: &ConvGeometry, x: usize, w: usize, y: usize) {
    assert!(g.supported(), "conv kernels: unsupported geometry {g:?}");
    assert_eq!(x, g.batch * g.in_len(), "conv kernels: input length");
    assert_eq!(w, g.weight_len(), "conv kernels: weight length");
    assert_eq!(y, g.batch * g.out_len(), "conv kernels: output length");
}

/// Dense forward: `y = conv(x, w)` (`w` already masked): the direct kernel where
/// [`direct_is_faster`], else im2col + GEMM.
pub fn forward_dense(g: &ConvGeometry, x: &[f32], w: &[f32], y: &mut [f32]) {
    check(g, x.len(), w.len(), y.len());
    if direct_is_faster(g) {
        forward_direct(g, x, &DirectWeight::new(g, w), y);
    } else {
        forward_im2col(g, x, w, y);
    }
}

/// [`forward_dense`]'s im2col + GEMM form, whatever the geometry.
pub fn forward_im2col(g: &ConvGeometry, x: &[f32], w: &[f32], y: &mut [f32]) {
    check(g, x.len(), w.len(), y.len());
    let (row, p, cog) = (g.row_len(), g.out_plane(), g.cout_g());
    let wo = g.out_hw().expect("supported geometry")[1];
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each(|(y, x)| {
            with_columns(g, |col| {
                for grp in 0..g.groups {
                    let wg = MatRef::row_major(&w[grp * cog * row..][..cog * row], cog, row);
                    for rows in tiles(g) {
                        let pt = rows.len() * wo;
                        let start = grp * cog * p + rows.start * wo;
                        let cols = tile_columns(g, x, grp, rows, col);
                        matmul_rows(
                            &mut y[start..start + (cog - 1) * p + pt],
                            p,
                            wg,
                            MatRef::row_major(cols, row, pt),
                            false,
                        );
                    }
                }
            })
        });
}

/// Whether the dense forward runs on the direct kernel ([`super::direct`]) rather than im2col +
/// GEMM: for the stride-1, ungrouped, non-pointwise geometries it handles with output planes
/// of at least 16×16 positions. `cargo bench -p ast-core --bench conv_kernels`, forward at
/// batch 128, direct against GEMM: 16 ch at 32×32 1.7 / 3.8 ms, 32 ch at 32×32 5.7 / 10.2,
/// 32 ch at 16×16 1.6 / 1.9, 64 ch at 16×16 5.9 / 6.8, but 64 ch at 8×8 1.8 / 1.7 and 128 ch at
/// 8×8 7.2 / 6.0 (a wide 8×8 plane wastes a third of its lanes on the padding columns).
pub fn direct_is_faster(g: &ConvGeometry) -> bool {
    DirectWeight::handles(g) && !g.pointwise() && g.out_plane() >= 256
}

/// `dy`'s block of group `grp`, output rows `rows`: `C_out/groups × rows·W_out`, rows `P` apart.
fn dy_block<'a>(g: &ConvGeometry, dy: &'a [f32], grp: usize, rows: &Range<usize>) -> MatRef<'a> {
    let (p, cog) = (g.out_plane(), g.cout_g());
    let wo = g.out_hw().expect("supported geometry")[1];
    let pt = rows.len() * wo;
    MatRef {
        data: &dy[grp * cog * p + rows.start * wo..][..(cog - 1) * p + pt],
        rows: cog,
        cols: pt,
        rs: p,
        cs: 1,
    }
}

/// Dense input gradient: `dx = convᵀ(dy, w)`.
///
/// A stride-1 convolution with non-trivial kernel runs its input gradient as the forward
/// convolution of `dy` with the flipped, transposed kernel ([`transposed_conv`]): im2col and
/// a GEMM with `C_out·kh·kw` terms per output instead of a GEMM with `C_out` terms and col2im's
/// adds (5–10 % faster on 16×16 and 32×32 planes, the same on 8×8).
pub fn input_grad_dense(g: &ConvGeometry, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    check(g, dx.len(), w.len(), dy.len());
    if let Some((gt, wt)) = transposed_conv(g, w) {
        forward_dense(&gt, dy, &wt, dx);
        return;
    }
    let (row, p, cog) = (g.row_len(), g.out_plane(), g.cout_g());
    let wo = g.out_hw().expect("supported geometry")[1];
    dx.par_chunks_mut(g.in_len())
        .zip(dy.par_chunks(g.out_len()))
        .for_each(|(dx, dy)| {
            with_columns(g, |col| {
                if !g.pointwise() {
                    dx.fill(0.0);
                }
                for grp in 0..g.groups {
                    let wg = MatRef::row_major(&w[grp * cog * row..][..cog * row], cog, row);
                    for rows in tiles(g) {
                        let dyg = dy_block(g, dy, grp, &rows);
                        if g.pointwise() {
                            matmul(&mut dx[grp * row * p..][..row * p], wg.t(), dyg, false);
                        } else {
                            let cols = &mut col[..row * rows.len() * wo];
                            matmul(cols, wg.t(), dyg, false);
                            col2im(g, cols, grp, rows, dx);
                        }
                    }
                }
            })
        });
}

/// For a stride-1 convolution whose padding is at most its dilated kernel extent minus one
/// (not 1×1): the convolution whose forward is this one's input gradient, and its weights.
/// Its input is `dy` (`C_out` channels at `H_out × W_out`), its padding `d·(k − 1) − p`, its
/// output `[N, C_in, H, W]`, and its kernel this one's flipped in both axes with input and
/// output channels swapped within each group.
fn transposed_conv(g: &ConvGeometry, w: &[f32]) -> Option<(ConvGeometry, Vec<f32>)> {
    let [kh, kw] = g.kernel;
    let extent = |i: usize| g.dilation[i] * (g.kernel[i] - 1);
    if g.stride != [1, 1] || g.kernel == [1, 1] || (0..2).any(|i| g.padding[i] > extent(i)) {
        return None;
    }
    let t = ConvGeometry {
        batch: g.batch,
        c_in: g.c_out,
        in_hw: g.out_hw().expect("supported geometry"),
        c_out: g.c_in,
        kernel: g.kernel,
        stride: [1, 1],
        padding: [extent(0) - g.padding[0], extent(1) - g.padding[1]],
        dilation: g.dilation,
        groups: g.groups,
    };
    debug_assert_eq!(t.out_hw(), Some(g.in_hw));
    let (cig, cog) = (g.cin_g(), g.cout_g());
    let mut wt = vec![0.0; w.len()];
    for grp in 0..g.groups {
        for co in 0..cog {
            for ci in 0..cig {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let from = (((grp * cog + co) * cig + ci) * kh + ky) * kw + kx;
                        let to = (((grp * cig + ci) * cog + co) * kh + (kh - 1 - ky)) * kw
                            + (kw - 1 - kx);
                        wt[to] = w[from];
                    }
                }
            }
        }
    }
    Some((t, wt))
}

/// Dense weight gradient: `dw = Σ_n dy_n · im2col(x_n)ᵀ`, at every position.
///
/// Computed as `dwᵀ = Σ_n im2col(x_n) · dy_nᵀ`, with each tile of `dy_n` transposed first (the
/// product `dy_n · im2col(x_n)ᵀ` ran 5–7× slower on 16 channels). Tiles of fewer than 128
/// positions (8×8 planes) accumulate `dwᵀ` column-major, which is `dw` in place: the GEMM then
/// runs along `row_len` (1.2–1.35× faster there); longer tiles accumulate it row-major and
/// transpose once at the end (there the column-major form was 1.5–2.5× slower: the GEMM
/// re-packs `im2col(x_n)` across its long rows).
pub fn weight_grad_dense(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    if direct_grad_is_faster(g) {
        weight_grad_direct(g, x, dy, dw);
    } else {
        weight_grad_im2col(g, x, dy, dw);
    }
}

/// Whether the dense weight gradient runs on the direct kernel
/// ([`super::direct::weight_grad_direct`]): 3×3 stride-1 ungrouped undilated convolutions with
/// a multiple of 32 output channels. `cargo bench -p ast-core --bench conv_kernels`, batch 128,
/// direct against im2col + GEMM: 32 ch at 16×16 1.8 / 2.0 ms, 64 ch at 8×8 1.5 / 2.1, 32 ch at
/// 32×32 7.7 / 8.0, 64 ch at 16×16 6.3 / 6.6, 128 ch at 8×8 6.0 / 7.2; but 16 channels at 32×32
/// 4.8 / 3.6 (one vector of channels: one broadcast per multiply-add).
pub fn direct_grad_is_faster(g: &ConvGeometry) -> bool {
    DirectWeight::handles(g)
        && g.kernel == [3, 3]
        && g.dilation == [1, 1]
        && g.c_out.is_multiple_of(32)
}

/// [`weight_grad_dense`]'s im2col + GEMM form, whatever the geometry.
pub fn weight_grad_im2col(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    check(g, x.len(), dw.len(), dy.len());
    let (row, cog, p) = (g.row_len(), g.cout_g(), g.out_plane());
    let wo = g.out_hw().expect("supported geometry")[1];
    let tile_len = tile_positions(g);
    let in_place = tile_len < 128;
    let partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(GRAD_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            // Per group: `dw` in place (`in_place`), else `dwᵀ` row-major.
            let mut acc = vec![0.0; dw.len()];
            let mut dy_t = vec![0.0; cog * tile_len];
            let samples = chunk * GRAD_CHUNK..((chunk + 1) * GRAD_CHUNK).min(g.batch);
            with_columns(g, |col| {
                for (i, n) in samples.enumerate() {
                    let xn = &x[n * g.in_len()..][..g.in_len()];
                    let dyn_ = &dy[n * g.out_len()..][..g.out_len()];
                    for grp in 0..g.groups {
                        for (j, rows) in tiles(g).enumerate() {
                            let pt = rows.len() * wo;
                            let dy_t = &mut dy_t[..pt * cog];
                            let block = &dyn_[grp * cog * p + rows.start * wo..];
                            if pt >= BLOCKED_TRANSPOSE {
                                transpose_into(dy_t, block, cog, pt, p);
                            } else {
                                for co in 0..cog {
                                    for (k, &v) in block[co * p..][..pt].iter().enumerate() {
                                        dy_t[k * cog + co] = v;
                                    }
                                }
                            }
                            let cols = tile_columns(g, xn, grp, rows, col);
                            let (acc, a, b) = (
                                &mut acc[grp * cog * row..][..cog * row],
                                MatRef::row_major(cols, row, pt),
                                MatRef::row_major(dy_t, pt, cog),
                            );
                            if in_place {
                                matmul_col_major(acc, a, b, i > 0 || j > 0);
                            } else {
                                matmul(acc, a, b, i > 0 || j > 0);
                            }
                        }
                    }
                }
            });
            acc
        })
        .collect();
    sum_in_order(&partials, dw);
    if !in_place {
        let transposed = dw.to_vec();
        for (grp, block) in transposed.chunks_exact(cog * row).enumerate() {
            for (r, values) in block.chunks_exact(cog).enumerate() {
                for (co, &v) in values.iter().enumerate() {
                    dw[(grp * cog + co) * row + r] = v;
                }
            }
        }
    }
}

/// Tiles of at least this many positions (those of 32×32 planes: 352 and 896 in ResNet-32 and
/// wide ResNet-32) transpose their `dy` block in blocks ([`transpose_into`]): the dense weight
/// gradient of 16 and 32 channels at 32×32 12 % faster (3 alternating pairs of `conv_kernels`
/// runs); on 16×16 and 8×8 planes (tiles of 256 and 64) the blocked form was not faster.
const BLOCKED_TRANSPOSE: usize = 300;

/// `dst[k·rows + r] = src[r·stride + k]` for `r < rows`, `k < cols`: a `rows × cols` block of
/// rows `stride` apart, transposed, in blocks of 16 columns so that the writes of a block stay
/// in a few cache lines (one value per `rows`-float row: a scattered write per value before).
fn transpose_into(dst: &mut [f32], src: &[f32], rows: usize, cols: usize, stride: usize) {
    for k0 in (0..cols).step_by(16) {
        let width = 16.min(cols - k0);
        for r in 0..rows {
            let from = &src[r * stride + k0..][..width];
            for (j, &v) in from.iter().enumerate() {
                dst[(k0 + j) * rows + r] = v;
            }
        }
    }
}

pub(crate) fn sum_in_order(partials: &[Vec<f32>], out: &mut [f32]) {
    out.fill(0.0);
    for part in partials {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
}

/// Copies one short row (a plane row: 8 to 34 values here) with constant-size moves, which
/// compile to vector loads and stores inside the dispatched kernels; `copy_from_slice` of a
/// variable length is a `memcpy` call, whose overhead made the row copies of the sparse
/// kernels ≈ 10 % of a step at density 0.02.
#[inline(always)]
pub(crate) fn copy_row(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_row: lengths");
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    for (a, b) in (&mut d).zip(&mut s) {
        a.copy_from_slice(b);
    }
    let (mut d, mut s) = (
        d.into_remainder().chunks_exact_mut(8),
        s.remainder().chunks_exact(8),
    );
    for (a, b) in (&mut d).zip(&mut s) {
        a.copy_from_slice(b);
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = *b;
    }
}

#[inline(always)]
/// Sample `x`'s input channels zero-padded, `[C_in, H + 2p_h, W + 2p_w]`, into `padded`. Only
/// the interior is written: the border must be zero already (buffers start zeroed, and no
/// kernel writes a border of its `padded` copy), which saves a pass over the buffer.
pub(crate) fn pad_input(g: &ConvGeometry, x: &[f32], padded: &mut [f32]) {
    let [h, w] = g.in_hw;
    let [hp, wp] = g.padded_hw();
    let [ph, pw] = g.padding;
    for (src, dst) in x.chunks_exact(h * w).zip(padded.chunks_exact_mut(hp * wp)) {
        for (row, dst_row) in src.chunks_exact(w).zip(dst[ph * wp..].chunks_exact_mut(wp)) {
            copy_row(&mut dst_row[pw..pw + w], row);
        }
    }
}

#[inline(always)]
/// One output plane `[H_out, W_out]` laid out with the padded input's row pitch `W + 2p_w`
/// (the columns past `W_out` are zero), so that each active weight's contribution is one long
/// strided product (see [`SparseWeight`]). Only the first `W_out` columns of each row are
/// written: the others must be zero already (as in [`pad_input`]).
fn widen(g: &ConvGeometry, plane: &[f32], wide: &mut [f32]) {
    let [_, wo] = g.out_hw().expect("supported geometry");
    let wp = g.padded_hw()[1];
    for (src, dst) in plane.chunks_exact(wo).zip(wide.chunks_mut(wp)) {
        copy_row(&mut dst[..wo], src);
    }
}

/// Splits a sparse kernel's padded buffer into the padded input and the stride phases, and
/// for a stride above 1 copies the padded input into its phases: `phases[r·L + i] =
/// padded[i·s + r]`. Returns what the products read (the padded input for stride 1).
#[inline(always)]
fn phases_of<'a>(g: &ConvGeometry, buffer: &'a mut [f32]) -> &'a [f32] {
    let (s, len) = (g.stride[1], g.padded_buffer_len());
    let (padded, phases) = buffer.split_at_mut(len);
    if s == 1 {
        return padded;
    }
    let l = g.phase_len();
    for r in 0..s {
        for (dst, &v) in phases[r * l..]
            .iter_mut()
            .zip(padded[r..].iter().step_by(s))
        {
            *dst = v;
        }
    }
    phases
}

/// `wide[base..base + B] = Σ_e values[e] · src[starts[e] + base..][..B]`, with the `B` sums
/// held in registers across all the entries (output-stationary): one load per multiply-add
/// instead of the load, add and store of an output that each entry's pass over the plane
/// costs.
#[inline(always)]
fn gather_block<const B: usize>(
    wide: &mut [f32],
    src: &[f32],
    starts: &[usize],
    values: &[f32],
    base: usize,
) {
    let mut acc = [0.0f32; B];
    for (&start, &v) in starts.iter().zip(values) {
        let inp: &[f32; B] = src[start + base..][..B]
            .try_into()
            .expect("a block of B values");
        for (a, &x) in acc.iter_mut().zip(inp) {
            *a += v * x;
        }
    }
    wide[base..base + B].copy_from_slice(&acc);
}

/// `out[j] = Σ_e values[e] · src[starts[e] + j]` for every `j` (`out.len()` a multiple of 16),
/// in [`gather_block`]s.
#[inline(always)]
fn gather(out: &mut [f32], src: &[f32], starts: &[usize], values: &[f32]) {
    let len = out.len();
    let mut base = 0;
    while base + 64 <= len {
        gather_block::<64>(out, src, starts, values, base);
        base += 64;
    }
    while base < len {
        gather_block::<16>(out, src, starts, values, base);
        base += 16;
    }
}

/// Sparse forward: `y = conv(x, w)` using only the active weights.
pub fn forward_sparse(g: &ConvGeometry, x: &[f32], w: &SparseWeight, y: &mut [f32]) {
    check(g, x.len(), g.weight_len(), y.len());
    w.check(g);
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each_init(
            || {
                (
                    vec![0.0; g.sparse_buffer_len()],
                    vec![0.0; g.wide_buffer_len()],
                )
            },
            |(padded, wide), (y, x)| {
                SparseSample {
                    kernel: SparseKernel::Forward,
                    g,
                    w,
                    input: x,
                    dy: &[],
                    out: y,
                    padded,
                    wide,
                }
                .run()
            },
        );
}

#[inline(always)]
fn forward_sparse_sample(
    g: &ConvGeometry,
    x: &[f32],
    w: &SparseWeight,
    y: &mut [f32],
    padded: &mut [f32],
    wide: &mut [f32],
) {
    let [_, wo] = g.out_hw().expect("supported geometry");
    let (wp, len) = (g.padded_hw()[1], g.lanes_len());
    pad_input(g, x, padded);
    let src = phases_of(g, padded);
    for (co, out) in y.chunks_exact_mut(g.out_plane()).enumerate() {
        let entries = w.row_start[co]..w.row_start[co + 1];
        if entries.is_empty() {
            out.fill(0.0);
            continue;
        }
        gather(
            &mut wide[..len],
            src,
            &w.start[entries.clone()],
            &w.value[entries],
        );
        for (dst, src) in out.chunks_exact_mut(wo).zip(wide.chunks(wp)) {
            copy_row(dst, &src[..wo]);
        }
    }
}

/// Sparse input gradient: `dx = convᵀ(dy, w)` using only the active weights.
pub fn input_grad_sparse(g: &ConvGeometry, dy: &[f32], w: &SparseWeight, dx: &mut [f32]) {
    check(g, dx.len(), g.weight_len(), dy.len());
    w.check(g);
    let by_input = !w.by_input_start.is_empty();
    dx.par_chunks_mut(g.in_len())
        .zip(dy.par_chunks(g.out_len()))
        .for_each_init(
            || {
                if by_input {
                    g.by_input_buffers()
                } else {
                    (
                        vec![0.0; g.sparse_buffer_len()],
                        vec![0.0; g.wide_buffer_len()],
                    )
                }
            },
            |(padded, wide), (dx, dy)| {
                SparseSample {
                    kernel: if by_input {
                        SparseKernel::InputGradByInput
                    } else {
                        SparseKernel::InputGrad
                    },
                    g,
                    w,
                    input: dy,
                    dy: &[],
                    out: dx,
                    padded,
                    wide,
                }
                .run()
            },
        );
}

/// The first half of one sample's stride-1 input gradient, output-stationary by input channel:
/// `dy` laid out as wide planes behind a zero margin (`buffer`,
/// [`ConvGeometry::dy_channel_len`] per channel; only its valid positions are ever written, so
/// the rest stays zero). After it, `dy` is not read again, so `∂x` may overwrite it.
#[inline(always)]
fn lay_out_dy(g: &ConvGeometry, dy: &[f32], buffer: &mut [f32]) {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let wp = g.padded_hw()[1];
    let (margin, cl) = (g.dy_margin(), g.dy_channel_len());
    for (src, dst) in dy.chunks_exact(ho * wo).zip(buffer.chunks_exact_mut(cl)) {
        for (row, dst_row) in src.chunks_exact(wo).zip(dst[margin..].chunks_mut(wp)) {
            copy_row(&mut dst_row[..wo], row);
        }
    }
}

/// The second half: every input channel's padded gradient plane [`gather`]ed from the entries
/// that read that channel, and its interior copied out. No pass clears or scatters into a
/// padded `dx`.
#[inline(always)]
fn gather_input_grad(
    g: &ConvGeometry,
    w: &SparseWeight,
    buffer: &[f32],
    plane: &mut [f32],
    dx: &mut [f32],
) {
    let [h, wi] = g.in_hw;
    let wp = g.padded_hw()[1];
    let [ph, pw] = g.padding;
    for (ci, out) in dx.chunks_exact_mut(h * wi).enumerate() {
        let entries = w.by_input_start[ci]..w.by_input_start[ci + 1];
        if entries.is_empty() {
            out.fill(0.0);
            continue;
        }
        gather(
            plane,
            buffer,
            &w.by_input_read[entries.clone()],
            &w.by_input_value[entries],
        );
        for (row, src_row) in out
            .chunks_exact_mut(wi)
            .zip(plane[ph * wp..].chunks_exact(wp))
        {
            copy_row(row, &src_row[pw..pw + wi]);
        }
    }
}

#[inline(always)]
fn input_grad_sparse_sample(
    g: &ConvGeometry,
    dy: &[f32],
    w: &SparseWeight,
    dx: &mut [f32],
    padded: &mut [f32],
    wide: &mut [f32],
) {
    let [h, wi] = g.in_hw;
    let [hp, wp] = g.padded_hw();
    let [ph, pw] = g.padding;
    let (len, s) = (g.lanes_len(), g.stride[1]);
    // Accumulates on the padded input (stride 1) or on its phases, then puts the phases back
    // in place: `padded[i·s + r] = phases[r·L + i]`.
    let (padded, phases) = padded.split_at_mut(g.padded_buffer_len());
    let acc = if s == 1 { &mut *padded } else { &mut *phases };
    acc.fill(0.0);
    for (co, plane) in dy.chunks_exact(g.out_plane()).enumerate() {
        widen(g, plane, wide);
        for e in w.row_start[co]..w.row_start[co + 1] {
            let dst = &mut acc[w.start[e]..][..len];
            let v = w.value[e];
            for (d, &t) in dst.iter_mut().zip(&wide[..len]) {
                *d += v * t;
            }
        }
    }
    if s > 1 {
        let l = g.phase_len();
        for r in 0..s {
            for (dst, &v) in padded[r..].iter_mut().step_by(s).zip(&phases[r * l..]) {
                *dst = v;
            }
        }
    }
    for (dst, src) in dx
        .chunks_exact_mut(h * wi)
        .zip(padded.chunks_exact(hp * wp))
    {
        for (row, src_row) in dst
            .chunks_exact_mut(wi)
            .zip(src[ph * wp..].chunks_exact(wp))
        {
            copy_row(row, &src_row[pw..pw + wi]);
        }
    }
}

/// Sampled weight gradient: `dw` at the active positions of `w` (one value per entry, in the
/// entries' order), `Σ_n Σ_pixels dy · x` over the pixels each weight touches.
pub fn weight_grad_sparse(g: &ConvGeometry, x: &[f32], dy: &[f32], w: &SparseWeight) -> Vec<f32> {
    check(g, x.len(), g.weight_len(), dy.len());
    w.check(g);
    let partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(GRAD_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0.0; w.nnz()];
            let (mut padded, mut wide) = (
                vec![0.0; g.sparse_buffer_len()],
                vec![0.0; g.wide_buffer_len()],
            );
            for n in chunk * GRAD_CHUNK..((chunk + 1) * GRAD_CHUNK).min(g.batch) {
                let xn = &x[n * g.in_len()..][..g.in_len()];
                let dyn_ = &dy[n * g.out_len()..][..g.out_len()];
                SparseSample {
                    kernel: SparseKernel::WeightGrad,
                    g,
                    w,
                    input: xn,
                    dy: dyn_,
                    out: &mut acc,
                    padded: &mut padded,
                    wide: &mut wide,
                }
                .run();
            }
            acc
        })
        .collect();
    let mut out = vec![0.0; w.nnz()];
    sum_in_order(&partials, &mut out);
    out
}

#[inline(always)]
fn weight_grad_sparse_sample(
    g: &ConvGeometry,
    x: &[f32],
    dy: &[f32],
    w: &SparseWeight,
    acc: &mut [f32],
    padded: &mut [f32],
    wide: &mut [f32],
) {
    let len = g.lanes_len();
    pad_input(g, x, padded);
    let src = phases_of(g, padded);
    for (co, plane) in dy.chunks_exact(g.out_plane()).enumerate() {
        widen(g, plane, wide);
        for e in w.row_start[co]..w.row_start[co + 1] {
            acc[e] += dot(&wide[..len], &src[w.start[e]..]);
        }
    }
}

/// Where [`MaskedConvPlan::sparse_grads`] reads `x` (`[N, C_in, H, W]`) and `dy`
/// (`[N, C_out, H_out, W_out]`) and writes `∂x`.
#[derive(Debug)]
pub enum GradBuffers<'a> {
    /// `∂x` over `x` (its last use): `x` holds the input on entry and `∂x` on return.
    OverInput {
        /// The input, then `∂x`.
        x: &'a mut [f32],
        /// The output gradient.
        dy: &'a [f32],
    },
    /// `∂x` over `dy`, which must then be shaped like `x`.
    OverDy {
        /// The input.
        x: &'a [f32],
        /// The output gradient, then `∂x`.
        dy: &'a mut [f32],
    },
    /// `∂x` into a buffer of its own, every value of which is written.
    Separate {
        /// The input.
        x: &'a [f32],
        /// The output gradient.
        dy: &'a [f32],
        /// `∂x`.
        dx: &'a mut [f32],
    },
}

impl<'a> GradBuffers<'a> {
    /// The buffers of each run of `samples` samples, in batch order.
    fn split(self, g: &ConvGeometry, samples: usize) -> Vec<GradBuffers<'a>> {
        let (xs, ys) = (samples * g.in_len(), samples * g.out_len());
        match self {
            Self::OverInput { x, dy } => x
                .chunks_mut(xs)
                .zip(dy.chunks(ys))
                .map(|(x, dy)| Self::OverInput { x, dy })
                .collect(),
            Self::OverDy { x, dy } => x
                .chunks(xs)
                .zip(dy.chunks_mut(ys))
                .map(|(x, dy)| Self::OverDy { x, dy })
                .collect(),
            Self::Separate { x, dy, dx } => x
                .chunks(xs)
                .zip(dy.chunks(ys))
                .zip(dx.chunks_mut(xs))
                .map(|((x, dy), dx)| Self::Separate { x, dy, dx })
                .collect(),
        }
    }

    /// The lengths of `x`, `dy` and `∂x`.
    fn lens(&self) -> [usize; 3] {
        match self {
            Self::OverInput { x, dy } => [x.len(), dy.len(), x.len()],
            Self::OverDy { x, dy } => [x.len(), dy.len(), dy.len()],
            Self::Separate { x, dy, dx } => [x.len(), dy.len(), dx.len()],
        }
    }
}

/// One sample of the fused sparse backward: the stride-1 input gradient by input channel
/// ([`lay_out_dy`], [`gather_input_grad`]) and the weight gradient at the active positions from
/// the same laid-out `dy` (rows `W + 2p_w` apart behind each channel's margin, zero elsewhere,
/// as [`widen`] lays it out), so that `dy` is read from memory once for both.
struct FusedSample<'a> {
    g: &'a ConvGeometry,
    w: &'a SparseWeight,
    io: GradBuffers<'a>,
    acc: &'a mut [f32],
    padded: &'a mut [f32],
    buffer: &'a mut [f32],
    plane: &'a mut [f32],
}

impl pulp::WithSimd for FusedSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            g,
            w,
            io,
            acc,
            padded,
            buffer,
            plane,
        } = self;
        match io {
            GradBuffers::OverInput { x, dy } => {
                pad_input(g, x, padded);
                lay_out_dy(g, dy, buffer);
                gather_input_grad(g, w, buffer, plane, x);
            }
            GradBuffers::OverDy { x, dy } => {
                pad_input(g, x, padded);
                lay_out_dy(g, dy, buffer);
                gather_input_grad(g, w, buffer, plane, dy);
            }
            GradBuffers::Separate { x, dy, dx } => {
                pad_input(g, x, padded);
                lay_out_dy(g, dy, buffer);
                gather_input_grad(g, w, buffer, plane, dx);
            }
        }
        let (len, margin, cl) = (g.lanes_len(), g.dy_margin(), g.dy_channel_len());
        for co in 0..g.c_out {
            let dy = &buffer[co * cl + margin..][..len];
            for e in w.row_start[co]..w.row_start[co + 1] {
                acc[e] += dot(dy, &padded[w.start[e]..]);
            }
        }
    }
}

/// `Σ_j a[j] · b[j]`, with 16 independent partial sums so that it vectorises (the same sums
/// in the same order on every CPU).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Whether the sparse form is expected to be faster than the dense form for `active` active
/// weights, by a cost model fitted to `cargo bench -p ast-core --bench conv_kernels` (forward,
/// input gradient and active-position weight gradient of the ResNet-32 / wide ResNet-32
/// convolutions at batch 128, 2-core AMD EPYC with AVX-512):
/// - sparse: `active · (L + 60)`, `L` the length of one strided product (the span of the
///   output plane rounded up to whole vectors) and 60 the fixed cost per active weight and
///   sample, in element-steps;
/// - dense: `7.8·P^−0.2 / C^0.45 · W·P` for `W` weights, output plane `P` and `C` output
///   channels per group: the GEMM's multiply-adds, cheaper per multiply-add as the GEMM's rows
///   (`C`) grow, since im2col costs the same per column whatever `C`, and a little cheaper on
///   large planes, where the sparse products pay more for padding and copies.
///
///   Where the dense forward runs on the direct kernel ([`direct_is_faster`]), the dense
///   cost is 0.8 of that.
///
/// Measured crossovers (2026-11-30, fourth session, with the direct dense kernels): 16 ch at 32×32 ≈ 0.45,
/// 32 ch at 32×32 ≈ 0.30, 32 ch at 16×16 ≈ 0.28, 64 ch at 16×16 ≈ 0.23, 64 ch at 8×8 ≈ 0.20,
/// 128 ch at 8×8 ≈ 0.17; the model's: 0.40, 0.29, 0.32, 0.23, 0.24, 0.17.
pub fn sparse_is_faster(geometry: &ConvGeometry, active: usize) -> bool {
    let p = geometry.out_plane() as f64;
    let sparse = active as f64 * (geometry.lanes_len() as f64 + 60.0);
    let per_mac = 7.8 * p.powf(-0.2) / (geometry.cout_g() as f64).powf(0.45);
    let direct = if direct_is_faster(geometry) { 0.8 } else { 1.0 };
    let dense = direct * per_mac * (geometry.weight_len() as f64) * p;
    sparse < dense
}

/// The weights a masked convolution computes with, in the form its density calls for.
// One per layer and call, moved rarely: the padding of the smaller variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Chooses the sparse form where [`sparse_is_faster`] and for depthwise-like layers (one
    /// input channel per group, where a GEMM has a single row), else the dense form; the sparse
    /// form needs equal strides along both axes.
    ///
    /// # Panics
    /// If the geometry is not [`ConvGeometry::supported`] or the lengths do not match it.
    pub fn new(geometry: ConvGeometry, weight: &[f32], mask: &[bool]) -> Self {
        assert!(
            geometry.supported(),
            "conv kernels: unsupported geometry {geometry:?}"
        );
        let active = mask.iter().filter(|&&m| m).count();
        let sparse = sparse_is_faster(&geometry, active) || geometry.cin_g() == 1;
        let weights = if sparse && geometry.stride[0] == geometry.stride[1] {
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
        let mut y = pool::take_overwritten(g.batch * g.out_len());
        match &self.weights {
            PlanWeights::Dense(w) => forward_dense(g, x, w, &mut y),
            PlanWeights::Sparse(w) => forward_sparse(g, x, w, &mut y),
        }
        y
    }

    /// `∂L/∂x` from `dy = ∂L/∂y`, `[N, C_in, H, W]`.
    pub fn input_grad(&self, dy: &[f32]) -> Vec<f32> {
        let g = &self.geometry;
        let mut dx = pool::take_overwritten(g.batch * g.in_len());
        self.input_grad_into(dy, &mut dx);
        dx
    }

    /// [`Self::input_grad`] into `dx`, every value of which it overwrites (whatever `dx` held:
    /// a buffer no longer needed can take it without being cleared).
    ///
    /// # Panics
    /// If `dx` does not hold `N·C_in·H·W` values.
    pub fn input_grad_into(&self, dy: &[f32], dx: &mut [f32]) {
        let g = &self.geometry;
        match &self.weights {
            PlanWeights::Dense(w) => input_grad_dense(g, dy, w, dx),
            PlanWeights::Sparse(w) => input_grad_sparse(g, dy, w, dx),
        }
    }

    /// [`Self::input_grad`] in place: `io` holds `dy` on entry and `∂x` on return. Only where
    /// `∂x` is shaped like `dy` (same channels and plane) and the sparse form's stride-1 input
    /// gradient runs, which reads each sample's `dy` into its own buffer before it writes that
    /// sample's `∂x`; elsewhere it returns `false` and leaves `io` alone.
    pub fn input_grad_in_place(&self, io: &mut [f32]) -> bool {
        let g = &self.geometry;
        let PlanWeights::Sparse(w) = &self.weights else {
            return false;
        };
        let same_shape = g.c_in == g.c_out && g.out_hw() == Some(g.in_hw);
        if w.by_input_start.is_empty() || !same_shape || io.len() != g.batch * g.in_len() {
            return false;
        }
        w.check(g);
        io.par_chunks_mut(g.in_len()).for_each_init(
            || g.by_input_buffers(),
            |(buffer, plane), sample| {
                SparseSample {
                    kernel: SparseKernel::InputGradByInputInPlace,
                    g,
                    w,
                    input: &[],
                    dy: &[],
                    out: sample,
                    padded: buffer,
                    wide: plane,
                }
                .run()
            },
        );
        true
    }

    /// Whether [`Self::sparse_grads`] applies: the sparse form with its stride-1 input
    /// gradient by input channel.
    pub fn fuses_sparse_grads(&self) -> bool {
        matches!(&self.weights, PlanWeights::Sparse(w) if !w.by_input_start.is_empty())
    }

    /// Both gradients of a sparse-form, stride-1 plan in one pass over the batch: per sample,
    /// `dy` is laid out once and serves the input gradient and the weight gradient at the
    /// active positions (the two separate kernels each read `dy` from memory). The same
    /// values as [`Self::input_grad`] and [`Self::weight_grad`] (not `dense`), bit for bit.
    /// Returns the weight gradient shaped like the weight (zero at inactive positions), or
    /// `None` where it does not apply ([`Self::fuses_sparse_grads`]), leaving the buffers
    /// alone.
    ///
    /// # Panics
    /// If a buffer's length does not match the geometry.
    pub fn sparse_grads(&self, io: GradBuffers<'_>) -> Option<Vec<f32>> {
        let g = &self.geometry;
        let PlanWeights::Sparse(w) = &self.weights else {
            return None;
        };
        if !self.fuses_sparse_grads() {
            return None;
        }
        w.check(g);
        let [x, dy, dx] = io.lens();
        check(g, x, g.weight_len(), dy);
        assert_eq!(dx, x, "conv kernels: input gradient length");
        let partials: Vec<Vec<f32>> = io
            .split(g, GRAD_CHUNK)
            .into_par_iter()
            .map(|chunk| {
                let mut acc = vec![0.0; w.nnz()];
                let mut padded = vec![0.0; g.sparse_buffer_len()];
                let (mut buffer, mut plane) = g.by_input_buffers();
                for io in chunk.split(g, 1) {
                    pulp::Arch::new().dispatch(FusedSample {
                        g,
                        w,
                        io,
                        acc: &mut acc,
                        padded: &mut padded,
                        buffer: &mut buffer,
                        plane: &mut plane,
                    });
                }
                acc
            })
            .collect();
        let mut active = vec![0.0; w.nnz()];
        sum_in_order(&partials, &mut active);
        let mut dw = vec![0.0; g.weight_len()];
        for (&i, v) in w.index.iter().zip(active) {
            dw[i] = v;
        }
        Some(dw)
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
