//! Picking a sub-net for a latency budget: each sub-net's latency on this machine at the
//! caller's batch size, and the most accurate sub-net within the budget. `ast-cli infer
//! --subnet auto` and `ast-cli eval --latency-budget-ms` both choose with
//! [`best_within_budget`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::model::InferenceModel;

/// The sub-net with the best accuracy among those whose latency is within `budget` (same unit
/// as `latencies`); ties: the faster one, then the lower index. `None` when none is.
///
/// # Panics
/// If `accuracy` and `latencies` differ in length.
pub fn best_within_budget(accuracy: &[f64], latencies: &[f64], budget: f64) -> Option<usize> {
    assert_eq!(accuracy.len(), latencies.len(), "one latency per sub-net");
    (0..accuracy.len())
        .filter(|&s| latencies[s] <= budget)
        .min_by(|&a, &b| {
            accuracy[b]
                .total_cmp(&accuracy[a])
                .then(latencies[a].total_cmp(&latencies[b]))
                .then(a.cmp(&b))
        })
}

/// A sub-net's measured latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median milliseconds per forward pass of the batch.
    pub median_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
}

impl Latency {
    /// The median and 90th percentile of `seconds` (not empty).
    pub fn of(mut seconds: Vec<f64>) -> Self {
        seconds.sort_by(f64::total_cmp);
        let at = |q: f64| 1000.0 * seconds[((seconds.len() - 1) as f64 * q).round() as usize];
        Self {
            median_ms: at(0.5),
            p90_ms: at(0.9),
        }
    }
}

impl InferenceModel {
    /// Each sub-net's latency for a batch of `batch` images (constant input), over `runs`
    /// passes after one warm-up pass, on the current rayon pool.
    pub fn latencies(&self, batch: usize, runs: usize) -> Result<Vec<Latency>> {
        let [c, h, w] = self.input_shape();
        let images: Vec<f32> = (0..batch * c * h * w)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        (0..self.subnets())
            .map(|k| {
                let mut seconds = Vec::with_capacity(runs);
                for run in 0..=runs.max(1) {
                    let start = Instant::now();
                    self.forward_subnet(k, &images, batch)?;
                    if run > 0 {
                        seconds.push(start.elapsed().as_secs_f64());
                    }
                }
                Ok(Latency::of(seconds))
            })
            .collect()
    }

    /// The most accurate sub-net (by the file's top-1; by density where the file has no
    /// accuracies) whose median latency here at batch `batch` is within `budget_ms`, with the
    /// latencies measured.
    pub fn pick_within_budget(
        &self,
        budget_ms: f64,
        batch: usize,
        runs: usize,
    ) -> Result<(usize, Vec<Latency>)> {
        let latencies = self.latencies(batch, runs)?;
        let medians: Vec<f64> = latencies.iter().map(|l| l.median_ms).collect();
        let subnets = &self.header().subnets;
        let accuracy: Vec<f64> = match subnets.iter().map(|s| s.top1).collect::<Option<Vec<_>>>() {
            Some(top1) => top1,
            None => subnets.iter().map(|s| s.density).collect(),
        };
        match best_within_budget(&accuracy, &medians, budget_ms) {
            Some(k) => Ok((k, latencies)),
            None => Err(InferError::NoneWithinBudget {
                budget_ms,
                fastest_ms: medians.iter().copied().fold(f64::INFINITY, f64::min),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_accurate_sub_net_within_the_budget_by_hand() {
        let top1 = [0.92, 0.90, 0.85];
        let lat = [10.0, 6.0, 3.0];
        assert_eq!(best_within_budget(&top1, &lat, 1000.0), Some(0));
        assert_eq!(best_within_budget(&top1, &lat, 10.0), Some(0));
        assert_eq!(best_within_budget(&top1, &lat, 9.9), Some(1));
        assert_eq!(best_within_budget(&top1, &lat, 4.0), Some(2));
        assert_eq!(best_within_budget(&top1, &lat, 2.0), None);
        // Equal accuracy: the faster one; equal both: the lower index.
        assert_eq!(best_within_budget(&[0.9, 0.9, 0.8], &lat, 1000.0), Some(1));
        assert_eq!(best_within_budget(&[0.9, 0.9], &[5.0, 5.0], 5.0), Some(0));
    }

    #[test]
    fn percentiles_by_hand() {
        let l = Latency::of((1..=10).rev().map(|ms| ms as f64 / 1000.0).collect());
        // Sorted 1..10 ms: index round(9·0.5) = 5 (rounds half away from zero) → 6 ms, index
        // round(9·0.9) = 8 → 9 ms.
        assert!(
            (l.median_ms - 6.0).abs() < 1e-9 && (l.p90_ms - 9.0).abs() < 1e-9,
            "{l:?}"
        );
    }
}
