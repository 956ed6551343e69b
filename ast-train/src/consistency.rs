//! The same AST steps on two backends (e.g. CUDA against Flex): same initial weights, same
//! inputs, same schedule with ramp and prune-and-regrow events; the losses and final masks are
//! compared.
//!
//! The model is a small CIFAR ResNet (ResNet-8, widths 8/16/32): two backends round
//! differently, and in a layer of `n` weights the values at a top-k boundary are ~1/n apart, so
//! a large model may flip boundary positions (near-ties) that say nothing about correctness.

use ast_core::rng::MaskRng;
use ast_core::subnet::{mask_vec, read_masks};
use ast_core::{AstConfig, AstStep, MaskScheduleConfig, SubnetTarget};
use ast_models::{CifarResNet, CifarResNetConfig};
use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::error::{Result, TrainError};

/// Iterations per "epoch" of the check's schedule: with [`train_small`]'s schedule, pruning
/// and prune-and-regrow both happen within 20 iterations.
const STEPS_PER_EPOCH: usize = 5;

/// What the two runs gave.
#[derive(Debug, Clone, Serialize)]
pub struct Consistency {
    /// Loss of every iteration on the reference backend.
    pub reference_losses: Vec<f32>,
    /// Loss of every iteration on the backend under test.
    pub losses: Vec<f32>,
    /// Largest `|a − b| / max(1, |b|)` over the iterations.
    pub max_loss_difference: f32,
    /// Mask events of each run.
    pub events: [usize; 2],
    /// Kept weights of each sub-net on the reference backend and on the one under test.
    pub kept: Vec<[usize; 2]>,
    /// Mask positions (all sub-nets) and how many of them differ.
    pub mask_positions: usize,
    /// Positions whose mask differs between the backends.
    pub mask_differences: usize,
}

impl Consistency {
    /// Whether the runs agree: losses within `loss_tolerance`, the same mask events and kept
    /// counts, and at most `max_mask_difference` of the mask positions differing (near-ties).
    pub fn agrees(&self, loss_tolerance: f32, max_mask_difference: f64) -> bool {
        self.max_loss_difference <= loss_tolerance
            && self.events[0] == self.events[1]
            && self.kept.iter().all(|k| k[0] == k[1])
            && (self.mask_differences as f64) <= max_mask_difference * self.mask_positions as f64
    }
}

/// Runs `steps` AST iterations (three sub-nets at 0.5 / 0.2 / 0.05, batch 8 of 16×16 images)
/// on `R` and on `T` from the same weights and inputs.
pub fn compare_backends<R, T>(
    steps: usize,
    seed: u64,
    reference: &R::Device,
    tested: &T::Device,
) -> Result<Consistency>
where
    R: AutodiffBackend,
    T: AutodiffBackend,
{
    if steps == 0 {
        return Err(TrainError::Config {
            field: "steps",
            reason: "must be ≥ 1".into(),
        });
    }
    R::seed(reference, seed);
    let reference_model = small_resnet::<R>(reference);
    let mut weights = FloatParams::default();
    reference_model.visit(&mut weights);
    let tested_model = small_resnet::<T>(tested).map(&mut Replace {
        values: weights.values.into_iter(),
    });
    let inputs = || MaskRng::new(seed, 7);
    let (reference_losses, reference_events, reference_masks) =
        train_small(reference_model, steps, STEPS_PER_EPOCH, inputs(), reference)?;
    let (losses, events, masks) =
        train_small(tested_model, steps, STEPS_PER_EPOCH, inputs(), tested)?;
    let max_loss_difference = reference_losses
        .iter()
        .zip(&losses)
        .map(|(b, a)| {
            let d = (a - b).abs() / b.abs().max(1.0);
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max);
    let (mut positions, mut differences) = (0, 0);
    let mut kept = Vec::new();
    for (a, b) in reference_masks.iter().zip(&masks) {
        let mut count = [0, 0];
        for (a, b) in a.iter().zip(b) {
            positions += a.len();
            differences += a.iter().zip(b).filter(|(x, y)| x != y).count();
            count[0] += a.iter().filter(|&&x| x).count();
            count[1] += b.iter().filter(|&&x| x).count();
        }
        kept.push(count);
    }
    Ok(Consistency {
        reference_losses,
        losses,
        max_loss_difference,
        events: [reference_events, events],
        kept,
        mask_positions: positions,
        mask_differences: differences,
    })
}

/// The small CIFAR ResNet of the checks (ResNet-8, widths 8/16/32, stride-2 stages with 1×1
/// projection shortcuts, three sub-nets), weights from `B`'s generator.
pub fn small_resnet<B: Backend>(device: &B::Device) -> CifarResNet<B> {
    CifarResNetConfig::new(10, 3, [8, 16, 32], 1, true)
        .with_classifier_std(Some(0.01))
        .init::<B>(device)
}

/// Per iteration the loss; the number of mask events; per sub-net, per masked layer, the final
/// mask.
pub type SmallRun = (Vec<f32>, usize, Vec<Vec<Vec<bool>>>);

/// `steps` AST iterations of [`small_resnet`]: three sub-nets at 0.5 / 0.2 / 0.05, a ramp over
/// the first two epochs of `steps_per_epoch` iterations, mask events every 6 global iterations
/// of a sub-net's counter (pruning and prune-and-regrow), batches of 8 random 16×16 images
/// drawn from `inputs`, SGD at lr 0.05.
pub fn train_small<B: AutodiffBackend>(
    model: CifarResNet<B>,
    steps: usize,
    steps_per_epoch: usize,
    mut inputs: MaskRng,
    device: &B::Device,
) -> Result<SmallRun> {
    let switch = model.switch().clone();
    let mut config = AstConfig::new(vec![
        SubnetTarget::Density(0.5),
        SubnetTarget::Density(0.2),
        SubnetTarget::Density(0.05),
    ]);
    config.schedule = MaskScheduleConfig {
        update_frequency: 6,
        init_prune_epoch: 0,
        final_prune_epoch: 2,
        subnet_offset: 1,
        ..MaskScheduleConfig::default()
    };
    let mut ast = AstStep::<B>::new(config, &model, &switch, steps_per_epoch, steps)?;
    let mut model = ast.init_masks(model);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let (batch, side) = (8, 16);
    let (mut losses, mut events) = (Vec::with_capacity(steps), 0);
    for _ in 0..steps {
        let iteration = ast.begin();
        let pixels: Vec<f32> = (0..batch * 3 * side * side)
            .map(|_| inputs.next_f64() as f32 * 2.0 - 1.0)
            .collect();
        let labels: Vec<i64> = (0..batch)
            .map(|_| (inputs.next_u64() % 10) as i64)
            .collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(pixels, [batch, 3, side, side]), device);
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), device);
        let loss = loss_fn.forward(model.forward(x), y);
        let value = loss.clone().into_data().convert::<f32>().to_vec::<f32>();
        losses.push(
            value
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(f32::NAN),
        );
        let (m, report) = ast.step(model, loss.backward(), iteration, 0.05);
        model = m;
        events += usize::from(report.mask_update.is_some());
    }
    let masks = (0..3)
        .map(|k| Ok(read_masks(&model, k)?.into_iter().map(mask_vec).collect()))
        .collect::<Result<_>>()?;
    Ok((losses, events, masks))
}

/// Every float parameter's values (weights and running statistics), in visiting order.
#[derive(Default)]
struct FloatParams {
    values: Vec<TensorData>,
}

impl<B: Backend> ModuleVisitor<B> for FloatParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.values.push(param.val().into_data().convert::<f32>());
    }
}

/// Gives a model of the same architecture the values of [`FloatParams`], in the same order.
struct Replace {
    values: std::vec::IntoIter<TensorData>,
}

impl<B: Backend> ModuleMapper<B> for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let data = self
            .values
            .next()
            .expect("both models have the same architecture");
        param.map(|t| {
            let grad = t.is_require_grad();
            let t = Tensor::from_data(data, &t.device());
            if grad {
                t.require_grad()
            } else {
                t
            }
        })
    }
}
