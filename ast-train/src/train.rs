//! The alternating training loop, evaluation of every sub-net, and the run directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use ast_core::subnet::{density, sync_running_stats};
use ast_core::{AstModule, AstStep, ModelSpec, SubnetTarget};
use burn::collective;
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::{Augment, DatasetKind, TrainConfig};
use crate::data::{
    read_cifar10, read_cifar100, read_mnist_dir, Cifar100Labels, CifarSource, CifarTransform,
    DatasetSource, FolderSource, ImageDataset, ImageFolder, ImagenetTransform, Loader,
    SampleSource,
};
use crate::error::{Result, TrainError};
use crate::lock::{RunLock, LOCK_FILE};
use crate::metrics::{temporary_of, top_k_correct, write_atomic, SubnetMetrics, METRICS_FILE};
use crate::parallel::{CrossNode, Team};
use crate::trainer::{run_worker, Worker};

/// Training and evaluation sources of a run.
pub struct DataSources {
    /// Training samples (augmented when the loader trains).
    pub train: Arc<dyn SampleSource>,
    /// Evaluation samples.
    pub test: Arc<dyn SampleSource>,
    /// Number of classes.
    pub classes: usize,
}

impl DataSources {
    /// Training and test sources from two burn datasets of
    /// [`ImageItem`](crate::data::ImageItem)s of `classes` classes, each through its transform
    /// (e.g. [`CifarTransform::cifar`]`(true)` and `(false)`).
    pub fn from_datasets<Train, Test>(
        train: Train,
        test: Test,
        classes: usize,
        train_transform: CifarTransform,
        test_transform: CifarTransform,
    ) -> Self
    where
        Train: burn_dataset::Dataset<crate::data::ImageItem> + 'static,
        Test: burn_dataset::Dataset<crate::data::ImageItem> + 'static,
    {
        DataSources {
            train: Arc::new(DatasetSource::new(train, train_transform, classes)),
            test: Arc::new(DatasetSource::new(test, test_transform, classes)),
            classes,
        }
    }
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

/// Reads the dataset of `config` and pairs it with the input pipeline of the model `spec`
/// builds.
pub fn load_data<S: ModelSpec>(config: &TrainConfig, spec: &S) -> Result<DataSources> {
    let d = &config.data;
    let wants = spec.image_size();
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
                config.model,
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

pub(crate) const CONFIG_FILE: &str = "config.json";
/// A finished run's summary.
pub(crate) const SUMMARY_FILE: &str = "summary.json";

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
const RESUMABLE_CHANGES: [&str; 5] = [
    "epochs",
    "data.path",
    "data_threads",
    "checkpoint_every_minutes",
    "devices",
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
    remove_run_files(dir)?;
    remove_if_present(&dir.join(CONFIG_FILE))?;
    // The lock may be held by the caller (removing it is then allowed on Unix only); the
    // directory goes only when empty: anything of the user's stays.
    let _ = std::fs::remove_file(dir.join(LOCK_FILE));
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// The name of an entry of `dir` other than the lock, if it has one.
fn first_entry(dir: &Path) -> Result<Option<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect();
    names.sort();
    Ok(names.into_iter().next())
}

/// Removes what a run writes in `dir` besides its configuration: its metrics files, its plots
/// and, in `checkpoints/`, its checkpoints (`epoch-…`, `.tmp-…`, `latest`). Anything else, in
/// `checkpoints/` too, is not the run's and stays.
fn remove_run_files(dir: &Path) -> Result<()> {
    for name in RUN_FILES.iter().filter(|&&n| n != CHECKPOINTS_DIR) {
        let path = dir.join(name);
        if !path.is_dir() {
            remove_if_present(&path)?;
        }
    }
    // The report and plots a run draws; other files there stay.
    remove_if_present(&dir.join(crate::report::REPORT_FILE))?;
    let plots = dir.join(crate::plot::PLOTS_DIR);
    if plots.is_dir() && !plots.is_symlink() {
        for name in crate::plot::PLOT_FILES {
            checkpoint::remove_file_if_present(&plots.join(name))?;
        }
        let _ = std::fs::remove_dir(&plots);
    }
    let checkpoints = dir.join(CHECKPOINTS_DIR);
    if !checkpoints.is_dir() || checkpoints.is_symlink() {
        return Ok(());
    }
    for entry in std::fs::read_dir(&checkpoints).map_err(|e| TrainError::io(&checkpoints, e))? {
        let entry = entry.map_err(|e| TrainError::io(&checkpoints, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "latest" || name.starts_with("epoch-") || name.starts_with(".tmp-") {
            remove_if_present(&entry.path())?;
        }
    }
    // Only when nothing of anyone else's is left in it.
    let _ = std::fs::remove_dir(&checkpoints);
    Ok(())
}

/// Removes what an interrupted run left half-written in `dir`: unfinished and superseded
/// checkpoints ([`checkpoint::tidy`]) and the temporary files of its atomic writes.
pub(crate) fn tidy_run(dir: &Path) -> Result<()> {
    checkpoint::tidy(dir)?;
    for name in RUN_FILES
        .iter()
        .chain([&CONFIG_FILE])
        .filter(|&&n| n != CHECKPOINTS_DIR)
    {
        checkpoint::remove_file_if_present(&temporary_of(&dir.join(name)))?;
    }
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

/// The directory of a run's checkpoints.
const CHECKPOINTS_DIR: &str = "checkpoints";

/// The files and directories a run writes besides its configuration.
const RUN_FILES: [&str; 5] = [
    CHECKPOINTS_DIR,
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
        config.validate()?;
        // A run killed after its last epoch's checkpoint but before its summary is finished
        // by the resume (summary, tidying); only a run with its summary is done.
        if done >= config.epochs && dir.join(SUMMARY_FILE).exists() {
            // "Nothing changed" must not hide a damaged checkpoint.
            checkpoint::verify(&latest)?;
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
    check_out_path(dir)?;
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let lock = RunLock::acquire(dir)?;
    let ours = read_run_config(dir).is_ok();
    if ours && !opts.overwrite && holds_progress(dir)? {
        return Err(TrainError::RunExists(dir.clone()));
    }
    if !ours && !opts.overwrite {
        if let Some(example) = first_entry(dir)? {
            return Err(TrainError::NotARun {
                dir: dir.clone(),
                example,
            });
        }
    }
    remove_run_files(dir)?;
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    write_atomic(&saved, &json).map_err(|e| TrainError::Unwritable {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    Ok((config, lock))
}

/// Refuses an output path that exists but cannot be a directory: a dangling symbolic link (the
/// OS would answer "File exists") or a file or device.
fn check_out_path(dir: &Path) -> Result<()> {
    let refuse = |reason: String| TrainError::Unwritable {
        path: dir.to_path_buf(),
        reason,
    };
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() && std::fs::metadata(dir).is_err() {
        let target = std::fs::read_link(dir)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(refuse(format!(
            "it is a symbolic link to {target}, which does not exist; create that directory \
             or choose another --out"
        )));
    }
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(refuse(
            "it exists and is not a directory (a file or a device); choose another --out".into(),
        ));
    }
    Ok(())
}

pub(crate) fn data_threads(config: &TrainConfig) -> usize {
    config.data_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Evaluates every sub-net of `model` on `loader` (loss, top-1, top-5, density).
pub fn evaluate<B: Backend, M: AstModule<B>>(
    model: &M,
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
        let (x, y) = batch.into_tensors::<B>(device);
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
pub fn recalibrate_batch_norms<B: AutodiffBackend, M: AstModule<B>>(
    model: &M,
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
            let (x, _) = loader.batch(epoch, b)?.into_tensors::<B>(device);
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

/// Runs (or resumes) a training run in `opts.dir` on backend `B`, of the model `spec` builds:
/// a built-in [`ast_models::ModelKind`] or a model of your own ([`ModelSpec`]).
pub fn train<B, S>(
    config: TrainConfig,
    spec: &S,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
    <S::Model<B> as AutodiffModule<B>>::InnerModule: AstModule<B::InnerBackend>,
{
    let started = Instant::now();
    check_spec(&config, spec)?;
    let sources = load_data(&config, spec)?;
    train_from(config, spec, &sources, opts, device, started)
}

/// [`train`] on data of your own: any burn datasets of [`ImageItem`](crate::data::ImageItem)s
/// ([`DataSources::from_datasets`]) or other [`SampleSource`]s instead of the dataset that
/// `config.data` names (its subsets and augmentation setting are not applied: the sources are
/// taken as given). Resuming needs the same sources again.
pub fn train_on<B, S>(
    config: TrainConfig,
    spec: &S,
    sources: &DataSources,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
    <S::Model<B> as AutodiffModule<B>>::InnerModule: AstModule<B::InnerBackend>,
{
    let started = Instant::now();
    check_spec(&config, spec)?;
    let side = spec.image_size();
    for (which, source) in [("training", &sources.train), ("test", &sources.test)] {
        let shape = source.sample_shape();
        if shape != [3, side, side] {
            return Err(TrainError::config(
                "data",
                format!(
                    "the {which} samples are {shape:?}; {} takes [3, {side}, {side}]: give the \
                     transform that output shape",
                    config.model
                ),
            ));
        }
    }
    train_from(config, spec, sources, opts, device, started)
}

fn train_from<B, S>(
    config: TrainConfig,
    spec: &S,
    sources: &DataSources,
    opts: &RunOptions,
    device: &B::Device,
    started: Instant,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
    <S::Model<B> as AutodiffModule<B>>::InnerModule: AstModule<B::InnerBackend>,
{
    let initial = starting_weights::<B, S>(&config, spec, sources.classes, opts, device)?;
    let worker = Worker::<B, S> {
        config,
        spec,
        opts,
        sources,
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
pub fn train_data_parallel<B, S>(
    config: TrainConfig,
    spec: &S,
    opts: &RunOptions,
    devices: &[B::Device],
    nodes: Option<Arc<dyn CrossNode>>,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    S: ModelSpec + Clone + 'static,
    S::Model<B>: AutodiffModule<B>,
    <S::Model<B> as AutodiffModule<B>>::InnerModule: AstModule<B::InnerBackend>,
{
    check_spec(&config, spec)?;
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
    let sources = Arc::new(load_data(&config, spec)?);
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
    let drawn = spec
        .build::<B>(sources.classes, subnets, &devices[0])
        .load_record(starting_weights::<B, S>(
            &config,
            spec,
            sources.classes,
            opts,
            &devices[0],
        )?);
    let (tx, rx) = std::sync::mpsc::channel();
    // Each worker waits for the word to register: `register` waits for all of them, so a
    // worker whose thread could not start would leave the others waiting there for ever.
    let mut go = Vec::with_capacity(local);
    for (rank, device) in devices.iter().enumerate() {
        let (config, spec, opts, sources, device, tx, nodes) = (
            config.clone(),
            spec.clone(),
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
                    let summary = run_worker(Worker::<B, S> {
                        config,
                        spec: &spec,
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
    // Each machine lists its own devices; their count is compared below.
    shared.devices = None;
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
fn initial_weights<B, S>(
    config: &TrainConfig,
    spec: &S,
    classes: usize,
    device: &B::Device,
) -> <S::Model<B> as Module<B>>::Record
where
    B: AutodiffBackend,
    S: ModelSpec,
{
    B::seed(device, config.seed);
    spec.build::<B>(classes, config.ast.subnets.len(), device)
        .into_record()
}

/// The weights a new run starts from: [`initial_weights`], or the last checkpoint of the run
/// [`TrainConfig::init_from`] names, checked to be of the same model, classes and sub-net count
/// (a resumed run loads its own checkpoint instead).
fn starting_weights<B, S>(
    config: &TrainConfig,
    spec: &S,
    classes: usize,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<<S::Model<B> as Module<B>>::Record>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
{
    let Some(dir) = config.init_from.as_ref().filter(|_| !opts.resume) else {
        return Ok(initial_weights::<B, S>(config, spec, classes, device));
    };
    let source = read_run_config(dir)?;
    let misfit = |what: &str, theirs: String, ours: String, fix: String| {
        TrainError::config(
            "init_from",
            format!(
                "the run in {} has {what} {theirs}, this run {ours}: {fix}",
                dir.display()
            ),
        )
    };
    if source.model != config.model {
        return Err(misfit(
            "model",
            source.model.clone(),
            config.model.clone(),
            format!("give --model {}", source.model),
        ));
    }
    let (theirs, ours) = (source.ast.subnets.len(), config.ast.subnets.len());
    if theirs != ours {
        return Err(misfit(
            "sub-nets:",
            theirs.to_string(),
            ours.to_string(),
            format!("give {theirs} targets (--densities or --nm)"),
        ));
    }
    let source_classes = checkpoint_classes(&source)?;
    if source_classes != classes {
        return Err(misfit(
            "classes:",
            source_classes.to_string(),
            classes.to_string(),
            format!("train on a dataset of {source_classes} classes"),
        ));
    }
    let (_, model, _) = load_run_model::<B, S>(spec, dir, device)?;
    Ok(model.into_record())
}

/// Errors unless `spec` builds the model the run's configuration names.
fn check_spec<S: ModelSpec>(config: &TrainConfig, spec: &S) -> Result<()> {
    if config.model == spec.name() {
        return Ok(());
    }
    Err(TrainError::config(
        "model",
        format!(
            "the run's configuration names model `{}` but the model given builds `{}`: give \
             the spec of the model the run was made with",
            config.model,
            spec.name()
        ),
    ))
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

/// Loads the model of a finished or interrupted run from its last checkpoint.
pub fn load_run_model<B, S>(
    spec: &S,
    run_dir: &Path,
    device: &B::Device,
) -> Result<(TrainConfig, S::Model<B>, usize)>
where
    B: AutodiffBackend,
    S: ModelSpec,
    S::Model<B>: AutodiffModule<B>,
{
    let config = read_run_config(run_dir)?;
    check_spec(&config, spec)?;
    let dir = checkpoint::latest(run_dir)?.ok_or_else(|| TrainError::Checkpoint {
        path: run_dir.to_path_buf(),
        reason: "the run has no checkpoint".into(),
    })?;
    let classes = checkpoint_classes(&config)?;
    let model = spec.build::<B>(classes, config.ast.subnets.len(), device);
    let switch = model.switch().clone();
    let mut ast = AstStep::<B>::new(config.ast.clone(), &model, &switch, 1, 1)?;
    let (model, state) = checkpoint::load(&dir, model, &mut ast)?;
    Ok((config, model, state.next_epoch))
}

pub(crate) fn checkpoint_classes(config: &TrainConfig) -> Result<usize> {
    Ok(match config.data.kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist | DatasetKind::Cifar10 => 10,
        DatasetKind::Cifar100 => 100,
        DatasetKind::Cifar100Coarse => 20,
        DatasetKind::Imagenet => ImageFolder::open(config.data.path.join("train"))?
            .classes()
            .len(),
    })
}
