//! Every kernel gives the same bits at every SIMD level: run here at the CPU's own level, then
//! limited to AVX2 (the register blocking of 16-register machines, whatever this CPU has) and
//! to no SIMD. A process of its own, since the limit holds for the whole process.

use ast_kernels::conv::direct::{forward_direct, weight_grad_direct, DirectWeight};
use ast_kernels::conv::{
    ConvGeometry, Epilogue, ForwardPlan, GradBuffers, MaskedConvPlan, PlanWeights, SparseWeight,
};
use ast_kernels::norm::{self, NormShape};
use ast_kernels::test_support::{geometry, TestRng};
use ast_kernels::{limit_simd, simd_level, SimdLimit};

/// Every kernel's outputs on fixed inputs, as bits.
fn outputs() -> Vec<Vec<u32>> {
    let mut rng = TestRng::new(11);
    let mut out = Vec::new();
    let mut keep = |v: &[f32]| out.push(v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
    // Direct dense forward and weight gradient: odd channel counts leave partial blocks.
    let g: ConvGeometry = geometry(3, [13, 19], 16, 3, 1, 1, 1);
    let (x, dy) = (
        rng.values(g.batch * g.in_len()),
        rng.values(g.batch * g.out_len()),
    );
    let w = rng.values(g.weight_len());
    let mut y = vec![0.0; g.batch * g.out_len()];
    forward_direct(&g, &x, &DirectWeight::new(&g, &w), &mut y);
    keep(&y);
    let mut dw = vec![0.0; g.weight_len()];
    weight_grad_direct(&g, &x, &dy, &mut dw);
    keep(&dw);
    // The sparse form: forward, input and weight gradients, the fused backward; stride 1 and 2.
    for stride in [1, 2] {
        let g = geometry(3, [13, 19], 12, 3, stride, 1, 1);
        let (x, dy) = (
            rng.values(g.batch * g.in_len()),
            rng.values(g.batch * g.out_len()),
        );
        let w = rng.values(g.weight_len());
        let mask = rng.mask(g.weight_len(), 0.2);
        let plan = MaskedConvPlan {
            geometry: g,
            weights: PlanWeights::Sparse(SparseWeight::new(&g, &w, &mask)),
        };
        keep(&plan.forward(&x));
        keep(&plan.input_grad(&dy));
        keep(&plan.weight_grad(&x, &dy, false));
        let mut dx = vec![0.0; x.len()];
        if let Some(dw) = plan.sparse_grads(GradBuffers::Separate {
            x: &x,
            dy: &dy,
            dx: &mut dx,
        }) {
            keep(&dw);
            keep(&dx);
        }
        // The inference plan, both forms, with its epilogue.
        for sparse in [true, false] {
            let g1 = ConvGeometry { batch: 1, ..g };
            let plan = ForwardPlan::with_form(g1, &w, &mask, sparse);
            let (bias, residual) = (rng.values(g.c_out), rng.values(g1.out_len()));
            let mut y = vec![0.0; g1.out_len()];
            let epilogue = Epilogue {
                bias: &bias,
                residual: Some(&residual),
                relu: true,
            };
            plan.forward(
                &x[..g1.in_len()],
                &mut y,
                &mut plan.scratch(),
                Some(epilogue),
            );
            keep(&y);
        }
    }
    // Batch norm with the residual and ReLU, forward and backward.
    let shape = NormShape {
        batch: 4,
        channels: 5,
        plane: 37,
    };
    let (x, r, dy) = (
        rng.values(shape.len()),
        rng.values(shape.len()),
        rng.values(shape.len()),
    );
    let (gamma, beta) = (rng.values(5), rng.values(5));
    let (y, stats) = norm::forward(&shape, &x, &gamma, &beta, 1e-5, Some(&r), true);
    keep(&y);
    let inv_std = norm::inv_std(&stats.var, 1e-5);
    // The gate read from the output, and as bytes written by the forward.
    let (_, mask, _) = norm::forward_masked(&shape, &x, &gamma, &beta, 1e-5, Some(&r));
    keep(&mask.iter().map(|&m| f32::from(m)).collect::<Vec<_>>());
    for gate in [norm::ReluGate::Output(&y), norm::ReluGate::Mask(&mask)] {
        let grads = norm::backward(
            &shape,
            &x,
            gate,
            dy.clone(),
            &stats.mean,
            &inv_std,
            &gamma,
            true,
        );
        keep(&grads.x);
        keep(&grads.gamma);
        keep(&grads.beta);
        keep(grads.residual.as_deref().expect("asked for"));
    }
    out
}

#[test]
fn every_kernel_gives_the_same_bits_at_every_simd_level() {
    let native = (simd_level(), outputs());
    limit_simd(SimdLimit::Avx2);
    let avx2 = (simd_level(), outputs());
    limit_simd(SimdLimit::Scalar);
    let scalar = (simd_level(), outputs());
    limit_simd(SimdLimit::Native);
    assert_eq!(scalar.0, "scalar");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert_eq!(avx2.0, "AVX2+FMA");
    }
    for (level, outputs) in [avx2, scalar] {
        assert_eq!(outputs.len(), native.1.len());
        for (i, (a, b)) in outputs.iter().zip(&native.1).enumerate() {
            assert!(a == b, "output {i} at {level} differs from {}", native.0);
        }
    }
}
