//! Gradient correction between consecutive sub-nets (§7).
//!
//! With `g` the current sub-net's masked gradient of a layer and `h` the reference (the previous
//! iteration's masked gradient, or the previous sub-net's gradient EMA): if `g·h < 0`,
//! `g ← g − (g·h/‖h‖²)·h`, then `g ← g ⊙ M_k`. The uncorrected `g` is what the next iteration
//! compares with. Computed branch-free on the device (no host synchronisation per layer).

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::config::CorrectionMode;

/// `g − (min(g·h, 0)/‖h‖²)·h`: removes the component of `g` that opposes `h`; leaves `g`
/// untouched when `g·h ≥ 0` or `h = 0`.
pub fn project_conflicting<B: Backend>(g: Tensor<B, 1>, h: Tensor<B, 1>) -> Tensor<B, 1> {
    let dot = (g.clone() * h.clone()).sum();
    let norm2 = (h.clone() * h.clone()).sum();
    let coef = dot.clamp_max(0.0) / norm2.clamp_min(1e-30);
    g - h * coef
}

/// The references kept between iterations, per masked layer (flat gradients).
#[derive(Debug, Clone)]
pub struct CorrectionState<B: Backend> {
    mode: CorrectionMode,
    subnets: usize,
    /// Projection: the previous iteration's uncorrected masked gradient per layer.
    pub previous: Vec<Option<Tensor<B, 1>>>,
    /// EMA variant: per sub-net, per layer, the EMA of its uncorrected masked gradients.
    pub ema: Vec<Vec<Option<Tensor<B, 1>>>>,
}

impl<B: Backend> CorrectionState<B> {
    /// Empty references for `layers` masked layers and `subnets` sub-nets.
    pub fn new(mode: CorrectionMode, layers: usize, subnets: usize) -> Self {
        let ema_subnets = if matches!(mode, CorrectionMode::Ema { .. }) {
            subnets
        } else {
            0
        };
        Self {
            mode,
            subnets,
            previous: vec![None; layers],
            ema: vec![vec![None; layers]; ema_subnets],
        }
    }

    /// Corrects sub-net `k`'s masked gradient `g` of layer `l` (mask `mask`, flat) and records
    /// the reference for the next iteration. With one sub-net there is nothing to correct against.
    pub fn correct(
        &mut self,
        k: usize,
        l: usize,
        g: Tensor<B, 1>,
        mask: &Tensor<B, 1, Bool>,
    ) -> Tensor<B, 1> {
        if matches!(self.mode, CorrectionMode::Off) {
            return g;
        }
        // The references and the projection are kept in f32 whatever the model's precision
        // (a no-op for f32 models), so that bf16/f16 training corrects like f32 training.
        let dtype = g.dtype();
        let g = g.cast(FloatDType::F32);
        let reference = match self.mode {
            CorrectionMode::Off => None,
            CorrectionMode::Projection => self.previous[l].replace(g.clone()),
            CorrectionMode::Ema { beta } => {
                let prev_subnet = (k + self.subnets - 1) % self.subnets;
                let reference = self.ema[prev_subnet][l].clone();
                let updated = match self.ema[k][l].take() {
                    Some(m) => m * beta + g.clone() * (1.0 - beta),
                    None => g.clone() * (1.0 - beta),
                };
                self.ema[k][l] = Some(updated);
                reference
            }
        };
        let corrected = match reference {
            Some(h) if self.subnets > 1 => {
                project_conflicting(g, h).mask_fill(mask.clone().bool_not(), 0.0)
            }
            _ => g,
        };
        corrected.cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{device, TestBackend};
    use burn::tensor::Tolerance;

    fn t(v: [f32; 3]) -> Tensor<TestBackend, 1> {
        Tensor::from_floats(v, &device())
    }

    #[test]
    fn opposing_gradients_are_projected_orthogonal() {
        // g = (1, 1, 0), h = (−1, 0, 0): g·h = −1, ‖h‖² = 1 ⇒ g − (−1)·h = (0, 1, 0) ⊥ h.
        let out = project_conflicting(t([1.0, 1.0, 0.0]), t([-1.0, 0.0, 0.0]));
        out.clone().into_data().assert_approx_eq::<f32>(
            &TensorData::from([0.0, 1.0, 0.0]),
            Tolerance::absolute(1e-6),
        );
        let dot: f32 = (out * t([-1.0, 0.0, 0.0])).sum().into_scalar();
        assert_eq!(dot, 0.0);
    }

    #[test]
    fn aligned_or_zero_references_leave_the_gradient_untouched() {
        let g = t([1.0, 2.0, 3.0]);
        for h in [t([1.0, 0.0, 0.0]), t([0.0, 1.0, -0.5]), t([0.0, 0.0, 0.0])] {
            project_conflicting(g.clone(), h)
                .into_data()
                .assert_eq(&g.clone().into_data(), true);
        }
    }

    #[test]
    fn projection_compares_with_the_previous_uncorrected_gradient_and_remasks() {
        let mask = Tensor::<TestBackend, 1, Bool>::from_data([true, true, false], &device());
        let mut state = CorrectionState::new(CorrectionMode::Projection, 1, 2);
        // First iteration: nothing to compare with.
        let first = state.correct(0, 0, t([-2.0, 0.0, 0.0]), &mask);
        first
            .into_data()
            .assert_eq(&TensorData::from([-2.0f32, 0.0, 0.0]), true);
        // g = (1, 1, 0), h = (−2, 0, 0): g·h = −2, ‖h‖² = 4 ⇒ g + 0.5·h = (0, 1, 0).
        let second = state.correct(1, 0, t([1.0, 1.0, 0.0]), &mask);
        second.into_data().assert_approx_eq::<f32>(
            &TensorData::from([0.0, 1.0, 0.0]),
            Tolerance::absolute(1e-6),
        );
        // The stored reference is the uncorrected (1, 1, 0): g = (−1, 0, 5) opposes it,
        // g·h = −1, ‖h‖² = 2 ⇒ (−0.5, 0.5, 5), re-masked ⇒ (−0.5, 0.5, 0).
        let third = state.correct(0, 0, t([-1.0, 0.0, 5.0]), &mask);
        third.into_data().assert_approx_eq::<f32>(
            &TensorData::from([-0.5, 0.5, 0.0]),
            Tolerance::absolute(1e-6),
        );
    }

    #[test]
    fn ema_variant_projects_against_the_previous_subnets_average() {
        let mask = Tensor::<TestBackend, 1, Bool>::from_data([true, true, true], &device());
        let mut state = CorrectionState::new(CorrectionMode::Ema { beta: 0.5 }, 1, 2);
        // Sub-net 0's EMA becomes 0.5·(−2, 0, 0) = (−1, 0, 0).
        let _ = state.correct(0, 0, t([-2.0, 0.0, 0.0]), &mask);
        // Sub-net 1 projects (1, 1, 0) against (−1, 0, 0): (0, 1, 0).
        let out = state.correct(1, 0, t([1.0, 1.0, 0.0]), &mask);
        out.into_data().assert_approx_eq::<f32>(
            &TensorData::from([0.0, 1.0, 0.0]),
            Tolerance::absolute(1e-6),
        );
    }
}
