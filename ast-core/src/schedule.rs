//! *When* masks change and *how much*: plain functions of the iteration (§4, §5).

use serde::Serialize;

use crate::config::{MaskScheduleConfig, SubnetTarget};
use crate::error::{invalid, Result};

/// Density of the cubic ramp at progress `p ∈ [0, 1]`:
/// `d(p) = 1 − s(p)` with `s(p) = (1 − d_0) + (d_0 − d_k)·(1 − (1 − p)^3)`.
pub fn cubic_density(p: f64, init_density: f64, final_density: f64) -> f64 {
    let p = p.clamp(0.0, 1.0);
    let sparsity =
        (1.0 - init_density) + (init_density - final_density) * (1.0 - (1.0 - p).powi(3));
    1.0 - sparsity
}

/// Fraction of N:M groups made sparse at progress `p`: `q(p) = 1 − (1 − p)^3` (§8).
pub fn nm_sparse_fraction(p: f64) -> f64 {
    1.0 - (1.0 - p.clamp(0.0, 1.0)).powi(3)
}

/// Prune-and-regrow rate at global iteration `t`, decayed by a cosine over `total` iterations
/// from `initial` to `last`. Like the original (a `CosineAnnealingLR` stepped once before each
/// mask step), the rate is read one iteration ahead:
/// `r_t = last + (initial − last)·(1 + cos(π·(t + 1)/total))/2`, held at `last` past `total`.
pub fn cosine_prune_rate(t: usize, total: usize, initial: f64, last: f64) -> f64 {
    let frac = if total == 0 {
        1.0
    } else {
        ((t + 1) as f64 / total as f64).min(1.0)
    };
    last + (initial - last) * 0.5 * (1.0 + (core::f64::consts::PI * frac).cos())
}

/// What a sub-net's mask does at an iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskEvent {
    /// During the ramp: recompute the mask at `progress` (then prune-and-regrow).
    Ramp {
        /// Ramp progress `p ∈ [0, 1]`.
        progress: f64,
    },
    /// After the ramp: prune-and-regrow at constant density.
    Regrow,
}

/// Sub-net `k`'s prune counter at global iteration `t`, `s = t − k·(K·offset + 1)`, or `None`
/// before sub-net `k`'s schedule starts. This is the original code's clock (`pruners/sparse.py`:
/// `(steps[k] − k·offset − 1)·K` with `steps[k]` the sub-net's own 1-based step count), counted
/// in *global* iterations: `update_frequency` and the offsets are global iteration counts.
pub fn prune_counter(
    config: &MaskScheduleConfig,
    subnets: usize,
    k: usize,
    t: usize,
) -> Option<usize> {
    let delay = k * (subnets.max(1) * config.subnet_offset + 1);
    t.checked_sub(delay)
}

/// The mask event of sub-net `k` at global iteration `t` (sub-net `t mod K` trains at `t`).
///
/// The original schedule, exactly (`pruners/sparse.py`, `Mask.step` and `Mask.pruning`): with
/// `s` the [`prune_counter`], `f` the update frequency and `S` iterations per epoch, sub-net `k`
/// has an event when it trains (`t mod K = k`) and `s` is a positive multiple of `f` with
/// `s ≥ init_prune_epoch·S`. `s` is always a multiple of `K` at those iterations, so when `K`
/// does not divide `f` the events fall every `lcm(f, K)` iterations, as in the original.
/// The ramp is counted in events: `c = s/f`, `c_0 = ⌊init_prune_epoch·S/f⌋`,
/// `c_1 = ⌊final_prune_epoch·S/f⌋`; events with `c ≤ c_1` recompute the mask at progress
/// `p = (c − c_0)/(c_1 − c_0)` (1 when `c_1 = c_0`), later events only prune-and-regrow.
pub fn mask_event(
    config: &MaskScheduleConfig,
    subnets: usize,
    k: usize,
    t: usize,
    steps_per_epoch: usize,
) -> Option<MaskEvent> {
    let subnets = subnets.max(1);
    if t % subnets != k {
        return None;
    }
    let s = prune_counter(config, subnets, k, t)?;
    let f = config.update_frequency.max(1);
    if s == 0 || s % f != 0 || s < config.init_prune_epoch * steps_per_epoch {
        return None;
    }
    let count = s / f;
    let first = config.init_prune_epoch * steps_per_epoch / f;
    let last = config.final_prune_epoch * steps_per_epoch / f;
    if count > last {
        return Some(MaskEvent::Regrow);
    }
    let progress = if last > first {
        (count - first) as f64 / (last - first) as f64
    } else {
        1.0
    };
    Some(MaskEvent::Ramp { progress })
}

/// One mask event of a run's timeline (see [`timeline`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScheduledEvent {
    /// Global iteration.
    pub iteration: usize,
    /// The sub-net whose mask changes.
    pub subnet: usize,
    /// Its prune counter `s` (see [`prune_counter`]).
    pub prune_counter: usize,
    /// `"ramp"` (recompute, then prune-and-regrow) or `"regrow"`.
    pub kind: &'static str,
    /// Ramp progress, for ramp events.
    pub progress: Option<f64>,
    /// The density the event aims at: the cubic ramp's, or for N:M sub-nets the density with a
    /// fraction `q(p)` of the groups made N:M; `None` for regrow events (density unchanged).
    pub target_density: Option<f64>,
    /// The prune-and-regrow rate of the event.
    pub prune_rate: f64,
}

/// Every mask event of a run of `total_steps` iterations, in order, without training.
pub fn timeline(
    config: &MaskScheduleConfig,
    subnets: &[SubnetTarget],
    steps_per_epoch: usize,
    total_steps: usize,
) -> Vec<ScheduledEvent> {
    (0..total_steps)
        .filter_map(|t| scheduled_event(config, subnets, t, steps_per_epoch, total_steps))
        .collect()
}

/// The mask event at global iteration `t` of a run of `total_steps` iterations, if any.
pub fn scheduled_event(
    config: &MaskScheduleConfig,
    subnets: &[SubnetTarget],
    t: usize,
    steps_per_epoch: usize,
    total_steps: usize,
) -> Option<ScheduledEvent> {
    let count = subnets.len().max(1);
    let k = t % count;
    let event = mask_event(config, count, k, t, steps_per_epoch)?;
    let progress = match event {
        MaskEvent::Ramp { progress } => Some(progress),
        MaskEvent::Regrow => None,
    };
    let target_density = progress.map(|p| match subnets[k] {
        SubnetTarget::Density(d) => cubic_density(p, config.init_density, d),
        SubnetTarget::Nm { n, m } => 1.0 - nm_sparse_fraction(p) * (1.0 - n as f64 / m as f64),
    });
    Some(ScheduledEvent {
        iteration: t,
        subnet: k,
        prune_counter: prune_counter(config, count, k, t).unwrap_or(0),
        kind: if progress.is_some() { "ramp" } else { "regrow" },
        progress,
        target_density,
        prune_rate: cosine_prune_rate(t, total_steps, config.prune_rate, config.final_prune_rate),
    })
}

/// The global iteration of sub-net `k`'s last ramp event, where it reaches its final density
/// (progress 1, prune counter `c_1·f`), or `None` when no event of its schedule has progress 1:
/// `c_1 = 0`, the counter `c_1·f` lies before `init_prune_epoch`, or it is not a multiple of `K`
/// (the sub-net never trains at that counter value).
pub fn final_ramp_iteration(
    config: &MaskScheduleConfig,
    subnets: usize,
    k: usize,
    steps_per_epoch: usize,
) -> Option<usize> {
    let subnets = subnets.max(1);
    let f = config.update_frequency.max(1);
    let s = config.final_prune_epoch * steps_per_epoch / f * f;
    if s == 0 || s < config.init_prune_epoch * steps_per_epoch || !s.is_multiple_of(subnets) {
        return None;
    }
    Some(s + k * (subnets * config.subnet_offset + 1))
}

/// Checks that every sub-net listed in `pruned` reaches its final density within
/// `total_steps` iterations; the error names the sub-net and what to change.
pub fn check_reaches_final_density(
    config: &MaskScheduleConfig,
    subnets: usize,
    pruned: &[usize],
    steps_per_epoch: usize,
    total_steps: usize,
) -> Result<()> {
    for &k in pruned {
        let problem = match final_ramp_iteration(config, subnets, k, steps_per_epoch) {
            Some(t) if t < total_steps => continue,
            Some(t) => format!(
                "puts sub-net {k}'s last ramp event at iteration {t}, past the run's \
                 {total_steps} iterations: lower `update_frequency`, `subnet_offset` or \
                 `final_prune_epoch`, or train longer"
            ),
            None => format!(
                "never gives sub-net {k} its final density: no mask event falls on the ramp's \
                 end (update_frequency {} with {subnets} sub-nets, {steps_per_epoch} iterations \
                 per epoch, ramp epochs {}..{}); make `update_frequency` a multiple of the number \
                 of sub-nets and at most final_prune_epoch × iterations per epoch",
                config.update_frequency, config.init_prune_epoch, config.final_prune_epoch
            ),
        };
        return Err(invalid("schedule", problem));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn cubic_ramp_start_middle_end() {
        // dense start, final density 0.1: s(0) = 0, s(1/2) = 0.9·(1 − 1/8) = 0.7875, s(1) = 0.9.
        close(cubic_density(0.0, 1.0, 0.1), 1.0);
        close(cubic_density(0.5, 1.0, 0.1), 1.0 - 0.7875);
        close(cubic_density(1.0, 1.0, 0.1), 0.1);
        // from init density 0.5: s(1/2) = 0.5 + 0.4·0.875 = 0.85.
        close(cubic_density(0.5, 0.5, 0.1), 0.15);
        close(cubic_density(7.0, 0.5, 0.1), 0.1);
    }

    #[test]
    fn cosine_prune_rate_is_read_one_iteration_ahead() {
        // r_t = 0.005 + 0.495·(1 + cos(π·(t+1)/100))/2: t + 1 = 50 ⇒ 0.2525, t + 1 = 100 ⇒ 0.005.
        close(cosine_prune_rate(49, 100, 0.5, 0.005), 0.2525);
        close(cosine_prune_rate(99, 100, 0.5, 0.005), 0.005);
        close(cosine_prune_rate(150, 100, 0.5, 0.005), 0.005);
        close(cosine_prune_rate(0, 0, 0.5, 0.005), 0.005);
    }

    /// Produced by running the original `Mask` code (`pruners/sparse.py`) with K = 3, densities
    /// 0.5 / 0.2 / 0.1, iteroffset 2, update_frequency 12, 10 iterations per epoch, 10 epochs,
    /// init_prune_epoch 1, final_prune_epoch 6, init density 1, prune rate 0.5 → 0.005
    /// (the fidelity issue's test vector): `t k s target_sparsity prune_rate`, `None` = regrow.
    const ORIGINAL_EVENTS: [(usize, usize, usize, Option<f64>, f64); 22] = [
        (12, 0, 12, Some(0.244), 0.479644),
        (19, 1, 12, Some(0.3904), 0.452732),
        (24, 0, 24, Some(0.392), 0.427509),
        (26, 2, 12, Some(0.4392), 0.416175),
        (31, 1, 24, Some(0.6272), 0.385117),
        (36, 0, 36, Some(0.468), 0.350794),
        (38, 2, 24, Some(0.7056), 0.336338),
        (43, 1, 36, Some(0.7488), 0.298877),
        (48, 0, 48, Some(0.496), 0.260274),
        (50, 2, 36, Some(0.8424), 0.244726),
        (55, 1, 48, Some(0.7936), 0.206123),
        (60, 0, 60, Some(0.5), 0.168662),
        (62, 2, 48, Some(0.8928), 0.154206),
        (67, 1, 60, Some(0.8), 0.119883),
        (72, 0, 72, None, 0.088825),
        (74, 2, 60, Some(0.9), 0.077491),
        (79, 1, 72, None, 0.052268),
        (84, 0, 84, None, 0.031976),
        (86, 2, 72, None, 0.025356),
        (91, 1, 84, None, 0.012776),
        (96, 0, 96, None, 0.006098),
        (98, 2, 84, None, 0.005122),
    ];

    /// The settings [`ORIGINAL_EVENTS`] was produced with (10 iterations per epoch, 100 in all).
    fn original_config() -> MaskScheduleConfig {
        MaskScheduleConfig {
            init_density: 1.0,
            update_frequency: 12,
            init_prune_epoch: 1,
            final_prune_epoch: 6,
            subnet_offset: 2,
            prune_rate: 0.5,
            final_prune_rate: 0.005,
            ..MaskScheduleConfig::default()
        }
    }

    #[test]
    fn events_targets_and_rates_equal_the_original_code() {
        let config = original_config();
        let densities = [0.5, 0.2, 0.1];
        let (subnets, per_epoch, total) = (3, 10, 100);
        let mut events = Vec::new();
        for t in 0..total {
            let k = t % subnets;
            if let Some(event) = mask_event(&config, subnets, k, t, per_epoch) {
                let s = prune_counter(&config, subnets, k, t).unwrap();
                let target = match event {
                    MaskEvent::Ramp { progress } => {
                        Some(1.0 - cubic_density(progress, 1.0, densities[k]))
                    }
                    MaskEvent::Regrow => None,
                };
                let rate = cosine_prune_rate(t, total, 0.5, 0.005);
                events.push((t, k, s, target, rate));
            }
        }
        assert_eq!(events.len(), ORIGINAL_EVENTS.len(), "{events:?}");
        for (got, want) in events.iter().zip(&ORIGINAL_EVENTS) {
            assert_eq!((got.0, got.1, got.2), (want.0, want.1, want.2));
            match (got.3, want.3) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-6, "t {}: {a} vs {b}", got.0),
                (a, b) => assert_eq!(a, b, "t {}", got.0),
            }
            assert!(
                (got.4 - want.4).abs() < 1e-6,
                "t {}: {} vs {}",
                got.0,
                got.4,
                want.4
            );
        }
        // Nothing happens for a sub-net at an iteration another sub-net trains.
        assert_eq!(mask_event(&config, 3, 1, 12, per_epoch), None);
    }

    #[test]
    fn the_ramp_is_counted_in_events_as_in_the_original() {
        // K = 1, S = 10, f = 7, ramp epochs 0..3: c_1 = ⌊30/7⌋ = 4, so the event at s = 28 is the
        // last ramp event with p = 4/4 = 1 (not 28/30), and s = 35 only regrows.
        let config = MaskScheduleConfig {
            update_frequency: 7,
            init_prune_epoch: 0,
            final_prune_epoch: 3,
            subnet_offset: 0,
            ..MaskScheduleConfig::default()
        };
        let event = |t| mask_event(&config, 1, 0, t, 10);
        assert_eq!(event(0), None);
        assert_eq!(event(6), None);
        assert_eq!(event(7), Some(MaskEvent::Ramp { progress: 0.25 }));
        assert_eq!(event(28), Some(MaskEvent::Ramp { progress: 1.0 }));
        assert_eq!(event(35), Some(MaskEvent::Regrow));
        // A ramp starting at epoch 1 (s ≥ 10, c_0 = ⌊10/5⌋ = 2, c_1 = 6) starts at p = 0.
        let late = MaskScheduleConfig {
            update_frequency: 5,
            init_prune_epoch: 1,
            ..config
        };
        let event = |t| mask_event(&late, 1, 0, t, 10);
        assert_eq!(event(5), None, "before init_prune_epoch");
        assert_eq!(event(10), Some(MaskEvent::Ramp { progress: 0.0 }));
        assert_eq!(event(20), Some(MaskEvent::Ramp { progress: 0.5 }));
        assert_eq!(event(30), Some(MaskEvent::Ramp { progress: 1.0 }));
        assert_eq!(event(35), Some(MaskEvent::Regrow));
    }

    #[test]
    fn offsets_are_global_and_events_need_the_subnet_to_train() {
        // K = 2, offset 2: sub-net 1's counter is s = t − 1·(2·2 + 1) = t − 5.
        // f = 3 does not divide into K's rhythm: s is even when sub-net k trains, so events
        // fall every lcm(3, 2) = 6 iterations, as in the original.
        let config = MaskScheduleConfig {
            update_frequency: 3,
            init_prune_epoch: 0,
            final_prune_epoch: 100,
            subnet_offset: 2,
            ..MaskScheduleConfig::default()
        };
        let times = |k: usize| -> Vec<usize> {
            (0..30)
                .filter(|&t| mask_event(&config, 2, k, t, 10).is_some())
                .collect()
        };
        assert_eq!(times(0), vec![6, 12, 18, 24]);
        assert_eq!(times(1), vec![11, 17, 23, 29]);
        assert_eq!(prune_counter(&config, 2, 1, 4), None);
        assert_eq!(prune_counter(&config, 2, 1, 11), Some(6));
    }

    #[test]
    fn a_schedule_that_never_reaches_the_final_density_is_an_error() {
        // K = 3, offset 2, S = 10, ramp epochs 0..3, f = 3: c_1·f = 30, sub-net k's last ramp
        // event is at t = 30 + 7k.
        let config = MaskScheduleConfig {
            update_frequency: 3,
            init_prune_epoch: 0,
            final_prune_epoch: 3,
            subnet_offset: 2,
            ..MaskScheduleConfig::default()
        };
        assert_eq!(final_ramp_iteration(&config, 3, 2, 10), Some(44));
        assert_eq!(
            mask_event(&config, 3, 2, 44, 10),
            Some(MaskEvent::Ramp { progress: 1.0 })
        );
        assert!(check_reaches_final_density(&config, 3, &[0, 1, 2], 10, 45).is_ok());
        let late = check_reaches_final_density(&config, 3, &[0, 1, 2], 10, 44).unwrap_err();
        assert!(
            late.to_string()
                .contains("sub-net 2's last ramp event at iteration 44"),
            "{late}"
        );
        // f = 4 with K = 3: c_1·f = 28 is not a multiple of 3, so no event has progress 1.
        let skewed = MaskScheduleConfig {
            update_frequency: 4,
            ..config.clone()
        };
        assert_eq!(final_ramp_iteration(&skewed, 3, 0, 10), None);
        let never = check_reaches_final_density(&skewed, 3, &[0], 10, 1000).unwrap_err();
        assert!(
            never.to_string().contains("never gives sub-net 0"),
            "{never}"
        );
        // Events rarer than the ramp: c_1 = ⌊30/31⌋ = 0.
        let rare = MaskScheduleConfig {
            update_frequency: 31,
            ..config
        };
        assert_eq!(final_ramp_iteration(&rare, 1, 0, 10), None);
        assert!(check_reaches_final_density(&rare, 1, &[], 10, 1000).is_ok());
    }

    #[test]
    fn the_timeline_lists_the_original_events() {
        let config = original_config();
        let subnets = [0.5, 0.2, 0.1].map(SubnetTarget::Density);
        let events = timeline(&config, &subnets, 10, 100);
        assert_eq!(events.len(), ORIGINAL_EVENTS.len());
        for (e, want) in events.iter().zip(&ORIGINAL_EVENTS) {
            assert_eq!(
                (e.iteration, e.subnet, e.prune_counter),
                (want.0, want.1, want.2)
            );
            assert_eq!(e.kind, if want.3.is_some() { "ramp" } else { "regrow" });
            if let (Some(d), Some(s)) = (e.target_density, want.3) {
                assert!((1.0 - d - s).abs() < 1e-6);
            }
        }
        // N:M at full progress: every group N:M, density N/M.
        let nm = [SubnetTarget::Nm { n: 1, m: 4 }];
        let last = timeline(&config, &nm, 10, 100)
            .into_iter()
            .filter_map(|e| e.target_density)
            .next_back();
        assert_eq!(last, Some(0.25));
    }
}
