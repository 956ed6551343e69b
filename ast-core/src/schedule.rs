//! *When* masks change and *how much*: plain functions of the iteration (§4, §5).

use crate::config::MaskScheduleConfig;

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

/// Prune-and-regrow rate at global iteration `t` of `total`, decayed by a cosine from
/// `initial` to `last`: `r_t = last + (initial − last)·(1 + cos(π·t/total))/2`.
pub fn cosine_prune_rate(t: usize, total: usize, initial: f64, last: f64) -> f64 {
    let frac = if total == 0 {
        1.0
    } else {
        (t as f64 / total as f64).min(1.0)
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

/// The mask event of sub-net `k` at global iteration `t` (sub-net `t mod subnets` trains at `t`).
///
/// Sub-net `k` counts its own iterations `n = t / K`, shifted by its offset: `e = n − k·offset`.
/// Events fall on `e = f, 2f, 3f, …` (`f` = update frequency). With `S` iterations per epoch a
/// sub-net makes `S/K` own iterations per epoch, so the ramp spans `e ∈ [i0, i1]`,
/// `i0 = init_prune_epoch·S/K`, `i1 = final_prune_epoch·S/K`, and its progress is
/// `p = (e − i0)/(i1 − i0)`. The first event at or past `i1` still belongs to the ramp with
/// `p = 1`, so every sub-net, offset or not, reaches its final density; later events regrow.
pub fn mask_event(
    config: &MaskScheduleConfig,
    subnets: usize,
    k: usize,
    t: usize,
    steps_per_epoch: usize,
) -> Option<MaskEvent> {
    let subnets = subnets.max(1);
    let own = t / subnets;
    let delay = k * config.subnet_offset;
    if own <= delay {
        return None;
    }
    let e = own - delay;
    let f = config.update_frequency.max(1);
    if e % f != 0 {
        return None;
    }
    let per_epoch = steps_per_epoch as f64 / subnets as f64;
    let i0 = config.init_prune_epoch as f64 * per_epoch;
    let i1 = config.final_prune_epoch as f64 * per_epoch;
    let e = e as f64;
    if e < i0 {
        return None;
    }
    if e - (f as f64) < i1 {
        let progress = if i1 > i0 {
            ((e - i0) / (i1 - i0)).min(1.0)
        } else {
            1.0
        };
        Some(MaskEvent::Ramp { progress })
    } else {
        Some(MaskEvent::Regrow)
    }
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
    fn cosine_prune_rate_decays_from_initial_to_last() {
        close(cosine_prune_rate(0, 100, 0.5, 0.005), 0.5);
        close(cosine_prune_rate(50, 100, 0.5, 0.005), 0.2525);
        close(cosine_prune_rate(100, 100, 0.5, 0.005), 0.005);
    }

    #[test]
    fn events_follow_frequency_ramp_and_offset() {
        // K = 2, 20 iterations per epoch ⇒ 10 own iterations per epoch; ramp over epochs 1..=3
        // ⇒ own iterations 10..=30; events every 5 own iterations; offset 10 own iterations.
        let config = MaskScheduleConfig {
            update_frequency: 5,
            init_prune_epoch: 1,
            final_prune_epoch: 3,
            subnet_offset: 10,
            ..MaskScheduleConfig::default()
        };
        let event = |k: usize, own: usize| mask_event(&config, 2, k, own * 2 + k, 20);
        assert_eq!(event(0, 5), None, "before the ramp");
        assert_eq!(event(0, 11), None, "not on the frequency");
        assert_eq!(event(0, 10), Some(MaskEvent::Ramp { progress: 0.0 }));
        assert_eq!(event(0, 20), Some(MaskEvent::Ramp { progress: 0.5 }));
        assert_eq!(event(0, 30), Some(MaskEvent::Ramp { progress: 1.0 }));
        assert_eq!(event(0, 35), Some(MaskEvent::Regrow));
        // sub-net 1 is delayed by 1·10 own iterations: the same events, 10 own iterations later.
        for own in 0..60 {
            let shifted = if own >= 10 { event(0, own - 10) } else { None };
            assert_eq!(event(1, own), shifted, "own iteration {own}");
        }
    }

    #[test]
    fn the_first_event_past_the_ramp_end_reaches_full_progress() {
        // Events every 7 own iterations, ramp ends at 30: events at 28 (p = 28/30) and 35 (p = 1).
        let config = MaskScheduleConfig {
            update_frequency: 7,
            init_prune_epoch: 0,
            final_prune_epoch: 3,
            subnet_offset: 0,
            ..MaskScheduleConfig::default()
        };
        assert_eq!(
            mask_event(&config, 1, 0, 28, 10),
            Some(MaskEvent::Ramp {
                progress: 28.0 / 30.0
            })
        );
        assert_eq!(
            mask_event(&config, 1, 0, 35, 10),
            Some(MaskEvent::Ramp { progress: 1.0 })
        );
        assert_eq!(mask_event(&config, 1, 0, 42, 10), Some(MaskEvent::Regrow));
    }
}
