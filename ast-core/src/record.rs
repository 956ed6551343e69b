//! The AST step's state as a burn [`Record`]: what a training loop of your own saves and loads
//! with burn's recorders beside the model's record (which holds the weights, every sub-net's
//! masks and BatchNorms), so that a run continues exactly where it stopped.

use burn::module::ParamId;
use burn::prelude::*;
use burn::record::Record;
use burn::tensor::backend::AutodiffBackend;

use crate::error::{AstError, Result};
use crate::optimizer::ParamState;
use crate::step::AstStep;

/// Adam's step count and its first and second moments, flat.
pub type AdamMoments<B> = (usize, Tensor<B, 1>, Tensor<B, 1>);

/// [`AstStep`]'s state: the schedule position, the shared optimizer's per-parameter state and
/// the gradient-correction references. Save it with any burn recorder
/// (`recorder.record(ast.record(), path)`), load it with [`AstStep::load_record`].
#[derive(Record, Debug)]
pub struct AstStepRecord<B: Backend> {
    /// The next global iteration `t` (it fixes the sub-net, the mask schedule and the prune
    /// rate).
    pub iteration: usize,
    /// SGD's velocity per parameter, keyed by the parameter's id as burn serialises it
    /// (`ParamId::serialize`), in key order.
    pub velocity: Vec<(String, Tensor<B, 1>)>,
    /// Adam's or AdamW's step count and moments per parameter, keyed likewise.
    pub moments: Vec<(String, AdamMoments<B>)>,
    /// Projection: the previous iteration's masked gradient per masked layer.
    pub previous: Vec<Option<Tensor<B, 1>>>,
    /// EMA correction: per sub-net and masked layer, the EMA of its masked gradients.
    pub ema: Vec<Vec<Option<Tensor<B, 1>>>>,
}

impl<B: AutodiffBackend> AstStep<B> {
    /// The step's state as a burn record (see [`AstStepRecord`]).
    pub fn record(&self) -> AstStepRecord<B::InnerBackend> {
        let (mut velocity, mut moments) = (Vec::new(), Vec::new());
        let mut ids = self.optimizer().state_ids();
        ids.sort_by_key(|id| id.serialize());
        for id in ids {
            match self.optimizer().state(id).cloned() {
                Some(ParamState::Sgd { velocity: v }) => velocity.push((id.serialize(), v)),
                Some(ParamState::Adam {
                    time,
                    moment_1,
                    moment_2,
                }) => moments.push((id.serialize(), (time, moment_1, moment_2))),
                None => {}
            }
        }
        let correction = self.correction_state();
        AstStepRecord {
            iteration: self.iteration(),
            velocity,
            moments,
            previous: correction.previous.clone(),
            ema: correction.ema.clone(),
        }
    }

    /// Continues from `record`, a record of a step with the same configuration over the same
    /// model. Build this step from the model *after* loading the model's record: the optimizer
    /// state is keyed by the parameters' ids, which the model's record carries.
    ///
    /// Errors when the record's optimizer state is another optimizer's or its correction
    /// references do not fit the model's masked layers.
    pub fn load_record(&mut self, record: AstStepRecord<B::InnerBackend>) -> Result<()> {
        let layers = self.layers().len();
        let correction = self.correction_state();
        let fits = |refs: &Vec<Option<Tensor<B::InnerBackend, 1>>>| refs.len() == layers;
        if !fits(&record.previous)
            || record.ema.len() != correction.ema.len()
            || !record.ema.iter().all(fits)
        {
            return Err(AstError::Model(format!(
                "the step record's correction references do not fit this model's {layers} \
                 masked layers and this configuration's correction"
            )));
        }
        let states = record
            .velocity
            .into_iter()
            .map(|(id, velocity)| (id, ParamState::Sgd { velocity }))
            .chain(record.moments.into_iter().map(|(id, (time, m1, m2))| {
                let state = ParamState::Adam {
                    time,
                    moment_1: m1,
                    moment_2: m2,
                };
                (id, state)
            }));
        for (key, state) in states {
            let id = ParamId::try_deserialize(&key).ok_or_else(|| {
                AstError::Model(format!(
                    "the step record names parameter `{key}`, not an id"
                ))
            })?;
            self.optimizer_mut()
                .set_state(id, state)
                .map_err(|e| AstError::Model(format!("the step record: {e}")))?;
        }
        let correction = self.correction_state_mut();
        correction.previous = record.previous;
        correction.ema = record.ema;
        self.set_iteration(record.iteration);
        Ok(())
    }
}
