//! The training stack on burn's Wgpu backend, which this project has no kernels for: built
//! with `--features wgpu` (`cargo check -p ast-tests --features wgpu --tests`), it proves that
//! `ast-core`'s layers and step, the models and `ast-train`'s loop take any `B: Backend` (a
//! trait the user would have to implement, and could not, would fail this build). CI has no
//! GPU, so it only compiles; the test itself runs where a Wgpu adapter exists.
#![cfg(feature = "wgpu")]

use ast_train::consistency::compare_backends;
use burn::backend::{Autodiff, Flex, Wgpu};

#[test]
#[ignore = "needs a GPU adapter; run with --ignored where one exists"]
fn twenty_ast_steps_on_wgpu_agree_with_flex() {
    let c = compare_backends::<Autodiff<Flex>, Autodiff<Wgpu>>(
        20,
        1,
        &Default::default(),
        &Default::default(),
    )
    .unwrap();
    assert!(c.agrees(1e-3, 1e-3), "{c:?}");
}
