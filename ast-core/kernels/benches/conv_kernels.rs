//! The masked-convolution kernels' two forms, dense (im2col + GEMM) and sparse (active weights
//! only), on the convolutions of ResNet-32 and wide ResNet-32 at batch 128, across densities:
//! the time of one training step's work (forward, input gradient, weight gradient at the active
//! positions) per form, the density below which the sparse form wins, and the form the cost
//! model `sparse_is_faster` picks (fitted to these figures).
//!
//! ```sh
//! cargo bench -p ast-kernels --bench conv_kernels
//! cargo bench -p ast-kernels --bench conv_kernels -- 1.0 0.05   # only these densities
//! AST_SIMD=avx2 cargo bench -p ast-kernels --bench conv_kernels   # at the AVX2 level
//! ```

use std::time::Instant;

use ast_kernels::conv::dense::{direct_is_faster, forward_im2col, weight_grad_im2col};
use ast_kernels::conv::direct::{forward_direct, weight_grad_direct, DirectWeight};
use ast_kernels::conv::{
    sparse_is_faster, ConvGeometry, MaskedConvPlan, PlanWeights, SparseWeight,
};
use ast_kernels::test_support::TestRng;
use ast_kernels::{limit_simd, simd_level, SimdLimit};

const DENSITIES: [f64; 8] = [1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02];

fn geometry(c: usize, hw: usize) -> ConvGeometry {
    ConvGeometry {
        batch: 128,
        c_in: c,
        in_hw: [hw, hw],
        c_out: c,
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    }
}

/// Median milliseconds of forward, input gradient and active-position weight gradient, and
/// of their sum.
fn time(plan: &MaskedConvPlan, x: &[f32], dy: &[f32]) -> [f64; 4] {
    let mut runs: Vec<[f64; 4]> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let y = plan.forward(x);
            let forward = start.elapsed().as_secs_f64() * 1000.0;
            let dx = plan.input_grad(dy);
            let input_grad = start.elapsed().as_secs_f64() * 1000.0 - forward;
            let dw = plan.weight_grad(x, dy, false);
            let total = start.elapsed().as_secs_f64() * 1000.0;
            assert!(y.len() + dx.len() + dw.len() > 0);
            [forward, input_grad, total - forward - input_grad, total]
        })
        .collect();
    runs.sort_by(|a, b| a[3].total_cmp(&b[3]));
    runs[2]
}

/// Median milliseconds of 5 runs of `f`.
fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    // `AST_SIMD=avx2|scalar` runs the kernels at that level, as the CLI does.
    if let Ok(level) = std::env::var("AST_SIMD") {
        let limit = SimdLimit::from_name(&level).expect("AST_SIMD: native, avx2 or scalar");
        limit_simd(limit);
    }
    println!("kernels at {}", simd_level());
    let chosen: Vec<f64> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let densities = if chosen.is_empty() {
        DENSITIES.to_vec()
    } else {
        chosen
    };
    let mut rng = TestRng::new(1);
    let shapes = [
        ("16 ch, 32×32 (ResNet-32 stage 1)", geometry(16, 32)),
        ("32 ch, 16×16 (ResNet-32 stage 2)", geometry(32, 16)),
        ("64 ch, 8×8 (ResNet-32 stage 3)", geometry(64, 8)),
        ("32 ch, 32×32 (wide stage 1)", geometry(32, 32)),
        ("64 ch, 16×16 (wide stage 2)", geometry(64, 16)),
        ("128 ch, 8×8 (wide stage 3)", geometry(128, 8)),
        (
            "32 → 64 ch, 32×32, stride 2 (wide stage 2 entry)",
            ConvGeometry {
                c_out: 64,
                stride: [2, 2],
                ..geometry(32, 32)
            },
        ),
    ];
    for (name, g) in shapes {
        let x: Vec<f32> = (0..g.batch * g.in_len())
            .map(|_| rng.next_f64() as f32)
            .collect();
        let dy: Vec<f32> = (0..g.batch * g.out_len())
            .map(|_| rng.next_f64() as f32)
            .collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|_| rng.next_f64() as f32).collect();
        println!(
            "{name}: density, dense form ms, sparse form ms (each: forward + input gradient + \
             weight gradient), model picks"
        );
        if DirectWeight::handles(&g) {
            let direct = DirectWeight::new(&g, &w);
            let mut y = vec![0.0; g.batch * g.out_len()];
            let mut reference = y.clone();
            let direct_ms = median_ms(|| forward_direct(&g, &x, &direct, &mut y));
            let im2col_ms = median_ms(|| forward_im2col(&g, &x, &w, &mut reference));
            let diff = y
                .iter()
                .zip(&reference)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            let mut dw = vec![0.0; g.weight_len()];
            let mut dw_reference = dw.clone();
            let direct_grad_ms = median_ms(|| weight_grad_direct(&g, &x, &dy, &mut dw));
            let im2col_grad_ms = median_ms(|| weight_grad_im2col(&g, &x, &dy, &mut dw_reference));
            let grad_diff = dw
                .iter()
                .zip(&dw_reference)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs() / b.abs().max(1.0)));
            println!(
                "  dense weight gradient: direct {direct_grad_ms:.1} ms, im2col + GEMM \
                 {im2col_grad_ms:.1} ms (largest relative difference {grad_diff:e})"
            );
            println!(
                "  dense forward: direct {direct_ms:.1} ms, im2col + GEMM {im2col_ms:.1} ms \
                 (largest difference {diff:e}); direct chosen: {}",
                direct_is_faster(&g)
            );
        }
        let mut crossover = 0.0;
        for &d in &densities {
            let mask: Vec<bool> = (0..g.weight_len()).map(|_| rng.next_f64() < d).collect();
            let masked = w.iter().zip(&mask).map(|(&v, &m)| if m { v } else { 0.0 });
            let dense = MaskedConvPlan {
                geometry: g,
                weights: PlanWeights::Dense(masked.collect()),
            };
            let sparse = MaskedConvPlan {
                geometry: g,
                weights: PlanWeights::Sparse(SparseWeight::new(&g, &w, &mask)),
            };
            let ([df, di, dw, td], [f, i, w, ts]) = (time(&dense, &x, &dy), time(&sparse, &x, &dy));
            if ts < td && crossover == 0.0 {
                crossover = d;
            }
            let active = mask.iter().filter(|&&m| m).count();
            let pick = if sparse_is_faster(&g, active) {
                "sparse"
            } else {
                "dense"
            };
            println!(
                "  {d:>5}  {td:>8.1} ({df:.1} + {di:.1} + {dw:.1})  {ts:>8.1} ({f:.1} + {i:.1} + {w:.1})  {pick}"
            );
        }
        println!("  sparse form faster from density {crossover} down");
    }
}
