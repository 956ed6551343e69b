//! Checkpoints: everything a run needs to continue bit-identically.
//!
//! A checkpoint is a directory `checkpoints/epoch-NNNN/` holding
//! - `model.safetensors` (burn-store): weights, every sub-net's masks, every BatchNorm copy with
//!   its running statistics;
//! - `optimizer.safetensors`: the shared optimizer's state keyed by parameter path (SGD:
//!   `velocity/…`; Adam/AdamW: `moment_1/…`, `moment_2/…` and each step count as a one-element
//!   u64 tensor `time/…`) and the gradient-correction references;
//! - `state.json`: the next epoch, the global iteration (which fixes the sub-net, the mask and LR
//!   schedules and the data order), the best accuracy so far, and the SHA-256 of both tensor
//!   files, verified on load.
//!
//! Both tensor files are written without header metadata, so that a checkpoint's bytes (and
//! their checksums) depend on its content only.
//!
//! It is written into a temporary directory and renamed into place, then `checkpoints/latest`
//! is replaced atomically: a crash leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ast_core::optimizer::ParamState;
use ast_core::subnet::{param_paths, sync_running_stats};
use ast_core::AstStep;
use burn::module::{AutodiffModule, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::metrics::write_atomic;

/// Checkpoints kept in a run directory (older ones are removed).
pub const KEEP: usize = 2;

/// The trainer's own state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The epoch the resumed run starts with.
    pub next_epoch: usize,
    /// The global iteration the resumed run starts with.
    pub iteration: usize,
    /// Best top-1 so far of the sparsest sub-net.
    pub best_sparsest_top1: f64,
    /// SHA-256 (hex) of each tensor file of the checkpoint, by file name (checkpoints written
    /// before checksums were kept have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
    /// A mid-epoch checkpoint's running sums of its epoch (`None` at an epoch's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
}

/// The training figures of an epoch interrupted by a mid-epoch checkpoint, so that the resumed
/// epoch reports what an uninterrupted one would.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Sum of the training losses so far.
    pub loss_sum: f64,
    /// Per sub-net: summed loss, correct predictions, samples, iterations.
    pub per_subnet: Vec<(f64, usize, usize, usize)>,
}

/// The weights, masks and BatchNorms of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer state and correction references of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Test hook, compiled only with the `fault-injection` feature (the test suite's build; a
/// release build of `ast-cli` has none): `AST_KILL_AT=<point>:<n>` ends the process (exit
/// status 137, no cleanup, as a SIGKILL would) the `n`-th time the run reaches `<point>` (`n`
/// defaults to 1). The points sit between the writes of a checkpoint and of an epoch's
/// metrics; the kill tests use them to prove that a run killed anywhere resumes to the same
/// bytes as an uninterrupted one.
#[cfg(feature = "fault-injection")]
pub fn kill_point(point: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Ok(spec) = std::env::var("AST_KILL_AT") else {
        return;
    };
    let (name, nth) = spec.split_once(':').unwrap_or((spec.as_str(), "1"));
    if name == point && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth.parse().unwrap_or(1) {
        std::process::exit(137);
    }
}

/// Without the `fault-injection` feature the kill points do nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn kill_point(_point: &str) {}

fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes a checkpoint of `model`, `ast` and `state` into `run_dir`; returns its directory.
pub fn save<B: AutodiffBackend, M: AutodiffModule<B>>(
    run_dir: &Path,
    model: &M,
    ast: &AstStep<B>,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = match state.partial {
        None => format!("epoch-{:04}", state.next_epoch),
        // Sorts after the previous epoch's end and before this epoch's.
        Some(_) => format!("epoch-{:04}-iter-{:09}", state.next_epoch, state.iteration),
    };
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    kill_point("checkpoint-started");

    sync_running_stats(model);
    let model_file = tmp.join(MODEL_FILE);
    // burn-store's default metadata is a hash map: its order, hence the file's bytes, would
    // change from process to process.
    let mut store = SafetensorsStore::from_file(&model_file).clear_metadata();
    model
        .save_into(&mut store)
        .map_err(|e| TrainError::io(&model_file, e))?;
    kill_point("checkpoint-model-written");
    let optimizer_file = tmp.join(OPTIMIZER_FILE);
    let (tensors, times) = optimizer_tensors(model, ast);
    write_tensors(&optimizer_file, tensors, times)?;
    kill_point("checkpoint-optimizer-written");
    let mut state = state.clone();
    state.sha256 = [MODEL_FILE, OPTIMIZER_FILE]
        .iter()
        .map(|f| Ok((f.to_string(), sha256_of(&tmp.join(f))?)))
        .collect::<Result<_>>()?;
    let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
    write_atomic(&tmp.join("state.json"), &state_json)?;
    kill_point("checkpoint-state-written");
    sync_file(&model_file)?;

    let target = root.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| TrainError::io(&target, e))?;
    kill_point("checkpoint-renamed");
    write_atomic(&root.join("latest"), name.as_bytes())?;
    kill_point("checkpoint-latest-written");
    prune_old(&root, &name)?;
    Ok(target)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

fn prune_old(root: &Path, current: &str) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| TrainError::io(root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("epoch-") && n.as_str() <= current)
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for n in &names[..excess] {
        let p = root.join(n);
        std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints_dir(run_dir).join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => Ok(Some(checkpoints_dir(run_dir).join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&pointer, e)),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the trainer state of checkpoint `dir`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    if !dir.is_dir() {
        return Err(corrupt(dir, "checkpoint directory does not exist"));
    }
    let state_file = dir.join("state.json");
    let text =
        std::fs::read_to_string(&state_file).map_err(|e| corrupt(&state_file, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| corrupt(&state_file, format!("unreadable state: {e}")))
}

/// Loads a checkpoint into `model` (built with the run's config) and `ast` (built for it).
pub fn load<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    model: M,
    ast: &mut AstStep<B>,
) -> Result<(M, TrainerState)> {
    let state = read_state(dir)?;
    verify_checksums(dir, &state)?;

    let model_file = dir.join(MODEL_FILE);
    if !model_file.is_file() {
        return Err(corrupt(&model_file, "file is missing"));
    }
    let mut model = model;
    let mut store = SafetensorsStore::from_file(&model_file);
    let applied = model.load_from(&mut store).map_err(|e| {
        // burn-store's message is a multi-line table; its first line names the problem.
        let text = e.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(':');
        corrupt(
            &model_file,
            format!(
                "its tensors do not fit the run's model ({first}): config.json's model or \
                     sub-net count, or the file, changed since the checkpoint was written"
            ),
        )
    })?;
    if !applied.errors.is_empty() || !applied.missing.is_empty() {
        return Err(corrupt(
            &model_file,
            format!(
                "does not fit the model ({} errors, {} tensors missing{})",
                applied.errors.len(),
                applied.missing.len(),
                applied
                    .missing
                    .first()
                    .map(|(p, _)| format!(", e.g. `{p}`"))
                    .unwrap_or_default()
            ),
        ));
    }
    if let Some(extra) = applied.unused.first() {
        // E.g. a checkpoint of 3 sub-nets read with a config of 2: loading the rest would
        // silently drop a sub-net.
        return Err(corrupt(
            &model_file,
            format!(
                "holds {} tensors the run's model does not have (e.g. `{extra}`): config.json's \
                 model or sub-net count changed since the checkpoint was written",
                applied.unused.len()
            ),
        ));
    }

    let optimizer_file = dir.join(OPTIMIZER_FILE);
    let bytes =
        std::fs::read(&optimizer_file).map_err(|e| corrupt(&optimizer_file, e.to_string()))?;
    let tensors =
        SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&optimizer_file, e.to_string()))?;
    restore_optimizer(&model, ast, &tensors).map_err(|reason| corrupt(&optimizer_file, reason))?;
    ast.set_iteration(state.iteration);
    Ok((model, state))
}

type Named = Vec<(String, Vec<f32>)>;

fn host(t: Tensor<impl Backend, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

fn optimizer_tensors<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    ast: &AstStep<B>,
) -> (Named, Vec<(String, u64)>) {
    let paths = param_paths(model);
    let mut out: Named = Vec::new();
    let mut times = Vec::new();
    let optimizer = ast.optimizer();
    for id in optimizer.state_ids() {
        let (Some(path), Some(state)) = (paths.get(&id), optimizer.state(id)) else {
            continue;
        };
        match state {
            ParamState::Sgd { velocity } => {
                out.push((format!("velocity/{path}"), host(velocity.clone())));
            }
            ParamState::Adam {
                time,
                moment_1,
                moment_2,
            } => {
                out.push((format!("moment_1/{path}"), host(moment_1.clone())));
                out.push((format!("moment_2/{path}"), host(moment_2.clone())));
                times.push((format!("time/{path}"), *time as u64));
            }
        }
    }
    let correction = ast.correction_state();
    for (layer, h) in ast.layers().iter().zip(&correction.previous) {
        if let Some(h) = h {
            out.push((format!("previous/{}", layer.path), host(h.clone())));
        }
    }
    for (k, per_layer) in correction.ema.iter().enumerate() {
        for (layer, m) in ast.layers().iter().zip(per_layer) {
            if let Some(m) = m {
                out.push((format!("ema/{k}/{}", layer.path), host(m.clone())));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, times)
}

fn write_tensors(path: &Path, tensors: Named, counts: Vec<(String, u64)>) -> Result<()> {
    let floats = tensors.into_iter().map(|(name, v)| {
        let n = v.len();
        let bytes = v.into_iter().flat_map(f32::to_le_bytes).collect();
        (name, Dtype::F32, bytes, n)
    });
    let counts = counts
        .into_iter()
        .map(|(name, c)| (name, Dtype::U64, c.to_le_bytes().to_vec(), 1));
    let bytes: Vec<(String, Dtype, Vec<u8>, usize)> = floats.chain(counts).collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, dtype, b, n)| {
            (
                name.clone(),
                TensorView::new(*dtype, vec![*n], b).expect("consistent view"),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).map_err(|e| TrainError::io(path, e))?;
    write_atomic(path, &data)
}

/// The SHA-256 of a file, in hex.
fn sha256_of(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks the files of checkpoint `dir` against the checksums its state recorded.
fn verify_checksums(dir: &Path, state: &TrainerState) -> Result<()> {
    for (file, expected) in &state.sha256 {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(corrupt(&path, "file is missing"));
        }
        if sha256_of(&path)? != *expected {
            return Err(corrupt(
                &path,
                "its SHA-256 differs from the one state.json recorded: the file was changed \
                 or damaged after it was written; restore it, or start the run again",
            ));
        }
    }
    Ok(())
}

fn restore_optimizer<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    ast: &mut AstStep<B>,
    tensors: &SafeTensors<'_>,
) -> core::result::Result<(), String> {
    let ids: HashMap<String, ParamId> = param_paths(model)
        .into_iter()
        .map(|(id, p)| (p, id))
        .collect();
    let layer_index: HashMap<String, usize> = ast
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| (l.path.clone(), i))
        .collect();
    let device = model.devices().into_iter().next().unwrap_or_default();
    type Moments<IB> = (Option<Tensor<IB, 1>>, Option<Tensor<IB, 1>>);
    let mut moments: HashMap<String, Moments<B::InnerBackend>> = HashMap::new();
    let mut times: HashMap<String, usize> = HashMap::new();
    for (name, view) in tensors.tensors() {
        if let Some(path) = name.strip_prefix("time/") {
            let bytes: [u8; 8] = view
                .data()
                .try_into()
                .ok()
                .filter(|_| view.dtype() == Dtype::U64)
                .ok_or_else(|| format!("tensor `{name}` is not one u64"))?;
            times.insert(path.to_string(), u64::from_le_bytes(bytes) as usize);
            continue;
        }
        if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
            return Err(format!("tensor `{name}` is not a flat f32 tensor"));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = values.len();
        let tensor = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(values, [n]), &device);
        let layer = |path: &str| {
            layer_index
                .get(path)
                .copied()
                .ok_or_else(|| format!("unknown layer `{path}`"))
        };
        if let Some(path) = name.strip_prefix("velocity/") {
            let state = ParamState::Sgd { velocity: tensor };
            ast.optimizer_mut()
                .set_state(param_id(&ids, path)?, state)?;
        } else if let Some(path) = name.strip_prefix("moment_1/") {
            moments.entry(path.to_string()).or_default().0 = Some(tensor);
        } else if let Some(path) = name.strip_prefix("moment_2/") {
            moments.entry(path.to_string()).or_default().1 = Some(tensor);
        } else if let Some(path) = name.strip_prefix("previous/") {
            let l = layer(path)?;
            ast.correction_state_mut().previous[l] = Some(tensor);
        } else if let Some(rest) = name.strip_prefix("ema/") {
            let (k, path) = rest
                .split_once('/')
                .ok_or_else(|| format!("bad tensor name `{name}`"))?;
            let k: usize = k.parse().map_err(|_| format!("bad tensor name `{name}`"))?;
            let l = layer(path)?;
            let ema = &mut ast.correction_state_mut().ema;
            if k >= ema.len() {
                return Err(format!(
                    "tensor `{name}`: no EMA for sub-net {k} in this configuration"
                ));
            }
            ema[k][l] = Some(tensor);
        } else {
            return Err(format!("unexpected tensor `{name}`"));
        }
    }
    for (path, moments) in moments {
        let (Some(moment_1), Some(moment_2)) = moments else {
            return Err(format!(
                "Adam state of `{path}` lacks one of its two moments"
            ));
        };
        let time = *times
            .get(&path)
            .ok_or_else(|| format!("Adam state of `{path}` lacks its step count"))?;
        let state = ParamState::Adam {
            time,
            moment_1,
            moment_2,
        };
        ast.optimizer_mut()
            .set_state(param_id(&ids, &path)?, state)?;
    }
    Ok(())
}

fn param_id(ids: &HashMap<String, ParamId>, path: &str) -> core::result::Result<ParamId, String> {
    ids.get(path)
        .copied()
        .ok_or_else(|| format!("unknown parameter `{path}`"))
}
