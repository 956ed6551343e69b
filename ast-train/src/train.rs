//! The alternating training loop, evaluation of every sub-net, and the run directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ast_core::schedule::{check_reaches_final_density, scheduled_event};
use ast_core::subnet::{density, non_finite_params, sync_running_stats};
use ast_core::{AstStep, SubnetTarget};
use ast_models::AstModel;
use burn::collective;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, PartialEpoch, TrainerState};
use crate::config::{Augment, DatasetKind, TrainConfig};
use crate::data::{
    read_cifar10, read_cifar100, read_mnist_dir, Cifar100Labels, CifarSource, CifarTransform,
    FolderSource, HostBatch, ImageDataset, ImageFolder, ImagenetTransform, Loader, SampleSource,
};
use crate::error::{Result, TrainError};
use crate::lock::{RunLock, LOCK_FILE};
use crate::metrics::{
    top_k_correct, write_atomic, EpochRecord, EventRecord, EventsWriter, MetricsWriter, Progress,
    SubnetMetrics, SubnetTraining, METRICS_FILE,
};
use crate::parallel::{CrossNode, Team};

/// Training and evaluation sources of a run.
pub struct DataSources {
    /// Training samples (augmented when the loader trains).
    pub train: Arc<dyn SampleSource>,
    /// Evaluation samples.
    pub test: Arc<dyn SampleSource>,
    /// Number of classes.
    pub classes: usize,
}

impl std::fmt::Debug for DataSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataSources(train {}, test {}, {} classes)",
            self.train.len(),
            self.test.len(),
            self.classes
        )
    }
}

fn subset(data: ImageDataset, n: Option<usize>) -> Arc<ImageDataset> {
    Arc::new(match n {
        Some(n) => data.subset(n),
        None => data,
    })
}

/// Reads the dataset of `config` and pairs it with the model's input pipeline.
pub fn load_data(config: &TrainConfig) -> Result<DataSources> {
    let d = &config.data;
    let wants = config.model.image_size();
    let gives = if d.kind == DatasetKind::Imagenet {
        224
    } else {
        32
    };
    if wants != gives {
        return Err(TrainError::config(
            "model",
            format!(
                "{} expects {wants}×{wants} inputs but {} gives {gives}×{gives}",
                config.model.name(),
                d.kind.name()
            ),
        ));
    }
    let augment = d.augment == Augment::Standard;
    let cifar_like = |(train, test): (ImageDataset, ImageDataset), grey: bool| {
        let classes = train.classes;
        let transform = |t| {
            if grey {
                CifarTransform::fashion_mnist(t, 3)
            } else {
                CifarTransform::cifar(t)
            }
        };
        DataSources {
            train: Arc::new(CifarSource::new(
                subset(train, d.train_subset),
                transform(augment),
            )),
            test: Arc::new(CifarSource::new(
                subset(test, d.test_subset),
                transform(false),
            )),
            classes,
        }
    };
    Ok(match d.kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => {
            cifar_like(read_mnist_dir(&d.path)?, true)
        }
        DatasetKind::Cifar10 => cifar_like(read_cifar10(&d.path)?, false),
        DatasetKind::Cifar100 => cifar_like(read_cifar100(&d.path, Cifar100Labels::Fine)?, false),
        DatasetKind::Cifar100Coarse => {
            cifar_like(read_cifar100(&d.path, Cifar100Labels::Coarse)?, false)
        }
        DatasetKind::Imagenet => {
            let train = Arc::new(ImageFolder::open(d.path.join("train"))?);
            let test = Arc::new(ImageFolder::open(d.path.join("val"))?);
            DataSources {
                classes: train.classes().len(),
                train: Arc::new(FolderSource::new(train, ImagenetTransform::new(augment))),
                test: Arc::new(FolderSource::new(test, ImagenetTransform::new(false))),
            }
        }
    })
}

/// How to treat the output directory.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The run directory.
    pub dir: PathBuf,
    /// Continue the run in `dir` from its last checkpoint.
    pub resume: bool,
    /// Replace a run already in `dir`.
    pub overwrite: bool,
    /// Print progress to stderr.
    pub progress: bool,
    /// Stop abruptly after this many global iterations, writing nothing more (as a kill would).
    pub stop_after: Option<usize>,
    /// Graceful stop: once set (e.g. by a SIGINT handler), the run finishes its iteration,
    /// writes a mid-epoch checkpoint and returns [`TrainError::Stopped`].
    pub stop: Option<Arc<AtomicBool>>,
    /// Raise the graceful stop by itself after this many global iterations (tests).
    pub stop_gracefully_after: Option<usize>,
    /// Printed (with `progress`) before the first iteration of this invocation, followed by
    /// that iteration's time once its device work is done: GPU backends compile their kernels
    /// then, which would otherwise look like a hang.
    pub first_step_note: Option<String>,
    /// Created once the first iteration finished (e.g. to remember that kernels are cached).
    pub first_step_marker: Option<PathBuf>,
}

/// The final state of every sub-net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Epochs completed.
    pub epochs: usize,
    /// The targets of the sub-nets.
    pub targets: Vec<SubnetTarget>,
    /// The last evaluation of every sub-net.
    pub subnets: Vec<SubnetMetrics>,
    /// Best top-1 of the sparsest sub-net over all epochs.
    pub best_sparsest_top1: f64,
    /// Wall-clock seconds of this invocation.
    pub seconds: f64,
    /// Whether the run stopped early on request (`stop_after`).
    pub interrupted: bool,
}

const CONFIG_FILE: &str = "config.json";

/// Reads and checks the configuration saved in run directory `dir`.
pub fn read_run_config(dir: &Path) -> Result<TrainConfig> {
    let saved = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&saved) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TrainError::NoRun(dir.to_path_buf()));
        }
        Err(e) => return Err(TrainError::io(&saved, e)),
    };
    let config: TrainConfig = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: saved.clone(),
        reason: format!("unreadable config: {e}"),
    })?;
    config.validate()?;
    Ok(config)
}

/// The settings a resumed run may change: they move neither the data order nor any result
/// already computed (`epochs` extends the LR and prune-rate schedules from the resumed epoch).
const RESUMABLE_CHANGES: [&str; 4] = [
    "epochs",
    "data.path",
    "data_threads",
    "checkpoint_every_minutes",
];

/// The configuration of a resumed run when the user also gave settings: those in
/// [`RESUMABLE_CHANGES`] are applied ([`train`] records them in config.json once the
/// checkpoint has loaded), any other difference from the saved configuration is an error
/// listing them.
fn resume_config(saved: &TrainConfig, requested: TrainConfig, done: usize) -> Result<TrainConfig> {
    let leaves = |c: &TrainConfig| {
        let mut out = Vec::new();
        flatten_json(
            "",
            &serde_json::to_value(c).expect("config serialises"),
            &mut out,
        );
        out
    };
    let (old, new) = (leaves(saved), leaves(&requested));
    let changed: Vec<String> = new
        .iter()
        .filter(|(key, value)| old.iter().find(|(k, _)| k == key).map(|(_, v)| v) != Some(value))
        .map(|(key, _)| key.clone())
        .chain(
            old.iter()
                .filter(|(key, _)| !new.iter().any(|(k, _)| k == key))
                .map(|(key, _)| key.clone()),
        )
        .collect();
    let refused: Vec<&String> = changed
        .iter()
        .filter(|k| !RESUMABLE_CHANGES.contains(&k.as_str()))
        .collect();
    if !refused.is_empty() {
        let keys: Vec<&str> = refused.iter().map(|k| k.as_str()).collect();
        return Err(TrainError::config(
            "resume",
            format!(
                "cannot change {} of a run being resumed (only {} can change); start a new run \
                 (another --out, or --overwrite) to change them",
                keys.join(", "),
                RESUMABLE_CHANGES.join(", ")
            ),
        ));
    }
    if requested.epochs < done {
        return Err(TrainError::config(
            "epochs",
            format!(
                "{} is below the {done} epochs the run has already trained",
                requested.epochs
            ),
        ));
    }
    Ok(requested)
}

/// Every leaf of a JSON value with its dotted path (arrays are leaves).
fn flatten_json(
    prefix: &str,
    value: &serde_json::Value,
    out: &mut Vec<(String, serde_json::Value)>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_json(&key, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

/// Whether run directory `dir` holds results worth keeping: a checkpoint or metrics. A
/// directory with only a configuration (a start that failed or was killed before its first
/// epoch ended) holds nothing a new start could lose.
fn holds_progress(dir: &Path) -> Result<bool> {
    let metrics = std::fs::metadata(dir.join(METRICS_FILE)).map_or(0, |m| m.len());
    Ok(checkpoint::latest(dir)?.is_some() || metrics > 0)
}

/// After a new run failed: removes what it wrote when it has no checkpoint yet (its
/// configuration, metrics, events, a partial checkpoint, the lock), and `dir` itself when
/// nothing else is left in it, so that a failed start leaves no half run behind. A run with a
/// checkpoint is left as it is.
pub fn discard_unstarted_run(dir: &Path) -> Result<()> {
    if checkpoint::latest(dir)?.is_some() {
        return Ok(());
    }
    for name in RUN_FILES.iter().chain([&CONFIG_FILE]) {
        remove_if_present(&dir.join(name))?;
    }
    // The lock may be held by the caller (removing it is then allowed on Unix only); the
    // directory goes only when empty: anything of the user's stays.
    let _ = std::fs::remove_file(dir.join(LOCK_FILE));
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Removes the file or directory `path`; one that does not exist is fine.
fn remove_if_present(path: &Path) -> Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TrainError::io(path, e)),
        _ => Ok(()),
    }
}

/// The files and directories a run writes besides its configuration.
const RUN_FILES: [&str; 5] = [
    "checkpoints",
    METRICS_FILE,
    "metrics.csv",
    "events.jsonl",
    "summary.json",
];

/// Creates (or checks) the run directory, locks it for the life of the returned [`RunLock`],
/// and returns the configuration to run: the given one for a new run, the saved one when
/// resuming.
///
/// A new run refuses a directory holding a run's progress (checkpoints or metrics) unless
/// `overwrite`; a configuration without progress is replaced. Every file the run writes is
/// removed before a new run starts there.
pub fn prepare_run_dir(
    config: Option<TrainConfig>,
    opts: &RunOptions,
) -> Result<(TrainConfig, RunLock)> {
    let dir = &opts.dir;
    if opts.resume {
        if !dir.join(CONFIG_FILE).exists() {
            return Err(TrainError::NoRun(dir.clone()));
        }
        let lock = RunLock::acquire(dir)?;
        let saved = read_run_config(dir)?;
        let Some(latest) = checkpoint::latest(dir)? else {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                reason: "the run has no checkpoint yet (it stopped before its first checkpoint); \
                         start it again with --overwrite"
                    .into(),
            });
        };
        let done = checkpoint::read_state(&latest)?.next_epoch;
        let config = match config {
            Some(requested) => resume_config(&saved, requested, done)?,
            None => saved,
        };
        if done >= config.epochs {
            return Err(TrainError::RunFinished {
                dir: dir.clone(),
                epochs: done,
            });
        }
        return Ok((config, lock));
    }
    let config =
        config.ok_or_else(|| TrainError::config("recipe", "a new run needs a configuration"))?;
    config.validate()?;
    let saved = dir.join(CONFIG_FILE);
    let unwritable = |e: std::io::Error| TrainError::Unwritable {
        path: dir.clone(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let lock = RunLock::acquire(dir)?;
    if saved.exists() && !opts.overwrite && holds_progress(dir)? {
        return Err(TrainError::RunExists(dir.clone()));
    }
    for stale in RUN_FILES {
        remove_if_present(&dir.join(stale))?;
    }
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    write_atomic(&saved, &json).map_err(|e| TrainError::Unwritable {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    Ok((config, lock))
}

fn to_tensors<B: Backend>(
    batch: HostBatch,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let n = batch.labels.len();
    (
        Tensor::from_data(TensorData::new(batch.images, batch.shape), device),
        Tensor::from_data(TensorData::new(batch.labels, [n]), device),
    )
}

fn data_threads(config: &TrainConfig) -> usize {
    config.data_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Evaluates every sub-net of `model` on `loader` (loss, top-1, top-5, density).
pub fn evaluate<B: Backend>(
    model: &AstModel<B>,
    loader: &Loader,
    device: &B::Device,
) -> Result<Vec<SubnetMetrics>> {
    sync_running_stats(model);
    let k = ast_core::subnet::subnet_count(&ast_core::subnet::masked_layers(model))?;
    let switch = model.switch().clone();
    let active = switch.get();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut sums = vec![(0.0f64, 0usize, 0usize); k];
    let mut seen = 0usize;
    for batch in loader.epoch(0, 0) {
        let batch = batch?;
        let labels = batch.labels.clone();
        let (x, y) = to_tensors::<B>(batch, device);
        seen += labels.len();
        for (s, sum) in sums.iter_mut().enumerate() {
            switch.set(s);
            let logits = model.forward(x.clone());
            let classes = logits.dims()[1];
            let loss: f32 = loss_fn
                .forward(logits.clone(), y.clone())
                .into_scalar()
                .elem();
            let host: Vec<f32> = logits
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 logits");
            sum.0 += loss as f64 * labels.len() as f64;
            sum.1 += top_k_correct(&host, classes, &labels, 1);
            sum.2 += top_k_correct(&host, classes, &labels, 5.min(classes));
        }
    }
    switch.set(active);
    if seen == 0 {
        return Err(TrainError::config(
            "test_subset",
            "the test set is empty: nothing to evaluate (check --data-path and --test-subset)",
        ));
    }
    let seen = seen as f64;
    sums.iter()
        .enumerate()
        .map(|(s, (loss, top1, top5))| {
            Ok(SubnetMetrics {
                subnet: s,
                density: density(model, s)?,
                loss: loss / seen,
                top1: *top1 as f64 / seen,
                top5: *top5 as f64 / seen,
            })
        })
        .collect()
}

/// Refreshes every sub-net's BatchNorm running statistics with `batches` training-mode forward
/// passes over batches of `epoch` (no weight changes); see
/// [`TrainConfig::bn_recalibration_batches`].
pub fn recalibrate_batch_norms<B: AutodiffBackend>(
    model: &AstModel<B>,
    loader: &Loader,
    epoch: usize,
    batches: usize,
    device: &B::Device,
) -> Result<()> {
    let switch = model.switch().clone();
    let active = switch.get();
    let subnets = ast_core::subnet::subnet_count(&ast_core::subnet::masked_layers(model))?;
    for k in 0..subnets {
        switch.set(k);
        for b in 0..batches.min(loader.batches_per_epoch()) {
            let (x, _) = to_tensors::<B>(loader.batch(epoch, b)?, device);
            let _ = model.forward(x);
        }
    }
    switch.set(active);
    Ok(())
}

/// Index of the sparsest sub-net (lowest target density; the first on ties).
pub fn sparsest(targets: &[SubnetTarget]) -> usize {
    (0..targets.len())
        .min_by(|&a, &b| {
            targets[a]
                .density()
                .total_cmp(&targets[b].density())
                .then(a.cmp(&b))
        })
        .unwrap_or(0)
}

/// Runs (or resumes) a training run in `opts.dir` on backend `B`.
pub fn train<B>(config: TrainConfig, opts: &RunOptions, device: &B::Device) -> Result<RunSummary>
where
    B: AutodiffBackend,
{
    let started = Instant::now();
    let sources = load_data(&config)?;
    let initial = initial_weights::<B>(&config, sources.classes, device);
    let worker = Worker::<B> {
        config,
        opts,
        sources: &sources,
        device,
        team: None,
        initial: Some(initial),
        started,
    };
    Ok(run_worker(worker)?.expect("a lone worker leads"))
}

/// [`train`] on several devices at once, one worker thread per device (data parallelism, see
/// [`crate::parallel`]): every global batch of `config.batch_size` samples is split into one
/// shard per worker, the workers' dense gradients are averaged before each step, and worker 0
/// alone evaluates and writes metrics and checkpoints (which a run on any number of devices
/// can resume). Each worker normalises with its own shard's BatchNorm statistics (as PyTorch's
/// DistributedDataParallel without SyncBatchNorm); the running statistics are averaged over the
/// workers after every iteration. On the CPU backends the devices may repeat
/// (several workers share the one CPU device).
///
/// With `nodes`, this process is one of several (one per machine, each with its own
/// `devices`, the same number everywhere): the shards are split over all their workers, the
/// gradients averaged over all of them, and each process's worker 0 evaluates and writes the
/// run's files into its own `opts.dir` (the same files on every machine, so any of them can
/// resume). The processes must be given the same configuration (checked, but for the data
/// path) and the same data.
///
/// With one device and no `nodes` this is [`train`] with the exchanges of one worker (their
/// cost can be measured; the results are [`train`]'s).
///
/// One data-parallel run at a time per process (burn-collective keeps one server per backend).
pub fn train_data_parallel<B>(
    config: TrainConfig,
    opts: &RunOptions,
    devices: &[B::Device],
    nodes: Option<Arc<dyn CrossNode>>,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
{
    if devices.is_empty() {
        return Err(TrainError::config(
            "devices",
            "is empty: give at least one device",
        ));
    }
    let local = devices.len();
    if let Some(nodes) = &nodes {
        check_same_setup(nodes.as_ref(), &config, local)?;
    }
    let workers = local * nodes.as_ref().map_or(1, |n| n.size());
    if !config.batch_size.is_multiple_of(workers) {
        return Err(TrainError::config(
            "batch_size",
            format!(
                "({}) is not divisible by the {workers} workers: every worker takes an equal \
                 shard of each batch; choose a multiple of {workers}",
                config.batch_size
            ),
        ));
    }
    let _session = crate::parallel::session();
    let started = Instant::now();
    let sources = Arc::new(load_data(&config)?);
    let last = sources.train.len() % config.batch_size;
    if last != 0 && last < workers {
        return Err(TrainError::config(
            "train_subset",
            format!(
                "leaves a last batch of {last} samples, fewer than the {workers} workers: change \
                 train_subset or batch_size so that it holds at least {workers}"
            ),
        ));
    }
    // The initial weights are drawn here, once, from the process-wide generator; every worker
    // loads them into a model of its own (own sub-net switch, own BatchNorm statistics).
    let subnets = config.ast.subnets.len();
    let drawn = AstModel::<B>::new(config.model, sources.classes, subnets, &devices[0])
        .load_record(initial_weights::<B>(&config, sources.classes, &devices[0]));
    let (tx, rx) = std::sync::mpsc::channel();
    // Each worker waits for the word to register: `register` waits for all of them, so a
    // worker whose thread could not start would leave the others waiting there for ever.
    let mut go = Vec::with_capacity(local);
    for (rank, device) in devices.iter().enumerate() {
        let (config, opts, sources, device, tx, nodes) = (
            config.clone(),
            opts.clone(),
            Arc::clone(&sources),
            device.clone(),
            tx.clone(),
            nodes.clone(),
        );
        let (start, wait) = std::sync::mpsc::channel::<bool>();
        let initial = drawn.clone().into_record();
        let spawned = std::thread::Builder::new()
            .name(format!("ast-worker-{rank}"))
            .stack_size(8 << 20)
            .spawn(move || {
                if wait.recv() != Ok(true) {
                    return;
                }
                let run = std::panic::AssertUnwindSafe(|| {
                    let team = Team::<B::InnerBackend>::join_nodes(rank, local, &device, nodes)?;
                    let summary = run_worker(Worker::<B> {
                        config,
                        opts: &opts,
                        sources: &sources,
                        device: &device,
                        team: Some(&team),
                        initial: Some(initial),
                        started,
                    })?;
                    team.finish()?;
                    Ok(summary)
                });
                let result = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                    Err(TrainError::Workers(format!(
                        "worker {rank} panicked: {}",
                        panic_text(panic.as_ref())
                    )))
                });
                let _ = tx.send((rank, result));
            });
        if let Err(e) = spawned {
            // The started workers see their start signal dropped and return at once.
            return Err(TrainError::Workers(format!(
                "cannot start worker {rank}: {e}"
            )));
        }
        go.push(start);
    }
    for start in go {
        // A worker that is gone already reports through `tx`.
        let _ = start.send(true);
    }
    drop((tx, drawn));
    supervise::<B::InnerBackend>(&rx, local)
}

/// Errors unless every process runs the same configuration (but for the data path, which
/// may differ between machines) with as many workers as this one.
fn check_same_setup(nodes: &dyn CrossNode, config: &TrainConfig, local: usize) -> Result<()> {
    use sha2::Digest;
    let mut shared = config.clone();
    shared.data.path = PathBuf::new();
    let json = serde_json::to_vec(&shared).expect("config serialises");
    let digest = sha2::Sha256::digest(&json);
    // One byte per value (exact in f32), then the worker count.
    let mut mine: Vec<f32> = digest[..8].iter().map(|&b| b as f32).collect();
    mine.push(local as f32);
    let all = nodes.all_gather(&mine)?;
    for (p, theirs) in all.chunks(mine.len()).enumerate() {
        if theirs[8] != mine[8] {
            return Err(TrainError::Workers(format!(
                "process {p} has {} workers (--devices) and process {} has {local}: give every \
                 process as many devices",
                theirs[8],
                nodes.rank()
            )));
        }
        if theirs[..8] != mine[..8] {
            return Err(TrainError::Workers(format!(
                "process {p}'s configuration differs from process {}'s: give every process the \
                 same recipe and flags (only --data-path and --out may differ)",
                nodes.rank()
            )));
        }
    }
    Ok(())
}

/// The seeded initial weights of a run's model. Drawn through a record, in the record's order,
/// whatever touches the model first: one worker or several start from the same values.
fn initial_weights<B>(
    config: &TrainConfig,
    classes: usize,
    device: &B::Device,
) -> <AstModel<B> as Module<B>>::Record
where
    B: AutodiffBackend,
{
    B::seed(device, config.seed);
    AstModel::<B>::new(config.model, classes, config.ast.subnets.len(), device).into_record()
}

/// Waits for the workers of [`train_data_parallel`]. The first failure resets the collective
/// session, so the other workers' pending exchanges fail instead of waiting for ever; the error
/// returned is the failure itself, not its echo in the other workers.
fn supervise<IB: Backend>(
    rx: &std::sync::mpsc::Receiver<(usize, Result<Option<RunSummary>>)>,
    workers: usize,
) -> Result<RunSummary> {
    let mut leader = None;
    let mut failure: Option<TrainError> = None;
    for _ in 0..workers {
        let received = match failure {
            // After a failure the others stop at their next exchange; a worker still busy
            // with a long computation past this bound is left behind.
            Some(_) => rx.recv_timeout(std::time::Duration::from_secs(120)).ok(),
            None => rx.recv().ok(),
        };
        let Some((rank, result)) = received else {
            break;
        };
        match result {
            Ok(summary) if rank == 0 => leader = summary,
            Ok(_) => {}
            Err(e) => {
                if failure.is_none() {
                    collective::reset_collective::<IB>();
                }
                // Keep the first failure itself; its echoes only while nothing better is known.
                let better = match &failure {
                    None => true,
                    Some(TrainError::PeerFailed) => !matches!(e, TrainError::PeerFailed),
                    Some(_) => false,
                };
                if better {
                    failure = Some(e);
                }
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(leader.expect("worker 0 returns the summary")),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What one worker of a run needs; see [`run_worker`].
struct Worker<'a, B: AutodiffBackend> {
    config: TrainConfig,
    opts: &'a RunOptions,
    sources: &'a DataSources,
    device: &'a B::Device,
    /// The other workers of a data-parallel run, `None` when training alone.
    team: Option<&'a Team<B::InnerBackend>>,
    /// The initial weights when they were drawn by another thread.
    initial: Option<<AstModel<B> as Module<B>>::Record>,
    started: Instant,
}

/// The training loop of one worker. The leader (the only worker, or worker 0) evaluates and
/// writes the run's files and returns the summary; the others return `None`.
fn run_worker<B>(worker: Worker<'_, B>) -> Result<Option<RunSummary>>
where
    B: AutodiffBackend,
{
    let Worker {
        config,
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
    let total_steps = steps_per_epoch * config.epochs;
    let subnets = config.ast.subnets.len();

    let model = AstModel::<B>::new(config.model, sources.classes, subnets, device);
    let model = match initial {
        // Fresh autodiff leaves: the workers' graphs must not meet.
        Some(record) => model.load_record(record).fork(device),
        None => model,
    };
    let switch = model.switch().clone();
    let mut ast = AstStep::<B>::new(
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
    check_reaches_final_density(schedule, subnets, &pruned, steps_per_epoch, total_steps)?;
    let mut model = ast.init_masks(model);
    let mut state = TrainerState {
        next_epoch: 0,
        iteration: 0,
        best_sparsest_top1: 0.0,
        sha256: Default::default(),
        partial: None,
    };
    if opts.resume {
        let dir = checkpoint::latest(&opts.dir)?.ok_or_else(|| TrainError::Checkpoint {
            path: opts.dir.clone(),
            reason: "the run has no checkpoint yet".into(),
        })?;
        let (loaded, saved) = checkpoint::load(&dir, model, &mut ast)?;
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
        model = loaded;
        state = saved;
        // Changes the resume was allowed to make (e.g. more epochs) become the run's own.
        if leader && read_run_config(&opts.dir)? != config {
            let json = serde_json::to_vec_pretty(&config).expect("config serialises");
            write_atomic(&opts.dir.join(CONFIG_FILE), &json)?;
        }
    }
    let (metrics, events) = if leader {
        (
            Some(MetricsWriter::open(&opts.dir, state.next_epoch)?),
            Some(EventsWriter::open(&opts.dir, state.iteration)?),
        )
    } else {
        (None, None)
    };
    let progress_on = opts.progress && leader;
    let mut loss_fn = CrossEntropyLossConfig::new();
    if config.label_smoothing > 0.0 {
        loss_fn = loss_fn.with_smoothing(Some(config.label_smoothing as f32));
    }
    let loss_fn = loss_fn.init(device);
    let sparsest = sparsest(&config.ast.subnets);
    let mut last_eval = Vec::new();
    let mut last_checkpoint = Instant::now();

    let started_at = state.iteration;
    for epoch in state.next_epoch..config.epochs {
        let epoch_start = Instant::now();
        let lr = config.lr_schedule.lr(config.lr, epoch, config.epochs);
        let first = state.iteration - epoch * steps_per_epoch;
        let progress = Progress::new(epoch, config.epochs, steps_per_epoch, first, progress_on);
        let mut pending: Vec<PendingStep<B::InnerBackend>> = Vec::with_capacity(READBACK_EVERY);
        // Per sub-net: summed loss, correct predictions, samples, iterations; a mid-epoch
        // checkpoint carries the sums of its epoch so far.
        let PartialEpoch {
            mut loss_sum,
            mut per_subnet,
        } = state.partial.take().unwrap_or_else(|| PartialEpoch {
            loss_sum: 0.0,
            per_subnet: vec![(0.0, 0, 0, 0); config.ast.subnets.len()],
        });
        for (i, batch) in train_loader.epoch(epoch, first).enumerate() {
            let t = ast.iteration();
            let first_of_invocation = t == started_at;
            let step_start = Instant::now();
            if first_of_invocation && progress_on {
                if let Some(note) = &opts.first_step_note {
                    eprintln!("{note}");
                }
            }
            if opts.stop_after == Some(t) {
                return Ok(leader.then(|| RunSummary {
                    epochs: epoch,
                    targets: config.ast.subnets.clone(),
                    subnets: last_eval,
                    best_sparsest_top1: state.best_sparsest_top1,
                    seconds: started.elapsed().as_secs_f64(),
                    interrupted: true,
                }));
            }
            let batch = batch?;
            let labels = batch.labels.clone();
            let shard = labels.len();
            let (x, y) = to_tensors::<B>(batch, device);
            let iteration = ast.begin();
            let subnet = iteration.subnet();
            let logits = model.forward(x);
            let loss = loss_fn.forward(logits.clone(), y);
            pending.push(PendingStep {
                iteration: t,
                subnet,
                done: first + i + 1,
                loss: loss.clone().inner(),
                logits: logits.inner(),
                labels,
            });
            let grads = match team {
                None => GradientsParams::from_grads(loss.backward(), &model),
                Some(team) => {
                    // Shards of a partial batch may differ by one sample: weigh each worker's
                    // mean loss by its share, so the mean over workers is the batch's mean.
                    let whole = train_loader.global_batch_len(first + i);
                    let loss = if shard * team.global_size() == whole {
                        loss
                    } else {
                        loss.mul_scalar((shard * team.global_size()) as f32 / whole as f32)
                    };
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    team.mean_gradients(&model, grads)?
                }
            };
            let (stepped, report) = ast.step_params(model, grads, iteration, lr);
            model = match team {
                // Every worker leaves the iteration with the same running statistics.
                Some(team) => team.mean_buffers(stepped)?,
                None => stepped,
            };
            if first_of_invocation && leader {
                first_step_done::<B>(opts, device, step_start)?;
            }
            if let Some(update) = report.mask_update {
                if let Some(team) = team {
                    team.check_same(
                        &format!("the masks after iteration {t}"),
                        masks_checksum(&model),
                    )?;
                }
                let event = scheduled_event(
                    &config.ast.schedule,
                    &config.ast.subnets,
                    t,
                    steps_per_epoch,
                    total_steps,
                )
                .expect("the step reports the events the schedule gives");
                if let Some(events) = &events {
                    events.append(&EventRecord {
                        event,
                        density: update.density,
                        changed: update.changed,
                    })?;
                }
            }
            let stop = opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
                || opts.stop_gracefully_after == Some(t + 1);
            let due = leader
                && config
                    .checkpoint_every_minutes
                    .is_some_and(|m| last_checkpoint.elapsed().as_secs() >= m * 60);
            // The workers stop and checkpoint at the same iteration: any worker's stop request
            // counts, and the leader's clock says when a checkpoint is due.
            let (stop, due) = match team {
                Some(team) => {
                    let [stop, due] = team.any_of([stop, due])?;
                    (stop, due)
                }
                None => (stop, due),
            };
            let last = first + i + 1 == steps_per_epoch;
            if pending.len() >= READBACK_EVERY || stop || due || last {
                let mut sums = EpochSums {
                    loss_sum: &mut loss_sum,
                    per_subnet: &mut per_subnet,
                };
                read_back(
                    &mut pending,
                    epoch,
                    sources.classes,
                    &mut sums,
                    &progress,
                    team,
                )?;
            }
            if (stop || due) && !last {
                check_finite(&model, epoch)?;
                if !leader {
                    if stop {
                        return Ok(None);
                    }
                    continue;
                }
                let partial = PartialEpoch {
                    loss_sum,
                    per_subnet: per_subnet.clone(),
                };
                let mid = TrainerState {
                    next_epoch: epoch,
                    iteration: ast.iteration(),
                    partial: Some(partial),
                    ..state.clone()
                };
                let saved = checkpoint::save(&opts.dir, &model, &ast, &mid)?;
                last_checkpoint = Instant::now();
                if stop {
                    return Err(TrainError::Stopped {
                        iteration: ast.iteration(),
                        checkpoint: saved,
                        dir: opts.dir.clone(),
                    });
                }
            }
        }
        state.iteration = ast.iteration();
        if config.bn_recalibration_batches > 0 {
            // Every worker recalibrates on the same whole batches: their statistics stay equal.
            recalibrate_batch_norms(
                &model,
                &whole_loader,
                epoch,
                config.bn_recalibration_batches,
                device,
            )?;
        }
        // A checkpoint or a result of a diverged model is worth nothing: stop before writing.
        check_finite(&model, epoch)?;
        let signalled = opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        let stop = match team {
            Some(team) => team.any(signalled)?,
            None => signalled,
        };
        // Only the leader holds the writers: the other workers go on to the next epoch.
        let Some(metrics) = &metrics else {
            state.next_epoch = epoch + 1;
            if stop && state.next_epoch < config.epochs {
                return Ok(None);
            }
            continue;
        };
        let eval_model = model.valid();
        last_eval = evaluate(&eval_model, &test_loader, device)?;
        if let Some(m) = last_eval.iter().find(|m| !m.loss.is_finite()) {
            let what = format!("sub-net {}'s test loss ({}) is", m.subnet, m.loss);
            return Err(TrainError::NonFiniteModel { epoch, what });
        }
        state.best_sparsest_top1 = state.best_sparsest_top1.max(last_eval[sparsest].top1);
        state.next_epoch = epoch + 1;
        metrics.append(&EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / per_subnet.iter().map(|s| s.3).sum::<usize>().max(1) as f64,
            seconds: epoch_start.elapsed().as_secs_f64(),
            subnets: last_eval.clone(),
            best_sparsest_top1: state.best_sparsest_top1,
            train: per_subnet
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
        if progress_on {
            for m in &last_eval {
                eprintln!(
                    "epoch {}/{} sub-net {} density {:.4} loss {:.4} top-1 {:.4} top-5 {:.4}",
                    epoch + 1,
                    config.epochs,
                    m.subnet,
                    m.density,
                    m.loss,
                    m.top1,
                    m.top5
                );
            }
        }
        if state.next_epoch.is_multiple_of(config.checkpoint_every)
            || state.next_epoch == config.epochs
            || stop
        {
            let saved = checkpoint::save(&opts.dir, &model, &ast, &state)?;
            last_checkpoint = Instant::now();
            if stop && state.next_epoch < config.epochs {
                return Err(TrainError::Stopped {
                    iteration: ast.iteration(),
                    checkpoint: saved,
                    dir: opts.dir.clone(),
                });
            }
        }
    }

    if !leader {
        return Ok(None);
    }
    let summary = RunSummary {
        epochs: config.epochs,
        targets: config.ast.subnets.clone(),
        subnets: last_eval,
        best_sparsest_top1: state.best_sparsest_top1,
        seconds: started.elapsed().as_secs_f64(),
        interrupted: false,
    };
    let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
    write_atomic(&opts.dir.join("summary.json"), &json)?;
    Ok(Some(summary))
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

/// The running training figures of an epoch.
struct EpochSums<'a> {
    loss_sum: &'a mut f64,
    /// Per sub-net: summed loss, correct predictions, samples, iterations.
    per_subnet: &'a mut [(f64, usize, usize, usize)],
}

/// Reads `pending`'s losses and logits back in one transfer each and adds them up in iteration
/// order; the first non-finite loss is an error naming its iteration (no checkpoint has been
/// written since: checkpoints are taken only after a read-back).
fn read_back<B: Backend>(
    pending: &mut Vec<PendingStep<B>>,
    epoch: usize,
    classes: usize,
    sums: &mut EpochSums<'_>,
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
            });
        }
        let (correct, samples) = (correct as usize, samples as usize);
        *sums.loss_sum += value as f64;
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
            Err(TrainError::NonFiniteModel { epoch, what })
        }
    }
}

/// Loads the model of a finished or interrupted run from its last checkpoint.
pub fn load_run_model<B>(
    run_dir: &Path,
    device: &B::Device,
) -> Result<(TrainConfig, AstModel<B>, usize)>
where
    B: AutodiffBackend,
{
    let config = read_run_config(run_dir)?;
    let dir = checkpoint::latest(run_dir)?.ok_or_else(|| TrainError::Checkpoint {
        path: run_dir.to_path_buf(),
        reason: "the run has no checkpoint".into(),
    })?;
    let classes = checkpoint_classes(&config)?;
    let model = AstModel::<B>::new(config.model, classes, config.ast.subnets.len(), device);
    let switch = model.switch().clone();
    let mut ast = AstStep::<B>::new(config.ast.clone(), &model, &switch, 1, 1)?;
    let (model, state) = checkpoint::load(&dir, model, &mut ast)?;
    Ok((config, model, state.next_epoch))
}

fn checkpoint_classes(config: &TrainConfig) -> Result<usize> {
    Ok(match config.data.kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist | DatasetKind::Cifar10 => 10,
        DatasetKind::Cifar100 => 100,
        DatasetKind::Cifar100Coarse => 20,
        DatasetKind::Imagenet => ImageFolder::open(config.data.path.join("train"))?
            .classes()
            .len(),
    })
}
