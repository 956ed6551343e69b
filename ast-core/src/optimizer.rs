//! The optimizer behind the AST step: it receives the masked, corrected gradients and moves the
//! shared weights with SGD (PyTorch's semantics), Adam or AdamW, on the dense shared weights
//! (the original's scope) or on the active sub-net's positions only.
//!
//! Adam and AdamW are burn's own (`burn::optim::{Adam, AdamW}` through their
//! [`SimpleOptimizer`] step); their per-parameter state is public, so the active scope can keep
//! it untouched outside the mask and checkpoints can store it. SGD is ours: burn's `Sgd` keeps
//! its velocity private, so neither could reach it; the update is tested equal to burn's `Sgd`
//! (momentum, dampening 0, weight decay) in `step.rs`. Any other burn optimizer trains in the
//! dense scope through [`AstStep::step_with`](crate::AstStep::step_with).

use std::collections::HashMap;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{
    Adam, AdamConfig, AdamState, AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState,
    GradientsParams, SimpleOptimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::{AdamSettings, OptimizerKind, SgdSettings, UpdateScope};

/// The optimizer state of one parameter, flattened.
#[derive(Debug, Clone)]
pub enum ParamState<B: Backend> {
    /// SGD's momentum buffer.
    Sgd {
        /// The velocity `v`.
        velocity: Tensor<B, 1>,
    },
    /// Adam's or AdamW's moments.
    Adam {
        /// Steps taken by this parameter (bias correction).
        time: usize,
        /// First moment `m`.
        moment_1: Tensor<B, 1>,
        /// Second moment `v`.
        moment_2: Tensor<B, 1>,
    },
}

impl<B: Backend> ParamState<B> {
    /// Keeps `self` where `keep_old` is false and `old` (zeros if none) where it is true.
    fn keep(self, old: Option<Self>, keep_old: &Tensor<B, 1, Bool>) -> Self {
        let pick = |new: Tensor<B, 1>, old: Option<Tensor<B, 1>>| match old {
            Some(old) => new.mask_where(keep_old.clone(), old),
            None => new.mask_fill(keep_old.clone(), 0.0),
        };
        match (self, old) {
            (ParamState::Sgd { velocity }, old) => ParamState::Sgd {
                velocity: pick(velocity, old.map(ParamState::into_velocity)),
            },
            (
                ParamState::Adam {
                    time,
                    moment_1,
                    moment_2,
                },
                old,
            ) => {
                let (m1, m2) = old.map(ParamState::into_moments).unzip();
                ParamState::Adam {
                    time,
                    moment_1: pick(moment_1, m1),
                    moment_2: pick(moment_2, m2),
                }
            }
        }
    }

    /// Zeroes the state at `positions` (weights a prune-and-regrow just re-activated).
    fn reset(self, positions: &Tensor<B, 1, Bool>) -> Self {
        match self {
            ParamState::Sgd { velocity } => ParamState::Sgd {
                velocity: velocity.mask_fill(positions.clone(), 0.0),
            },
            ParamState::Adam {
                time,
                moment_1,
                moment_2,
            } => ParamState::Adam {
                time,
                moment_1: moment_1.mask_fill(positions.clone(), 0.0),
                moment_2: moment_2.mask_fill(positions.clone(), 0.0),
            },
        }
    }

    fn into_velocity(self) -> Tensor<B, 1> {
        match self {
            ParamState::Sgd { velocity } => velocity,
            ParamState::Adam { .. } => unreachable!("one optimizer kind per run"),
        }
    }

    fn into_moments(self) -> (Tensor<B, 1>, Tensor<B, 1>) {
        match self {
            ParamState::Adam {
                moment_1, moment_2, ..
            } => (moment_1, moment_2),
            ParamState::Sgd { .. } => unreachable!("one optimizer kind per run"),
        }
    }

    fn into_adaptive(self) -> AdaptiveMomentumState<B, 1> {
        match self {
            ParamState::Adam {
                time,
                moment_1,
                moment_2,
            } => AdaptiveMomentumState::new(time, moment_1, moment_2),
            ParamState::Sgd { .. } => unreachable!("one optimizer kind per run"),
        }
    }

    fn from_adaptive(state: AdaptiveMomentumState<B, 1>) -> Self {
        ParamState::Adam {
            time: state.time,
            moment_1: state.moment_1,
            moment_2: state.moment_2,
        }
    }

    /// The optimizer this state belongs to (`Adam` stands for both Adam and AdamW).
    pub fn kind(&self) -> OptimizerKind {
        match self {
            ParamState::Sgd { .. } => OptimizerKind::Sgd,
            ParamState::Adam { .. } => OptimizerKind::Adam,
        }
    }
}

#[derive(Clone)]
enum Rule {
    Sgd(SgdSettings),
    Adam(Adam),
    AdamW(AdamW),
}

/// The shared optimizer of all sub-nets: one state per parameter, updated by whichever
/// sub-net trains.
pub struct AstOptimizer<B: Backend> {
    kind: OptimizerKind,
    rule: Rule,
    scope: UpdateScope,
    states: HashMap<ParamId, ParamState<B>>,
}

impl<B: Backend> core::fmt::Debug for AstOptimizer<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AstOptimizer")
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .field("states", &self.states.len())
            .finish()
    }
}

impl<B: Backend> AstOptimizer<B> {
    /// An optimizer of `kind` with the given settings, acting in `scope`.
    pub fn new(
        kind: OptimizerKind,
        sgd: SgdSettings,
        adam: AdamSettings,
        scope: UpdateScope,
    ) -> Self {
        let rule = match kind {
            OptimizerKind::Sgd => Rule::Sgd(sgd),
            OptimizerKind::Adam => {
                let decay = (adam.weight_decay != 0.0)
                    .then(|| WeightDecayConfig::new(adam.weight_decay as f32));
                Rule::Adam(
                    AdamConfig::new()
                        .with_beta_1(adam.beta_1 as f32)
                        .with_beta_2(adam.beta_2 as f32)
                        .with_epsilon(adam.epsilon as f32)
                        .with_weight_decay(decay)
                        .build(),
                )
            }
            OptimizerKind::AdamW => Rule::AdamW(
                AdamWConfig::new()
                    .with_beta_1(adam.beta_1 as f32)
                    .with_beta_2(adam.beta_2 as f32)
                    .with_epsilon(adam.epsilon as f32)
                    .with_weight_decay(adam.weight_decay as f32)
                    .build(),
            ),
        };
        Self {
            kind,
            rule,
            scope,
            states: HashMap::new(),
        }
    }

    /// The optimizer's kind.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// One update of the flat parameter `id`. `mask`, given for masked weights, restricts the
    /// update (value and state) to the active positions in [`UpdateScope::Active`]; it is
    /// ignored in [`UpdateScope::Dense`].
    pub fn update(
        &mut self,
        id: ParamId,
        w: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        mask: Option<&Tensor<B, 1, Bool>>,
        lr: f64,
    ) -> Tensor<B, 1> {
        let inactive = match self.scope {
            UpdateScope::Active => mask.map(|m| m.clone().bool_not()),
            UpdateScope::Dense => None,
        };
        let old = self.states.remove(&id);
        // The active scope puts the old state back outside the mask.
        let kept = inactive.as_ref().and(old.clone());
        let (next, state) = match &self.rule {
            Rule::Sgd(s) => sgd_step(w.clone(), grad, old, inactive.as_ref(), s, lr),
            Rule::Adam(adam) => {
                let prev = old.map(|s| AdamState::new(s.into_adaptive()));
                let (next, state) = SimpleOptimizer::step(adam, lr, w.clone(), grad, prev);
                (next, state.map(|s| ParamState::from_adaptive(s.momentum)))
            }
            Rule::AdamW(adamw) => {
                let prev = old.map(|s| AdamWState::new(s.into_adaptive()));
                let (next, state) = SimpleOptimizer::step(adamw, lr, w.clone(), grad, prev);
                (next, state.map(|s| ParamState::from_adaptive(s.momentum)))
            }
        };
        let (next, state) = match &inactive {
            Some(off) => (
                next.mask_where(off.clone(), w),
                state.map(|s| s.keep(kept, off)),
            ),
            None => (next, state),
        };
        if let Some(state) = state {
            self.states.insert(id, state);
        }
        next
    }

    /// Zeroes the state of parameter `id` at `positions`.
    pub fn reset(&mut self, id: ParamId, positions: &Tensor<B, 1, Bool>) {
        if let Some(state) = self.states.remove(&id) {
            self.states.insert(id, state.reset(positions));
        }
    }

    /// The state of parameter `id`, if it has one yet.
    pub fn state(&self, id: ParamId) -> Option<&ParamState<B>> {
        self.states.get(&id)
    }

    /// Replaces the state of parameter `id` (resuming a run). Errors when the state belongs to
    /// another kind of optimizer.
    pub fn set_state(&mut self, id: ParamId, state: ParamState<B>) -> Result<(), String> {
        let expected = match self.kind {
            OptimizerKind::AdamW => OptimizerKind::Adam,
            kind => kind,
        };
        if state.kind() != expected {
            return Err(format!(
                "the saved state is {}'s, the run's optimizer is {}",
                state.kind().name(),
                self.kind.name()
            ));
        }
        self.states.insert(id, state);
        Ok(())
    }

    /// The ids of all parameters that have a state.
    pub fn state_ids(&self) -> Vec<ParamId> {
        self.states.keys().copied().collect()
    }
}

/// One SGD step with PyTorch's semantics; `inactive` keeps the decay off those positions.
fn sgd_step<B: Backend>(
    w: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    old: Option<ParamState<B>>,
    inactive: Option<&Tensor<B, 1, Bool>>,
    s: &SgdSettings,
    lr: f64,
) -> (Tensor<B, 1>, Option<ParamState<B>>) {
    let mut d = grad;
    if s.weight_decay != 0.0 {
        let decay = w.clone() * s.weight_decay;
        d = d + match inactive {
            Some(off) => decay.mask_fill(off.clone(), 0.0),
            None => decay,
        };
    }
    if s.momentum == 0.0 {
        return (w - d * lr, None);
    }
    let v = match old {
        None => d.clone(),
        Some(old) => old.into_velocity() * s.momentum + d.clone() * (1.0 - s.dampening),
    };
    let update = if s.nesterov {
        d + v.clone() * s.momentum
    } else {
        v.clone()
    };
    (w - update * lr, Some(ParamState::Sgd { velocity: v }))
}

fn flatten<IB: Backend, const D: usize>(t: Tensor<IB, D>) -> Tensor<IB, 1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

/// Applies one optimizer update to every parameter of a module that has a gradient: the masked
/// weights take their prepared (masked, corrected) gradient, every other parameter its raw one;
/// parameters without a gradient (the other sub-nets' BatchNorms) are skipped, as PyTorch does.
pub(crate) struct ApplyUpdates<'a, B: AutodiffBackend> {
    pub optimizer: &'a mut AstOptimizer<B::InnerBackend>,
    pub grads: &'a mut GradientsParams,
    pub prepared: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
    pub masks: HashMap<ParamId, Tensor<B::InnerBackend, 1, Bool>>,
    pub lr: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for ApplyUpdates<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let id = param.id;
        let grad = match self.prepared.remove(&id) {
            Some(g) => Some(g),
            None => self.grads.remove::<B::InnerBackend, D>(id).map(flatten),
        };
        let Some(grad) = grad else { return param };
        let mask = self.masks.get(&id);
        let (optimizer, lr) = (&mut *self.optimizer, self.lr);
        param.map(|tensor| {
            let require_grad = tensor.is_require_grad();
            let shape = tensor.shape();
            let w = optimizer.update(id, flatten(tensor.inner()), grad, mask, lr);
            let tensor = Tensor::from_inner(w.reshape(shape));
            if require_grad {
                tensor.require_grad()
            } else {
                tensor
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{device, TestBackend};

    type T = TestBackend;

    fn flat(v: &[f32]) -> Tensor<T, 1> {
        Tensor::from_floats(v, &device())
    }

    fn values(t: &Tensor<T, 1>) -> Vec<f32> {
        t.clone().into_data().to_vec().unwrap()
    }

    /// Two steps from w = (1, −2) with gradients (0.5, −1) then (0.5, 0) at lr 0.1.
    fn two_steps(kind: OptimizerKind, weight_decay: f64, mask: Option<[bool; 2]>) -> Vec<Vec<f32>> {
        let adam = AdamSettings {
            weight_decay,
            ..AdamSettings::default()
        };
        let scope = match mask {
            Some(_) => UpdateScope::Active,
            None => UpdateScope::Dense,
        };
        let mut opt = AstOptimizer::<T>::new(kind, SgdSettings::default(), adam, scope);
        let mask = mask.map(|m| Tensor::<T, 1, Bool>::from_data(m, &device()));
        let id = ParamId::new();
        let mut w = flat(&[1.0, -2.0]);
        [[0.5, -1.0], [0.5, 0.0]]
            .iter()
            .map(|g| {
                w = opt.update(id, w.clone(), flat(g), mask.as_ref(), 0.1);
                values(&w)
            })
            .collect()
    }

    fn assert_close(got: &[Vec<f32>], want: &[[f32; 2]]) {
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 2e-6, "got {got:?}, expected {want:?}");
            }
        }
    }

    // Golden values: torch.optim.Adam / AdamW 2.x on the same two steps
    // (`golden/torch_optimizers.py`; lr 0.1, default betas and eps), checked by hand with the
    // textbook formulas (m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), w ← w − lr·m̂/(√v̂ + ε)).

    #[test]
    fn adam_matches_pytorch() {
        let got = two_steps(OptimizerKind::Adam, 0.0, None);
        assert_close(&got, &[[0.9, -1.9], [0.8, -1.832_994_1]]);
    }

    #[test]
    fn adam_adds_its_weight_decay_to_the_gradient_as_pytorch() {
        let got = two_steps(OptimizerKind::Adam, 0.1, None);
        assert_close(&got, &[[0.9, -1.9], [0.800_047_3, -1.822_176_5]]);
    }

    #[test]
    fn adamw_decays_decoupled_as_pytorch() {
        let got = two_steps(OptimizerKind::AdamW, 0.1, None);
        assert_close(&got, &[[0.89, -1.88], [0.7811, -1.794_194_1]]);
    }

    #[test]
    fn the_active_scope_leaves_weights_and_adam_moments_outside_the_mask_untouched() {
        // AdamW decays every position in the dense scope; in the active scope the second
        // weight and its moments stay exactly as they were, while the first follows AdamW.
        for kind in [OptimizerKind::Adam, OptimizerKind::AdamW] {
            let got = two_steps(kind, 0.1, Some([true, false]));
            let dense = two_steps(kind, 0.1, None);
            assert_eq!(got[0][0], dense[0][0], "{kind:?}");
            assert_eq!(got[1][1], -2.0, "{kind:?}");
            assert_eq!(got[0][1], -2.0, "{kind:?}");
        }
        let mut opt = AstOptimizer::<T>::new(
            OptimizerKind::Adam,
            SgdSettings::default(),
            AdamSettings::default(),
            UpdateScope::Active,
        );
        let id = ParamId::new();
        let mask = Tensor::<T, 1, Bool>::from_data([true, false], &device());
        let all = Tensor::<T, 1, Bool>::from_data([true, true], &device());
        let w = opt.update(id, flat(&[1.0, 1.0]), flat(&[1.0, 1.0]), Some(&all), 0.1);
        let before = opt.state(id).cloned().unwrap();
        opt.update(id, w, flat(&[1.0, 0.0]), Some(&mask), 0.1);
        let (
            ParamState::Adam {
                moment_1: m0,
                moment_2: v0,
                ..
            },
            Some(ParamState::Adam {
                time,
                moment_1: m1,
                moment_2: v1,
            }),
        ) = (before, opt.state(id))
        else {
            panic!("Adam state expected");
        };
        assert_eq!(*time, 2);
        assert_eq!(values(m1)[1], values(&m0)[1]);
        assert_eq!(values(v1)[1], values(&v0)[1]);
        assert_ne!(values(m1)[0], values(&m0)[0]);
    }

    #[test]
    fn state_of_another_optimizer_is_refused() {
        let mut opt = AstOptimizer::<T>::new(
            OptimizerKind::AdamW,
            SgdSettings::default(),
            AdamSettings::default(),
            UpdateScope::Dense,
        );
        let sgd = ParamState::Sgd {
            velocity: flat(&[0.0]),
        };
        let err = opt.set_state(ParamId::new(), sgd).unwrap_err();
        assert!(err.contains("sgd") && err.contains("adamw"), "{err}");
    }
}
