//! Direct dense convolution for stride-1, ungrouped layers, forward ([`forward_direct`]) and
//! weight gradient ([`weight_grad_direct`]): no im2col. (The input gradient of a stride-1
//! convolution is the forward of the transposed kernel, so it runs here too.)
//!
//! Forward: each block of `CO` (8) output channels and two vectors of output positions (one on
//! CPUs with 16 vector registers) keeps its sums in registers across all `C_in·kh·kw` weight
//! positions; every position loads one shifted run of the padded input and feeds `CO` (8)
//! multiply-adds with it (the im2col + GEMM form
//! writes `kh·kw` copies of the input, which the GEMM then packs once more: on 16 channels
//! that costs as much as the multiply-adds).
//!
//! The layouts are those of the sparse kernels (see [`super::sparse::SparseWeight`]): the
//! zero-padded input `[C_in, H + 2p_h, W + 2p_w]` and output planes with the padded row pitch
//! ("wide" planes), so that weight position `(ci, ky, kx)` reads the padded input at a fixed
//! offset from the output position.

use rayon::prelude::*;

use super::geometry::ConvGeometry;
use super::layout::{pad_input, sum_in_order, write_out, Epilogue, Placement, GRAD_CHUNK};

/// Output channels per block.
pub(crate) const CO: usize = 8;
/// Output positions per block on any CPU: a multiple of every SIMD width (blocks of the
/// narrower vectors of AVX2 or no SIMD run one after another).
const LANES: usize = 32;

/// The weights of a [`ConvGeometry`] laid out for the direct kernel: per block of `CO` (8)
/// output channels, per weight position `(ci, ky, kx)`, the `CO` (8) channels' values (zero for
/// channels past `C_out`), and each position's offset in the padded input.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectWeight {
    values: Vec<f32>,
    offsets: Vec<usize>,
    geometry: ConvGeometry,
}

impl DirectWeight {
    /// Whether the direct kernel computes `geometry`: stride 1, one group.
    pub fn handles(geometry: &ConvGeometry) -> bool {
        geometry.supported() && geometry.stride == [1, 1] && geometry.groups == 1
    }

    /// Lays out `w` (`[C_out, C_in, kh, kw]`, already masked).
    ///
    /// # Panics
    /// If the geometry is not [`Self::handles`] or `w` is not its weight count long.
    pub fn new(geometry: &ConvGeometry, w: &[f32]) -> Self {
        assert!(
            Self::handles(geometry),
            "direct conv: geometry {geometry:?}"
        );
        assert_eq!(w.len(), geometry.weight_len(), "direct conv: weight length");
        let row = geometry.row_len();
        let blocks = geometry.c_out.div_ceil(CO);
        let mut values = vec![0.0; blocks * row * CO];
        for (i, &v) in w.iter().enumerate() {
            let (co, t) = (i / row, i % row);
            values[((co / CO) * row + t) * CO + co % CO] = v;
        }
        Self {
            values,
            offsets: offsets(geometry),
            geometry: *geometry,
        }
    }
}

/// Each weight position's `(ci, ky, kx)` offset in the padded input of one sample.
fn offsets(g: &ConvGeometry) -> Vec<usize> {
    let [kh, kw] = g.kernel;
    let [hp, wp] = g.padded_hw();
    (0..g.row_len())
        .map(|t| {
            let (ci, ky, kx) = (t / (kh * kw), t / kw % kh, t % kw);
            ci * hp * wp + ky * g.dilation[0] * wp + kx * g.dilation[1]
        })
        .collect()
}

/// The padded-input buffer: the padded input, and as far as the last block's reads reach.
fn padded_len(g: &ConvGeometry, offsets: &[usize]) -> usize {
    let [hp, wp] = g.padded_hw();
    (g.c_in * hp * wp).max(offsets.iter().max().map_or(0, |&o| o + lanes(g)))
}

/// Output positions of a wide plane that the blocks cover: the span up to the last output,
/// rounded up to whole blocks.
fn lanes(g: &ConvGeometry) -> usize {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    ((ho - 1) * g.padded_hw()[1] + wo).next_multiple_of(LANES)
}

/// The lengths of [`forward_direct`]'s two buffers per sample: the padded input and the
/// block's wide planes.
pub(crate) fn forward_buffers(g: &ConvGeometry, w: &DirectWeight) -> (usize, usize) {
    (padded_len(g, &w.offsets), CO * lanes(g))
}

/// One sample of [`forward_direct`] on the calling thread, with buffers of
/// [`forward_buffers`]' lengths whose padding border is zero (the kernel writes only the
/// interior, so buffers kept for the same geometry stay so). `x` is one sample, compact, or
/// zero-padded by the geometry's padding when `x_padded` (then read in place); `y` is placed
/// as `place`, and so is the epilogue's residual.
pub(crate) fn forward_direct_sample(
    g: &ConvGeometry,
    (x, x_padded): (&[f32], bool),
    w: &DirectWeight,
    (y, place): (&mut [f32], Placement),
    [padded, wide]: [&mut [f32]; 2],
    epilogue: Option<Epilogue<'_>>,
) {
    assert_eq!(
        (&w.geometry.kernel, w.geometry.c_in, w.geometry.c_out),
        (&g.kernel, g.c_in, g.c_out),
        "DirectWeight built for another geometry"
    );
    crate::dispatch(DirectSample {
        g,
        w,
        x,
        x_padded,
        y,
        place,
        padded,
        wide,
        epilogue,
    })
}

/// `y = conv(x, w)` for a geometry [`DirectWeight::handles`].
pub fn forward_direct(g: &ConvGeometry, x: &[f32], w: &DirectWeight, y: &mut [f32]) {
    assert_eq!(&w.geometry, g, "DirectWeight built for another geometry");
    assert_eq!(x.len(), g.batch * g.in_len(), "direct conv: input length");
    assert_eq!(y.len(), g.batch * g.out_len(), "direct conv: output length");
    let (padded_len, wide_len) = forward_buffers(g, w);
    let place = Placement::new(g.out_hw().expect("supported geometry"), 0);
    y.par_chunks_mut(g.out_len())
        .zip(x.par_chunks(g.in_len()))
        .for_each_init(
            || (vec![0.0; padded_len], vec![0.0; wide_len]),
            |(padded, wide), (y, x)| {
                crate::dispatch(DirectSample {
                    g,
                    w,
                    x,
                    x_padded: false,
                    y,
                    place,
                    padded,
                    wide,
                    epilogue: None,
                })
            },
        );
}

/// One sample of [`forward_direct`], compiled for the widest SIMD set through `pulp`.
struct DirectSample<'a> {
    g: &'a ConvGeometry,
    w: &'a DirectWeight,
    x: &'a [f32],
    /// Whether `x` is already padded (read in place).
    x_padded: bool,
    y: &'a mut [f32],
    place: Placement,
    padded: &'a mut [f32],
    wide: &'a mut [f32],
    epilogue: Option<Epilogue<'a>>,
}

impl pulp::WithSimd for DirectSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            g,
            w,
            x,
            x_padded,
            y,
            place,
            padded,
            wide,
            epilogue,
        } = self;
        let [_, wo] = g.out_hw().expect("supported geometry");
        let (wp, row, len) = (g.padded_hw()[1], g.row_len(), lanes(g));
        let src = if x_padded {
            assert!(x.len() >= padded.len(), "direct conv: padded input length");
            &x[..padded.len()]
        } else {
            pad_input(g, x, padded);
            padded
        };
        for (block, weights) in w.values.chunks_exact(row * CO).enumerate() {
            // `CO × V` sums and the `V` input vectors in registers: 2 vectors where there are
            // 32 registers (AVX-512), 1 where there are 16 (AVX2, SSE, NEON's 128-bit lanes
            // would have 32 but 4 lanes each), so that nothing spills.
            if S::F32_LANES >= 16 {
                for base in (0..len).step_by(2 * S::F32_LANES) {
                    direct_block::<S, 2>(simd, src, weights, &w.offsets, base, wide, len);
                }
            } else {
                for base in (0..len).step_by(S::F32_LANES) {
                    direct_block::<S, 1>(simd, src, weights, &w.offsets, base, wide, len);
                }
            }
            let first = block * CO;
            let channels = first..first + CO.min(g.c_out - first);
            let out = &mut y[first * place.plane..];
            write_out(out, wide, [len, wp, wo], channels, epilogue.as_ref(), place);
        }
    }
}

/// The sums of one block: `wide[c·len + base + l] = Σ_t weights[t·CO + c] ·
/// padded[offsets[t] + base + l]` for `c < CO`, `l < lanes`, held in registers across `t`
/// (one fused multiply-add per weight, channel and lane, in `t` order on every CPU).
#[inline(always)]
fn direct_block<S: pulp::Simd, const V: usize>(
    simd: S,
    padded: &[f32],
    weights: &[f32],
    offsets: &[usize],
    base: usize,
    wide: &mut [f32],
    len: usize,
) {
    let lanes = V * S::F32_LANES;
    let mut acc = [[simd.splat_f32s(0.0); V]; CO];
    for (ws, &offset) in weights.chunks_exact(CO).zip(offsets) {
        let (xs, _) = S::as_simd_f32s(&padded[offset + base..][..lanes]);
        let xs: [S::f32s; V] = core::array::from_fn(|i| xs[i]);
        for (a, &v) in acc.iter_mut().zip(ws) {
            let v = simd.splat_f32s(v);
            for (s, &x) in a.iter_mut().zip(&xs) {
                *s = simd.mul_add_f32s(v, x, *s);
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        let (out, _) = S::as_mut_simd_f32s(&mut wide[c * len + base..][..lanes]);
        out.copy_from_slice(a);
    }
}

/// `dw = Σ_n dy_n ⋆ x_n` at every position, for a geometry [`DirectWeight::handles`], with
/// the output channels along the vector lanes: `dwᵀ[t][co] = Σ_pos x_pad[offset_t + pos] ·
/// dyᵀ[pos][co]`, a GEMM whose im2col operand is read in place from the padded input (one
/// broadcast per weight position and output position) and whose sums never need a horizontal
/// reduction. Per sample: `x` zero-padded, `dy` transposed to `[pos][C_out]`, then per block of
/// weight positions and output-channel vectors one pass over the output positions with the
/// sums in registers. The batch is cut into chunks of `GRAD_CHUNK` samples whose sums are
/// added in chunk order, so the result does not depend on the thread count.
///
/// # Panics
/// If the geometry is not [`DirectWeight::handles`] with a 3×3 undilated kernel, or a length
/// does not match it.
pub fn weight_grad_direct(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(
        DirectWeight::handles(g) && g.kernel == [3, 3] && g.dilation == [1, 1],
        "direct conv weight gradient: geometry {g:?}"
    );
    assert_eq!(x.len(), g.batch * g.in_len(), "direct conv: input length");
    assert_eq!(
        dy.len(),
        g.batch * g.out_len(),
        "direct conv: output length"
    );
    assert_eq!(dw.len(), g.weight_len(), "direct conv: weight length");
    let offsets = offsets(g);
    let [hp, wp] = g.padded_hw();
    // Channels per `dyᵀ` row: whole vectors on any CPU (16 lanes covers AVX-512 and AVX2).
    let cp = g.c_out.next_multiple_of(16);
    let row = g.row_len();
    let partials: Vec<Vec<f32>> = (0..g.batch.div_ceil(GRAD_CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![0.0; row * cp];
            let mut padded = vec![0.0; g.c_in * hp * wp];
            let mut dy_t = vec![0.0; g.out_plane() * cp];
            for n in chunk * GRAD_CHUNK..((chunk + 1) * GRAD_CHUNK).min(g.batch) {
                crate::dispatch(DirectGradSample {
                    g,
                    offsets: &offsets,
                    x: &x[n * g.in_len()..][..g.in_len()],
                    dy: &dy[n * g.out_len()..][..g.out_len()],
                    acc: &mut acc,
                    padded: &mut padded,
                    dy_t: &mut dy_t,
                });
            }
            acc
        })
        .collect();
    let mut dw_t = vec![0.0; row * cp];
    sum_in_order(&partials, &mut dw_t);
    for (co, dw_row) in dw.chunks_exact_mut(row).enumerate() {
        for (t, v) in dw_row.iter_mut().enumerate() {
            *v = dw_t[t * cp + co];
        }
    }
}

/// One sample of [`weight_grad_direct`], compiled for the widest SIMD set through `pulp`.
struct DirectGradSample<'a> {
    g: &'a ConvGeometry,
    offsets: &'a [usize],
    x: &'a [f32],
    dy: &'a [f32],
    /// `dwᵀ`, `[C_in·kh·kw][cp]`.
    acc: &'a mut [f32],
    padded: &'a mut [f32],
    dy_t: &'a mut [f32],
}

impl pulp::WithSimd for DirectGradSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            g,
            offsets,
            x,
            dy,
            acc,
            padded,
            dy_t,
        } = self;
        pad_input(g, x, padded);
        let (p, cp) = (g.out_plane(), dy_t.len() / g.out_plane());
        for (co, plane) in dy.chunks_exact(p).enumerate() {
            for (q, &v) in plane.iter().enumerate() {
                dy_t[q * cp + co] = v;
            }
        }
        // Vectors of output channels per block: the most of 4, 2, 1 that divides `cp`, with
        // 24 sums in registers where there are 32 (AVX-512), 12 where there are 16 (AVX2 and
        // narrower), so that the sums, the `dy` vectors and the broadcast input never spill.
        let vectors = cp / S::F32_LANES;
        match (S::F32_LANES >= 16, vectors % 4, vectors % 2) {
            (true, 0, _) => grad_blocks::<S, 4, 2>(simd, g, offsets, padded, dy_t, acc),
            (true, _, 0) => grad_blocks::<S, 2, 4>(simd, g, offsets, padded, dy_t, acc),
            (true, _, _) => grad_blocks::<S, 1, 8>(simd, g, offsets, padded, dy_t, acc),
            (false, _, 0) => grad_blocks::<S, 2, 2>(simd, g, offsets, padded, dy_t, acc),
            (false, _, _) => grad_blocks::<S, 1, 4>(simd, g, offsets, padded, dy_t, acc),
        }
    }
}

/// Every block of `R` kernel rows (pairs `(ci, ky)`, three weight positions each) × `V`
/// vectors of output channels: `acc[t][co] += Σ_pos padded[offset_t + pos] · dy_t[pos][co]`,
/// the `3R × V` sums in registers across the output positions. Rows past the last one repeat
/// it and are not stored.
#[inline(always)]
fn grad_blocks<S: pulp::Simd, const V: usize, const R: usize>(
    simd: S,
    g: &ConvGeometry,
    offsets: &[usize],
    padded: &[f32],
    dy_t: &[f32],
    acc: &mut [f32],
) {
    let [ho, wo] = g.out_hw().expect("supported geometry");
    let (wp, rows, width) = (g.padded_hw()[1], offsets.len() / 3, V * S::F32_LANES);
    let cp = dy_t.len() / (ho * wo);
    for r0 in (0..rows).step_by(R) {
        let starts: [usize; R] = core::array::from_fn(|k| offsets[3 * (r0 + k).min(rows - 1)]);
        for c0 in (0..cp).step_by(width) {
            let mut sums = [[[simd.splat_f32s(0.0); V]; 3]; R];
            for (oy, dy_row) in dy_t.chunks_exact(wo * cp).enumerate() {
                let xs: [&[f32]; R] = starts.map(|s| &padded[s + oy * wp..][..wo + 2]);
                for (ox, d) in dy_row.chunks_exact(cp).enumerate() {
                    let d = S::as_simd_f32s(&d[c0..c0 + width]).0;
                    for (s, x) in sums.iter_mut().zip(&xs) {
                        let x = &x[ox..ox + 3];
                        for (s, &x) in s.iter_mut().zip(x) {
                            let x = simd.splat_f32s(x);
                            for (s, &d) in s.iter_mut().zip(d) {
                                *s = simd.mul_add_f32s(x, d, *s);
                            }
                        }
                    }
                }
            }
            for (k, s) in sums.iter().enumerate().take(rows - r0) {
                for (kx, s) in s.iter().enumerate() {
                    let at = (3 * (r0 + k) + kx) * cp + c0;
                    let out = S::as_mut_simd_f32s(&mut acc[at..at + width]).0;
                    for (o, &s) in out.iter_mut().zip(s) {
                        *o = simd.add_f32s(*o, s);
                    }
                }
            }
        }
    }
}
