//! Checkpoints: everything a run needs to continue bit-identically.
//!
//! A checkpoint is a directory `checkpoints/epoch-NNNN/` holding
//! - `model.safetensors` (burn-store): weights and every BatchNorm copy with its running
//!   statistics;
//! - `masks.safetensors`: every sub-net's mask of every masked layer as packed bits (one `U8`
//!   tensor of `⌈n / 8⌉` bytes per mask, named by the mask's module path, position `p` in bit
//!   `p mod 8` of byte `p / 8`): an eighth of what burn-store's one byte per boolean takes.
//!   Checkpoints written before kept the masks in `model.safetensors`; they still load;
//! - `optimizer.safetensors`: the shared optimizer's state keyed by parameter path (SGD:
//!   `velocity/…`; Adam/AdamW: `moment_1/…`, `moment_2/…` and each step count as a one-element
//!   u64 tensor `time/…`) and the gradient-correction references;
//! - `state.json`: the next epoch, the global iteration (which fixes the sub-net, the mask and LR
//!   schedules and the data order), the best accuracy so far;
//! - `SHA256SUMS`: the SHA-256 of every other file, `state.json` included, as `sha256sum` writes
//!   them (so `sha256sum -c SHA256SUMS` checks a checkpoint by hand), verified on load; a
//!   checkpoint of this layout without it is refused. Earlier layouts kept the tensor files'
//!   checksums in `state.json` (still verified) or none.
//!
//! The tensor files are written without header metadata, so that a checkpoint's bytes (and
//! their checksums) depend on its content only.
//!
//! It is written into a temporary directory and renamed into place, then `checkpoints/latest`
//! is replaced atomically: a crash leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use ast_core::optimizer::ParamState;
use ast_core::subnet::{
    mask_vec, masked_layers, param_paths, read_params, replace_masks, sync_running_stats,
    MaskedLayerInfo,
};
use ast_core::AstStep;
use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn_store::{ModuleSnapshot, PathFilter, SafetensorsStore};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::metrics::{temporary_of, write_atomic};

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
/// Every sub-net's masks of a checkpoint, as packed bits.
pub const MASKS_FILE: &str = "masks.safetensors";
/// The trainer's state of a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// The SHA-256 of every other file of a checkpoint.
pub const SUMS_FILE: &str = "SHA256SUMS";
/// The files [`SUMS_FILE`] covers.
const SUMMED: [&str; 4] = [MODEL_FILE, MASKS_FILE, OPTIMIZER_FILE, STATE_FILE];

/// The module paths of `model`'s masks.
fn mask_paths<B: Backend, M: Module<B>>(model: &M) -> HashSet<String> {
    mask_slots(model).into_iter().map(|(p, _, _)| p).collect()
}

/// Every tensor of `model` in [`MODEL_FILE`]: all but its `masks` (their paths), which
/// [`MASKS_FILE`] holds.
fn model_file_filter<B: Backend, M: Module<B>>(model: &M, masks: &HashSet<String>) -> PathFilter {
    let kept: Vec<String> = model
        .collect(None, None, false)
        .iter()
        .map(|t| t.full_path())
        .filter(|p| !masks.contains(p))
        .collect();
    PathFilter::new().with_full_paths(kept)
}

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
    let mut store = SafetensorsStore::from_file(&model_file)
        .clear_metadata()
        .filter(model_file_filter(model, &mask_paths(model)));
    model
        .save_into(&mut store)
        .map_err(|e| TrainError::io(&model_file, e))?;
    kill_point("checkpoint-model-written");
    write_masks(&tmp.join(MASKS_FILE), model)?;
    let optimizer_file = tmp.join(OPTIMIZER_FILE);
    let (tensors, times) = optimizer_tensors(model, ast);
    write_tensors(&optimizer_file, tensors, times)?;
    kill_point("checkpoint-optimizer-written");
    let mut state = state.clone();
    state.sha256 = [MODEL_FILE, MASKS_FILE, OPTIMIZER_FILE]
        .iter()
        .map(|f| Ok((f.to_string(), sha256_of(&tmp.join(f))?)))
        .collect::<Result<_>>()?;
    let state_json = serde_json::to_vec_pretty(&state).expect("state serialises");
    write_atomic(&tmp.join(STATE_FILE), &state_json)?;
    let sums = SUMMED
        .iter()
        .map(|f| Ok(format!("{}  {f}\n", sha256_of(&tmp.join(f))?)))
        .collect::<Result<String>>()?;
    write_atomic(&tmp.join(SUMS_FILE), sums.as_bytes())?;
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

/// Removes what an interrupted checkpoint left in `run_dir`: unfinished checkpoint
/// directories (`.tmp-…`), checkpoints beyond the [`KEEP`] newest up to `latest`, and the
/// pointer's temporary file.
pub fn tidy(run_dir: &Path) -> Result<()> {
    let root = checkpoints_dir(run_dir);
    if let Some(latest) = latest(run_dir)? {
        let name = latest.file_name().map(|n| n.to_string_lossy().into_owned());
        prune_old(&root, &name.unwrap_or_default())?;
    }
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
            }
        }
    }
    remove_file_if_present(&temporary_of(&root.join("latest")))
}

/// Removes the plain file `path`, if there is one.
pub(crate) fn remove_file_if_present(path: &Path) -> Result<()> {
    match path.is_file() {
        true => std::fs::remove_file(path).map_err(|e| TrainError::io(path, e)),
        false => Ok(()),
    }
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints_dir(run_dir).join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) if name.trim().is_empty() || name.contains(['/', '\\']) => {
            let fix = match newest_on_disk(&checkpoints_dir(run_dir)) {
                Some(newest) => format!(
                    "write the newest one's name there (`echo {newest} > {}`)",
                    pointer.display()
                ),
                None => "no checkpoint is left either: start the run again with --overwrite".into(),
            };
            Err(corrupt(
                &pointer,
                format!("names no checkpoint directory; {fix}"),
            ))
        }
        Ok(name) => Ok(Some(checkpoints_dir(run_dir).join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io(&pointer, e)),
    }
}

/// The greatest `epoch-…` name among the checkpoint directories in `root`, for messages.
fn newest_on_disk(root: &Path) -> Option<String> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(STATE_FILE).is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("epoch-"))
        .max()
}

fn corrupt(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the trainer state of checkpoint `dir`, checked against [`SUMS_FILE`] and for values
/// no run writes.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    if !dir.is_dir() {
        return Err(corrupt(dir, "checkpoint directory does not exist"));
    }
    let state_file = dir.join(STATE_FILE);
    match read_sums(dir)? {
        Some(sums) => check_sum(dir, STATE_FILE, &sums[STATE_FILE], SUMS_FILE)?,
        None if dir.join(MASKS_FILE).exists() => {
            return Err(corrupt(
                &dir.join(SUMS_FILE),
                "is missing, so the checkpoint cannot be verified: restore it, or start the run \
                 again",
            ));
        }
        None => {}
    }
    let text =
        std::fs::read_to_string(&state_file).map_err(|e| corrupt(&state_file, e.to_string()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| corrupt(&state_file, format!("unreadable state: {e}")))?;
    let best = state.best_sparsest_top1;
    if !(0.0..=1.0).contains(&best) {
        return Err(corrupt(
            &state_file,
            format!("best_sparsest_top1 is {best}, not an accuracy in [0, 1]"),
        ));
    }
    Ok(state)
}

/// The checksums [`SUMS_FILE`] lists, by file name, or `None` for a checkpoint without one
/// (earlier layouts).
fn read_sums(dir: &Path) -> Result<Option<BTreeMap<String, String>>> {
    let path = dir.join(SUMS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| corrupt(&path, e.to_string()))?;
    let mut sums = BTreeMap::new();
    for line in text.lines() {
        let (hash, name) = line
            .split_once("  ")
            .filter(|(h, _)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| corrupt(&path, format!("line `{line}` is not `SHA-256  file`")))?;
        sums.insert(name.to_string(), hash.to_string());
    }
    if let Some(missing) = SUMMED.iter().find(|f| !sums.contains_key(**f)) {
        return Err(corrupt(&path, format!("lists no checksum of {missing}")));
    }
    Ok(Some(sums))
}

/// Checks every file of checkpoint `dir` against its recorded SHA-256 and returns its state.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let state = read_state(dir)?;
    match read_sums(dir)? {
        Some(sums) => {
            for file in [MODEL_FILE, MASKS_FILE, OPTIMIZER_FILE] {
                check_sum(dir, file, &sums[file], SUMS_FILE)?;
            }
        }
        // The earlier layout kept the tensor files' checksums in the state.
        None => {
            for (file, expected) in &state.sha256 {
                check_sum(dir, file, expected, STATE_FILE)?;
            }
        }
    }
    Ok(state)
}

/// Loads a checkpoint into `model` (built with the run's config) and `ast` (built for it).
pub fn load<B: AutodiffBackend, M: AutodiffModule<B>>(
    dir: &Path,
    model: M,
    ast: &mut AstStep<B>,
) -> Result<(M, TrainerState)> {
    let state = verify(dir)?;

    let model_file = dir.join(MODEL_FILE);
    if !model_file.is_file() {
        return Err(corrupt(&model_file, "file is missing"));
    }
    let mut model = model;
    // Checkpoints written before masks had a file of their own hold them in the model's.
    let masks_file = dir.join(MASKS_FILE);
    let packed = masks_file.is_file();
    let mut store = SafetensorsStore::from_file(&model_file);
    // The masks file holds the masks: the model file's are missing by design.
    let masks: HashSet<String> = match packed {
        true => mask_paths(&model),
        false => HashSet::new(),
    };
    if packed {
        store = store
            .filter(model_file_filter(&model, &masks))
            .allow_partial(true);
    }
    let misfit = |why: &str| {
        corrupt(
            &model_file,
            format!(
                "its tensors do not fit the run's model ({why}): config.json's model or \
                 sub-net count, or the file, changed since the checkpoint was written"
            ),
        )
    };
    let applied = model.load_from(&mut store).map_err(|e| {
        // burn-store's message is a multi-line table; its first line names the problem.
        let text = e.to_string();
        misfit(
            text.lines()
                .next()
                .unwrap_or_default()
                .trim()
                .trim_end_matches(':'),
        )
    })?;
    let missing: Vec<&String> = (applied.missing.iter())
        .map(|(p, _)| p)
        .filter(|p| !masks.contains(*p))
        .collect();
    if !applied.errors.is_empty() || !missing.is_empty() {
        return Err(misfit(&format!(
            "{} errors, {} tensors missing{}",
            applied.errors.len(),
            missing.len(),
            missing
                .first()
                .map(|p| format!(", e.g. `{p}`"))
                .unwrap_or_default()
        )));
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

    if packed {
        model = read_masks(&masks_file, model)?;
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

/// The mask of every sub-net of every masked layer: (its module path, the layer, the sub-net).
fn mask_slots<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, MaskedLayerInfo, usize)> {
    let paths = param_paths(model);
    let mut slots = Vec::new();
    for layer in masked_layers(model) {
        for (k, id) in layer.mask_ids.iter().enumerate() {
            let path = paths.get(id).expect("every mask has a path").clone();
            slots.push((path, layer.clone(), k));
        }
    }
    slots
}

/// Writes [`MASKS_FILE`]: each mask of `model` as packed bits.
fn write_masks<B: Backend, M: Module<B>>(path: &Path, model: &M) -> Result<()> {
    let slots = mask_slots(model);
    let ids: Vec<ParamId> = slots.iter().map(|(_, l, k)| l.mask_ids[*k]).collect();
    let packed: Vec<(String, Vec<u8>)> = slots
        .into_iter()
        .zip(read_params(model, &ids))
        .map(|((name, _, _), data)| {
            let bits = mask_vec(data);
            (name, ast_infer::bits::pack(bits.into_iter()))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = packed
        .iter()
        .map(|(name, bytes)| {
            let view = TensorView::new(Dtype::U8, vec![bytes.len()], bytes);
            (name.clone(), view.expect("consistent view"))
        })
        .collect();
    let data = safetensors::serialize(views, None).map_err(|e| TrainError::io(path, e))?;
    write_atomic(path, &data)
}

/// Reads [`MASKS_FILE`] into `model`'s masks: every mask there, of its layer's size, nothing
/// else.
fn read_masks<B: Backend, M: Module<B>>(path: &Path, model: M) -> Result<M> {
    let bytes = std::fs::read(path).map_err(|e| corrupt(path, e.to_string()))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let slots = mask_slots(&model);
    if tensors.len() != slots.len() {
        return Err(corrupt(
            path,
            format!(
                "holds {} masks, the run's model has {}: config.json's model or sub-net count, \
                 or the file, changed since the checkpoint was written",
                tensors.len(),
                slots.len()
            ),
        ));
    }
    let subnets = slots.iter().map(|(_, _, k)| k + 1).max().unwrap_or(0);
    let mut masks: Vec<Vec<TensorData>> = vec![Vec::new(); subnets];
    for (name, layer, k) in slots {
        let view = tensors
            .tensor(&name)
            .map_err(|_| corrupt(path, format!("the mask `{name}` is missing")))?;
        let bits = (view.dtype() == Dtype::U8 && view.shape().len() == 1)
            .then(|| ast_infer::bits::unpack(view.data(), layer.numel()))
            .flatten()
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("the mask `{name}` is not {} packed bits", layer.numel()),
                )
            })?;
        masks[k].push(TensorData::new(bits, layer.shape.clone()));
    }
    let mut model = model;
    for (k, masks) in masks.into_iter().enumerate() {
        model = replace_masks(model, k, masks).map_err(|e| corrupt(path, e.to_string()))?;
    }
    Ok(model)
}

/// The SHA-256 of a file, in hex.
fn sha256_of(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let digest = sha2::Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `file` of checkpoint `dir` against the SHA-256 `expected` that `recorded_in` holds.
fn check_sum(dir: &Path, file: &str, expected: &str, recorded_in: &str) -> Result<()> {
    let path = dir.join(file);
    if !path.is_file() {
        return Err(corrupt(&path, "file is missing"));
    }
    if sha256_of(&path)? != expected {
        return Err(corrupt(
            &path,
            format!(
                "its SHA-256 differs from the one {recorded_in} recorded: the file was changed \
                 or damaged after it was written; restore it, or start the run again"
            ),
        ));
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
    let sizes = param_sizes(model);
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
        // Every tensor has the size of what it belongs to: a parameter, or a masked layer's
        // weight (the correction references).
        let expected = match name.split_once('/') {
            Some(("velocity" | "moment_1" | "moment_2", path)) => {
                sizes.get(&param_id(&ids, path)?).copied()
            }
            Some(("previous", path)) => layer_index.get(path).map(|&l| ast.layers()[l].numel()),
            Some(("ema", rest)) => (rest.split_once('/'))
                .and_then(|(_, path)| layer_index.get(path))
                .map(|&l| ast.layers()[l].numel()),
            _ => None,
        };
        if let Some(expected) = expected.filter(|&e| e != n) {
            return Err(format!(
                "tensor `{name}` holds {n} values, but what it belongs to has {expected}"
            ));
        }
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

/// The number of values of every float parameter of `model`, by id.
fn param_sizes<B: Backend, M: Module<B>>(model: &M) -> HashMap<ParamId, usize> {
    struct Sizes(HashMap<ParamId, usize>);
    impl<B: Backend> ModuleVisitor<B> for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.insert(param.id, param.lazy_shape().num_elements());
        }
    }
    let mut sizes = Sizes(HashMap::new());
    model.visit(&mut sizes);
    sizes.0
}

fn param_id(ids: &HashMap<String, ParamId>, path: &str) -> core::result::Result<ParamId, String> {
    ids.get(path)
        .copied()
        .ok_or_else(|| format!("unknown parameter `{path}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ast_core::testing::{tiny_config, TinyNet};
    use ast_core::SubnetTarget;
    use burn::backend::{Autodiff, Flex};

    type B = Autodiff<Flex>;

    /// A tiny model with seeded ERK masks at density 0.5 for two sub-nets, and its step.
    fn tiny() -> (TinyNet<B>, AstStep<B>) {
        let device = Default::default();
        let mut config = tiny_config(vec![SubnetTarget::Density(0.2); 2]);
        config.schedule.init_density = 0.5;
        let switch = ast_core::SubnetSwitch::new();
        let model = TinyNet::<B>::new(2, &switch, &device);
        let ast = AstStep::new(config, &model, &switch, 10, 100).unwrap();
        (ast.init_masks(model), ast)
    }

    fn state() -> TrainerState {
        TrainerState {
            next_epoch: 1,
            iteration: 10,
            best_sparsest_top1: 0.5,
            sha256: BTreeMap::new(),
            partial: None,
        }
    }

    /// Rewrites the checkpoint's checksums to match its files (as someone covering an edit
    /// would), so that what is checked next is the content itself.
    fn reseal(dir: &Path) {
        let sums: String = SUMMED
            .iter()
            .map(|f| format!("{}  {f}\n", sha256_of(&dir.join(f)).unwrap()))
            .collect();
        std::fs::write(dir.join(SUMS_FILE), sums).unwrap();
    }

    fn all_masks(model: &TinyNet<B>) -> Vec<Vec<TensorData>> {
        (0..2)
            .map(|k| ast_core::subnet::read_masks(model, k).unwrap())
            .collect()
    }

    #[test]
    fn masks_are_stored_as_bits_and_old_checkpoints_still_load() {
        let run = tempfile::tempdir().unwrap();
        let (model, ast) = tiny();
        let dir = save(run.path(), &model, &ast, &state()).unwrap();

        // The model file holds no mask; the masks file one bit per position.
        let bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
        let names: Vec<String> = SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        assert!(!names.iter().any(|n| n.contains("masks")), "{names:?}");
        let bytes = std::fs::read(dir.join(MASKS_FILE)).unwrap();
        let masks = SafeTensors::deserialize(&bytes).unwrap();
        let layers = masked_layers(&model);
        assert_eq!(masks.len(), 2 * layers.len());
        let bits: usize = masks.tensors().iter().map(|(_, v)| v.data().len()).sum();
        let expected: usize = layers.iter().map(|l| 2 * l.numel().div_ceil(8)).sum();
        assert_eq!(bits, expected);

        // Loaded into a fresh model: the same masks.
        let (fresh, mut fresh_ast) = tiny();
        let (loaded, _) = load(&dir, fresh, &mut fresh_ast).unwrap();
        assert_eq!(all_masks(&loaded), all_masks(&model));

        // A checkpoint of the earlier layout (masks inside the model file, no masks file, two
        // checksums) loads to the same masks.
        let old = run.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let mut store = SafetensorsStore::from_file(old.join(MODEL_FILE)).clear_metadata();
        model.save_into(&mut store).unwrap();
        std::fs::copy(dir.join(OPTIMIZER_FILE), old.join(OPTIMIZER_FILE)).unwrap();
        let mut old_state = state();
        old_state.sha256 = [MODEL_FILE, OPTIMIZER_FILE]
            .iter()
            .map(|f| (f.to_string(), sha256_of(&old.join(f)).unwrap()))
            .collect();
        std::fs::write(
            old.join("state.json"),
            serde_json::to_vec(&old_state).unwrap(),
        )
        .unwrap();
        let (fresh, mut fresh_ast) = tiny();
        let (loaded, _) = load(&old, fresh, &mut fresh_ast).unwrap();
        assert_eq!(all_masks(&loaded), all_masks(&model));

        // A mask of the wrong length (checksums made to match): refused, naming it.
        let first = masks.names()[0].to_string();
        let short = vec![0u8; 1];
        let view = TensorView::new(Dtype::U8, vec![1], &short).unwrap();
        let data = safetensors::serialize(vec![(first.clone(), view)], None).unwrap();
        std::fs::write(dir.join(MASKS_FILE), data).unwrap();
        let (fresh, mut fresh_ast) = tiny();
        let err = load(&dir, fresh, &mut fresh_ast).err().unwrap().to_string();
        assert!(
            err.contains("its SHA-256 differs from the one SHA256SUMS recorded"),
            "{err}"
        );
        reseal(&dir);
        let (fresh, mut fresh_ast) = tiny();
        let err = load(&dir, fresh, &mut fresh_ast).err().unwrap().to_string();
        assert!(err.contains("holds 1 masks, the run's model has"), "{err}");
    }

    #[test]
    fn an_optimizer_tensor_of_the_wrong_size_is_refused_not_a_panic() {
        let run = tempfile::tempdir().unwrap();
        let (model, ast) = tiny();
        let dir = save(run.path(), &model, &ast, &state()).unwrap();
        let numel = masked_layers(&model)[0].numel();
        for name in ["velocity/conv1.weight", "previous/conv1"] {
            let values = vec![0u8; 4 * (numel - 1)];
            let view = TensorView::new(Dtype::F32, vec![numel - 1], &values).unwrap();
            let data = safetensors::serialize(vec![(name.to_string(), view)], None).unwrap();
            std::fs::write(dir.join(OPTIMIZER_FILE), data).unwrap();
            reseal(&dir);
            let (fresh, mut fresh_ast) = tiny();
            let err = load(&dir, fresh, &mut fresh_ast).err().unwrap().to_string();
            let expected = format!(
                "`{name}` holds {} values, but what it belongs to has {numel}",
                numel - 1
            );
            assert!(err.contains(&expected), "{err}");
        }
    }

    #[test]
    fn a_latest_pointer_naming_no_checkpoint_is_one_line() {
        let run = tempfile::tempdir().unwrap();
        std::fs::create_dir(run.path().join("checkpoints")).unwrap();
        for name in ["", "\n", "../../etc"] {
            std::fs::write(run.path().join("checkpoints/latest"), name).unwrap();
            let err = latest(run.path()).unwrap_err().to_string();
            assert!(err.contains("names no checkpoint directory"), "{err}");
        }
    }

    #[test]
    fn every_file_of_a_checkpoint_is_checked_the_state_included() {
        let run = tempfile::tempdir().unwrap();
        let (model, ast) = tiny();
        let dir = save(run.path(), &model, &ast, &state()).unwrap();
        let load_err = || {
            let (fresh, mut fresh_ast) = tiny();
            load(&dir, fresh, &mut fresh_ast).err().unwrap().to_string()
        };
        // An edited state: its checksum differs.
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        let edited = text.replace("\"best_sparsest_top1\": 0.5", "\"best_sparsest_top1\": 2.5");
        assert_ne!(edited, text);
        std::fs::write(dir.join(STATE_FILE), edited).unwrap();
        let err = load_err();
        assert!(
            err.contains("state.json") && err.contains("SHA-256 differs"),
            "{err}"
        );
        // Checksums made to match: the value is out of range.
        reseal(&dir);
        let err = load_err();
        assert!(
            err.contains("best_sparsest_top1 is 2.5, not an accuracy"),
            "{err}"
        );
        // No checksums at all: refused, not unverified.
        std::fs::remove_file(dir.join(SUMS_FILE)).unwrap();
        let err = load_err();
        assert!(
            err.contains("SHA256SUMS") && err.contains("is missing"),
            "{err}"
        );
        // `sha256sum -c` reads the file: two spaces, one line per file.
        let dir = save(run.path(), &model, &ast, &state()).unwrap();
        let sums = std::fs::read_to_string(dir.join(SUMS_FILE)).unwrap();
        assert_eq!(sums.lines().count(), 4);
        let line = format!(
            "{}  {MODEL_FILE}",
            sha256_of(&dir.join(MODEL_FILE)).unwrap()
        );
        assert!(sums.lines().any(|l| l == line), "{sums}");
    }
}
