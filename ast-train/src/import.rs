//! Import of the original code's training checkpoints (github.com/mengjian0502/AST,
//! `torch.save({'state_dict': model.state_dict(), 'epoch': …, 'acc': …})` of one of its CIFAR
//! models — ResNet-20/32/56, the wide ResNet-32, ResNet-18/50, MobileNet-V1 — built with
//! `nspars=K, uspars=True`) into a run directory that `eval`, `stats`, `export`, `run --resume`
//! and `run --init-from` take.
//!
//! The file is read with burn-store's PyTorch reader, which parses the pickle without running
//! any of it; the names and mask buffers are mapped by
//! [`AstModel::load_original`](ast_models::AstModel::load_original). The run directory
//! holds the configuration given (its sub-nets' targets from the masks) and one checkpoint at
//! the end of the epoch the file stores, with a fresh optimizer.
//! Everything is checked before anything is written.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use ast_core::{AstStep, SubnetTarget};
use ast_models::original::StateDict;
use ast_models::{AstModel, ModelKind};
use burn::tensor::backend::AutodiffBackend;
use burn_store::pytorch::reader::PickleValue;
use burn_store::pytorch::{PytorchError, PytorchReader};

use crate::checkpoint::{self, TrainerState};
use crate::config::{total_iterations, TrainConfig};
use crate::error::{Result, TrainError};
use crate::train::{checkpoint_classes, prepare_run_dir, RunOptions};

/// What an import brought in.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// Sub-nets (the original's `nspars`).
    pub subnets: usize,
    /// Per sub-net, the share of the masked layers' weights its mask keeps.
    pub densities: Vec<f64>,
    /// The epochs the run directory counts as done.
    pub epochs: usize,
    /// Tensors read from the file.
    pub tensors: usize,
}

fn refuse(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Import {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Every tensor of the state dict in `path` as f32 by key (a `module.` prefix, which
/// `nn.DataParallel` adds, removed): under the checkpoint's `state_dict` key, or the file itself
/// when it is a bare state dict.
fn read_state_dict(path: &Path) -> Result<StateDict> {
    if !path.is_file() {
        return Err(refuse(path, "no such file"));
    }
    let unreadable = |e: PytorchError| {
        // burn-store's text goes on with guesses after its first sentence.
        let text = e.to_string();
        let first = text
            .split(". ")
            .next()
            .unwrap_or_default()
            .trim_end_matches('.');
        refuse(
            path,
            format!(
                "not a PyTorch checkpoint this reader can take ({first}); save the model's \
                 state dict: torch.save({{'state_dict': model.state_dict()}}, …)"
            ),
        )
    };
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(reader) => reader,
        Err(PytorchError::KeyNotFound(_)) => PytorchReader::new(path).map_err(unreadable)?,
        Err(e) => return Err(unreadable(e)),
    };
    let mut tensors = HashMap::new();
    for (key, snapshot) in reader.into_tensors() {
        let data = snapshot
            .to_data()
            .map_err(|e| refuse(path, format!("tensor `{key}` cannot be read: {e:?}")))?;
        let shape = data.shape.to_vec();
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| refuse(path, format!("tensor `{key}` is not numeric: {e:?}")))?;
        let key = key.strip_prefix("module.").unwrap_or(&key).to_string();
        tensors.insert(key, (shape, values));
    }
    if tensors.is_empty() {
        return Err(refuse(path, "holds no tensors: it is not a state dict"));
    }
    Ok(tensors)
}

/// The sub-net indices `j` of the `….mask{j}` buffers.
fn mask_indices(tensors: &StateDict) -> BTreeSet<usize> {
    tensors
        .keys()
        .filter_map(|k| k.rsplit_once(".mask").and_then(|(_, j)| j.parse().ok()))
        .collect()
}

/// A number the checkpoint stores beside its state dict (`epoch`, `acc`), if it has it.
fn stored_number(path: &Path, key: &str) -> Option<f64> {
    match PytorchReader::read_pickle_data(path, Some(key)).ok()? {
        PickleValue::Int(v) => Some(v as f64),
        PickleValue::Float(v) => Some(v),
        _ => None,
    }
}

/// Imports the original's checkpoint `from` into the run directory `opts.dir`, as a run of
/// `config` (its model one of the original's CIFAR models). The sub-nets' targets become `densities` when given (one per sub-net of the checkpoint) or the
/// densities their masks keep (to four decimals). The run counts the checkpoint's `epoch + 1`
/// epochs as done (all of `config.epochs` when it stores none), so that `run --resume` goes on
/// with the rest of the schedule (with a fresh optimizer).
pub fn import_original<B: AutodiffBackend>(
    from: &Path,
    mut config: TrainConfig,
    densities: Option<&[f64]>,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<Imported> {
    let kind: ModelKind = config
        .model
        .parse()
        .map_err(|e: String| TrainError::config("model", e))?;
    let tensors = read_state_dict(from)?;
    let found = mask_indices(&tensors);
    let subnets = found.len();
    if subnets == 0 {
        return Err(refuse(
            from,
            "its state dict holds no mask buffers (`….mask0`): it is not a checkpoint of the \
             original's sparse models (built with uspars=True)",
        ));
    }
    if found.last() != Some(&(subnets - 1)) {
        return Err(refuse(
            from,
            format!("its masks are numbered {found:?}, not 0 to K − 1"),
        ));
    }
    let classifier = ["classifier.weight", "linear.weight", "fc.weight"]
        .iter()
        .find_map(|k| tensors.get(*k))
        .ok_or_else(|| {
            refuse(
                from,
                format!(
                    "it has no classifier (`classifier.weight`, `linear.weight` or \
                     `fc.weight`): not a state dict of the original's {kind}"
                ),
            )
        })?;
    let classes = classifier.0[0];
    let expected = checkpoint_classes(&config)?;
    if classes != expected {
        return Err(refuse(
            from,
            format!(
                "its classifier has {classes} outputs, {} has {expected} classes: give the \
                 dataset it was trained on (--dataset)",
                config.data.kind
            ),
        ));
    }
    let model = AstModel::<B>::new(kind, classes, subnets, device)
        .load_original(&tensors)
        .map_err(|reason| match reason.starts_with("the original's names") {
            true => TrainError::config("model", format!("cannot import {kind}: {reason}")),
            false => refuse(
                from,
                format!("{reason}: not a checkpoint of {kind} as the original defines it"),
            ),
        })?;
    let achieved: Vec<f64> = (0..subnets)
        .map(|j| {
            let (kept, all) = tensors
                .iter()
                .filter(|(k, _)| k.ends_with(&format!(".mask{j}")))
                .fold((0.0, 0usize), |(kept, all), (_, (_, v))| {
                    (
                        kept + v.iter().map(|&x| f64::from(x)).sum::<f64>(),
                        all + v.len(),
                    )
                });
            kept / all as f64
        })
        .collect();
    let targets = match densities {
        Some(given) if given.len() != subnets => {
            return Err(TrainError::config(
                "densities",
                format!(
                    "gives {} sub-nets, the checkpoint holds {subnets}",
                    given.len()
                ),
            ))
        }
        Some(given) => given.to_vec(),
        None => achieved.iter().map(|d| (d * 1e4).round() / 1e4).collect(),
    };
    config.ast.subnets = targets.iter().map(|&d| SubnetTarget::Density(d)).collect();
    // The original stores the epoch just finished (from 0).
    let done = match stored_number(from, "epoch").filter(|e| *e >= 0.0) {
        Some(epoch) => (epoch as usize + 1).min(config.epochs),
        None => config.epochs,
    };
    let best = stored_number(from, "acc")
        .map(|acc| acc / 100.0)
        .filter(|acc| (0.0..=1.0).contains(acc))
        .unwrap_or(0.0);
    let steps_per_epoch = config
        .data
        .train_subset
        .unwrap_or(config.data.kind.train_size())
        .div_ceil(config.batch_size);
    let total = total_iterations(steps_per_epoch, config.epochs)?;

    let (config, _lock) = prepare_run_dir(Some(config), opts)?;
    let switch = model.switch().clone();
    let ast = AstStep::<B>::new(config.ast.clone(), &model, &switch, steps_per_epoch, total)?;
    let state = TrainerState {
        next_epoch: done,
        iteration: done * steps_per_epoch,
        best_sparsest_top1: best,
        sha256: Default::default(),
        partial: None,
    };
    if let Err(e) = checkpoint::save(&opts.dir, &model, &ast, &state) {
        // Nothing half-written stays behind (the configuration alone is no run).
        crate::train::discard_unstarted_run(&opts.dir)?;
        return Err(e);
    }
    Ok(Imported {
        subnets,
        densities: achieved,
        epochs: done,
        tensors: tensors.len(),
    })
}
