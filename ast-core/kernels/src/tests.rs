//! The kernels against their definitions and each other: hand-computed cases, the dense forms
//! against a naive input gradient, direct against im2col, fused against separate, sparse and
//! dense picked as the cost model says, bit-identical results whatever the thread count, and
//! pooled outputs overwritten everywhere. (Against burn's operations: `ast-core`'s Flex tests.)

use crate::conv::dense::{
    direct_grad_suits, direct_suits, forward_im2col, input_grad_dense, weight_grad_im2col,
};
use crate::conv::direct::{forward_direct, weight_grad_direct, DirectWeight};
use crate::conv::{
    sparse_is_faster, ConvGeometry, GradBuffers, MaskedConvPlan, PlanWeights, SparseWeight,
};
use crate::norm::{self, NormShape};
use crate::pool;
use crate::test_support::{geometry, rel_err, TestRng};

/// `∂L/∂x` by the definition: every output position adds `w · dy` to the input it read.
fn naive_input_grad(g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let [ho, wo] = g.out_hw().unwrap();
    let [h, wi] = g.in_hw;
    let (cig, cog) = (g.c_in / g.groups, g.c_out / g.groups);
    let mut dx = vec![0.0f64; g.batch * g.in_len()];
    for n in 0..g.batch {
        for co in 0..g.c_out {
            let grp = co / cog;
            for ci in 0..cig {
                for ky in 0..g.kernel[0] {
                    for kx in 0..g.kernel[1] {
                        let wv = w[((co * cig + ci) * g.kernel[0] + ky) * g.kernel[1] + kx];
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize
                                    - g.padding[0] as isize;
                                let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize
                                    - g.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wi as isize {
                                    continue;
                                }
                                let d = dy[((n * g.c_out + co) * ho + oy) * wo + ox];
                                let at = ((n * g.c_in + grp * cig + ci) * h + iy as usize) * wi
                                    + ix as usize;
                                dx[at] += f64::from(wv) * f64::from(d);
                            }
                        }
                    }
                }
            }
        }
    }
    dx.into_iter().map(|v| v as f32).collect()
}

#[test]
fn dense_input_gradient_equals_its_definition() {
    // Stride 1 runs as the forward of the flipped, transposed kernel: "same" and smaller
    // padding, dilation, groups, a 1×3 kernel; stride 2 and 1×1 keep the col2im path.
    let shapes = [
        geometry(2, [8, 12], 7, 3, 1, 1, 1),
        geometry(2, [8, 12], 7, 3, 1, 0, 1),
        geometry(2, [8, 12], 9, 3, 1, 1, 2),
        ConvGeometry {
            dilation: [2, 2],
            ..geometry(2, [6, 4], 9, 3, 1, 1, 1)
        },
        ConvGeometry {
            dilation: [2, 2],
            ..geometry(2, [6, 4], 9, 3, 1, 2, 2)
        },
        ConvGeometry {
            kernel: [1, 3],
            padding: [0, 1],
            ..geometry(3, [5, 7], 6, 3, 1, 1, 1)
        },
        geometry(2, [8, 12], 9, 3, 2, 1, 1),
        geometry(2, [8, 12], 6, 1, 1, 0, 1),
    ];
    let mut rng = TestRng::new(11);
    for g in shapes {
        let [ho, wo] = g.out_hw().unwrap();
        let dy = rng.values(g.batch * g.c_out * ho * wo);
        let w = rng.values(g.weight_len());
        let mut dx = vec![f32::NAN; g.batch * g.in_len()];
        input_grad_dense(&g, &dy, &w, &mut dx);
        let want = naive_input_grad(&g, &dy, &w);
        for (i, (a, b)) in dx.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{g:?} at {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn plans_pick_the_form_the_cost_model_expects_to_be_faster() {
    // 64 channels at 8×8 (P = 64, span 78 rounded up to 80): sparse below
    // 7.8·64^−0.2/64^0.45 · 36 864·64 / (80 + 60) ≈ 8 805 active weights (density 0.239).
    let g = geometry(1, [64, 64], 8, 3, 1, 1, 1);
    let g = ConvGeometry { in_hw: [8, 8], ..g };
    assert!(sparse_is_faster(&g, 8_800));
    assert!(!sparse_is_faster(&g, 8_811));
    let w = vec![1.0; g.weight_len()];
    let dense = MaskedConvPlan::new(g, &w, &vec![true; g.weight_len()]);
    assert!(matches!(dense.weights, PlanWeights::Dense(_)));
    let few: Vec<bool> = (0..g.weight_len()).map(|i| i % 20 == 0).collect();
    assert!(matches!(
        MaskedConvPlan::new(g, &w, &few).weights,
        PlanWeights::Sparse(_)
    ));
    // 32 channels at 32×32 (direct dense form, crossover ≈ 0.29): dense at density 0.5, where
    // the sparse form measured 1.4× slower, and sparse at density 0.2.
    let big = ConvGeometry {
        in_hw: [32, 32],
        ..geometry(1, [32, 32], 32, 3, 1, 1, 1)
    };
    assert!(!sparse_is_faster(&big, big.weight_len() / 2));
    assert!(sparse_is_faster(&big, big.weight_len() / 5));
    // Depthwise: always sparse (a GEMM of one row per group).
    let dw = geometry(1, [4, 4], 5, 3, 1, 1, 4);
    let all = vec![true; dw.weight_len()];
    assert!(matches!(
        MaskedConvPlan::new(dw, &vec![1.0; dw.weight_len()], &all).weights,
        PlanWeights::Sparse(_)
    ));
}

#[test]
fn sparse_weight_by_hand() {
    // Two output channels of one 1×2 input-channel pair (kernel 1×1, 2 inputs):
    // w = [[1, 2], [3, 4]], mask = [[true, false], [false, true]].
    let g = ConvGeometry {
        in_hw: [1, 1],
        ..geometry(1, [2, 2], 1, 1, 1, 0, 1)
    };
    let s = SparseWeight::new(&g, &[1.0, 2.0, 3.0, 4.0], &[true, false, false, true]);
    assert_eq!(s.row_start, vec![0, 1, 2]);
    assert_eq!(s.index, vec![0, 3]);
    assert_eq!(s.value, vec![1.0, 4.0]);
    // x = [5, 7] (1×1 pixels): y = [1·5, 4·7].
    let plan = MaskedConvPlan {
        geometry: g,
        weights: PlanWeights::Sparse(s),
    };
    assert_eq!(plan.forward(&[5.0, 7.0]), vec![5.0, 28.0]);
    // dy = [1, 1]: dx = [1, 4]; sampled dw = [x0·dy0, 0, 0, x1·dy1] = [5, 0, 0, 7].
    assert_eq!(plan.input_grad(&[1.0, 1.0]), vec![1.0, 4.0]);
    assert_eq!(
        plan.weight_grad(&[5.0, 7.0], &[1.0, 1.0], false),
        vec![5.0, 0.0, 0.0, 7.0]
    );
    // The dense gradient has every position: dw[co][ci] = dy[co]·x[ci].
    assert_eq!(
        plan.weight_grad(&[5.0, 7.0], &[1.0, 1.0], true),
        vec![5.0, 7.0, 5.0, 7.0]
    );
}

/// A batch norm's inputs: 6 samples of 5 channels, planes of 37 values (no whole vector at
/// the end).
struct NormCase {
    shape: NormShape,
    x: Vec<f32>,
    residual: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl NormCase {
    fn new(seed: u64) -> Self {
        let shape = NormShape {
            batch: 6,
            channels: 5,
            plane: 37,
        };
        let mut rng = TestRng::new(seed);
        let [x, residual, dy] = [(); 3].map(|_| rng.values(shape.len()));
        let [gamma, beta] = [(); 2].map(|_| rng.values(5));
        NormCase {
            shape,
            x,
            residual,
            dy,
            gamma,
            beta,
        }
    }

    /// The forward with the residual and ReLU.
    fn forward(&self) -> (Vec<f32>, norm::BatchStats) {
        let (x, r) = (&self.x, Some(&self.residual[..]));
        norm::forward(&self.shape, x, &self.gamma, &self.beta, 1e-5, r, true)
    }

    /// The backward from the forward's statistics, `∂r` wanted.
    fn backward(&self, gate: norm::ReluGate<'_>, stats: &norm::BatchStats) -> norm::NormGrads {
        let inv_std = norm::inv_std(&stats.var, 1e-5);
        let (dy, mean) = (self.dy.clone(), &stats.mean);
        norm::backward(
            &self.shape,
            &self.x,
            gate,
            dy,
            mean,
            &inv_std,
            &self.gamma,
            true,
        )
    }
}

fn threads(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

#[test]
fn batch_norm_kernels_are_bit_identical_whatever_the_thread_count() {
    let case = NormCase::new(3);
    let run = |n: usize| {
        threads(n).install(|| {
            let (y, stats) = case.forward();
            let grads = case.backward(norm::ReluGate::Output(&y), &stats);
            (y, stats, grads)
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn the_relu_gate_as_bytes_gives_the_bits_of_the_gate_read_from_the_output() {
    // About half the outputs cut by the ReLU; one and three threads.
    let case = NormCase::new(4);
    let (y, stats) = case.forward();
    assert!(y.iter().filter(|&&v| v == 0.0).count() > case.shape.len() / 4);
    let expected = case.backward(norm::ReluGate::Output(&y), &stats);
    let opened: Vec<u8> = y.iter().map(|&v| u8::from(v > 0.0)).collect();
    for n in [1, 3] {
        let (y_masked, mask, masked_stats) = threads(n).install(|| {
            let (x, r) = (&case.x, Some(&case.residual[..]));
            norm::forward_masked(&case.shape, x, &case.gamma, &case.beta, 1e-5, r)
        });
        assert_eq!((&y_masked, &mask, &masked_stats), (&y, &opened, &stats));
        let grads = threads(n).install(|| case.backward(norm::ReluGate::Mask(&mask), &stats));
        assert_eq!(grads, expected);
    }
}

#[test]
fn direct_kernels_equal_im2col_and_do_not_depend_on_the_thread_count() {
    // 3×3 "same" at 16×17 with 32 output channels (both direct kernels), 5 input channels,
    // 11 samples (two weight-gradient chunks, the second short).
    let g = geometry(11, [5, 32], 16, 3, 1, 1, 1);
    assert!(direct_suits(&g) && direct_grad_suits(&g));
    let mut rng = TestRng::new(5);
    let x = rng.values(g.batch * g.in_len());
    let w = rng.values(g.weight_len());
    let dy = rng.values(g.batch * g.out_len());
    let run = |n: usize| {
        threads(n).install(|| {
            let mut y = vec![f32::NAN; g.batch * g.out_len()];
            forward_direct(&g, &x, &DirectWeight::new(&g, &w), &mut y);
            let mut dw = vec![f32::NAN; g.weight_len()];
            weight_grad_direct(&g, &x, &dy, &mut dw);
            (y, dw)
        })
    };
    let (y, dw) = run(1);
    assert_eq!((y.clone(), dw.clone()), run(3));
    let mut y_ref = vec![0.0; y.len()];
    forward_im2col(&g, &x, &w, &mut y_ref);
    let mut dw_ref = vec![0.0; dw.len()];
    weight_grad_im2col(&g, &x, &dy, &mut dw_ref);
    assert!(
        rel_err(&y, &y_ref) <= 1e-5,
        "forward {}",
        rel_err(&y, &y_ref)
    );
    assert!(
        rel_err(&dw, &dw_ref) <= 1e-5,
        "weight grad {}",
        rel_err(&dw, &dw_ref)
    );
}

#[test]
fn fused_sparse_gradients_equal_the_separate_kernels_bit_for_bit() {
    let shapes = [
        // 11 samples: a short last chunk; "same" padding, so ∂x may go over dy.
        geometry(11, [6, 6], 9, 3, 1, 1, 1),
        // No padding, other channel counts, a 5×5 kernel, dilation.
        geometry(3, [5, 7], 9, 3, 1, 0, 1),
        geometry(2, [4, 4], 10, 5, 1, 2, 1),
        ConvGeometry {
            dilation: [2, 2],
            ..geometry(2, [3, 5], 9, 3, 1, 2, 1)
        },
    ];
    for (i, g) in shapes.into_iter().enumerate() {
        let mut rng = TestRng::new(i as u64);
        let x = rng.values(g.batch * g.in_len());
        let w = rng.values(g.weight_len());
        let dy = rng.values(g.batch * g.out_len());
        let mask = rng.mask(g.weight_len(), 0.3);
        let plan = MaskedConvPlan {
            geometry: g,
            weights: PlanWeights::Sparse(SparseWeight::new(&g, &w, &mask)),
        };
        let (dx, dw) = (plan.input_grad(&dy), plan.weight_grad(&x, &dy, false));
        let mut over_input = x.clone();
        let fused = plan.sparse_grads(GradBuffers::OverInput {
            x: &mut over_input,
            dy: &dy,
        });
        assert_eq!(fused.as_ref(), Some(&dw), "{g:?}: weight gradient over x");
        assert_eq!(over_input, dx, "{g:?}: input gradient over x");
        let mut separate = vec![f32::NAN; dx.len()];
        let fused = plan.sparse_grads(GradBuffers::Separate {
            x: &x,
            dy: &dy,
            dx: &mut separate,
        });
        assert_eq!(
            (fused.as_ref(), &separate),
            (Some(&dw), &dx),
            "{g:?}: separate"
        );
        if dy.len() == dx.len() {
            let mut over_dy = dy.clone();
            let fused = plan.sparse_grads(GradBuffers::OverDy {
                x: &x,
                dy: &mut over_dy,
            });
            assert_eq!(
                (fused.as_ref(), &over_dy),
                (Some(&dw), &dx),
                "{g:?}: over dy"
            );
        }
    }
    // Not fused: a stride of 2, the dense form.
    let g = geometry(2, [4, 4], 9, 3, 2, 1, 1);
    let w = vec![1.0; g.weight_len()];
    let all = vec![true; g.weight_len()];
    let (x, dy) = (
        vec![0.0; g.batch * g.in_len()],
        vec![0.0; g.batch * g.out_len()],
    );
    let mut dx = vec![0.0; x.len()];
    let strided = MaskedConvPlan {
        geometry: g,
        weights: PlanWeights::Sparse(SparseWeight::new(&g, &w, &all)),
    };
    assert!(strided
        .sparse_grads(GradBuffers::Separate {
            x: &x,
            dy: &dy,
            dx: &mut dx
        })
        .is_none());
    let g = geometry(2, [4, 4], 9, 3, 1, 1, 1);
    let dense = MaskedConvPlan {
        geometry: g,
        weights: PlanWeights::Dense(vec![1.0; g.weight_len()]),
    };
    let (x, dy) = (
        vec![0.0; g.batch * g.in_len()],
        vec![0.0; g.batch * g.out_len()],
    );
    let mut dx = vec![0.0; x.len()];
    assert!(dense
        .sparse_grads(GradBuffers::Separate {
            x: &x,
            dy: &dy,
            dx: &mut dx
        })
        .is_none());
}

#[test]
fn outputs_taken_from_the_pool_are_overwritten_everywhere() {
    // Lengths above `pool::MIN_LEN` that no other test uses (the pool is process-wide).
    let g = geometry(3, [7, 9], 61, 3, 1, 1, 1);
    let mut rng = TestRng::new(9);
    let x = rng.values(g.batch * g.in_len());
    let w = rng.values(g.weight_len());
    let dy = rng.values(g.batch * g.out_len());
    let poison = |len: usize| pool::give(vec![f32::NAN; len]);
    for density in [1.0, 0.1] {
        let mask: Vec<bool> = (0..g.weight_len())
            .map(|_| rng.next_f64() < density)
            .collect();
        let plan = MaskedConvPlan::new(g, &w, &mask);
        let (y, dx) = (plan.forward(&x), plan.input_grad(&dy));
        poison(y.len());
        poison(dx.len());
        assert_eq!(
            (plan.forward(&x), plan.input_grad(&dy)),
            (y, dx),
            "density {density}"
        );
    }
    let shape = NormShape {
        batch: 3,
        channels: 7,
        plane: 61 * 62,
    };
    let (gamma, beta) = (rng.values(7), rng.values(7));
    let run = || {
        let (y, stats) = norm::forward(&shape, &x, &gamma, &beta, 1e-5, Some(&x), true);
        let inv_std = norm::inv_std(&stats.var, 1e-5);
        let grads = norm::backward(
            &shape,
            &x,
            norm::ReluGate::Output(&y),
            x.clone(),
            &stats.mean,
            &inv_std,
            &gamma,
            true,
        );
        (y, grads)
    };
    let first = run();
    poison(shape.len());
    poison(shape.len());
    assert_eq!(run(), first);
}
