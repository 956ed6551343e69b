//! Convolution gradients on Flex, computed the way burn does and the alternatives a Flex
//! implementation of `AstBackend::masked_conv2d` with its own backward could use: the input
//! gradient as a transposed convolution (burn) or as a convolution with the flipped, transposed
//! kernel (stride 1); the weight gradient as burn's swapped convolution or unfold + matmul.
//! Each pair is also checked to agree.
//!
//! ```sh
//! cargo bench -p ast-core --bench conv_grads
//! ```

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::module::{conv2d, conv_transpose2d, unfold4d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, UnfoldOptions};
use burn::tensor::Distribution;
use std::time::Instant;

type B = Flex;

fn time<F: FnMut() -> Tensor<B, 4>>(name: &str, mut f: F) -> Tensor<B, 4> {
    let mut out = f();
    let start = Instant::now();
    for _ in 0..3 {
        out = f();
    }
    let _ = out.clone().sum().into_scalar();
    println!(
        "{name}: {:.1} ms",
        start.elapsed().as_secs_f64() * 1000.0 / 3.0
    );
    out
}

/// Prints the largest difference of two results relative to the largest magnitude.
fn report(a: Tensor<B, 4>, b: Tensor<B, 4>) {
    let scale = a.clone().abs().max().into_scalar();
    let diff = (a - b).abs().max().into_scalar();
    println!("  agree to {:.1e} (relative)", diff / scale);
}

fn main() {
    let d = Default::default();
    for (n, c, side) in [(128usize, 16usize, 32usize), (128, 64, 8)] {
        let k = 3;
        let x = Tensor::<B, 4>::random([n, c, side, side], Distribution::Default, &d);
        let w = Tensor::<B, 4>::random([c, c, k, k], Distribution::Default, &d);
        let g = Tensor::<B, 4>::random([n, c, side, side], Distribution::Default, &d);
        println!("n={n} c={c} side={side}");
        let a = time("x-grad conv_transpose2d", || {
            conv_transpose2d(
                g.clone(),
                w.clone(),
                None,
                ConvTransposeOptions::new([1, 1], [1, 1], [0, 0], [1, 1], 1),
            )
        });
        let b = time("x-grad conv2d flipped", || {
            conv2d(
                g.clone(),
                w.clone().swap_dims(0, 1).flip([2, 3]),
                None,
                ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            )
        });
        report(a, b);
        let wa = time("w-grad burn generic", || {
            let xs = x.clone().swap_dims(0, 1);
            let gs = g.clone().swap_dims(0, 1);
            conv2d(xs, gs, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).swap_dims(0, 1)
        });
        let wb = time("w-grad unfold+matmul", || {
            let unf = unfold4d(
                x.clone(),
                [k, k],
                UnfoldOptions::new([1, 1], [1, 1], [1, 1]),
            ); // [n, c*k*k, L]
            let gr = g.clone().reshape([n, c, side * side]); // [n, cout, L]
            gr.matmul(unf.swap_dims(1, 2))
                .sum_dim(0)
                .reshape([c, c, k, k])
        });
        report(wa, wb);
        time("fwd conv2d", || {
            conv2d(
                x.clone(),
                w.clone(),
                None,
                ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            )
        });
    }
}
