//! The im2col columns of a tile of output rows (and their adjoint, col2im), the tiling that
//! keeps a tile's columns in the cache, and each thread's column buffer.

use core::ops::Range;

use super::geometry::ConvGeometry;

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
pub(crate) fn col2im(
    g: &ConvGeometry,
    col: &mut [f32],
    grp: usize,
    rows: Range<usize>,
    dx: &mut [f32],
) {
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
pub(crate) fn tiles(g: &ConvGeometry) -> impl Iterator<Item = Range<usize>> {
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
pub(crate) fn tile_columns<'a>(
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
pub(crate) fn tile_positions(g: &ConvGeometry) -> usize {
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
pub(crate) fn with_columns<R>(g: &ConvGeometry, f: impl FnOnce(&mut [f32]) -> R) -> R {
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
