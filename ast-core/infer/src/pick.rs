//! Picking a sub-net for a latency budget: each sub-net's latency on this machine at the
//! caller's batch size, and the most accurate sub-net within the budget. `ast-cli infer
//! --subnet auto` and `ast-cli eval --latency-budget-ms` both choose with
//! [`best_within_budget`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::format::Calibration;
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

/// This machine as a calibration names it: CPU model, SIMD level, threads.
pub fn this_machine() -> (String, String, usize) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    (
        cpu,
        ast_kernels::simd_level().to_string(),
        rayon::current_num_threads(),
    )
}

impl InferenceModel {
    /// The file's calibration for this machine at `batch`, if it has one.
    pub fn calibrated(&self, batch: usize) -> Option<&Calibration> {
        let (cpu, simd, threads) = this_machine();
        self.header().calibration.iter().find(|c| {
            c.batch == batch
                && c.cpu == cpu
                && c.simd == simd
                && c.threads == threads
                && c.median_ms.len() == self.subnets()
        })
    }

    /// Each sub-net's latency for a batch of `batch` images (constant input), over `runs`
    /// passes after one warm-up pass, on the current rayon pool.
    pub fn latencies(&self, batch: usize, runs: usize) -> Result<Vec<Latency>> {
        let images = test_images(batch, self.input_shape());
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
    ///
    /// Where the file holds a calibration for this CPU, SIMD level, thread count and batch size
    /// ([`Calibration`]), its medians are used and nothing is measured (the returned
    /// latencies then carry the median as their p90 too).
    pub fn pick_within_budget(
        &self,
        budget_ms: f64,
        batch: usize,
        runs: usize,
    ) -> Result<(usize, Vec<Latency>)> {
        let latencies = match self.calibrated(batch) {
            Some(c) => c
                .median_ms
                .iter()
                .map(|&ms| Latency {
                    median_ms: ms,
                    p90_ms: ms,
                })
                .collect(),
            None => self.latencies(batch, runs)?,
        };
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

/// `batch` fixed images of shape `[c, h, w]` with values spread over [−1, 1), to time passes on.
pub(crate) fn test_images(batch: usize, [c, h, w]: [usize; 3]) -> Vec<f32> {
    (0..batch * c * h * w)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect()
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
    fn a_calibration_for_this_machine_is_read_instead_of_measuring() {
        use crate::format::{with_header, Values};
        use crate::graph::{ConvSpec, Graph, Op};
        use crate::{export, Params, SubnetInfo};
        // A 1×1 convolution and a linear layer; three sub-nets of top-1 90, 80 and 70 %.
        let conv = ConvSpec {
            c_in: 1,
            c_out: 2,
            in_hw: [2, 2],
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias: false,
        };
        let graph = Graph {
            input: [1, 2, 2],
            classes: 2,
            ops: vec![
                Op::Conv {
                    input: 0,
                    output: 1,
                    layer: "c".into(),
                    masked: true,
                    conv,
                    norm: None,
                    residual: None,
                    relu: false,
                },
                Op::GlobalAvgPool {
                    input: 1,
                    output: 2,
                    channels: 2,
                },
                Op::Linear {
                    input: 2,
                    output: 3,
                    layer: "l".into(),
                    masked: false,
                    d_in: 2,
                    d_out: 2,
                    bias: false,
                },
            ],
        };
        let mut params = Params::default();
        params.floats.insert("c.weight".into(), vec![1.0, 2.0]);
        params.floats.insert("l.weight".into(), vec![1.0; 4]);
        let subnets = (0..3)
            .map(|k| {
                params
                    .masks
                    .insert(format!("c.masks.{k}"), vec![true, k != 2]);
                SubnetInfo {
                    trained_index: k,
                    target: "0.5".into(),
                    density: 0.0,
                    top1: Some(90.0 - 10.0 * k as f64),
                    top5: None,
                    evaluated_on: None,
                }
            })
            .collect();
        let null = serde_json::Value::Null;
        let (bytes, mut header) = export("t", &graph, &params, subnets, Values::F32, null).unwrap();
        let (cpu, simd, threads) = this_machine();
        // Stored latencies no real pass takes: within 5 ms only sub-net 1 (4 ms) fits, though
        // sub-net 0 is more accurate; no calibration for batch 2.
        header.calibration.push(Calibration {
            cpu,
            simd,
            threads,
            batch: 1,
            median_ms: vec![100.0, 4.0, 6.0],
        });
        let calibrated = with_header(&bytes, &header).unwrap();
        let model = InferenceModel::from_bytes(&calibrated).unwrap();
        let (k, latencies) = model.pick_within_budget(5.0, 1, 3).unwrap();
        assert_eq!((k, latencies[0].median_ms), (1, 100.0));
        // Another batch size is measured (a pass takes far less than 100 ms): every sub-net
        // fits, the most accurate wins.
        let (k, latencies) = model.pick_within_budget(100.0, 2, 3).unwrap();
        assert_eq!(k, 0);
        assert!(latencies[0].median_ms < 100.0);
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
