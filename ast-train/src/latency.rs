//! Picking a sub-net for a latency budget: each sub-net's inference time on this machine and
//! backend (its density decides how much work its masked layers do), and the most accurate
//! sub-net that runs within the budget.

use std::time::Instant;

use burn::prelude::*;

use crate::error::{Result, TrainError};
use crate::metrics::SubnetMetrics;
use ast_models::AstModel;

/// Median seconds of one inference forward pass of `x` through each sub-net of `model`, over
/// `runs` passes after one warm-up pass (the device is synchronised after each). The active
/// sub-net is restored.
pub fn subnet_latencies<B: Backend>(
    model: &AstModel<B>,
    x: &Tensor<B, 4>,
    runs: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    if runs == 0 {
        return Err(TrainError::config("latency_runs", "must be ≥ 1"));
    }
    let k = ast_core::subnet::subnet_count(&ast_core::subnet::masked_layers(model))?;
    let switch = model.switch().clone();
    let active = switch.get();
    let sync = || B::sync(device).map_err(|e| TrainError::Device(format!("{e:?}")));
    let mut latencies = Vec::with_capacity(k);
    for s in 0..k {
        switch.set(s);
        let mut times = Vec::with_capacity(runs);
        for run in 0..=runs {
            let start = Instant::now();
            let y = model.forward(x.clone());
            sync()?;
            drop(y);
            if run > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        latencies.push(times[times.len() / 2]);
    }
    switch.set(active);
    Ok(latencies)
}

/// The sub-net with the best top-1 among those whose latency is within `budget_s` seconds
/// (ties: the faster one, then the lower index), or `None` when none is: the runtime's
/// [`ast_infer::best_within_budget`] on the evaluated top-1.
///
/// # Panics
/// If `metrics` and `latencies` differ in length.
pub fn best_within_budget(
    metrics: &[SubnetMetrics],
    latencies: &[f64],
    budget_s: f64,
) -> Option<usize> {
    let top1: Vec<f64> = metrics.iter().map(|m| m.top1).collect();
    ast_infer::best_within_budget(&top1, latencies, budget_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_ranks_the_evaluated_top1() {
        let metrics: Vec<SubnetMetrics> = [0.92, 0.90, 0.85]
            .iter()
            .enumerate()
            .map(|(subnet, &top1)| SubnetMetrics {
                subnet,
                density: 0.1,
                loss: 1.0,
                top1,
                top5: 1.0,
            })
            .collect();
        let lat = [0.010, 0.006, 0.003];
        assert_eq!(best_within_budget(&metrics, &lat, 0.0099), Some(1));
        assert_eq!(best_within_budget(&metrics, &lat, 0.002), None);
    }

    #[test]
    fn latencies_are_measured_per_sub_net_and_the_switch_is_restored() {
        use ast_models::ModelKind;
        use burn::backend::Flex;
        let device = Default::default();
        let model = AstModel::<Flex>::new(ModelKind::SmallCnn, 10, 3, &device);
        model.switch().set(2);
        let x = Tensor::<Flex, 4>::zeros([2, 3, 32, 32], &device);
        let lat = subnet_latencies(&model, &x, 3, &device).unwrap();
        assert_eq!(lat.len(), 3);
        assert!(lat.iter().all(|&t| t > 0.0 && t.is_finite()), "{lat:?}");
        assert_eq!(model.switch().get(), 2);
        assert!(subnet_latencies(&model, &x, 0, &device).is_err());
    }
}
