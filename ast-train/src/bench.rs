//! Throughput of the AST training step on any backend: switch to sub-net `t mod K`, forward,
//! cross-entropy, backward, gradient masking, masked SGD — the counterpart of the PyTorch
//! baseline `torch_ast_step.py` (same models, random masks of one density, random inputs).
//!
//! Mask updates are not timed: they run once per ~1000 iterations in a real run.

use std::time::Instant;

use ast_core::{AstConfig, AstStep, CorrectionMode, MaskScheduleConfig, SubnetTarget};
use ast_models::{AstModel, ModelKind};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use serde::Serialize;

use crate::error::{Result, TrainError};

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// The model.
    pub model: ModelKind,
    /// Images per step.
    pub batch: usize,
    /// Timed steps (the median is reported).
    pub steps: usize,
    /// Untimed steps first (CUDA compiles and tunes its kernels on the first ones).
    pub warmup: usize,
    /// Number of sub-nets K.
    pub subnets: usize,
    /// Density of every sub-net's random (ERK) mask.
    pub density: f64,
    /// Gradient correction mode.
    pub correction: CorrectionMode,
    /// Seed of the weights, masks and inputs.
    pub seed: u64,
    /// Also time this many plain dense training steps of the same model (one sub-net whose
    /// masks are full, no AST update: burn's SGD with momentum) after one untimed step; 0
    /// skips them.
    pub dense_steps: usize,
    /// Print the first step's time as soon as it is known (on a GPU it compiles the kernels).
    pub progress: bool,
}

impl StepBench {
    /// Refuses sizes and a density no bench can run (before anything is allocated).
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("batch", self.batch),
            ("steps", self.steps),
            ("subnets", self.subnets),
        ] {
            if value == 0 {
                return Err(TrainError::Config {
                    field,
                    reason: "must be ≥ 1".into(),
                });
            }
        }
        if self.batch > MAX_BENCH_BATCH {
            return Err(TrainError::Config {
            field: "batch",
            reason: format!(
                "must be ≤ {MAX_BENCH_BATCH}, got {} (one step holds the whole batch's activations)",
                self.batch
            ),
        });
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(TrainError::Config {
                field: "density",
                reason: format!("must lie in (0, 1], got {}", self.density),
            });
        }
        Ok(())
    }
}

/// Timings of [`StepBench`].
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    /// The model's name.
    pub model: String,
    /// Images per step.
    pub batch: usize,
    /// Seconds of every timed step, in order.
    pub step_s: Vec<f64>,
    /// Median seconds per step.
    pub median_step_s: f64,
    /// Median seconds of the forward pass and loss.
    pub median_forward_s: f64,
    /// Median seconds of the backward pass.
    pub median_backward_s: f64,
    /// Median seconds of the AST update (gradient masking, correction, masked SGD).
    pub median_update_s: f64,
    /// `batch / median_step_s`.
    pub images_per_s: f64,
    /// Median seconds of a step whose backward pass gives the masked weights their gradient at
    /// every position (the mask-event iterations, once per `update_frequency`), mask update
    /// itself not included.
    pub median_dense_grad_step_s: f64,
    /// Seconds of the very first AST step (on a GPU: kernel compilation and autotuning).
    pub first_step_s: f64,
    /// Images per second of the plain dense step, when timed.
    pub dense_images_per_s: Option<f64>,
    /// Seconds of the first plain dense step, when timed.
    pub dense_first_step_s: Option<f64>,
}

/// The largest batch `step_throughput` accepts: far beyond any real one, and small enough that
/// a typo is refused before anything is allocated.
pub const MAX_BENCH_BATCH: usize = 65_536;

/// Runs `bench.warmup + bench.steps` AST steps of `bench.model` on `device` and times each one
/// up to the end of its device work.
pub fn step_throughput<B>(bench: &StepBench, device: &B::Device) -> Result<StepTiming>
where
    B: AutodiffBackend,
{
    bench.validate()?;
    let mut config = AstConfig::new(vec![SubnetTarget::Density(bench.density); bench.subnets]);
    config.correction = bench.correction;
    config.seed = bench.seed;
    config.schedule = MaskScheduleConfig {
        init_density: bench.density,
        update_frequency: usize::MAX,
        ..Default::default()
    };
    config.validate()?;
    B::seed(device, bench.seed);
    let classes = 10;
    let side = bench.model.image_size();
    let model = AstModel::<B>::new(bench.model, classes, bench.subnets, device);
    let switch = model.switch().clone();
    let total = bench.warmup + bench.steps;
    let mut ast = AstStep::<B>::new(config, &model, &switch, total, total)?;
    let mut model = ast.init_masks(model);
    let x = Tensor::<B, 4>::random([bench.batch, 3, side, side], Distribution::Default, device);
    let labels: Vec<i64> = (0..bench.batch as i64)
        .map(|i| i % classes as i64)
        .collect();
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [bench.batch]), device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let sync = || B::sync(device).map_err(|e| TrainError::Device(format!("{e:?}")));
    // Per timed step: [total, forward, backward, update] seconds.
    let mut phases: Vec<[f64; 4]> = Vec::with_capacity(bench.steps);
    let mut dense_grad_steps = Vec::new();
    let dense_grad_from = total;
    let mut first_step_s = 0.0;
    for i in 0..total + bench.steps.min(3) {
        let start = Instant::now();
        let iteration = ast.begin();
        if i >= dense_grad_from {
            switch.set_dense_weight_grad(true);
        }
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        sync()?;
        let forward = start.elapsed().as_secs_f64();
        let grads = loss.backward();
        sync()?;
        let backward = start.elapsed().as_secs_f64();
        model = ast.step(model, grads, iteration, 0.1).0;
        sync()?;
        let end = start.elapsed().as_secs_f64();
        if i == 0 {
            first_step_s = end;
            if bench.progress {
                eprintln!("first step done in {end:.2} s");
            }
        }
        if i >= dense_grad_from {
            dense_grad_steps.push(end);
        } else if i >= bench.warmup {
            phases.push([end, forward, backward - forward, end - backward]);
        }
    }
    let phase = |i: usize| median(phases.iter().map(|p| p[i]).collect());
    let median_step_s = phase(0);
    drop((model, ast));
    let dense = (bench.dense_steps > 0)
        .then(|| dense_step_times::<B>(bench, x, y, device))
        .transpose()?;
    Ok(StepTiming {
        model: bench.model.to_string(),
        batch: bench.batch,
        step_s: phases.iter().map(|p| p[0]).collect(),
        median_step_s,
        median_forward_s: phase(1),
        median_backward_s: phase(2),
        median_update_s: phase(3),
        images_per_s: bench.batch as f64 / median_step_s,
        median_dense_grad_step_s: median(dense_grad_steps),
        first_step_s,
        dense_images_per_s: dense
            .as_ref()
            .map(|(_, steps)| bench.batch as f64 / median(steps.clone())),
        dense_first_step_s: dense.map(|(first, _)| first),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The first and the timed seconds of plain dense training steps: a fresh one-sub-net model
/// whose masks stay full, cross-entropy, backward, burn's SGD with momentum 0.9.
fn dense_step_times<B>(
    bench: &StepBench,
    x: Tensor<B, 4>,
    y: Tensor<B, 1, Int>,
    device: &B::Device,
) -> Result<(f64, Vec<f64>)>
where
    B: AutodiffBackend,
{
    let mut model = AstModel::<B>::new(bench.model, 10, 1, device);
    let mut optim = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .init::<B, AstModel<B>>();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut times = Vec::with_capacity(bench.dense_steps + 1);
    for _ in 0..=bench.dense_steps {
        let start = Instant::now();
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.1, model, grads);
        B::sync(device).map_err(|e| TrainError::Device(format!("{e:?}")))?;
        times.push(start.elapsed().as_secs_f64());
    }
    let first = times.remove(0);
    Ok((first, times))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn times_every_requested_step_and_rejects_empty_work() {
        let bench = StepBench {
            model: ModelKind::SmallCnn,
            batch: 4,
            steps: 3,
            warmup: 1,
            subnets: 2,
            density: 0.2,
            correction: CorrectionMode::Projection,
            seed: 1,
            dense_steps: 2,
            progress: false,
        };
        let t = step_throughput::<Autodiff<Flex>>(&bench, &Default::default()).unwrap();
        assert_eq!(t.step_s.len(), 3);
        assert!(t.step_s.iter().all(|&s| s > 0.0));
        assert!(t.step_s.contains(&t.median_step_s));
        assert!((t.images_per_s - 4.0 / t.median_step_s).abs() < 1e-9);
        assert!(t.first_step_s > 0.0 && t.dense_first_step_s.is_some_and(|s| s > 0.0));
        assert!(t
            .dense_images_per_s
            .is_some_and(|v| v.is_finite() && v > 0.0));
        let longest = t.step_s.iter().copied().fold(0.0, f64::max);
        for part in [t.median_forward_s, t.median_backward_s, t.median_update_s] {
            assert!(part > 0.0 && part <= longest, "{t:?}");
        }
        let empty = StepBench { steps: 0, ..bench };
        assert!(step_throughput::<Autodiff<Flex>>(&empty, &Default::default()).is_err());
    }
}
