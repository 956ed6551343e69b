//! The backend-generic engine on NdArray, which has no fast path of ours (burn's operations
//! only), in f32 and in f64: the same AST steps as on Flex give the same losses and the same
//! mask densities (the NdArray backend is selectable with `--backend ndarray`).

use ast_core::subnet::read_masks;
use ast_core::testing::{synthetic_batch, TinyNet};
use ast_core::{AstConfig, AstStep, MaskScheduleConfig, SubnetSwitch, SubnetTarget};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

fn run<B: AutodiffBackend>() -> (Vec<f32>, Vec<TensorData>) {
    let device = Default::default();
    let switch = SubnetSwitch::new();
    let model = TinyNet::<B>::new(2, &switch, &device);
    // Same initial weights on both backends: constant fill, so only the arithmetic differs.
    let model = model.map(&mut Fill);
    let mut config = AstConfig::new(vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.25),
    ]);
    config.schedule = MaskScheduleConfig {
        update_frequency: 2,
        final_prune_epoch: 1,
        subnet_offset: 1,
        ..Default::default()
    };
    let mut ast = AstStep::<B>::new(config, &model, &switch, 8, 12).unwrap();
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut losses = Vec::new();
    for t in 0..12 {
        let iteration = ast.begin();
        let (x, y) = synthetic_batch::<B>(8, t, &device);
        let loss = loss_fn.forward(model.forward(x), y);
        losses.push(loss.clone().into_scalar().elem::<f32>());
        model = ast.step(model, loss.backward(), iteration, 0.05).0;
    }
    (losses, read_masks(&model, 1).unwrap())
}

struct Fill;

impl<B: Backend> burn::module::ModuleMapper<B> for Fill {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        param.map(|t| {
            if !t.is_require_grad() {
                return t; // running statistics keep their initial values
            }
            let n = t.shape().num_elements();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.4)
                .collect();
            Tensor::from_data(TensorData::new(values, t.shape()), &t.device()).require_grad()
        })
    }
}

#[test]
fn ndarray_and_flex_agree_on_losses_and_masks() {
    let (flex_losses, flex_masks) = run::<Autodiff<Flex>>();
    assert_agree(&flex_losses, &flex_masks, run::<Autodiff<NdArray>>());
}

#[test]
fn ndarray_in_f64_and_flex_agree_on_losses_and_masks() {
    let (flex_losses, flex_masks) = run::<Autodiff<Flex>>();
    assert_agree(&flex_losses, &flex_masks, run::<Autodiff<NdArray<f64>>>());
}

fn assert_agree(
    flex_losses: &[f32],
    flex_masks: &[TensorData],
    (nd_losses, nd_masks): (Vec<f32>, Vec<TensorData>),
) {
    for (a, b) in flex_losses.iter().zip(&nd_losses) {
        assert!(
            a.is_finite() && (a - b).abs() < 1e-3,
            "flex {a} vs ndarray {b}"
        );
    }
    // Masks are computed on the host from each backend's weights: equal densities, and all
    // but near-ties agree.
    let (mut same, mut total, mut kept) = (0usize, 0usize, [0usize; 2]);
    for (a, b) in flex_masks.iter().zip(nd_masks) {
        let (a, b) = (a.to_vec::<bool>().unwrap(), b.to_vec::<bool>().unwrap());
        kept[0] += a.iter().filter(|&&x| x).count();
        kept[1] += b.iter().filter(|&&x| x).count();
        same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    assert_eq!(kept[0], kept[1]);
    assert!(
        same as f64 >= 0.98 * total as f64,
        "{same} of {total} mask bits agree"
    );
}

/// The backend check `ast-cli check-backend` runs (against CUDA on a GPU) passes for NdArray
/// against Flex, and its verdict fails a run whose loss is off.
#[test]
fn the_backend_check_passes_for_ndarray_against_flex() {
    use ast_train::consistency::compare_backends;
    let c = compare_backends::<Autodiff<Flex>, Autodiff<NdArray>>(
        20,
        1,
        &Default::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(c.losses.len(), 20);
    assert!(c.events[0] >= 4, "{c:?}");
    assert!(c.kept.iter().all(|k| k[0] > 0), "{c:?}");
    assert!(c.agrees(1e-3, 1e-3), "{c:?}");
    let mut off = c.clone();
    off.max_loss_difference = 0.01;
    assert!(!off.agrees(1e-3, 1e-3));
    let mut flipped = c;
    flipped.mask_differences = flipped.mask_positions / 100;
    assert!(!flipped.agrees(1e-3, 1e-3));
}
