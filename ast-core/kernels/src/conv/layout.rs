//! The planes the direct and sparse kernels compute on: the zero-padded input, output planes
//! with the padded row pitch ("wide" planes) and the stride phases; short row copies; and the
//! fixed-order sum of per-chunk weight gradients.

use super::geometry::ConvGeometry;

/// Samples per partial sum of a weight gradient: the batch is cut into chunks of this many
/// samples (independent of the thread count, so the sum order is fixed).
pub(crate) const GRAD_CHUNK: usize = 8;

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
pub(crate) fn widen(g: &ConvGeometry, plane: &[f32], wide: &mut [f32]) {
    let [_, wo] = g.out_hw().expect("supported geometry");
    let wp = g.padded_hw()[1];
    for (src, dst) in plane.chunks_exact(wo).zip(wide.chunks_mut(wp)) {
        copy_row(&mut dst[..wo], src);
    }
}

/// Sample `x` laid out in `buffer` as the sparse kernels read it: zero-padded
/// ([`pad_input`]), and for a stride above 1 in its stride phases ([`phases_of`]); returns what
/// the products read. For stride 2 the input goes straight into its two phases, one pass
/// instead of two (the padding copy and the strided phase copy took most of a stride-2 layer's
/// inference time at low density). As for [`pad_input`], only the interior is written.
#[inline(always)]
pub(crate) fn padded_phases<'a>(g: &ConvGeometry, x: &[f32], buffer: &'a mut [f32]) -> &'a [f32] {
    if g.stride[1] != 2 {
        pad_input(g, x, buffer);
        return phases_of(g, buffer);
    }
    let [h, w] = g.in_hw;
    let [hp, wp] = g.padded_hw();
    let [ph, pw] = g.padding;
    let l = g.phase_len();
    let phases = &mut buffer[g.padded_buffer_len()..];
    let (first, second) = phases.split_at_mut(l);
    for (ci, channel) in x.chunks_exact(h * w).enumerate() {
        for (r, row) in channel.chunks_exact(w).enumerate() {
            // Padded position `b + c` of column `c`: phase `(b + c) mod 2`, index `(b + c)/2`.
            let b = ci * hp * wp + (r + ph) * wp + pw;
            let (even, odd) = match b % 2 {
                0 => (&mut first[b / 2..], &mut second[b / 2..]),
                _ => (&mut second[b / 2..], &mut first[b / 2 + 1..]),
            };
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                even[w / 2] = *last;
            }
            for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
                *e = pair[0];
                *o = pair[1];
            }
        }
    }
    phases
}

/// The stride phases of an input already padded in `x` (a buffer at least
/// [`ConvGeometry::padded_buffer_len`] long), written into the phase part of `buffer` (see
/// [`phases_of`]); returns what the products read: `x` itself for stride 1.
#[inline(always)]
pub(crate) fn phases_of_padded<'a>(
    g: &ConvGeometry,
    x: &'a [f32],
    buffer: &'a mut [f32],
) -> &'a [f32] {
    let (s, len) = (g.stride[1], g.padded_buffer_len());
    if s == 1 {
        return &x[..len];
    }
    let l = g.phase_len();
    let phases = &mut buffer[len..];
    if s == 2 {
        // One pass of pairs, which the compiler vectorises (the strided loops stay scalar).
        let (even, odd) = phases.split_at_mut(l);
        let pairs = x[..len].chunks_exact(2);
        if let [last] = pairs.remainder() {
            even[len / 2] = *last;
        }
        for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
            *e = pair[0];
            *o = pair[1];
        }
    } else {
        for r in 0..s {
            for (dst, &v) in phases[r * l..].iter_mut().zip(x[r..len].iter().step_by(s)) {
                *dst = v;
            }
        }
    }
    phases
}

/// Splits a sparse kernel's padded buffer into the padded input and the stride phases, and
/// for a stride above 1 copies the padded input into its phases: `phases[r·L + i] =
/// padded[i·s + r]`. Returns what the products read (the padded input for stride 1).
#[inline(always)]
pub(crate) fn phases_of<'a>(g: &ConvGeometry, buffer: &'a mut [f32]) -> &'a [f32] {
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

/// What follows a convolution in inference, applied while its output is written:
/// `y = act(y + bias[c] + residual)` per output channel `c`, `act` a ReLU when `relu`.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// One value per output channel.
    pub bias: &'a [f32],
    /// A tensor of the output's shape (one sample) added after the bias.
    pub residual: Option<&'a [f32]>,
    /// Whether a ReLU follows.
    pub relu: bool,
}

/// `dst = act(src + bias + residual)` over one row (the [`Epilogue`] of a row of channel
/// plane values; `residual` the same row of the residual).
#[inline(always)]
pub(crate) fn finish_row(
    dst: &mut [f32],
    src: &[f32],
    bias: f32,
    residual: Option<&[f32]>,
    relu: bool,
) {
    let src = &src[..dst.len()];
    let act = |v: f32| if relu { v.max(0.0) } else { v };
    match residual {
        Some(r) => {
            for ((d, &s), &r) in dst.iter_mut().zip(src).zip(&r[..src.len()]) {
                *d = act(s + bias + r);
            }
        }
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = act(s + bias);
            }
        }
    }
}

/// Where the channel planes `[H, W]` of one sample lie in an activation buffer: compact
/// (`pad` 0: `[C, H, W]`), or inside a zero border of `pad` (`[C, H + 2·pad, W + 2·pad]`, then
/// [`ACTIVATION_SLACK`] zeros), the layout a following convolution with that padding reads
/// without copying its input (see [`super::ForwardPlan::forward_laid_out`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Values per channel.
    pub plane: usize,
    /// Values per row.
    pub pitch: usize,
    /// Where value `(0, 0)` of a channel is.
    pub origin: usize,
    /// Rows inside the border.
    pub rows: usize,
}

/// Zeros after a padded activation: as far as the kernels' vector runs over its last
/// channel reach.
pub const ACTIVATION_SLACK: usize = 64;

impl Placement {
    /// Planes of `[h, w]` inside a zero border of `pad` (compact for 0).
    pub fn new([h, w]: [usize; 2], pad: usize) -> Self {
        let pitch = w + 2 * pad;
        Self {
            plane: (h + 2 * pad) * pitch,
            pitch,
            origin: pad * pitch + pad,
            rows: h,
        }
    }

    /// The length of a buffer of `channels` such planes (with the slack where padded).
    pub fn buffer_len(&self, channels: usize) -> usize {
        let slack = if self.origin > 0 { ACTIVATION_SLACK } else { 0 };
        channels * self.plane + slack
    }
}

/// Writes `out`, the output channels `channels` of one sample placed as `place`, from `wide`
/// planes (`pitch` apart, rows `wp` apart, `wo` values each), applying `epilogue` (its
/// residual placed as `out`) where there is one. Only the values inside the border are
/// written.
#[inline(always)]
pub(crate) fn write_out(
    out: &mut [f32],
    wide: &[f32],
    [pitch, wp, wo]: [usize; 3],
    channels: core::ops::Range<usize>,
    epilogue: Option<&Epilogue<'_>>,
    place: Placement,
) {
    for (i, c) in channels.enumerate() {
        let src = &wide[i * pitch..];
        for (r, s) in src.chunks(wp).take(place.rows).enumerate() {
            let at = i * place.plane + place.origin + r * place.pitch;
            let d = &mut out[at..at + wo];
            match epilogue {
                None => copy_row(d, &s[..wo]),
                Some(e) => {
                    let at = c * place.plane + place.origin + r * place.pitch;
                    let residual = e.residual.map(|res| &res[at..at + wo]);
                    finish_row(d, s, e.bias[c], residual, e.relu)
                }
            }
        }
    }
}

/// Applies `epilogue` in place to one output sample `y` (`[C, plane]`).
pub(crate) fn apply_epilogue(y: &mut [f32], epilogue: &Epilogue<'_>) {
    let plane = y.len() / epilogue.bias.len().max(1);
    let act = |v: f32| if epilogue.relu { v.max(0.0) } else { v };
    for (c, values) in y.chunks_exact_mut(plane).enumerate() {
        let b = epilogue.bias[c];
        match epilogue.residual {
            Some(r) => {
                for (v, &r) in values.iter_mut().zip(&r[c * plane..][..plane]) {
                    *v = act(*v + b + r);
                }
            }
            None => values.iter_mut().for_each(|v| *v = act(*v + b)),
        }
    }
}
