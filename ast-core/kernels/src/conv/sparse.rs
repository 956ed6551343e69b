//! The sparse form: only the active weights, row-compressed by output channel
//! ([`SparseWeight`]), each one long product over a padded input plane; forward, input
//! gradient, the weight gradient at the active positions, and both gradients fused.

use rayon::prelude::*;

use super::geometry::{check, ConvGeometry};
use super::layout::{
    copy_row, finish_row, pad_input, padded_phases, phases_of_padded, sum_in_order, widen,
    Epilogue, Placement, GRAD_CHUNK,
};

/// Which per-sample sparse kernel a [`SparseSample`] runs.
#[derive(Clone, Copy)]
pub(crate) enum SparseKernel {
    /// One sample's forward with blocks of positions outside and output channels inside
    /// ([`forward_by_positions`]): the input already padded when `x_padded`, the output (and
    /// the epilogue's residual) placed as `place`; `wide` holds the keep mask
    /// ([`keep_mask`]).
    ForwardByPositions {
        x_padded: bool,
        place: Placement,
    },
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
pub(crate) struct SparseSample<'a> {
    pub(crate) kernel: SparseKernel,
    pub(crate) g: &'a ConvGeometry,
    pub(crate) w: &'a SparseWeight,
    /// The input `x` (forward, weight gradient) or `dy` (input gradient).
    pub(crate) input: &'a [f32],
    /// `dy` (weight gradient only).
    pub(crate) dy: &'a [f32],
    /// `y`, `dx`, or the weight-gradient accumulator.
    pub(crate) out: &'a mut [f32],
    pub(crate) padded: &'a mut [f32],
    pub(crate) wide: &'a mut [f32],
    /// What follows the forward (inference only).
    pub(crate) epilogue: Option<Epilogue<'a>>,
}

impl pulp::WithSimd for SparseSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            kernel,
            g,
            w,
            input,
            dy,
            out,
            padded,
            wide,
            epilogue,
        } = self;
        match kernel {
            SparseKernel::Forward => forward_sparse_sample(simd, g, input, w, out, padded, wide),
            SparseKernel::ForwardByPositions { x_padded, place } => forward_by_positions(
                simd,
                g,
                (input, x_padded),
                w,
                (out, place),
                [padded, wide],
                epilogue.as_ref(),
            ),
            SparseKernel::InputGrad => input_grad_sparse_sample(g, input, w, out, padded, wide),
            SparseKernel::InputGradByInput => {
                lay_out_dy(g, input, padded);
                gather_input_grad(simd, g, w, padded, wide, out);
            }
            SparseKernel::InputGradByInputInPlace => {
                lay_out_dy(g, out, padded);
                gather_input_grad(simd, g, w, padded, wide, out);
            }
            SparseKernel::WeightGrad => {
                weight_grad_sparse_sample(g, input, dy, w, out, padded, wide)
            }
        }
    }
}

impl SparseSample<'_> {
    pub(crate) fn run(self) {
        crate::dispatch(self);
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
/// position `j` of a contiguous run (`ConvGeometry::phase_offset`), so every product is a
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
    pub(crate) start: Vec<usize>,
    /// The entries by input channel, for the stride-1 input gradient (empty otherwise): input
    /// channel `ci`'s are `by_input_start[ci]..by_input_start[ci + 1]` of `by_input_value` and
    /// `by_input_read` (see [`ConvGeometry::dy_channel_len`]).
    pub(crate) by_input_start: Vec<usize>,
    pub(crate) by_input_value: Vec<f32>,
    pub(crate) by_input_read: Vec<usize>,
    pub(crate) geometry: ConvGeometry,
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

    pub(crate) fn check(&self, g: &ConvGeometry) {
        assert_eq!(&self.geometry, g, "SparseWeight built for another geometry");
    }

    /// Number of active weights.
    pub fn nnz(&self) -> usize {
        self.index.len()
    }
}

/// `out[..V·L] = Σ_e values[e] · src[starts[e] + base..][..V·L]` for `L` lanes per
/// vector, the `V` vector sums held in registers across all the entries (output-stationary):
/// one load and one fused multiply-add per vector and entry, instead of the load, add and
/// store of an output that each entry's pass over the plane costs. Fused multiply-adds round
/// once, on every CPU (pulp computes them exactly where the CPU has none), so the sums are the
/// same bits everywhere.
#[inline(always)]
fn gather_vectors<S: pulp::Simd, const V: usize>(
    simd: S,
    out: &mut [f32],
    src: &[f32],
    starts: &[usize],
    values: &[f32],
    base: usize,
) {
    let lanes = V * S::F32_LANES;
    let mut acc = [simd.splat_f32s(0.0); V];
    for (&start, &v) in starts.iter().zip(values) {
        let (xs, _) = S::as_simd_f32s(&src[start + base..][..lanes]);
        let v = simd.splat_f32s(v);
        for (a, &x) in acc.iter_mut().zip(xs) {
            *a = simd.mul_add_f32s(v, x, *a);
        }
    }
    let (out, _) = S::as_mut_simd_f32s(&mut out[..lanes]);
    out.copy_from_slice(&acc);
}

/// `out[j] = Σ_e values[e] · src[starts[e] + j]` for every `j` (`out.len()` a multiple of 16):
/// [`gather_count`] over blocks of at most 8 vectors, split evenly ([`vector_blocks`]), so that
/// no short remainder pays a pass over the entries of its own. (Inference takes up to 16 on
/// AVX-512; in the training step 16 measured no better, DEVELOPERS.md.)
#[inline(always)]
fn gather<S: pulp::Simd>(simd: S, out: &mut [f32], src: &[f32], starts: &[usize], values: &[f32]) {
    for (base, count) in vector_blocks::<S>(out.len(), 8) {
        gather_count(simd, count, &mut out[base..], src, starts, values, base);
    }
}

/// `len` positions (a multiple of the lanes) in blocks of at most `most` vectors (at most 16),
/// split evenly: each block's first position and its vector count (an 8×8 plane's 80 wide
/// positions are one block of 5 vectors on AVX-512, not 4 and then 1).
#[inline(always)]
fn vector_blocks<S: pulp::Simd>(len: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let lanes = S::F32_LANES;
    let vectors = len / lanes;
    let blocks = vectors.div_ceil(most);
    (0..blocks).map(move |b| {
        let first = vectors * b / blocks;
        (first * lanes, vectors * (b + 1) / blocks - first)
    })
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
                    epilogue: None,
                }
                .run()
            },
        );
}

/// [`forward_sparse_sample`] with the loops the other way round: for each block of output
/// positions, every output channel's entries, so that the input rows a block reads (all input
/// channels, a few rows each) stay in L1 across the output channels; the other order streams
/// the whole padded input from L2 once per output channel. Each channel's block of sums goes
/// from registers through a block on the stack straight into `y`, finished by the `epilogue`:
/// no wide plane is written and read again. Training keeps the other order: there the larger
/// working set competed with the step's other data for the cache (measured, DEVELOPERS.md); a
/// forward pass of one image has the cache to itself. The same sums in the same order, so the
/// same bits.
///
/// `x` is compact, or already padded by the geometry's padding when `x_padded` (read in place:
/// no copy). `y` is placed as `place`. Where its rows are as far apart as the wide planes'
/// (stride 1 into a border of the geometry's padding, the layout the next convolution reads in
/// place), a block is finished as one run, its wide positions outside the plane written as
/// zeros (they fall on the border) by the `keep` mask ([`keep_mask`]); otherwise row by row.
#[inline(always)]
fn forward_by_positions<S: pulp::Simd>(
    simd: S,
    g: &ConvGeometry,
    (x, x_padded): (&[f32], bool),
    w: &SparseWeight,
    (y, place): (&mut [f32], Placement),
    [padded, keep]: [&mut [f32]; 2],
    epilogue: Option<&Epilogue<'_>>,
) {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let (wp, len, span) = (g.padded_hw()[1], g.lanes_len(), g.span_len());
    let src = if x_padded {
        phases_of_padded(g, x, padded)
    } else {
        padded_phases(g, x, padded)
    };
    let in_place = g.stride == [1, 1] && place.pitch == wp;
    // Blocks of as many vectors as the registers hold besides the broadcast value: 16 of
    // AVX-512's 32, 8 of the 16 elsewhere.
    let mut sums = [0.0f32; 16 * 16];
    for (base, count) in vector_blocks::<S>(len, if S::F32_LANES == 16 { 16 } else { 8 }) {
        let block = count * S::F32_LANES;
        for (co, plane) in y.chunks_mut(place.plane).take(g.c_out).enumerate() {
            let entries = w.row_start[co]..w.row_start[co + 1];
            let (starts, values) = (&w.start[entries.clone()], &w.value[entries]);
            gather_count(simd, count, &mut sums, src, starts, values, base);
            let finish = epilogue.map(|e| {
                let residual = e.residual.map(|r| &r[co * place.plane..][..place.plane]);
                (e.bias[co], residual, e.relu)
            });
            if in_place {
                let run = base..(base + block).min(span);
                finish_run(plane, &sums, run, &keep[..span], place.origin, finish);
            } else {
                finish_block(plane, &sums[..block], base, [ho, wp, wo], place, finish);
            }
        }
    }
}

/// [`gather_vectors`] of `count` vectors (1 to 16).
#[inline(always)]
fn gather_count<S: pulp::Simd>(
    simd: S,
    count: usize,
    out: &mut [f32],
    src: &[f32],
    starts: &[usize],
    values: &[f32],
    base: usize,
) {
    macro_rules! by_count {
        ($($v:literal)*) => {
            match count {
                $($v => gather_vectors::<S, $v>(simd, out, src, starts, values, base),)*
                _ => unreachable!("1 to 16 vectors"),
            }
        };
    }
    by_count!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// Per wide position of `g` up to its span: 1 where it is an output position (its column is
/// below `W_out`), 0 where it falls past a row's end.
pub(crate) fn keep_mask(g: &ConvGeometry) -> Vec<f32> {
    let [_, wo] = g.out_hw().expect("supported geometry");
    let wp = g.padded_hw()[1];
    (0..g.span_len())
        .map(|j| if j % wp < wo { 1.0 } else { 0.0 })
        .collect()
}

/// Writes the wide positions `run` of one output channel (sums from `run.start` on in `sums`)
/// into its plane at `origin + j` (rows as far apart as the wide planes'), as `act(sum + bias
/// + residual)` where there is an epilogue, and as zero where `keep` is 0.
#[inline(always)]
fn finish_run(
    plane: &mut [f32],
    sums: &[f32],
    run: core::ops::Range<usize>,
    keep: &[f32],
    origin: usize,
    epilogue: Option<(f32, Option<&[f32]>, bool)>,
) {
    let n = run.len();
    let dst = &mut plane[origin + run.start..][..n];
    let (sums, keep) = (&sums[..n], &keep[run.start..][..n]);
    let pick = |k: f32, v: f32| if k != 0.0 { v } else { 0.0 };
    match epilogue {
        None => {
            for ((d, &s), &k) in dst.iter_mut().zip(sums).zip(keep) {
                *d = pick(k, s);
            }
        }
        Some((bias, residual, relu)) => {
            let act = |v: f32| if relu { v.max(0.0) } else { v };
            match residual {
                Some(r) => {
                    let r = &r[origin + run.start..][..n];
                    for (((d, &s), &k), &r) in dst.iter_mut().zip(sums).zip(keep).zip(r) {
                        *d = pick(k, act(s + bias + r));
                    }
                }
                None => {
                    for ((d, &s), &k) in dst.iter_mut().zip(sums).zip(keep) {
                        *d = pick(k, act(s + bias));
                    }
                }
            }
        }
    }
}

/// Writes the wide positions `base..base + sums.len()` of one output channel (rows `wp` apart,
/// the first `wo` of each row valid, `ho` rows) into its plane placed as `place`, as `act(sum +
/// bias + residual)` where there is an epilogue (`(bias, the channel's residual plane, relu)`).
#[inline(always)]
fn finish_block(
    plane: &mut [f32],
    sums: &[f32],
    base: usize,
    [ho, wp, wo]: [usize; 3],
    place: Placement,
    epilogue: Option<(f32, Option<&[f32]>, bool)>,
) {
    let end = base + sums.len();
    let mut row = base / wp;
    while row < ho && row * wp < end {
        let (first, last) = (base.saturating_sub(row * wp), (end - row * wp).min(wo));
        if first < last {
            let at = place.origin + row * place.pitch + first;
            let dst = &mut plane[at..at + last - first];
            let src = &sums[row * wp + first - base..];
            match epilogue {
                None => copy_row(dst, &src[..dst.len()]),
                Some((bias, residual, relu)) => {
                    let residual = residual.map(|r| &r[at..at + dst.len()]);
                    finish_row(dst, src, bias, residual, relu)
                }
            }
        }
        row += 1;
    }
}

#[inline(always)]
fn forward_sparse_sample<S: pulp::Simd>(
    simd: S,
    g: &ConvGeometry,
    x: &[f32],
    w: &SparseWeight,
    y: &mut [f32],
    padded: &mut [f32],
    wide: &mut [f32],
) {
    let [_, wo] = g.out_hw().expect("supported geometry");
    let (wp, len) = (g.padded_hw()[1], g.lanes_len());
    let src = padded_phases(g, x, padded);
    for (co, out) in y.chunks_exact_mut(g.out_plane()).enumerate() {
        let entries = w.row_start[co]..w.row_start[co + 1];
        if entries.is_empty() {
            out.fill(0.0);
            continue;
        }
        gather(
            simd,
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
                    epilogue: None,
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
fn gather_input_grad<S: pulp::Simd>(
    simd: S,
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
            simd,
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
                    epilogue: None,
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
    let src = padded_phases(g, x, padded);
    for (co, plane) in dy.chunks_exact(g.out_plane()).enumerate() {
        widen(g, plane, wide);
        for e in w.row_start[co]..w.row_start[co + 1] {
            acc[e] += dot(&wide[..len], &src[w.start[e]..]);
        }
    }
}

/// Where [`MaskedConvPlan::sparse_grads`](super::MaskedConvPlan::sparse_grads) reads `x` (`[N, C_in, H, W]`) and `dy`
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
    pub(crate) fn split(self, g: &ConvGeometry, samples: usize) -> Vec<GradBuffers<'a>> {
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
    pub(crate) fn lens(&self) -> [usize; 3] {
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
pub(crate) struct FusedSample<'a> {
    pub(crate) g: &'a ConvGeometry,
    pub(crate) w: &'a SparseWeight,
    pub(crate) io: GradBuffers<'a>,
    pub(crate) acc: &'a mut [f32],
    pub(crate) padded: &'a mut [f32],
    pub(crate) buffer: &'a mut [f32],
    pub(crate) plane: &'a mut [f32],
}

impl pulp::WithSimd for FusedSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
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
                gather_input_grad(simd, g, w, buffer, plane, x);
            }
            GradBuffers::OverDy { x, dy } => {
                pad_input(g, x, padded);
                lay_out_dy(g, dy, buffer);
                gather_input_grad(simd, g, w, buffer, plane, dy);
            }
            GradBuffers::Separate { x, dy, dx } => {
                pad_input(g, x, padded);
                lay_out_dy(g, dy, buffer);
                gather_input_grad(simd, g, w, buffer, plane, dx);
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
