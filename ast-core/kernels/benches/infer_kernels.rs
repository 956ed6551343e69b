//! One sample's forward through a [`ForwardPlan`] (the inference runtime's convolution, with
//! its epilogue: bias, residual add and ReLU), in
//! the dense form and in the sparse form across densities, on the convolutions of ResNet-32
//! and wide ResNet-32: microseconds per call (median) and multiply-adds per second (the active
//! ones for the sparse form, all of them for the dense form), one thread.
//!
//! ```sh
//! cargo bench -p ast-kernels --bench infer_kernels
//! cargo bench -p ast-kernels --bench infer_kernels -- 0.1 0.02   # only these densities
//! cargo bench -p ast-kernels --bench infer_kernels -- 0 sparse    # the sparse form's fixed costs
//! ```

use std::time::Instant;

use ast_kernels::conv::{ConvGeometry, Epilogue, ForwardPlan};
use ast_kernels::test_support::TestRng;

const DENSITIES: [f64; 5] = [0.5, 0.3, 0.1, 0.05, 0.02];

fn geometry(c_in: usize, c_out: usize, hw: usize, stride: usize) -> ConvGeometry {
    ConvGeometry {
        batch: 1,
        c_in,
        in_hw: [hw, hw],
        c_out,
        kernel: [3, 3],
        stride: [stride, stride],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
    }
}

/// Median microseconds of one forward of `plan` with its epilogue, over 11 runs of as many
/// calls as take 20 ms.
fn median_us(plan: &ForwardPlan, x: &[f32], y: &mut [f32]) -> f64 {
    let g = plan.geometry();
    let bias = vec![0.5; g.c_out];
    let residual = vec![0.25; g.out_len()];
    let epilogue = Epilogue {
        bias: &bias,
        residual: Some(&residual),
        relu: true,
    };
    let mut scratch = plan.scratch();
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed().as_secs_f64() < 0.02 {
        plan.forward(x, y, &mut scratch, Some(epilogue));
        calls += 1;
    }
    let mut runs: Vec<f64> = (0..11)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                plan.forward(x, y, &mut scratch, Some(epilogue));
            }
            start.elapsed().as_secs_f64() * 1e6 / calls as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[5]
}

fn main() {
    let chosen: Vec<f64> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let sparse_only = std::env::args().any(|a| a == "sparse");
    let densities = if chosen.is_empty() {
        DENSITIES.to_vec()
    } else {
        chosen
    };
    let mut rng = TestRng::new(1);
    let shapes = [
        ("16 ch, 32×32", geometry(16, 16, 32, 1)),
        ("32 ch, 16×16", geometry(32, 32, 16, 1)),
        ("64 ch, 8×8", geometry(64, 64, 8, 1)),
        ("32 ch, 32×32", geometry(32, 32, 32, 1)),
        ("64 ch, 16×16", geometry(64, 64, 16, 1)),
        ("128 ch, 8×8", geometry(128, 128, 8, 1)),
        ("16 → 32 ch, 32×32, stride 2", geometry(16, 32, 32, 2)),
    ];
    println!("shape | form | density | µs per call | GMAC/s");
    for (name, g) in shapes {
        let x = rng.values(g.in_len());
        let w = rng.values(g.weight_len());
        let mut y = vec![0.0; g.out_len()];
        let macs = |active: usize| (active * g.out_plane()) as f64;
        if !sparse_only {
            let dense = ForwardPlan::with_form(g, &w, &vec![true; w.len()], false);
            let us = median_us(&dense, &x, &mut y);
            println!(
                "{name} | dense | 1 | {us:.1} | {:.1}",
                macs(w.len()) / us / 1e3
            );
        }
        for &d in &densities {
            let mask = rng.mask(w.len(), d);
            let active = mask.iter().filter(|&&m| m).count();
            let sparse = ForwardPlan::with_form(g, &w, &mask, true);
            let us = median_us(&sparse, &x, &mut y);
            println!(
                "{name} | sparse | {d} | {us:.1} | {:.1}",
                macs(active) / us / 1e3
            );
        }
    }
}
