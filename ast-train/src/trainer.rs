//! The training loop of one worker, as a [`Trainer`] with one method per phase: set-up and
//! resume ([`Trainer::new`]), the iterations of an epoch ([`Trainer::train_epoch`]) and one
//! iteration in them ([`Trainer::iterate`]), mid-epoch checkpoints
//! ([`Trainer::checkpoint_mid_epoch`]), the end of an epoch (recalibration, evaluation,
//! metrics, checkpoint: [`Trainer::end_epoch`]) and the run's summary ([`Trainer::finish`]).

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ast_core::schedule::{check_reaches_final_density, scheduled_event};
use ast_core::step::MaskUpdate;
use ast_core::subnet::non_finite_params;
use ast_core::{AstModule, AstStep, ModelSpec, SubnetTarget};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::checkpoint::{self, PartialEpoch, TrainerState};
use crate::config::total_iterations;
use crate::data::{HostBatch, Loader};
use crate::error::{Kept, Result, TrainError};
use crate::metrics::{
    top_k_correct, write_atomic, EpochRecord, EventRecord, EventsWriter, MetricsWriter, Progress,
    SubnetMetrics, SubnetTraining,
};
use crate::parallel::Team;
use crate::train::{
    data_threads, evaluate, read_run_config, recalibrate_batch_norms, sparsest, tidy_run,
    DataSources, RunOptions, RunSummary, CONFIG_FILE, SUMMARY_FILE,
};
use crate::TrainConfig;

/// What one worker of a run needs; see [`run_worker`].
pub(crate) struct Worker<'a, B: AutodiffBackend, S: ModelSpec> {
    pub config: TrainConfig,
    pub spec: &'a S,
    pub opts: &'a RunOptions,
    pub sources: &'a DataSources,
    pub device: &'a B::Device,
    /// The other workers of a data-parallel run, `None` when training alone.
    pub team: Option<&'a Team<B::InnerBackend>>,
    /// The initial weights when they were drawn by another thread.
    pub initial: Option<<S::Model<B> as Module<B>>::Record>,
    pub started: Instant,
}

/// Trains one worker's share of a run. The leader (the only worker, or worker 0) evaluates and
/// writes the run's files and returns the summary; the others return `None`.
pub(crate) fn run_worker<B, S>(worker: Worker<'_, B, S>) -> Result<Option<RunSummary>>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
    <S::Model<B> as AutodiffModule<B>>::InnerModule: AstModule<B::InnerBackend>,
{
    let dir = worker.opts.dir.clone();
    let (trainer, model) = Trainer::new(worker)?;
    trainer.run(model).map_err(|e| match e {
        TrainError::NonFiniteLoss {
            value,
            epoch,
            iteration,
            subnet,
            ..
        } => TrainError::NonFiniteLoss {
            value,
            epoch,
            iteration,
            subnet,
            kept: kept_in(&dir),
        },
        TrainError::NonFiniteModel { epoch, what, .. } => TrainError::NonFiniteModel {
            epoch,
            what,
            kept: kept_in(&dir),
        },
        other => other,
    })
}

/// What run directory `dir` keeps to resume from.
fn kept_in(dir: &std::path::Path) -> Kept {
    match crate::checkpoint::latest(dir) {
        Ok(Some(path)) if path.is_dir() => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            Kept::Checkpoint(name.unwrap_or_default())
        }
        Ok(_) => Kept::Nothing,
        Err(_) => Kept::Unknown,
    }
}

/// How a run leaves before its last epoch is done: with the leader's summary, or `None` on the
/// other workers.
type Leave = ControlFlow<Option<RunSummary>>;

/// One worker's run: everything but the model, which each phase takes and gives back.
struct Trainer<'a, B: AutodiffBackend> {
    config: TrainConfig,
    opts: &'a RunOptions,
    device: &'a B::Device,
    team: Option<&'a Team<B::InnerBackend>>,
    leader: bool,
    classes: usize,
    /// The whole batches of every epoch (BatchNorm recalibration).
    whole_loader: Loader,
    /// This worker's shard of them.
    train_loader: Loader,
    test_loader: Loader,
    steps_per_epoch: usize,
    total_steps: usize,
    ast: AstStep<B>,
    state: TrainerState,
    metrics: Option<MetricsWriter>,
    events: Option<EventsWriter>,
    loss_fn: CrossEntropyLoss<B>,
    sparsest: usize,
    last_eval: Vec<SubnetMetrics>,
    last_checkpoint: Instant,
    started: Instant,
    /// The iteration this invocation started with.
    started_at: usize,
}

impl<'a, B: AutodiffBackend> Trainer<'a, B> {
    /// Loaders, the model with its initial masks, the step, and the state of a resumed run.
    fn new<S>(worker: Worker<'a, B, S>) -> Result<(Self, S::Model<B>)>
    where
        S: ModelSpec,
        S::Model<B>: AutodiffModule<B>,
    {
        let Worker {
            config,
            spec,
            opts,
            sources,
            device,
            team,
            initial,
            started,
        } = worker;
        let leader = team.is_none_or(|t| t.is_leader());
        let threads = data_threads(&config);
        let whole_loader = Loader::new(sources.train.clone(), config.batch_size, config.seed, true)
            .with_threads(threads);
        let train_loader = match team {
            Some(t) => whole_loader
                .clone()
                .with_shard(t.global_rank(), t.global_size()),
            None => whole_loader.clone(),
        };
        let test_loader = Loader::new(
            sources.test.clone(),
            config.eval_batch_size,
            config.seed,
            false,
        )
        .with_threads(threads);
        let steps_per_epoch = train_loader.batches_per_epoch();
        let total_steps = total_iterations(steps_per_epoch, config.epochs)?;
        let subnets = config.ast.subnets.len();

        let model = spec.build::<B>(sources.classes, subnets, device);
        let model = match initial {
            // Fresh autodiff leaves: the workers' graphs must not meet.
            Some(record) => model.load_record(record).fork(device),
            None => model,
        };
        let switch = model.switch().clone();
        let ast = AstStep::<B>::new(
            config.ast.clone(),
            &model,
            &switch,
            steps_per_epoch,
            total_steps,
        )?;
        let schedule = &config.ast.schedule;
        let pruned: Vec<usize> = (0..subnets)
            .filter(|&k| match config.ast.subnets[k] {
                SubnetTarget::Density(d) => d < schedule.init_density,
                SubnetTarget::Nm { .. } => true,
            })
            .collect();
        // A run started from another run's checkpoint starts with its sub-nets' masks.
        if config.init_from.is_none() {
            check_reaches_final_density(schedule, subnets, &pruned, steps_per_epoch, total_steps)?;
        }
        // A run started from another run's checkpoint keeps its masks.
        let model = match config.init_from.is_some() {
            true => model,
            false => ast.init_masks(model),
        };
        let mut loss_fn = CrossEntropyLossConfig::new();
        if config.label_smoothing > 0.0 {
            loss_fn = loss_fn.with_smoothing(Some(config.label_smoothing as f32));
        }
        let mut trainer = Self {
            sparsest: sparsest(&config.ast.subnets),
            loss_fn: loss_fn.init(device),
            config,
            opts,
            device,
            team,
            leader,
            classes: sources.classes,
            whole_loader,
            train_loader,
            test_loader,
            steps_per_epoch,
            total_steps,
            ast,
            state: TrainerState {
                next_epoch: 0,
                iteration: 0,
                best_sparsest_top1: 0.0,
                sha256: Default::default(),
                partial: None,
            },
            metrics: None,
            events: None,
            last_eval: Vec::new(),
            last_checkpoint: Instant::now(),
            started,
            started_at: 0,
        };
        let model = if opts.resume {
            trainer.resume(model)?
        } else {
            model
        };
        if leader {
            let metrics = MetricsWriter::open(&opts.dir, trainer.state.next_epoch)?;
            if trainer.state.next_epoch >= trainer.config.epochs {
                // Only the finish is left: its summary reports the last evaluation.
                trainer.last_eval = (metrics.read()?.pop())
                    .map(|record| record.subnets)
                    .unwrap_or_default();
            }
            trainer.metrics = Some(metrics);
            trainer.events = Some(EventsWriter::open(&opts.dir, trainer.state.iteration)?);
        }
        trainer.started_at = trainer.state.iteration;
        Ok((trainer, model))
    }

    /// Loads the run's latest checkpoint into `model`, the step and the state.
    fn resume<M: AutodiffModule<B>>(&mut self, model: M) -> Result<M> {
        let opts = self.opts;
        let dir = checkpoint::latest(&opts.dir)?.ok_or_else(|| TrainError::Checkpoint {
            path: opts.dir.clone(),
            reason: "the run has no checkpoint yet".into(),
        })?;
        let (loaded, saved) = checkpoint::load(&dir, model, &mut self.ast)?;
        if self.leader {
            // What the interrupted run left half-written (a second signal during its
            // checkpoint, a full disk) goes now, not at the end of the run.
            tidy_run(&opts.dir)?;
        }
        let steps_per_epoch = self.steps_per_epoch;
        let start = saved.next_epoch * steps_per_epoch;
        let mid_epoch = saved.iteration != start;
        if saved.iteration < start
            || saved.iteration >= start + steps_per_epoch
            || mid_epoch != saved.partial.is_some()
        {
            return Err(TrainError::Checkpoint {
                path: dir,
                reason: format!(
                    "it was taken at iteration {} after {} epochs, but the configuration gives \
                     {steps_per_epoch} iterations per epoch: batch_size, train_subset or the \
                     data changed in config.json since",
                    saved.iteration, saved.next_epoch
                ),
            });
        }
        let subnets = self.config.ast.subnets.len();
        if let Some(partial) = saved
            .partial
            .as_ref()
            .filter(|p| p.per_subnet.len() != subnets)
        {
            return Err(TrainError::Checkpoint {
                path: dir,
                reason: format!(
                    "its epoch figures are for {} sub-nets, the run has {subnets}: state.json \
                     was changed since it was written",
                    partial.per_subnet.len()
                ),
            });
        }
        self.state = saved;
        // Changes the resume was allowed to make (e.g. more epochs) become the run's own.
        if self.leader && read_run_config(&opts.dir)? != self.config {
            let json = serde_json::to_vec_pretty(&self.config).expect("config serialises");
            write_atomic(&opts.dir.join(CONFIG_FILE), &json)?;
        }
        Ok(loaded)
    }

    /// The epochs left, then the summary.
    fn run<M>(mut self, mut model: M) -> Result<Option<RunSummary>>
    where
        M: AutodiffModule<B> + AstModule<B>,
        M::InnerModule: AstModule<B::InnerBackend>,
    {
        for epoch in self.state.next_epoch..self.config.epochs {
            let epoch_start = Instant::now();
            let lr = self
                .config
                .lr_schedule
                .lr(self.config.lr, epoch, self.config.epochs);
            let (trained, sums) = self.train_epoch(model, epoch, lr)?;
            model = trained;
            let sums = match sums {
                ControlFlow::Continue(sums) => sums,
                ControlFlow::Break(leave) => return Ok(leave),
            };
            if let ControlFlow::Break(leave) =
                self.end_epoch(&model, epoch, lr, epoch_start, sums)?
            {
                return Ok(leave);
            }
        }
        self.finish()
    }

    /// The iterations of `epoch` left; gives back the epoch's training figures, or how the
    /// run leaves early.
    fn train_epoch<M: AutodiffModule<B> + AstModule<B>>(
        &mut self,
        mut model: M,
        epoch: usize,
        lr: f64,
    ) -> Result<(M, ControlFlow<Option<RunSummary>, PartialEpoch>)> {
        let steps_per_epoch = self.steps_per_epoch;
        let first = self.state.iteration - epoch * steps_per_epoch;
        let progress_on = self.opts.progress && self.leader;
        let progress = Progress::new(
            epoch,
            self.config.epochs,
            steps_per_epoch,
            first,
            progress_on,
        );
        let mut pending: Vec<PendingStep<B::InnerBackend>> = Vec::with_capacity(READBACK_EVERY);
        // A mid-epoch checkpoint carries the sums of its epoch so far.
        let mut sums = self.state.partial.take().unwrap_or_else(|| PartialEpoch {
            loss_sum: 0.0,
            per_subnet: vec![(0.0, 0, 0, 0); self.config.ast.subnets.len()],
        });
        let loader = self.train_loader.clone();
        for (i, batch) in loader.epoch(epoch, first).enumerate() {
            let t = self.ast.iteration();
            let first_of_invocation = t == self.started_at;
            let step_start = Instant::now();
            if first_of_invocation && progress_on {
                if let Some(note) = &self.opts.first_step_note {
                    eprintln!("{note}");
                }
            }
            if self.opts.stop_after == Some(t) {
                let summary = self.leader.then(|| self.summary(epoch, true));
                return Ok((model, ControlFlow::Break(summary)));
            }
            let done = first + i + 1;
            let (stepped, update) = self.iterate(model, batch?, done - 1, lr, &mut pending)?;
            model = stepped;
            if first_of_invocation && self.leader {
                first_step_done::<B>(self.opts, self.device, step_start)?;
            }
            if let Some(update) = update {
                self.record_mask_event(&model, t, update)?;
            }
            let stop = self
                .opts
                .stop
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
                || self.opts.stop_gracefully_after == Some(t + 1);
            let due = self.leader
                && self.config.checkpoint_every_minutes.is_some_and(|m| {
                    self.last_checkpoint.elapsed().as_secs() >= m.saturating_mul(60)
                });
            // The workers stop and checkpoint at the same iteration: any worker's stop request
            // counts, and the leader's clock says when a checkpoint is due.
            let (stop, due) = match self.team {
                Some(team) => {
                    let [stop, due] = team.any_of([stop, due])?;
                    (stop, due)
                }
                None => (stop, due),
            };
            let last = done == steps_per_epoch;
            if pending.len() >= READBACK_EVERY || stop || due || last {
                read_back(
                    &mut pending,
                    epoch,
                    self.classes,
                    &mut sums,
                    &progress,
                    self.team,
                )?;
            }
            if (stop || due) && !last {
                check_finite(&model, epoch)?;
                if !self.leader {
                    if stop {
                        return Ok((model, ControlFlow::Break(None)));
                    }
                    continue;
                }
                self.checkpoint_mid_epoch(&model, epoch, &sums, stop)?;
            }
        }
        self.state.iteration = self.ast.iteration();
        Ok((model, ControlFlow::Continue(sums)))
    }

    /// One AST iteration on `batch`, the `index`-th of its epoch: forward, backward, the
    /// workers' mean gradient, the step, the workers' mean running statistics. Its loss and
    /// logits join `pending`.
    fn iterate<M: AutodiffModule<B> + AstModule<B>>(
        &mut self,
        model: M,
        batch: HostBatch,
        index: usize,
        lr: f64,
        pending: &mut Vec<PendingStep<B::InnerBackend>>,
    ) -> Result<(M, Option<MaskUpdate>)> {
        let t = self.ast.iteration();
        let labels = batch.labels.clone();
        let shard = labels.len();
        let (x, y) = batch.into_tensors::<B>(self.device);
        let iteration = self.ast.begin();
        let subnet = iteration.subnet();
        let logits = model.forward(x);
        let loss = self.loss_fn.forward(logits.clone(), y);
        pending.push(PendingStep {
            iteration: t,
            subnet,
            done: index + 1,
            loss: loss.clone().inner(),
            logits: logits.inner(),
            labels,
        });
        let grads = match self.team {
            None => GradientsParams::from_grads(loss.backward(), &model),
            Some(team) => {
                // Shards of a partial batch may differ by one sample: weigh each worker's
                // mean loss by its share, so the mean over workers is the batch's mean.
                let whole = self.train_loader.global_batch_len(index);
                let loss = if shard * team.global_size() == whole {
                    loss
                } else {
                    loss.mul_scalar((shard * team.global_size()) as f32 / whole as f32)
                };
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                team.mean_gradients(&model, grads)?
            }
        };
        let (stepped, report) = self.ast.step_params(model, grads, iteration, lr);
        let model = match self.team {
            // Every worker leaves the iteration with the same running statistics.
            Some(team) => team.mean_buffers(stepped)?,
            None => stepped,
        };
        Ok((model, report.mask_update))
    }

    /// Checks that the workers agree on the masks after a mask event and appends it to
    /// `events.jsonl`.
    fn record_mask_event<M: Module<B>>(
        &self,
        model: &M,
        t: usize,
        update: MaskUpdate,
    ) -> Result<()> {
        if let Some(team) = self.team {
            team.check_same(
                &format!("the masks after iteration {t}"),
                masks_checksum(model),
            )?;
        }
        let event = scheduled_event(
            &self.config.ast.schedule,
            &self.config.ast.subnets,
            t,
            self.steps_per_epoch,
            self.total_steps,
        )
        .expect("the step reports the events the schedule gives");
        if let Some(events) = &self.events {
            events.append(&EventRecord {
                event,
                density: update.density,
                changed: update.changed,
            })?;
        }
        Ok(())
    }

    /// The leader's checkpoint inside `epoch` (a stop request, or `checkpoint_every_minutes`);
    /// after a stop request, the error that says where the run stopped.
    fn checkpoint_mid_epoch<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        epoch: usize,
        sums: &PartialEpoch,
        stop: bool,
    ) -> Result<()> {
        let mid = TrainerState {
            next_epoch: epoch,
            iteration: self.ast.iteration(),
            partial: Some(sums.clone()),
            ..self.state.clone()
        };
        let saved = checkpoint::save(&self.opts.dir, model, &self.ast, &mid)?;
        self.last_checkpoint = Instant::now();
        if stop {
            return Err(TrainError::Stopped {
                iteration: self.ast.iteration(),
                checkpoint: saved,
                dir: self.opts.dir.clone(),
            });
        }
        Ok(())
    }

    /// After the iterations of `epoch`: BatchNorm recalibration, and on the leader evaluation,
    /// metrics and the epoch's checkpoint. Breaks where a stop request ends the run.
    fn end_epoch<M>(
        &mut self,
        model: &M,
        epoch: usize,
        lr: f64,
        epoch_start: Instant,
        sums: PartialEpoch,
    ) -> Result<Leave>
    where
        M: AutodiffModule<B> + AstModule<B>,
        M::InnerModule: AstModule<B::InnerBackend>,
    {
        let epochs = self.config.epochs;
        if self.config.bn_recalibration_batches > 0 {
            // Every worker recalibrates on the same whole batches: their statistics stay equal.
            recalibrate_batch_norms(
                model,
                &self.whole_loader,
                epoch,
                self.config.bn_recalibration_batches,
                self.device,
            )?;
        }
        // A checkpoint or a result of a diverged model is worth nothing: stop before writing.
        check_finite(model, epoch)?;
        let signalled = self
            .opts
            .stop
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        let stop = match self.team {
            Some(team) => team.any(signalled)?,
            None => signalled,
        };
        self.state.next_epoch = epoch + 1;
        let stops_early = stop && self.state.next_epoch < epochs;
        // Only the leader holds the writers: the other workers go on to the next epoch.
        let Some(metrics) = &self.metrics else {
            return Ok(if stops_early {
                ControlFlow::Break(None)
            } else {
                ControlFlow::Continue(())
            });
        };
        let eval_model = model.valid();
        self.last_eval = evaluate(&eval_model, &self.test_loader, self.device)?;
        if let Some(m) = self.last_eval.iter().find(|m| !m.loss.is_finite()) {
            let what = format!("sub-net {}'s test loss ({}) is", m.subnet, m.loss);
            return Err(TrainError::NonFiniteModel {
                epoch,
                what,
                kept: Kept::Unknown,
            });
        }
        self.state.best_sparsest_top1 = self
            .state
            .best_sparsest_top1
            .max(self.last_eval[self.sparsest].top1);
        metrics.append(&EpochRecord {
            epoch,
            lr,
            train_loss: sums.loss_sum
                / sums.per_subnet.iter().map(|s| s.3).sum::<usize>().max(1) as f64,
            seconds: epoch_start.elapsed().as_secs_f64(),
            subnets: self.last_eval.clone(),
            best_sparsest_top1: self.state.best_sparsest_top1,
            train: sums
                .per_subnet
                .iter()
                .enumerate()
                .filter(|(_, s)| s.3 > 0)
                .map(
                    |(subnet, &(loss, correct, samples, steps))| SubnetTraining {
                        subnet,
                        loss: loss / steps as f64,
                        top1: correct as f64 / samples as f64,
                    },
                )
                .collect(),
        })?;
        checkpoint::kill_point("epoch-metrics-written");
        if self.opts.progress {
            for m in &self.last_eval {
                eprintln!(
                    "epoch {}/{epochs} sub-net {} density {:.4} loss {:.4} top-1 {:.4} top-5 {:.4}",
                    epoch + 1,
                    m.subnet,
                    m.density,
                    m.loss,
                    m.top1,
                    m.top5
                );
            }
        }
        let next = self.state.next_epoch;
        if next.is_multiple_of(self.config.checkpoint_every) || next == epochs || stop {
            let saved = checkpoint::save(&self.opts.dir, model, &self.ast, &self.state)?;
            self.last_checkpoint = Instant::now();
            if stops_early {
                return Err(TrainError::Stopped {
                    iteration: self.ast.iteration(),
                    checkpoint: saved,
                    dir: self.opts.dir.clone(),
                });
            }
        }
        if next < epochs {
            self.refresh_report(false);
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Redraws the run's plots and report (the leader, after an epoch and at the end). A
    /// report that cannot be written costs a warning, never the run.
    fn refresh_report(&self, finished: bool) {
        if let Err(e) = crate::report::write_report(&self.opts.dir, None, finished) {
            eprintln!("warning: the run's plots and report were not written: {e}");
        }
    }

    /// What the run did, after `epochs` epochs (interrupted by `stop_after` or not).
    fn summary(&self, epochs: usize, interrupted: bool) -> RunSummary {
        RunSummary {
            epochs,
            targets: self.config.ast.subnets.clone(),
            subnets: self.last_eval.clone(),
            best_sparsest_top1: self.state.best_sparsest_top1,
            seconds: self.started.elapsed().as_secs_f64(),
            interrupted,
        }
    }

    /// The leader removes what an interrupted finish may have left, writes `summary.json` and
    /// returns the summary; the others return `None`.
    fn finish(self) -> Result<Option<RunSummary>> {
        if !self.leader {
            return Ok(None);
        }
        tidy_run(&self.opts.dir)?;
        checkpoint::kill_point("run-tidied");
        // The plots and the report, before the summary that marks the run finished (a resume
        // of a run killed in between draws them again).
        self.refresh_report(true);
        let summary = self.summary(self.config.epochs, false);
        let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
        write_atomic(&self.opts.dir.join(SUMMARY_FILE), &json)?;
        Ok(Some(summary))
    }
}

/// A checksum of every boolean tensor of `model` (the masks), in visiting order.
fn masks_checksum<B: Backend, M: Module<B>>(model: &M) -> u64 {
    struct Masks(sha2::Sha256);
    impl<B: Backend> ModuleVisitor<B> for Masks {
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
            use sha2::Digest;
            let data = param.val().into_data().convert::<bool>();
            let bits: Vec<u8> = data.iter::<bool>().map(u8::from).collect();
            self.0.update(&bits);
        }
    }
    use sha2::Digest;
    let mut masks = Masks(sha2::Sha256::new());
    model.visit(&mut masks);
    let digest = masks.0.finalize();
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest holds 8 bytes"),
    )
}

/// Iterations whose loss and logits are read back to the host together. Reading them every
/// iteration would wait for each step's device work before the next step is queued: on a GPU
/// the host could not run ahead. On the CPU backends it changes nothing (the values, their
/// order and every sum are the same).
const READBACK_EVERY: usize = 10;

/// An iteration whose figures are still on the device.
struct PendingStep<B: Backend> {
    iteration: usize,
    subnet: usize,
    /// Iterations of the epoch done once this one is (for the progress line).
    done: usize,
    loss: Tensor<B, 1>,
    logits: Tensor<B, 2>,
    labels: Vec<i64>,
}

/// Reads `pending`'s losses and logits back in one transfer each and adds them up in iteration
/// order; the first non-finite loss is an error naming its iteration (no checkpoint has been
/// written since: checkpoints are taken only after a read-back).
fn read_back<B: Backend>(
    pending: &mut Vec<PendingStep<B>>,
    epoch: usize,
    classes: usize,
    sums: &mut PartialEpoch,
    progress: &Progress,
    team: Option<&Team<B>>,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let losses: Vec<f32> = Tensor::cat(pending.iter().map(|p| p.loss.clone()).collect(), 0)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 losses");
    let scores: Vec<f32> = Tensor::cat(pending.iter().map(|p| p.logits.clone()).collect(), 0)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits");
    // Per iteration: loss × samples, correct predictions, samples (this worker's shard).
    let mut figures = Vec::with_capacity(3 * pending.len());
    let mut offset = 0;
    for (step, &value) in pending.iter().zip(&losses) {
        let samples = step.labels.len();
        let rows = &scores[offset * classes..(offset + samples) * classes];
        offset += samples;
        let correct = top_k_correct(rows, classes, &step.labels, 1);
        figures.push([
            value as f64 * samples as f64,
            correct as f64,
            samples as f64,
        ]);
    }
    if let Some(team) = team {
        // The batch's figures are the sums over the workers' shards (in rank order).
        let flat: Vec<f32> = figures.iter().flatten().map(|&v| v as f32).collect();
        let all = team.gather_host(&flat)?;
        for (j, f) in figures.iter_mut().enumerate() {
            *f = [0, 1, 2].map(|c| all.iter().map(|w| w[3 * j + c] as f64).sum());
        }
    }
    for (step, [weighted, correct, samples]) in pending.drain(..).zip(figures) {
        // Alone, `weighted / samples` gives back the f32 loss exactly.
        let value = (weighted / samples) as f32;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                value,
                epoch,
                iteration: step.iteration,
                subnet: step.subnet,
                kept: Kept::Unknown,
            });
        }
        let (correct, samples) = (correct as usize, samples as usize);
        sums.loss_sum += value as f64;
        let s = &mut sums.per_subnet[step.subnet];
        *s = (s.0 + value as f64, s.1 + correct, s.2 + samples, s.3 + 1);
        progress.update(step.done, value);
    }
    Ok(())
}

/// Waits for the first iteration's device work, reports its time and leaves the marker.
fn first_step_done<B: Backend>(
    opts: &RunOptions,
    device: &B::Device,
    step_start: Instant,
) -> Result<()> {
    if opts.first_step_note.is_none() && opts.first_step_marker.is_none() {
        return Ok(());
    }
    B::sync(device).map_err(|e| TrainError::Device(format!("{e:?}")))?;
    let since = step_start.elapsed().as_secs_f64();
    if opts.progress && opts.first_step_note.is_some() {
        eprintln!("first iteration done in {since:.1} s");
    }
    if let Some(marker) = &opts.first_step_marker {
        // Only a hint for later runs' messages: failing to leave it changes nothing else.
        let _ = std::fs::write(marker, format!("{since:.3}\n"));
    }
    Ok(())
}

/// Errors when any parameter of `model` holds a NaN or an infinity.
fn check_finite<M: Module<B>, B: Backend>(model: &M, epoch: usize) -> Result<()> {
    let broken = non_finite_params(model);
    match broken.first() {
        None => Ok(()),
        Some(first) => {
            let what = match broken.len() {
                1 => format!("weights of `{first}` are"),
                n => format!("weights of {n} parameters (first `{first}`) are"),
            };
            Err(TrainError::NonFiniteModel {
                epoch,
                what,
                kept: Kept::Unknown,
            })
        }
    }
}
