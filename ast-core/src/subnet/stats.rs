//! Statistics of a model's masks: per-layer and overall density of a sub-net, and the overlap
//! between two sub-nets' masks.

use burn::module::Module;
use burn::prelude::*;

use super::{mask_vec, masked_layers, read_masks};
use crate::error::Result;

/// Density of one layer's mask for one sub-net.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDensity {
    /// Path of the layer.
    pub path: String,
    /// Active weights.
    pub active: usize,
    /// All weights.
    pub total: usize,
}

impl LayerDensity {
    /// `active / total`.
    pub fn density(&self) -> f64 {
        self.active as f64 / self.total as f64
    }
}

/// Per-layer densities of sub-net `k`.
pub fn layer_densities<B: Backend, M: Module<B>>(model: &M, k: usize) -> Result<Vec<LayerDensity>> {
    let layers = masked_layers(model);
    let masks = read_masks(model, k)?;
    Ok(layers
        .iter()
        .zip(masks)
        .map(|(l, m)| LayerDensity {
            path: l.path.clone(),
            active: mask_vec(m).iter().filter(|&&b| b).count(),
            total: l.numel(),
        })
        .collect())
}

/// Density of sub-net `k` over all prunable weights.
pub fn density<B: Backend, M: Module<B>>(model: &M, k: usize) -> Result<f64> {
    let per_layer = layer_densities(model, k)?;
    let active: usize = per_layer.iter().map(|l| l.active).sum();
    let total: usize = per_layer.iter().map(|l| l.total).sum();
    Ok(active as f64 / total as f64)
}

/// How much two sub-nets' masks share on a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOverlap {
    /// Path of the layer.
    pub path: String,
    /// Positions active in both.
    pub intersection: usize,
    /// Positions active in either.
    pub union: usize,
    /// Active positions of the sparser of the two.
    pub smaller: usize,
}

impl LayerOverlap {
    /// Intersection over union (1 when both masks are empty).
    pub fn iou(&self) -> f64 {
        if self.union == 0 {
            1.0
        } else {
            self.intersection as f64 / self.union as f64
        }
    }

    /// Share of the sparser mask's weights that the other mask also holds.
    pub fn containment(&self) -> f64 {
        if self.smaller == 0 {
            1.0
        } else {
            self.intersection as f64 / self.smaller as f64
        }
    }
}

/// Per-layer overlap between the masks of sub-nets `a` and `b`.
pub fn overlap<B: Backend, M: Module<B>>(
    model: &M,
    a: usize,
    b: usize,
) -> Result<Vec<LayerOverlap>> {
    let layers = masked_layers(model);
    let ma = read_masks(model, a)?;
    let mb = read_masks(model, b)?;
    Ok(layers
        .iter()
        .zip(ma.into_iter().zip(mb))
        .map(|(l, (x, y))| {
            let (x, y) = (mask_vec(x), mask_vec(y));
            let count = |f: &dyn Fn(bool, bool) -> bool| {
                x.iter().zip(&y).filter(|(p, q)| f(**p, **q)).count()
            };
            LayerOverlap {
                path: l.path.clone(),
                intersection: count(&|p, q| p && q),
                union: count(&|p, q| p || q),
                smaller: count(&|p, _| p).min(count(&|_, q| q)),
            }
        })
        .collect())
}

/// Collects the ids of float parameters holding a NaN or an infinity.
struct NonFinite(Vec<burn::module::ParamId>);

impl<B: Backend> burn::module::ModuleVisitor<B> for NonFinite {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        // One reduction per parameter: a NaN or an infinity makes the sum non-finite (so does
        // an overflow of finite values near f32::MAX, which is a diverged model too).
        let sum: f64 = param.val().sum().into_scalar().elem();
        if !sum.is_finite() {
            self.0.push(param.id);
        }
    }
}

/// The paths of the float parameters (weights, biases, BatchNorm statistics) that hold a NaN or
/// an infinity, in module order: empty for a healthy model.
pub fn non_finite_params<B: Backend, M: Module<B>>(model: &M) -> Vec<String> {
    let mut found = NonFinite(Vec::new());
    model.visit(&mut found);
    let paths = super::param_paths(model);
    found
        .0
        .iter()
        .map(|id| paths.get(id).cloned().unwrap_or_else(|| id.to_string()))
        .collect()
}
