//! Flex on the kernels against burn's generic operations (`generic_masked_conv2d`,
//! `generic_batch_norm_train`): outputs and every gradient on random shapes (and densities).

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

use ast_kernels::conv::ConvGeometry;
use ast_kernels::test_support::{geometry, rel_err, TestRng};

use crate::backend::{
    batch_norm_train, generic_batch_norm_train, generic_masked_conv2d, masked_conv2d, NormOptions,
};

type AD = Autodiff<Flex>;

struct Case {
    geometry: ConvGeometry,
    density: f64,
    bias: bool,
}

fn vec_of<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

/// Runs the fast and the generic path on the same data; returns the max relative errors of
/// (output, input gradient, weight gradient at active positions, dense weight gradient).
fn compare(case: &Case, seed: u64) -> [f32; 4] {
    let g = case.geometry;
    let device = Default::default();
    let mut rng = TestRng::new(seed);
    let x = rng.values(g.batch * g.in_len());
    let w = rng.values(g.weight_len());
    let b = rng.values(g.c_out);
    let mask: Vec<bool> = (0..g.weight_len())
        .map(|_| rng.next_f64() < case.density)
        .collect();
    let wdims = [g.c_out, g.c_in / g.groups, g.kernel[0], g.kernel[1]];
    let options = ConvOptions::new(g.stride, g.padding, g.dilation, g.groups);
    let [ho, wo] = g.out_hw().unwrap();
    let dy = rng.values(g.batch * g.c_out * ho * wo);

    let run = |fast: bool, dense_grad: bool| {
        let xt = Tensor::<AD, 4>::from_data(
            TensorData::new(x.clone(), [g.batch, g.c_in, g.in_hw[0], g.in_hw[1]]),
            &device,
        )
        .require_grad();
        let wt =
            Tensor::<AD, 4>::from_data(TensorData::new(w.clone(), wdims), &device).require_grad();
        let mt = Tensor::<AD, 4, Bool>::from_data(TensorData::new(mask.clone(), wdims), &device);
        let bt = case
            .bias
            .then(|| Tensor::<AD, 1>::from_data(TensorData::new(b.clone(), [g.c_out]), &device));
        let y = if fast {
            // Odd seeds feed the convolution an intermediate tensor, which its backward holds
            // alone: ∂x then goes into that tensor's buffer (the path of a real model); even
            // seeds feed the leaf itself, whose buffer the test still holds.
            let input = if seed % 2 == 1 {
                xt.clone() * 1.0
            } else {
                xt.clone()
            };
            masked_conv2d::<AD>(input, wt.clone(), mt, bt, options.clone(), dense_grad)
        } else {
            generic_masked_conv2d(xt.clone(), wt.clone(), mt, bt, options.clone())
        };
        let dyt = Tensor::<AD, 4>::from_data(
            TensorData::new(dy.clone(), [g.batch, g.c_out, ho, wo]),
            &device,
        );
        let grads = (y.clone() * dyt).sum().backward();
        (
            vec_of(y.inner()),
            vec_of(xt.grad(&grads).unwrap()),
            vec_of(wt.grad(&grads).unwrap()),
        )
    };
    let (y0, dx0, dw0) = run(false, true);
    let (y1, dx1, dw1) = run(true, false);
    let (_, _, dw_dense) = run(true, true);
    let active = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(&mask)
            .map(|(&x, &m)| if m { x } else { 0.0 })
            .collect()
    };
    [
        rel_err(&y1, &y0),
        rel_err(&dx1, &dx0),
        rel_err(&active(&dw1), &active(&dw0)),
        rel_err(&dw_dense, &dw0),
    ]
}

#[test]
fn fast_path_equals_burns_convolution_on_random_shapes_and_densities() {
    let mut shapes = vec![
        geometry(4, [16, 16], 8, 3, 1, 1, 1),
        geometry(3, [16, 32], 9, 3, 2, 1, 1),
        geometry(2, [32, 64], 6, 1, 2, 0, 1),
        geometry(5, [8, 8], 7, 1, 1, 0, 1),
        geometry(2, [3, 16], 10, 3, 1, 0, 1),
        geometry(2, [32, 32], 8, 3, 1, 1, 32),
        geometry(3, [16, 16], 9, 3, 2, 1, 16),
        geometry(2, [8, 16], 6, 3, 1, 1, 2),
        geometry(1, [128, 128], 4, 3, 1, 1, 1),
        geometry(64, [16, 16], 5, 3, 1, 1, 1),
        ConvGeometry {
            dilation: [2, 2],
            ..geometry(2, [8, 8], 9, 3, 1, 2, 1)
        },
        ConvGeometry {
            stride: [1, 2],
            ..geometry(2, [8, 8], 9, 3, 1, 1, 1)
        },
        geometry(2, [8, 8], 9, 3, 3, 1, 8),
        // Rows of 16, 32 and 64 values (whole vectors, no partial row at a block edge).
        ConvGeometry {
            in_hw: [5, 16],
            ..geometry(2, [8, 8], 5, 3, 1, 1, 1)
        },
        ConvGeometry {
            in_hw: [3, 32],
            ..geometry(2, [16, 8], 3, 3, 1, 1, 1)
        },
        ConvGeometry {
            in_hw: [6, 32],
            ..geometry(2, [8, 8], 6, 3, 2, 1, 1)
        },
        ConvGeometry {
            in_hw: [2, 64],
            ..geometry(2, [4, 4], 2, 3, 1, 1, 1)
        },
        // Planes cut into several im2col tiles (dense form).
        geometry(2, [64, 16], 24, 3, 1, 1, 1),
        geometry(2, [64, 16], 25, 3, 2, 1, 2),
        // The direct dense kernels (stride 1, one group, planes of 256 positions and more;
        // the weight gradient for 3×3 kernels with a multiple of 32 output channels): few
        // input channels, padding 0 and 2, a 5×5 kernel and 13 output channels (a part
        // block), dilation, 9 samples (two weight-gradient chunks), 32/64/96 output channels
        // (2, 4, 2·3 vectors per block).
        geometry(3, [5, 32], 16, 3, 1, 1, 1),
        geometry(9, [12, 64], 17, 3, 1, 0, 1),
        geometry(2, [7, 13], 16, 5, 1, 2, 1),
        ConvGeometry {
            dilation: [2, 2],
            ..geometry(2, [8, 8], 18, 3, 1, 2, 1)
        },
        geometry(2, [4, 96], 6, 3, 1, 1, 1),
        // Tiles of 930 positions: the dense weight gradient's blocked transpose of `dy`.
        geometry(2, [8, 16], 30, 3, 1, 1, 1),
        geometry(2, [8, 16], 30, 3, 1, 1, 2),
    ];
    // Random shapes: batch 1–64, channels 3–128, stride 1/2, padding 0/1, 1×1/3×3.
    let mut rng = TestRng::new(7);
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    for _ in 0..6 {
        let kernel = [1, 3][pick(2)];
        shapes.push(geometry(
            1 + pick(64),
            [3 + pick(126), 3 + pick(30)],
            kernel + 2 + pick(8),
            kernel,
            1 + pick(2),
            pick(2),
            1,
        ));
    }
    for (i, geometry) in shapes.into_iter().enumerate() {
        for density in [1.0, 0.5, 0.05, 0.0] {
            let case = Case {
                geometry,
                density,
                bias: i % 2 == 0,
            };
            let errs = compare(&case, i as u64);
            assert!(
                errs.iter().all(|&e| e <= 1e-4),
                "{geometry:?} at density {density}: relative errors {errs:?} \
                 (output, input grad, active weight grad, dense weight grad)"
            );
        }
    }
}

/// Batch norm (with residual and ReLU) through the kernels and through burn's operations
/// (`generic_batch_norm_train`): output, statistics and every gradient.
fn compare_norm(shape: [usize; 4], residual: bool, relu: bool, seed: u64) -> f32 {
    let device = Default::default();
    let [n, c, h, w] = shape;
    let mut rng = TestRng::new(seed);
    // Shifted and scaled so that the mean is far from zero, as after a convolution with bias.
    let x: Vec<f32> = rng
        .values(n * c * h * w)
        .iter()
        .map(|v| 3.0 * v + 1.5)
        .collect();
    let r = rng.values(x.len());
    let gamma = rng.values(c);
    let beta = rng.values(c);
    let dy = rng.values(x.len());
    let norm = NormOptions {
        epsilon: 1e-5,
        relu,
    };
    let run = |fast: bool| {
        let tensor = |v: &[f32]| {
            Tensor::<AD, 4>::from_data(TensorData::new(v.to_vec(), shape), &device).require_grad()
        };
        let vector = |v: &[f32]| {
            Tensor::<AD, 1>::from_data(TensorData::new(v.to_vec(), [c]), &device).require_grad()
        };
        let (xt, rt, gt, bt) = (tensor(&x), tensor(&r), vector(&gamma), vector(&beta));
        let res = residual.then(|| rt.clone());
        let out = if fast {
            batch_norm_train::<AD>(xt.clone(), gt.clone(), bt.clone(), res, norm)
        } else {
            generic_batch_norm_train(xt.clone(), gt.clone(), bt.clone(), res, norm)
        };
        let grads = (out.y.clone() * tensor(&dy)).sum().backward();
        let mut all = vec![
            vec_of(out.y.inner()),
            vec_of(out.mean.inner()),
            vec_of(out.var.inner()),
            vec_of(xt.grad(&grads).unwrap()),
            vec_of(gt.grad(&grads).unwrap()),
            vec_of(bt.grad(&grads).unwrap()),
        ];
        if residual {
            all.push(vec_of(rt.grad(&grads).unwrap()));
        }
        all
    };
    let (fast, generic) = (run(true), run(false));
    assert_eq!(fast.len(), generic.len());
    fast.iter()
        .zip(&generic)
        .map(|(a, b)| rel_err(a, b))
        .fold(0.0, f32::max)
}

#[test]
fn fast_batch_norm_equals_burns_operations_on_random_shapes() {
    let mut rng = TestRng::new(7);
    let mut pick = |lo: usize, hi: usize| lo + (rng.next_f64() * (hi - lo + 1) as f64) as usize;
    for case in 0..24u64 {
        let shape = [pick(1, 9), pick(1, 20), pick(1, 9), pick(1, 9)];
        let (residual, relu) = (case % 2 == 1, case % 4 >= 2);
        let err = compare_norm(shape, residual, relu, case);
        assert!(
            err <= 1e-4,
            "{shape:?} residual {residual} relu {relu}: relative error {err}"
        );
    }
}
