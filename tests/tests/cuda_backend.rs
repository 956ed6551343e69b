//! CUDA against Flex: the same 20 AST steps (a small ResNet, three sub-nets, ramp and
//! prune-and-regrow events) from the same weights and inputs give losses within 1e-3 and the
//! same masks but for near-ties, with kernel fusion on and off.
//!
//! Built with `--features cuda` only. Without a usable GPU (no NVIDIA driver, or libnvrtc not on
//! `LD_LIBRARY_PATH`) each test prints that it was SKIPPED and passes, unless `AST_REQUIRE_GPU`
//! (or `CI`) is set: then it fails. CI has no GPU and builds this binary only with `clippy`;
//! `scripts/gpu-check.sh` runs it on a GPU machine.
#![cfg(feature = "cuda")]

use ast_core::backend::cuda::{CudaDevice, CudaFused, CudaUnfused};
use ast_train::consistency::compare_backends;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

/// Device 0 when a tiny computation runs on it.
fn gpu<B: Backend<Device = CudaDevice>>(test: &str) -> Option<CudaDevice> {
    let device = CudaDevice { index: 0 };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        Tensor::<B, 1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
    });
    std::panic::set_hook(hook);
    match probe {
        Ok(Ok(v)) if v == [3.0] => Some(device),
        _ => {
            let fix = "no usable CUDA device (needs an NVIDIA GPU, its driver and libnvrtc on \
                       LD_LIBRARY_PATH)";
            ast_tests::require(false, "GPU", test, fix);
            None
        }
    }
}

fn check<B>(test: &str)
where
    B: Backend<Device = CudaDevice>,
{
    let Some(device) = gpu::<B>(test) else {
        return;
    };
    let c = compare_backends::<Autodiff<Flex>, Autodiff<B>>(20, 1, &Default::default(), &device)
        .unwrap();
    eprintln!(
        "{test}: largest loss difference {:.2e}, {} of {} mask positions differ, events {:?}",
        c.max_loss_difference, c.mask_differences, c.mask_positions, c.events
    );
    assert!(c.agrees(1e-3, 1e-3), "{c:?}");
}

#[test]
fn cuda_with_fusion_trains_like_flex() {
    check::<CudaFused>("cuda_with_fusion_trains_like_flex");
}

#[test]
fn cuda_without_fusion_trains_like_flex() {
    check::<CudaUnfused>("cuda_without_fusion_trains_like_flex");
}
