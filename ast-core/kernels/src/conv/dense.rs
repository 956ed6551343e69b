//! The dense form: `W ⊙ M` as a dense weight, through the [`super::direct`] kernels where they
//! are faster, else im2col + GEMM.

use rayon::prelude::*;

use core::ops::Range;

use super::direct::{forward_direct, weight_grad_direct, DirectWeight};
use super::geometry::{check, ConvGeometry};
use super::im2col::{col2im, tile_columns, tile_positions, tiles, with_columns};
use super::layout::{sum_in_order, GRAD_CHUNK};
use crate::gemm::{matmul, matmul_col_major, matmul_rows, MatRef};

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
/// GEMM: on AVX-512, for the geometries of [`direct_suits`]. At the AVX2 level (16 registers of
/// 8 lanes) the direct kernel loses to the GEMM on every one of them (`AST_SIMD=avx2 cargo
/// bench -p ast-kernels --bench conv_kernels`, forward at batch 128, direct / GEMM: 16 ch at
/// 32×32 5.2 / 4.5 ms, 32 ch at 16×16 6.0 / 4.4, 32 ch at 32×32 19.4 / 14.0, 64 ch at 16×16
/// 17.6 / 10.1), so narrower levels always take im2col + GEMM.
pub fn direct_is_faster(g: &ConvGeometry) -> bool {
    direct_suits(g) && crate::wide_vectors()
}

/// The geometries the direct forward beats im2col + GEMM on with AVX-512: the stride-1,
/// ungrouped, non-pointwise ones it handles with output planes of at least 16×16 positions.
/// `cargo bench -p ast-kernels --bench conv_kernels`, forward at batch 128, direct against GEMM:
/// 16 ch at 32×32 1.7 / 3.8 ms, 32 ch at 32×32 5.7 / 10.2, 32 ch at 16×16 1.6 / 1.9, 64 ch at
/// 16×16 5.9 / 6.8, but 64 ch at 8×8 1.8 / 1.7 and 128 ch at 8×8 7.2 / 6.0 (a wide 8×8 plane
/// wastes a third of its lanes on the padding columns).
pub fn direct_suits(g: &ConvGeometry) -> bool {
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
/// convolution of `dy` with the flipped, transposed kernel (`transposed_conv`): im2col and
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
/// ([`super::direct::weight_grad_direct`]): on AVX-512, for the geometries of
/// [`direct_grad_suits`]. At the AVX2 level im2col + GEMM is as fast or faster on each
/// (`AST_SIMD=avx2`, batch 128, direct / GEMM: 32 ch at 16×16 4.4 / 4.2 ms, 64 ch at 8×8 4.0 /
/// 4.0, 32 ch at 32×32 17.3 / 14.4, 64 ch at 16×16 16.4 / 10.5, 128 ch at 8×8 15.0 / 12.2).
pub fn direct_grad_is_faster(g: &ConvGeometry) -> bool {
    direct_grad_suits(g) && crate::wide_vectors()
}

/// The geometries the direct weight gradient beats im2col + GEMM on with AVX-512: 3×3 stride-1
/// ungrouped undilated convolutions with a multiple of 32 output channels. `cargo bench -p
/// ast-kernels --bench conv_kernels`, batch 128, direct against im2col + GEMM: 32 ch at 16×16
/// 1.8 / 2.0 ms, 64 ch at 8×8 1.5 / 2.1, 32 ch at 32×32 7.7 / 8.0, 64 ch at 16×16 6.3 / 6.6,
/// 128 ch at 8×8 6.0 / 7.2; but 16 channels at 32×32 4.8 / 3.6 (one vector of channels: one
/// broadcast per multiply-add).
pub fn direct_grad_suits(g: &ConvGeometry) -> bool {
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
