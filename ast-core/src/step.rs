//! The AST step (§6): pick sub-net `t mod K`, run its mask schedule, mask its gradients,
//! correct them against the previous sub-net, and hand them to the shared optimizer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::{AstConfig, SubnetTarget, UpdateScope};
use crate::correction::CorrectionState;
use crate::density::{erk_densities, random_masks};
use crate::error::{AstError, Result};
use crate::layers::SubnetSwitch;
use crate::mask::nm::GroupLayout;
use crate::mask::update::{mask_change, updated_masks, MaskChange, MaskInputs};
use crate::optimizer::{ApplyUpdates, AstOptimizer};
use crate::rng::MaskRng;
use crate::schedule::{cosine_prune_rate, mask_event, MaskEvent};
use crate::subnet::{
    inner_masks, mask_vec, masked_layers, read_params, subnet_count, weight_vec, write_masks,
    MaskedLayerInfo,
};

/// What one call of [`AstStep::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The global iteration `t` that was just performed.
    pub iteration: usize,
    /// The sub-net trained (`t mod K`).
    pub subnet: usize,
    /// The mask update of this iteration, if the schedule had one.
    pub mask_update: Option<MaskUpdate>,
}

/// A mask update performed by the step.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskUpdate {
    /// Ramp (recompute then regrow) or regrow only.
    pub event: MaskEvent,
    /// Prune-and-regrow rate used.
    pub prune_rate: f64,
    /// Density of the sub-net after the update.
    pub density: f64,
    /// Positions whose mask bit changed.
    pub changed: usize,
}

/// An iteration begun by [`AstStep::begin`]: the model is switched to its sub-net, and
/// [`AstStep::step`] takes it back after the forward and backward pass. Only `begin` makes
/// one, so a step cannot run on an iteration that was not begun.
#[derive(Debug)]
#[must_use = "pass it to AstStep::step after the forward and backward pass"]
pub struct Iteration {
    t: usize,
    subnet: usize,
    owner: u64,
}

impl Iteration {
    /// The global iteration `t`.
    pub fn index(&self) -> usize {
        self.t
    }

    /// The sub-net it trains, `t mod K`.
    pub fn subnet(&self) -> usize {
        self.subnet
    }
}

/// Tells the [`AstStep`]s of a process apart, so that an [`Iteration`] goes back to its own.
static NEXT_STEP_ID: AtomicU64 = AtomicU64::new(0);

/// The AST training step. Holds the shared optimizer (one state per parameter, shared by all
/// sub-nets) and the correction references.
///
/// ```text
/// let it = ast.begin();                    // switch(t mod K); it.subnet() is k
/// let loss = model.forward(x) ...;         // forward with sub-net k
/// let (model, report) = ast.step(model, loss.backward(), it, iteration, lr);
/// ```
///
/// A wrong sequence is a panic that says what to do: an [`Iteration`] of another step or of an
/// earlier iteration, or a model whose masked layers did not compute through this step's
/// [`SubnetSwitch`] since `begin` (the switch given to [`AstStep::new`] is not the model's).
///
/// **Update rule**: the configured optimizer ([`crate::optimizer`]; SGD with PyTorch's
/// semantics by default) on the masked, corrected gradient `g ⊙ M`. In the default
/// [`UpdateScope::Dense`] (the original's) it acts at every position, e.g. for SGD
/// `d = (g ⊙ M) + λ·W`, `v ← μ·v + d`, `W ← W − lr·v`. In [`UpdateScope::Active`] the same
/// happens *on active positions only*: weights outside the active mask, their optimizer state
/// and their weight decay are untouched (they belong to other sub-nets; no momentum from other
/// sub-nets leaks into a step). Every other parameter (stem, biases, the active sub-net's
/// BatchNorm) gets the plain update; parameters without a gradient (inactive BatchNorms) are
/// skipped. [`AstStep::step_with`] hands the same gradients to any burn optimizer instead.
#[derive(Debug)]
pub struct AstStep<B: AutodiffBackend> {
    config: AstConfig,
    switch: SubnetSwitch,
    layers: Vec<MaskedLayerInfo>,
    layouts: Vec<Vec<Option<GroupLayout>>>,
    steps_per_epoch: usize,
    total_steps: usize,
    iteration: usize,
    optimizer: AstOptimizer<B::InnerBackend>,
    correction: CorrectionState<B::InnerBackend>,
    id: u64,
}

impl<B: AutodiffBackend> AstStep<B> {
    /// Prepares the step for `model`, whose masked layers are switched by `switch`.
    ///
    /// `steps_per_epoch` and `total_steps` (global iterations) place the epoch-based ramp and
    /// the cosine prune-rate decay. Errors on an invalid config, a model whose sub-net count
    /// differs from the config's, or an N:M pattern that does not divide a layer's input size.
    pub fn new<M: AutodiffModule<B>>(
        config: AstConfig,
        model: &M,
        switch: &SubnetSwitch,
        steps_per_epoch: usize,
        total_steps: usize,
    ) -> Result<Self> {
        config.validate()?;
        if steps_per_epoch == 0 {
            return Err(crate::error::invalid("steps_per_epoch", "must be ≥ 1"));
        }
        let layers = masked_layers(model);
        let k = subnet_count(&layers)?;
        if k != config.subnets.len() {
            return Err(AstError::Model(format!(
                "the model has {k} sub-nets, the config lists {}",
                config.subnets.len()
            )));
        }
        let layouts = config
            .subnets
            .iter()
            .map(|target| {
                layers
                    .iter()
                    .map(|l| match *target {
                        SubnetTarget::Density(_) => Ok(None),
                        SubnetTarget::Nm { m, .. } => GroupLayout::new(&l.shape, l.input_axis(), m)
                            .map(Some)
                            .ok_or_else(|| AstError::NmIndivisible {
                                layer: l.path.clone(),
                                input: l.shape[l.input_axis()],
                                m,
                            }),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let correction = CorrectionState::new(config.correction, layers.len(), k);
        let optimizer = AstOptimizer::new(
            config.optimizer,
            config.sgd,
            config.adam,
            config.update_scope,
        );
        Ok(Self {
            config,
            switch: switch.clone(),
            layers,
            layouts,
            steps_per_epoch,
            total_steps,
            iteration: 0,
            optimizer,
            correction,
            id: NEXT_STEP_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The number of sub-nets `K`.
    pub fn subnets(&self) -> usize {
        self.config.subnets.len()
    }

    /// The masked layers the step works on.
    pub fn layers(&self) -> &[MaskedLayerInfo] {
        &self.layers
    }

    /// The configuration.
    pub fn config(&self) -> &AstConfig {
        &self.config
    }

    /// The next global iteration `t`.
    pub fn iteration(&self) -> usize {
        self.iteration
    }

    /// Sets the iteration counter (resuming a run).
    pub fn set_iteration(&mut self, t: usize) {
        self.iteration = t;
    }

    /// Initial masks (§3): unstructured sub-nets get seeded ERK masks at `init_density`
    /// (all-ones when it is 1); N:M sub-nets start dense, their ramp makes groups sparse.
    pub fn init_masks<M: AutodiffModule<B>>(&self, model: M) -> M {
        let shapes: Vec<Vec<usize>> = self.layers.iter().map(|l| l.shape.clone()).collect();
        let sizes: Vec<usize> = self.layers.iter().map(MaskedLayerInfo::numel).collect();
        let init = self.config.schedule.init_density;
        let densities = erk_densities(&shapes, init, self.config.schedule.erk_power_scale);
        let mut model = model;
        for (k, target) in self.config.subnets.iter().enumerate() {
            let masks = match target {
                SubnetTarget::Density(_) if init < 1.0 => random_masks(
                    &sizes,
                    &densities,
                    &mut MaskRng::new(self.config.seed, k as u64),
                ),
                _ => sizes.iter().map(|&n| vec![true; n]).collect(),
            };
            model = self.write_subnet_masks(model, k, masks);
        }
        model
    }

    /// Switches the model to the sub-net of the coming iteration, `t mod K`, and hands out the
    /// [`Iteration`] that [`AstStep::step`] takes back.
    ///
    /// It also tells the masked layers whether this iteration's backward pass must give the
    /// dense weight gradient at every position: only on a mask event, where growth ranks the
    /// inactive positions; otherwise the gradient inside the mask is all the update reads.
    pub fn begin(&self) -> Iteration {
        let t = self.iteration;
        let k = t % self.subnets();
        self.switch.set(k);
        self.switch.reset_forwards();
        let event = mask_event(
            &self.config.schedule,
            self.subnets(),
            k,
            t,
            self.steps_per_epoch,
        );
        self.switch.set_dense_weight_grad(event.is_some());
        Iteration {
            t,
            subnet: k,
            owner: self.id,
        }
    }

    /// Checks that `iteration` is this step's current one and that the model computed
    /// through this step's switch since it began.
    ///
    /// # Panics
    /// On a misuse, with what to do instead.
    fn check_begun(&self, iteration: &Iteration) {
        assert!(
            iteration.owner == self.id,
            "AstStep::step got an Iteration begun by another AstStep: each step takes back \
             what its own begin() handed out"
        );
        assert!(
            iteration.t == self.iteration,
            "AstStep::step got iteration {} but the step is at iteration {}: call begin() \
             once per iteration, before its forward pass",
            iteration.t,
            self.iteration
        );
        assert!(
            self.switch.forwards() > 0,
            "AstStep::step: no masked layer computed through this step's SubnetSwitch since \
             begin(): give AstStep::new the switch the model's masked layers were built with, \
             and run the forward pass between begin() and step()"
        );
    }

    /// One AST iteration after the forward and backward pass of sub-net `t mod K`
    /// (see [`AstStep::begin`]): mask schedule, gradient masking, correction, masked SGD.
    ///
    /// # Panics
    /// If `iteration` is not this step's current one, or the model did not compute through
    /// this step's switch since [`AstStep::begin`] (see [`AstStep`]).
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        model: M,
        grads: B::Gradients,
        iteration: Iteration,
        lr: f64,
    ) -> (M, StepReport) {
        let grads = GradientsParams::from_grads(grads, &model);
        self.step_params(model, grads, iteration, lr)
    }

    /// [`AstStep::step`] from the dense gradients already gathered per parameter: the place
    /// for anything that must see them before masking, e.g. the mean over data-parallel
    /// workers (mask growth then ranks the global gradient).
    ///
    /// # Panics
    /// As [`AstStep::step`].
    pub fn step_params<M: AutodiffModule<B>>(
        &mut self,
        model: M,
        mut grads: GradientsParams,
        iteration: Iteration,
        lr: f64,
    ) -> (M, StepReport) {
        let Prepared {
            model,
            masked,
            masks,
            report,
        } = self.prepare(model, &mut grads, &iteration);
        // The optimizer restricts the update to the active mask in the `Active` scope only; the
        // gradient itself is masked in both.
        let mut apply = ApplyUpdates::<B> {
            optimizer: &mut self.optimizer,
            grads: &mut grads,
            prepared: masked,
            masks: self.layers.iter().map(|l| l.weight_id).zip(masks).collect(),
            lr,
        };
        let model = model.map(&mut apply);
        self.iteration += 1;
        (model, report)
    }

    /// [`AstStep::step_params`] with any burn optimizer in place of the configured one: the
    /// masked weights' gradients are replaced by their masked, corrected form, and `optimizer`
    /// updates the whole model with them, as the original does with its dense SGD.
    ///
    /// The optimizer's state is the caller's to save (`Optimizer::to_record`); the
    /// [`AstStepRecord`](crate::AstStepRecord) then holds masks, schedule position and
    /// correction state only.
    ///
    /// # Panics
    /// As [`AstStep::step`]; and when the config asks for what only the built-in optimizers can
    /// do: [`UpdateScope::Active`] (it keeps the state outside the
    /// mask) or `reset_momentum_on_regrow` (it zeroes state at regrown positions).
    pub fn step_with<M, O>(
        &mut self,
        model: M,
        mut grads: GradientsParams,
        iteration: Iteration,
        lr: f64,
        optimizer: &mut O,
    ) -> (M, StepReport)
    where
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        assert!(
            self.config.update_scope == UpdateScope::Dense,
            "AstStep::step_with: the active update scope needs the optimizer state outside the \
             mask, which only the built-in optimizers expose: use UpdateScope::Dense, or \
             AstStep::step with AstConfig::optimizer"
        );
        assert!(
            !self.config.reset_momentum_on_regrow,
            "AstStep::step_with: reset_momentum_on_regrow zeroes optimizer state that only the \
             built-in optimizers expose: turn it off, or use AstStep::step"
        );
        let Prepared {
            model,
            masked,
            report,
            ..
        } = self.prepare(model, &mut grads, &iteration);
        for layer in &self.layers {
            if let Some(g) = masked.get(&layer.weight_id) {
                put_shaped(&mut grads, layer.weight_id, g.clone(), &layer.shape);
            }
        }
        let model = optimizer.step(lr, model, grads);
        self.iteration += 1;
        (model, report)
    }

    /// The part of an iteration before the optimizer: mask schedule, gradient masking and
    /// correction. Takes the masked weights' gradients out of `grads`.
    fn prepare<M: AutodiffModule<B>>(
        &mut self,
        model: M,
        grads: &mut GradientsParams,
        iteration: &Iteration,
    ) -> Prepared<B, M> {
        self.check_begun(iteration);
        let (t, k) = (iteration.t, iteration.subnet);
        let dense: Vec<Option<Tensor<B::InnerBackend, 1>>> = self
            .layers
            .iter()
            .map(|l| take_flat::<B::InnerBackend>(grads, l.weight_id, l.shape.len()))
            .collect();

        let mut model = model;
        let mut mask_update = None;
        let mut grown = Vec::new();
        if let Some(event) = mask_event(
            &self.config.schedule,
            self.subnets(),
            k,
            t,
            self.steps_per_epoch,
        ) {
            assert!(
                self.switch.dense_weight_grad(),
                "AstStep::step at a mask event without AstStep::begin before the forward pass"
            );
            let (updated, report, positions) = self.update_masks(model, k, t, event, &dense);
            model = updated;
            mask_update = Some(report);
            grown = positions;
        }

        let mask_ids: Vec<ParamId> = self.layers.iter().map(|l| l.mask_ids[k]).collect();
        let masks = inner_masks::<B, M>(&model, &mask_ids);
        if self.config.reset_momentum_on_regrow {
            self.reset_momentum(&grown, &masks);
        }
        let mut masked = HashMap::new();
        for (l, g) in dense.into_iter().enumerate() {
            if let Some(g) = g {
                let g = g.mask_fill(masks[l].clone().bool_not(), 0.0);
                let g = self.correction.correct(k, l, g, &masks[l]);
                masked.insert(self.layers[l].weight_id, g);
            }
        }
        Prepared {
            model,
            masked,
            masks,
            report: StepReport {
                iteration: t,
                subnet: k,
                mask_update,
            },
        }
    }

    fn write_subnet_masks<M: AutodiffModule<B>>(
        &self,
        model: M,
        k: usize,
        masks: Vec<Vec<bool>>,
    ) -> M {
        let ids: Vec<ParamId> = self.layers.iter().map(|l| l.mask_ids[k]).collect();
        let data = self
            .layers
            .iter()
            .zip(masks)
            .map(|(l, m)| TensorData::new(m, l.shape.clone()))
            .collect();
        write_masks(model, &ids, data)
    }

    /// Recomputes sub-net `k`'s masks on the host; returns the model, a report and, per layer,
    /// the positions that became active.
    fn update_masks<M: AutodiffModule<B>>(
        &self,
        model: M,
        k: usize,
        t: usize,
        event: MaskEvent,
        dense: &[Option<Tensor<B::InnerBackend, 1>>],
    ) -> (M, MaskUpdate, Vec<Vec<usize>>) {
        let schedule = &self.config.schedule;
        let weight_ids: Vec<ParamId> = self.layers.iter().map(|l| l.weight_id).collect();
        let mask_ids: Vec<ParamId> = self.layers.iter().map(|l| l.mask_ids[k]).collect();
        let weights: Vec<Vec<f32>> = read_params(&model, &weight_ids)
            .into_iter()
            .map(weight_vec)
            .collect();
        let old: Vec<Vec<bool>> = read_params(&model, &mask_ids)
            .into_iter()
            .map(mask_vec)
            .collect();
        let grads: Vec<Vec<f32>> = dense
            .iter()
            .zip(&self.layers)
            .map(|(g, l)| match g {
                Some(g) => weight_vec(g.clone().into_data()),
                None => vec![0.0; l.numel()],
            })
            .collect();
        let rate = cosine_prune_rate(
            t,
            self.total_steps,
            schedule.prune_rate,
            schedule.final_prune_rate,
        );
        let mut rng = MaskRng::new(self.config.seed, ((t as u64) << 8) | k as u64);
        let inputs = MaskInputs {
            weights: &weights,
            masks: &old,
            grads: &grads,
        };
        let target = self.config.subnets[k];
        let layouts = &self.layouts[k];
        let new = updated_masks(
            target,
            event,
            schedule.init_density,
            rate,
            inputs,
            layouts,
            &mut rng,
        );
        let MaskChange {
            grown,
            changed,
            density,
        } = mask_change(&old, &new);
        let model = self.write_subnet_masks(model, k, new);
        let report = MaskUpdate {
            event,
            prune_rate: rate,
            density,
            changed,
        };
        (model, report, grown)
    }

    fn reset_momentum(&mut self, grown: &[Vec<usize>], masks: &[Tensor<B::InnerBackend, 1, Bool>]) {
        for (l, positions) in grown.iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let n = self.layers[l].numel();
            let mut flags = vec![false; n];
            positions.iter().for_each(|&i| flags[i] = true);
            let reset = Tensor::<B::InnerBackend, 1, Bool>::from_data(
                TensorData::new(flags, [n]),
                &masks[l].device(),
            );
            self.optimizer.reset(self.layers[l].weight_id, &reset);
        }
    }

    /// The shared optimizer (its per-parameter state, for checkpoints).
    pub fn optimizer(&self) -> &AstOptimizer<B::InnerBackend> {
        &self.optimizer
    }

    /// The shared optimizer, mutable (resuming a run).
    pub fn optimizer_mut(&mut self) -> &mut AstOptimizer<B::InnerBackend> {
        &mut self.optimizer
    }

    /// The gradient-correction references (for checkpoints).
    pub fn correction_state(&self) -> &CorrectionState<B::InnerBackend> {
        &self.correction
    }

    /// Mutable gradient-correction references (resuming a run).
    pub fn correction_state_mut(&mut self) -> &mut CorrectionState<B::InnerBackend> {
        &mut self.correction
    }
}

/// An iteration up to the optimizer (see [`AstStep::prepare`]).
struct Prepared<B: AutodiffBackend, M> {
    model: M,
    /// The masked, corrected gradients of the masked weights, flat.
    masked: HashMap<ParamId, Tensor<B::InnerBackend, 1>>,
    /// The active sub-net's masks, flat, one per masked layer.
    masks: Vec<Tensor<B::InnerBackend, 1, Bool>>,
    report: StepReport,
}

/// Puts the flat gradient `g` of a masked weight back into `grads` with its weight's shape.
fn put_shaped<IB: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    g: Tensor<IB, 1>,
    shape: &[usize],
) {
    match *shape {
        [a, b] => grads.register::<IB, 2>(id, g.reshape([a, b])),
        [a, b, c, d] => grads.register::<IB, 4>(id, g.reshape([a, b, c, d])),
        _ => panic!("masked weights have rank 2 or 4, got shape {shape:?}"),
    }
}

fn take_flat<IB: Backend>(
    grads: &mut GradientsParams,
    id: ParamId,
    rank: usize,
) -> Option<Tensor<IB, 1>> {
    match rank {
        2 => grads.remove::<IB, 2>(id).map(flatten),
        4 => grads.remove::<IB, 4>(id).map(flatten),
        r => panic!("masked weights have rank 2 or 4, got {r}"),
    }
}

fn flatten<IB: Backend, const D: usize>(t: Tensor<IB, D>) -> Tensor<IB, 1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CorrectionMode, MaskScheduleConfig, SgdSettings, UpdateScope};
    use crate::layers::{mask_param, MaskedLinear, MaskedLinearConfig};
    use crate::schedule::MaskEvent;
    use crate::subnet::{density, mask_vec, read_masks, replace_masks};
    use crate::testing::{synthetic_batch, tiny_config, train_tiny, TinyNet};
    use crate::tests::{device, TestBackend};
    use burn::module::{ModuleMapper, Param};
    use burn::optim::momentum::MomentumConfig;
    use burn::optim::{Optimizer, SgdConfig};
    use burn::tensor::Tolerance;

    type AD = burn::backend::Autodiff<TestBackend>;

    #[derive(Module, Debug)]
    struct OneLinear<B: Backend> {
        fc: MaskedLinear<B>,
    }

    fn no_events() -> MaskScheduleConfig {
        MaskScheduleConfig {
            update_frequency: 1_000_000,
            final_prune_epoch: 1,
            subnet_offset: 0,
            ..MaskScheduleConfig::default()
        }
    }

    fn loss_of(model: &OneLinear<AD>, x: &Tensor<AD, 2>) -> Tensor<AD, 1> {
        let y = model.fc.forward(x.clone());
        (y.clone() * y).sum()
    }

    #[test]
    fn weights_outside_the_active_mask_get_exactly_zero_update() {
        // Sub-net 0 dense, sub-net 1 keeps only the diagonal of a 3×3 weight. Alternating with
        // momentum 0.9 and weight decay: every step of sub-net 1 leaves its 6 inactive weights
        // bit-identical (no gradient, no momentum leak from sub-net 0, no weight decay).
        let device = device();
        let switch = SubnetSwitch::new();
        let fc = MaskedLinearConfig::new(3, 3)
            .with_subnets(2)
            .init::<AD>(&switch, &device);
        let diag = Tensor::<AD, 2, Bool>::from_data(
            [
                [true, false, false],
                [false, true, false],
                [false, false, true],
            ],
            &device,
        );
        let model = OneLinear {
            fc: MaskedLinear {
                masks: vec![fc.masks[0].clone(), mask_param(diag)],
                ..fc
            },
        };
        let mut config =
            AstConfig::new(vec![SubnetTarget::Density(1.0), SubnetTarget::Density(1.0)]);
        config.schedule = no_events();
        config.correction = CorrectionMode::Off;
        config.update_scope = UpdateScope::Active;
        let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        let x = Tensor::<AD, 2>::from_floats([[1.0, -2.0, 0.5]], &device);
        let mut model = model;
        for _ in 0..6 {
            let iteration = ast.begin();
            let k = iteration.subnet();
            let before: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
            let grads = loss_of(&model, &x).backward();
            model = ast.step(model, grads, iteration, 0.1).0;
            let after: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
            for i in 0..9 {
                let active = k == 0 || i % 4 == 0;
                if active {
                    assert_ne!(
                        before[i], after[i],
                        "active weight {i} of sub-net {k} must move"
                    );
                } else {
                    assert_eq!(
                        before[i].to_bits(),
                        after[i].to_bits(),
                        "inactive weight {i} of sub-net {k} moved"
                    );
                }
            }
        }
    }

    #[test]
    fn step_params_takes_gradients_reduced_elsewhere() {
        // Two "workers", one row of the batch each: the sum of their gradients (the loss is a
        // sum over rows), reduced outside the step and given to `step_params`, moves the weights
        // as `step` does with the whole batch's backward pass.
        let device = device();
        let switch = SubnetSwitch::new();
        let fc = MaskedLinearConfig::new(3, 3)
            .with_subnets(2)
            .init::<AD>(&switch, &device);
        let model = OneLinear { fc };
        let mut config =
            AstConfig::new(vec![SubnetTarget::Density(1.0), SubnetTarget::Density(0.5)]);
        config.schedule = no_events();
        config.correction = CorrectionMode::Off;
        let mut whole = AstStep::new(config.clone(), &model, &switch, 10, 100).unwrap();
        let mut split = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        let model = whole.init_masks(model);
        let rows = [[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]];
        let x = Tensor::<AD, 2>::from_floats(rows, &device);
        let (mut a, mut b) = (model.clone(), model);
        for _ in 0..4 {
            let whole_iteration = whole.begin();
            a = whole
                .step(a.clone(), loss_of(&a, &x).backward(), whole_iteration, 0.1)
                .0;
            let split_iteration = split.begin();
            let mut grads: Vec<GradientsParams> = rows
                .iter()
                .map(|r| {
                    let xr = Tensor::<AD, 2>::from_floats([*r], &device);
                    GradientsParams::from_grads(loss_of(&b, &xr).backward(), &b)
                })
                .collect();
            let (mut sum, other) = (grads.remove(0), &mut grads[0]);
            let w = b.fc.weight.id;
            let total = sum.remove::<TestBackend, 2>(w).unwrap()
                + other.remove::<TestBackend, 2>(w).unwrap();
            sum.register(w, total);
            if let Some(bias) = b.fc.bias.as_ref().map(|p| p.id) {
                let total = sum.remove::<TestBackend, 1>(bias).unwrap()
                    + other.remove::<TestBackend, 1>(bias).unwrap();
                sum.register(bias, total);
            }
            b = split.step_params(b, sum, split_iteration, 0.1).0;
        }
        a.fc.weight
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&b.fc.weight.val().into_data(), Tolerance::absolute(1e-6));
    }

    #[test]
    fn with_a_full_mask_the_update_equals_burns_sgd_without_dampening() {
        // Golden reference: burn's own SGD (momentum 0.9, dampening 0, weight decay 5e-4), which
        // follows torch.optim.SGD. Three steps from the same start must agree.
        let device = device();
        let switch = SubnetSwitch::new();
        TestBackend::seed(&device, 3);
        let model = OneLinear {
            fc: MaskedLinearConfig::new(3, 2).init::<AD>(&switch, &device),
        };
        let mut config = AstConfig::new(vec![SubnetTarget::Density(1.0)]);
        config.schedule = no_events();
        let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        let mut reference = SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
            ))
            .with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(5e-4)))
            .init::<AD, OneLinear<AD>>();
        let x = Tensor::<AD, 2>::from_floats([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]], &device);
        // Parameters initialise lazily: materialise them before cloning so both copies agree.
        let _ = (
            model.fc.weight.val(),
            model.fc.bias.as_ref().map(|b| b.val()),
        );
        let (mut ours, mut theirs) = (model.clone(), model);
        for _ in 0..3 {
            let iteration = ast.begin();
            let g = loss_of(&ours, &x).backward();
            ours = ast.step(ours, g, iteration, 0.05).0;
            let g = GradientsParams::from_grads(loss_of(&theirs, &x).backward(), &theirs);
            theirs = reference.step(0.05, theirs, g);
        }
        ours.fc.weight.val().into_data().assert_approx_eq::<f32>(
            &theirs.fc.weight.val().into_data(),
            Tolerance::absolute(1e-6),
        );
        ours.fc
            .bias
            .unwrap()
            .val()
            .into_data()
            .assert_approx_eq::<f32>(
                &theirs.fc.bias.unwrap().val().into_data(),
                Tolerance::absolute(1e-6),
            );
    }

    #[test]
    fn parameter_ids_and_require_grad_survive_the_step() {
        let device = device();
        let switch = SubnetSwitch::new();
        let model = OneLinear {
            fc: MaskedLinearConfig::new(3, 2).init::<AD>(&switch, &device),
        };
        let id = model.fc.weight.id;
        let mut ast = AstStep::new(
            AstConfig::new(vec![SubnetTarget::Density(1.0)]),
            &model,
            &switch,
            10,
            100,
        )
        .unwrap();
        let iteration = ast.begin();
        let x = Tensor::<AD, 2>::ones([1, 3], &device);
        let g = loss_of(&model, &x).backward();
        let model = ast.step(model, g, iteration, 0.1).0;
        assert_eq!(model.fc.weight.id, id);
        assert!(model.fc.weight.val().is_require_grad());
        assert!(ast.optimizer().state(id).is_some());
    }

    /// A one-layer model with two sub-nets, its step, and the data of one iteration.
    fn two_subnets(switch: &SubnetSwitch) -> (OneLinear<AD>, AstStep<AD>, Tensor<AD, 2>) {
        let device = device();
        let model = OneLinear {
            fc: MaskedLinearConfig::new(3, 2)
                .with_subnets(2)
                .init::<AD>(switch, &device),
        };
        let config = AstConfig {
            schedule: no_events(),
            ..AstConfig::new(vec![SubnetTarget::Density(1.0); 2])
        };
        let ast = AstStep::new(config, &model, switch, 10, 100).unwrap();
        (model, ast, Tensor::<AD, 2>::ones([1, 3], &device))
    }

    /// The panic message of `f`.
    fn panic_message(f: impl FnOnce()) -> String {
        let payload =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("the call panics");
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn step_with_refuses_what_only_the_built_in_optimizers_can_do() {
        for (scope, reset, expected) in [
            (UpdateScope::Active, false, "active update scope"),
            (UpdateScope::Dense, true, "reset_momentum_on_regrow"),
        ] {
            let switch = SubnetSwitch::new();
            let (model, _, x) = two_subnets(&switch);
            let config = AstConfig::new(vec![SubnetTarget::Density(1.0); 2])
                .with_schedule(no_events())
                .with_update_scope(scope)
                .with_reset_momentum_on_regrow(reset);
            let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
            let mut sgd = SgdConfig::new().init::<AD, OneLinear<AD>>();
            let iteration = ast.begin();
            let grads = GradientsParams::from_grads(loss_of(&model, &x).backward(), &model);
            let message = panic_message(|| {
                let _ = ast.step_with(model, grads, iteration, 0.1, &mut sgd);
            });
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn begin_hands_out_the_subnet_of_t_mod_k_and_switches_to_it() {
        let switch = SubnetSwitch::new();
        let (mut model, mut ast, x) = two_subnets(&switch);
        for t in 0..5 {
            let iteration = ast.begin();
            assert_eq!((iteration.index(), iteration.subnet()), (t, t % 2));
            assert_eq!(switch.get(), t % 2);
            let g = loss_of(&model, &x).backward();
            let (stepped, report) = ast.step(model, g, iteration, 0.1);
            assert_eq!((report.iteration, report.subnet), (t, t % 2));
            model = stepped;
        }
    }

    #[test]
    fn an_iteration_of_an_earlier_begin_is_refused() {
        let switch = SubnetSwitch::new();
        let (model, mut ast, x) = two_subnets(&switch);
        let stale = ast.begin();
        let iteration = ast.begin();
        let g = loss_of(&model, &x).backward();
        let model = ast.step(model, g, iteration, 0.1).0;
        let message = panic_message(|| {
            let g = loss_of(&model, &x).backward();
            ast.step(model, g, stale, 0.1);
        });
        assert!(
            message.contains("got iteration 0 but the step is at iteration 1: call begin() once"),
            "{message}"
        );
    }

    #[test]
    fn an_iteration_of_another_step_is_refused() {
        let switch = SubnetSwitch::new();
        let (model, mut ast, x) = two_subnets(&switch);
        let (_, other, _) = two_subnets(&switch);
        let foreign = other.begin();
        let message = panic_message(|| {
            let g = loss_of(&model, &x).backward();
            ast.step(model, g, foreign, 0.1);
        });
        assert!(message.contains("begun by another AstStep"), "{message}");
    }

    #[test]
    fn a_switch_that_is_not_the_models_is_refused() {
        // The step was given a switch of its own; the model's layers follow another one, so
        // begin() could not switch them (they would train sub-net 0 under sub-net 1's mask).
        let models_switch = SubnetSwitch::new();
        let (model, _, x) = two_subnets(&models_switch);
        let config = AstConfig {
            schedule: no_events(),
            ..AstConfig::new(vec![SubnetTarget::Density(1.0); 2])
        };
        let mut ast = AstStep::new(config, &model, &SubnetSwitch::new(), 10, 100).unwrap();
        let iteration = ast.begin();
        let message = panic_message(|| {
            let g = loss_of(&model, &x).backward();
            ast.step(model, g, iteration, 0.1);
        });
        assert!(
            message.contains("no masked layer computed through this step's SubnetSwitch"),
            "{message}"
        );
        assert!(
            message.contains("give AstStep::new the switch"),
            "{message}"
        );
    }

    #[test]
    fn a_forward_pass_before_begin_is_refused() {
        let switch = SubnetSwitch::new();
        let (model, mut ast, x) = two_subnets(&switch);
        let g = loss_of(&model, &x).backward();
        let iteration = ast.begin();
        let message = panic_message(|| {
            ast.step(model, g, iteration, 0.1);
        });
        assert!(
            message.contains("run the forward pass between begin() and step()"),
            "{message}"
        );
    }

    #[test]
    fn nm_subnet_count_mismatch_and_indivisible_layers_are_errors() {
        let device = device();
        let switch = SubnetSwitch::new();
        let model = OneLinear {
            fc: MaskedLinearConfig::new(6, 2)
                .with_subnets(2)
                .init::<AD>(&switch, &device),
        };
        let err = AstStep::new(
            AstConfig::new(vec![SubnetTarget::Density(0.5)]),
            &model,
            &switch,
            1,
            1,
        )
        .unwrap_err();
        assert!(matches!(err, AstError::Model(_)), "{err}");
        let config = AstConfig::new(vec![
            SubnetTarget::Density(0.5),
            SubnetTarget::Nm { n: 1, m: 4 },
        ]);
        let err = AstStep::new(config, &model, &switch, 1, 1).unwrap_err();
        assert_eq!(
            err,
            AstError::NmIndivisible {
                layer: "fc".into(),
                input: 6,
                m: 4
            }
        );
        assert!(err
            .to_string()
            .contains("layer `fc`: input size 6 is not divisible by M = 4"));
    }

    fn train(
        config: AstConfig,
        steps: usize,
        seed: u64,
    ) -> (TinyNet<AD>, Vec<f32>, Vec<StepReport>) {
        train_tiny::<AD>(config, steps, seed, &device())
    }

    #[test]
    fn subnets_alternate_and_reach_their_final_density_after_the_ramp() {
        let targets = vec![
            SubnetTarget::Density(0.5),
            SubnetTarget::Density(0.2),
            SubnetTarget::Density(0.1),
        ];
        // Ramp over s ∈ (0, 30] (3 epochs of 10), events every 6, sub-net k's counter delayed by
        // k·(3·2 + 1) = 7k: each sub-net's last ramp event (s = 30) is at t = 30 + 7k ≤ 44.
        let (model, _, reports) = train(tiny_config(targets.clone()), 60, 1);
        assert_eq!(
            reports.iter().take(6).map(|r| r.subnet).collect::<Vec<_>>(),
            vec![0, 1, 2, 0, 1, 2]
        );
        for (k, target) in targets.iter().enumerate() {
            let d = density(&model, k).unwrap();
            let expected = target.density();
            assert!(
                (d - expected).abs() < 0.01,
                "sub-net {k}: density {d}, expected {expected}"
            );
        }
        let ramps = reports
            .iter()
            .filter(|r| {
                matches!(
                    r.mask_update,
                    Some(MaskUpdate {
                        event: MaskEvent::Ramp { .. },
                        ..
                    })
                )
            })
            .count();
        assert!(ramps >= 6, "{ramps} ramp events");
    }

    struct FreshLeaves;

    impl ModuleMapper<AD> for FreshLeaves {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
            p.map(|t| t.detach().require_grad())
        }
    }

    #[test]
    fn momentum_reset_zeroes_only_the_velocity_of_regrown_weights() {
        // Two identical runs, one with `reset_momentum_on_regrow`; at the first post-ramp
        // regrow event the step updates v ← μ·v + d on active positions, so at a regrown
        // position v_off − v_on = μ·v_before, and everywhere else both runs agree bit for bit.
        let device = device();
        TestBackend::seed(&device, 3);
        // No ramp (masks start at their density), so the first mask event is a regrow and the
        // two runs are identical up to it; the two sub-nets' masks differ, so weights inactive
        // in one carry momentum from the other.
        let mut config = tiny_config(vec![SubnetTarget::Density(0.5); 2]);
        config.schedule.init_density = 0.5;
        config.schedule.final_prune_epoch = 0;
        config.update_scope = UpdateScope::Active;
        let switch = SubnetSwitch::new();
        let model = TinyNet::<AD>::new(2, &switch, &device);
        let mut on_config = config.clone();
        on_config.reset_momentum_on_regrow = true;
        let mut off = AstStep::new(config, &model, &switch, 10, 200).unwrap();
        let mut on = AstStep::new(on_config, &model, &switch, 10, 200).unwrap();
        // burn initialises parameters lazily, per copy: materialise them before cloning. The
        // copy gets fresh autodiff leaves (two graphs sharing leaves would be merged).
        let model = model.map(&mut FreshLeaves);
        let copy = model.clone().map(&mut FreshLeaves);
        let (mut m_off, mut m_on) = (off.init_masks(model), on.init_masks(copy));
        let loss_fn = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
        let ids: Vec<ParamId> = off.layers().iter().map(|l| l.weight_id).collect();
        let flat = |ast: &AstStep<AD>, id| -> Vec<f32> {
            match ast.optimizer().state(id) {
                Some(crate::optimizer::ParamState::Sgd { velocity }) => {
                    velocity.clone().into_data().to_vec().unwrap()
                }
                _ => Vec::new(),
            }
        };
        let mut checked = 0;
        for t in 0..200 {
            let off_iteration = off.begin();
            let k = off_iteration.subnet();
            let (x, y) = synthetic_batch::<AD>(16, t as u64, &device);
            let before_masks = read_masks(&m_off, k).unwrap();
            let before: Vec<Vec<f32>> = ids.iter().map(|&id| flat(&off, id)).collect();
            let grads_off = loss_fn
                .forward(m_off.forward(x.clone()), y.clone())
                .backward();
            let (next_off, report) = off.step(m_off, grads_off, off_iteration, 0.05);
            let on_iteration = on.begin();
            let grads_on = loss_fn.forward(m_on.forward(x), y).backward();
            m_on = on.step(m_on, grads_on, on_iteration, 0.05).0;
            m_off = next_off;
            let regrow = matches!(
                report.mask_update,
                Some(MaskUpdate { event: MaskEvent::Regrow, changed, .. }) if changed > 0
            );
            if !regrow {
                continue;
            }
            let after_masks = read_masks(&m_off, k).unwrap();
            for (l, &id) in ids.iter().enumerate() {
                let (v_off, v_on) = (flat(&off, id), flat(&on, id));
                let was = mask_vec(before_masks[l].clone());
                let now = mask_vec(after_masks[l].clone());
                for i in 0..v_off.len() {
                    let v_before = before[l].get(i).copied().unwrap_or(0.0);
                    if now[i] && !was[i] {
                        let expected = 0.9 * v_before;
                        assert!(
                            (v_off[i] - v_on[i] - expected).abs() <= 1e-6 + 1e-4 * expected.abs(),
                            "layer {l} position {i}: off {} on {} before {v_before}",
                            v_off[i],
                            v_on[i]
                        );
                        if v_before.abs() > 1e-5 {
                            checked += 1;
                        }
                    } else if !now[i] {
                        assert_eq!(v_off[i].to_bits(), v_on[i].to_bits());
                        assert_eq!(
                            v_off[i].to_bits(),
                            v_before.to_bits(),
                            "layer {l} position {i} was {} off {} before {v_before}",
                            was[i],
                            v_off[i]
                        );
                    }
                }
            }
            break;
        }
        assert!(checked > 0, "no regrown weight with a non-zero velocity");
    }

    #[test]
    fn nm_subnets_have_exactly_n_per_group_after_the_ramp() {
        let targets = vec![
            SubnetTarget::Nm { n: 2, m: 4 },
            SubnetTarget::Nm { n: 1, m: 4 },
            SubnetTarget::Nm { n: 1, m: 8 },
        ];
        let (model, _, _) = train(tiny_config(targets.clone()), 60, 2);
        let layers = crate::subnet::masked_layers(&model);
        for (k, target) in targets.iter().enumerate() {
            let SubnetTarget::Nm { n, m } = *target else {
                unreachable!()
            };
            for (layer, mask) in layers.iter().zip(read_masks(&model, k).unwrap()) {
                let mask = mask_vec(mask);
                let layout = GroupLayout::new(&layer.shape, layer.input_axis(), m).unwrap();
                for g in 0..layout.group_count() {
                    let kept = layout.group(g).filter(|&i| mask[i]).count();
                    assert_eq!(kept, n, "sub-net {k}, layer {}, group {g}", layer.path);
                }
            }
        }
    }

    #[test]
    fn the_dense_scope_decays_and_carries_momentum_outside_the_mask() {
        // One sub-net keeping only the first of two weights w = (w₀, w₁); loss Σ W ⊙ (1, 1),
        // so the masked gradient is (1, 0). lr 1, weight decay 0.1, momentum 0.5:
        // step 1: d = (1 + 0.1·w₀, 0.1·w₁), v = d, w ← w − v;
        // step 2: d' = (1 + 0.1·w₀', 0.1·w₁'), v' = 0.5·v + d', w' ← w' − v'.
        // In the dense scope (the original's) the pruned weight w₁ moves by decay and momentum;
        // in the active scope it stays bit-identical.
        let run = |scope: UpdateScope| -> Vec<[f32; 2]> {
            let device = device();
            let switch = SubnetSwitch::new();
            let fc = MaskedLinearConfig::new(2, 1).init::<AD>(&switch, &device);
            let mask = Tensor::<AD, 2, Bool>::from_data([[true], [false]], &device);
            let model = OneLinear {
                fc: MaskedLinear {
                    weight: Param::from_tensor(Tensor::from_floats([[2.0], [3.0]], &device)),
                    masks: vec![mask_param(mask)],
                    ..fc
                },
            };
            let mut config = AstConfig::new(vec![SubnetTarget::Density(0.5)]);
            config.schedule = no_events();
            config.update_scope = scope;
            config.sgd = SgdSettings {
                momentum: 0.5,
                dampening: 0.0,
                weight_decay: 0.1,
                nesterov: false,
            };
            let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
            let mut model = model;
            (0..2)
                .map(|_| {
                    let iteration = ast.begin();
                    // ∂/∂W of x·(W ⊙ M) with x = 1: 1 at every position (the dense gradient).
                    let x = Tensor::<AD, 2>::ones([1, 2], &device);
                    let grads = model.fc.forward(x).sum().backward();
                    model = ast.step(model.clone(), grads, iteration, 1.0).0;
                    let w: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
                    [w[0], w[1]]
                })
                .collect()
        };
        // w₀: 2 − (1 + 0.2) = 0.8; then d = 1 + 0.08 = 1.08, v = 0.6 + 1.08 = 1.68 ⇒ −0.88.
        // w₁ (dense): 3 − 0.3 = 2.7; then d = 0.27, v = 0.15 + 0.27 = 0.42 ⇒ 2.28.
        let dense = run(UpdateScope::Dense);
        let want = [[0.8, 2.7], [-0.88, 2.28]];
        for (got, want) in dense.iter().zip(want) {
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "dense scope: {dense:?}, expected {want:?}"
                );
            }
        }
        let active = run(UpdateScope::Active);
        assert!((active[1][0] - -0.88).abs() < 1e-5, "{active:?}");
        assert_eq!(active[0][1], 3.0);
        assert_eq!(active[1][1], 3.0);
    }

    /// The weight changes of four alternating steps (K = 2) whose loss is `Σ W ⊙ C_t`, so that
    /// the gradient is the hand-chosen `C_t`: SGD without momentum or decay at lr 1 applies
    /// exactly the corrected masked gradient.
    fn applied_updates(correction: CorrectionMode) -> Vec<Vec<f32>> {
        let device = device();
        let switch = SubnetSwitch::new();
        let fc = MaskedLinearConfig::new(2, 2)
            .with_subnets(2)
            .init::<AD>(&switch, &device);
        // Sub-net 0 dense, sub-net 1 without the last weight.
        let m1 = Tensor::<AD, 2, Bool>::from_data([[true, true], [true, false]], &device);
        let model = OneLinear {
            fc: MaskedLinear {
                masks: vec![fc.masks[0].clone(), mask_param(m1)],
                ..fc
            },
        };
        let mut config =
            AstConfig::new(vec![SubnetTarget::Density(1.0), SubnetTarget::Density(1.0)]);
        config.schedule = no_events();
        config.correction = correction;
        config.sgd = SgdSettings {
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        let gradients = [
            [1.0, 2.0, 0.0, 1.0],
            [-1.0, 0.0, 1.0, 5.0],
            [0.0, 0.0, -1.0, 0.0],
            [0.0, -1.0, 0.0, 0.0],
        ];
        let mut model = model;
        gradients
            .iter()
            .map(|c| {
                let iteration = ast.begin();
                // The step checks that the model computed through its switch; the gradient
                // below is made by hand.
                let _ = model.fc.forward(Tensor::<AD, 2>::zeros([1, 2], &device));
                let before: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
                let c = Tensor::<AD, 1>::from_floats(*c, &device).reshape([2, 2]);
                let grads = (model.fc.weight.val() * c).sum().backward();
                model = ast.step(model.clone(), grads, iteration, 1.0).0;
                let after: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
                before.iter().zip(&after).map(|(b, a)| b - a).collect()
            })
            .collect()
    }

    fn assert_updates(got: &[Vec<f32>], want: &[[f32; 4]]) {
        for (t, (g, w)) in got.iter().zip(want).enumerate() {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() < 1e-6,
                    "step {t}: applied {g:?}, expected {w:?}"
                );
            }
        }
    }

    #[test]
    fn the_step_applies_the_hand_computed_correction_inside_the_mask() {
        // g_t = C_t ⊙ M_k. t = 0: nothing to correct against, u = g₀ = (1, 2, 0, 1).
        // t = 1 (sub-net 1): g₁ = (−1, 0, 1, 0), g₁·g₀ = −1 < 0, ‖g₀‖² = 6:
        //   g₁ + g₀/6 = (−5/6, 1/3, 1, 1/6), masked ⇒ (−5/6, 1/3, 1, 0): the inactive weight
        //   stays put although the projection moved it.
        // t = 2: g₂ = (0, 0, −1, 0) against g₁: g₂·g₁ = −1, ‖g₁‖² = 2 ⇒ (−1/2, 0, −1/2, 0).
        // t = 3: g₃ = (0, −1, 0, 0) against g₂: g₃·g₂ = 0, no conflict ⇒ unchanged.
        let third = 1.0 / 3.0;
        assert_updates(
            &applied_updates(CorrectionMode::Projection),
            &[
                [1.0, 2.0, 0.0, 1.0],
                [-5.0 / 6.0, third, 1.0, 0.0],
                [-0.5, 0.0, -0.5, 0.0],
                [0.0, -1.0, 0.0, 0.0],
            ],
        );
        // EMA (β = 1/2) against the other sub-net's EMA: at t = 1 and 2 the reference is a
        // multiple of the previous gradient (same projection). At t = 3 it is sub-net 0's EMA
        // h = ¼·g₀ + ½·g₂ = (¼, ½, −½, ¼): g₃·h = −½, ‖h‖² = 5/8 ⇒ g₃ + 0.8·h
        // = (0.2, −0.6, −0.4, 0.2), masked ⇒ (0.2, −0.6, −0.4, 0).
        assert_updates(
            &applied_updates(CorrectionMode::Ema { beta: 0.5 }),
            &[
                [1.0, 2.0, 0.0, 1.0],
                [-5.0 / 6.0, third, 1.0, 0.0],
                [-0.5, 0.0, -0.5, 0.0],
                [0.2, -0.6, -0.4, 0.0],
            ],
        );
        // Without correction every step applies its masked gradient.
        assert_updates(
            &applied_updates(CorrectionMode::Off),
            &[
                [1.0, 2.0, 0.0, 1.0],
                [-1.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, -1.0, 0.0],
                [0.0, -1.0, 0.0, 0.0],
            ],
        );
    }

    #[test]
    fn a_replaced_mask_is_used_by_the_next_step() {
        let device = device();
        let switch = SubnetSwitch::new();
        let model = OneLinear {
            fc: MaskedLinearConfig::new(2, 2).init::<AD>(&switch, &device),
        };
        let mut config = AstConfig::new(vec![SubnetTarget::Density(1.0)]);
        config.schedule = no_events();
        config.update_scope = UpdateScope::Active;
        let mut ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        let model = replace_masks(
            model,
            0,
            vec![TensorData::from([[true, false], [false, false]])],
        )
        .unwrap();
        let before: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
        let iteration = ast.begin();
        let g = loss_of(&model, &Tensor::ones([1, 2], &device)).backward();
        let model = ast.step(model, g, iteration, 0.1).0;
        let after: Vec<f32> = model.fc.weight.val().into_data().to_vec().unwrap();
        assert_ne!(before[0], after[0]);
        assert_eq!(&before[1..], &after[1..]);
    }
}
