//! Model-level operations on any burn `Module` holding [`MaskedConv2d`](crate::MaskedConv2d) and
//! [`MaskedLinear`](crate::MaskedLinear) layers: find them, read and replace masks (module-tree
//! visitors, here), measure densities and overlaps ([`stats`], re-exported). Layers are found by
//! walking the module tree, in declaration order.

pub mod stats;

pub use stats::{density, layer_densities, non_finite_params, overlap, LayerDensity, LayerOverlap};

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{BoolStore, DType};

use crate::error::{AstError, Result};

/// The kind of a masked layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// [`crate::MaskedConv2d`], weight `[C_out, C_in/groups, kh, kw]`.
    Conv2d,
    /// [`crate::MaskedLinear`], weight `[d_in, d_out]`.
    Linear,
}

/// A masked layer found in a model.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedLayerInfo {
    /// Dotted path of the layer in the model (`blocks.0.conv1`).
    pub path: String,
    /// Conv or linear.
    pub kind: LayerKind,
    /// Shape of the weight (and of every mask).
    pub shape: Vec<usize>,
    /// The shared weight's parameter id.
    pub weight_id: ParamId,
    /// Parameter ids of the masks, one per sub-net.
    pub mask_ids: Vec<ParamId>,
}

impl MaskedLayerInfo {
    /// Number of weights.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The input-channel axis of the weight, along which N:M groups run.
    pub fn input_axis(&self) -> usize {
        match self.kind {
            LayerKind::Conv2d => 1,
            LayerKind::Linear => 0,
        }
    }
}

fn kind_of(container: &str) -> Option<LayerKind> {
    match container {
        "Struct:MaskedConv2d" => Some(LayerKind::Conv2d),
        "Struct:MaskedLinear" => Some(LayerKind::Linear),
        _ => None,
    }
}

#[derive(Default)]
struct LayerCollector {
    stack: Vec<(String, String)>,
    layers: Vec<MaskedLayerInfo>,
}

impl<B: Backend> ModuleVisitor<B> for LayerCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some((name, container)) = self.stack.last() else {
            return;
        };
        let Some(kind) = kind_of(container) else {
            return;
        };
        if name != "weight" {
            return;
        }
        let path = self.stack[..self.stack.len() - 1]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(".");
        self.layers.push(MaskedLayerInfo {
            path,
            kind,
            shape: param.val().dims().to_vec(),
            weight_id: param.id,
            mask_ids: Vec::new(),
        });
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        let n = self.stack.len();
        if n >= 2 && self.stack[n - 2].0 == "masks" && kind_of(&self.stack[n - 2].1).is_some() {
            if let Some(layer) = self.layers.last_mut() {
                layer.mask_ids.push(param.id);
            }
        }
    }
}

/// Every masked layer of `model`, in declaration order.
pub fn masked_layers<B: Backend, M: Module<B>>(model: &M) -> Vec<MaskedLayerInfo> {
    let mut collector = LayerCollector::default();
    model.visit(&mut collector);
    collector.layers
}

/// The number of sub-nets `K`, checking that every masked layer has `K` masks.
pub fn subnet_count(layers: &[MaskedLayerInfo]) -> Result<usize> {
    let k = layers
        .first()
        .map(|l| l.mask_ids.len())
        .ok_or_else(|| AstError::Model("the model has no masked layers".into()))?;
    match layers.iter().find(|l| l.mask_ids.len() != k) {
        Some(l) => Err(AstError::Model(format!(
            "layer `{}` has {} masks, the first layer {k}",
            l.path,
            l.mask_ids.len()
        ))),
        None => Ok(k),
    }
}

fn check_subnet(layers: &[MaskedLayerInfo], k: usize) -> Result<()> {
    let count = subnet_count(layers)?;
    if k >= count {
        return Err(AstError::SubnetOutOfRange { index: k, count });
    }
    Ok(())
}

struct DataCollector<'a> {
    wanted: &'a HashMap<ParamId, usize>,
    found: Vec<Option<TensorData>>,
}

impl<B: Backend> ModuleVisitor<B> for DataCollector<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(&i) = self.wanted.get(&param.id) {
            self.found[i] = Some(param.val().into_data());
        }
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        if let Some(&i) = self.wanted.get(&param.id) {
            self.found[i] = Some(param.val().into_data());
        }
    }
}

/// Reads the parameters `ids` (float or bool) of `model` to the host, in the order given.
///
/// # Panics
/// If an id is not a parameter of the model (a programmer error: ids come from the model).
pub fn read_params<B: Backend, M: Module<B>>(model: &M, ids: &[ParamId]) -> Vec<TensorData> {
    let wanted: HashMap<ParamId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut collector = DataCollector {
        wanted: &wanted,
        found: vec![None; ids.len()],
    };
    model.visit(&mut collector);
    collector
        .found
        .into_iter()
        .zip(ids)
        .map(|(d, id)| d.unwrap_or_else(|| panic!("parameter {id} is not in the model")))
        .collect()
}

/// The masks of sub-net `k`, one per masked layer, as boolean tensor data.
pub fn read_masks<B: Backend, M: Module<B>>(model: &M, k: usize) -> Result<Vec<TensorData>> {
    let layers = masked_layers(model);
    check_subnet(&layers, k)?;
    let ids: Vec<ParamId> = layers.iter().map(|l| l.mask_ids[k]).collect();
    Ok(read_params(model, &ids))
}

/// Flat boolean vectors of mask data, whichever way the backend stores booleans (native bytes on
/// the CPU backends, `u8` or `u32` words on some GPU backends).
///
/// # Panics
/// If `data` is not boolean (a programmer error: masks are bool parameters).
pub fn mask_vec(data: TensorData) -> Vec<bool> {
    let bytes = data.as_bytes();
    match data.dtype {
        DType::Bool(BoolStore::Native | BoolStore::U8) => bytes.iter().map(|&b| b != 0).collect(),
        DType::Bool(BoolStore::U32) => bytes
            .chunks_exact(4)
            .map(|w| w.iter().any(|&b| b != 0))
            .collect(),
        other => panic!("a mask holds booleans, not {other:?}"),
    }
}

/// Flat `f32` vectors of weight data.
pub fn weight_vec(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .to_vec::<f32>()
        .expect("weights convert to f32")
}

struct MaskReplacer {
    new: HashMap<ParamId, TensorData>,
}

impl<B: Backend> ModuleMapper<B> for MaskReplacer {
    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        match self.new.remove(&param.id) {
            Some(data) => param.map(|old| Tensor::from_data(data, &old.device())),
            None => param,
        }
    }
}

/// Replaces the mask parameters `ids` with `masks` (already shape-checked), keeping their ids.
pub(crate) fn write_masks<B: Backend, M: Module<B>>(
    model: M,
    ids: &[ParamId],
    masks: Vec<TensorData>,
) -> M {
    let mut replacer = MaskReplacer {
        new: ids.iter().copied().zip(masks).collect(),
    };
    model.map(&mut replacer)
}

/// Replaces sub-net `k`'s masks (one per masked layer, in [`masked_layers`] order).
///
/// Errors if `k` is out of range, the number of masks differs from the number of masked
/// layers, or a mask's shape differs from its layer's weight.
pub fn replace_masks<B: Backend, M: Module<B>>(
    model: M,
    k: usize,
    masks: Vec<TensorData>,
) -> Result<M> {
    let layers = masked_layers(&model);
    check_subnet(&layers, k)?;
    if masks.len() != layers.len() {
        return Err(AstError::MaskCount {
            expected: layers.len(),
            got: masks.len(),
        });
    }
    for (layer, mask) in layers.iter().zip(&masks) {
        if mask.shape.to_vec() != layer.shape {
            return Err(AstError::MaskShape {
                layer: layer.path.clone(),
                expected: layer.shape.clone(),
                got: mask.shape.to_vec(),
            });
        }
    }
    let masks = masks.into_iter().map(|m| m.convert::<bool>()).collect();
    let ids: Vec<ParamId> = layers.iter().map(|l| l.mask_ids[k]).collect();
    Ok(write_masks(model, &ids, masks))
}

/// Folds the pending BatchNorm running-statistics updates into their values.
///
/// burn defers each training forward's running-statistics update (per thread) until the next
/// training forward of the same BatchNorm; call this before evaluating or saving a model so that
/// the values read are the ones training produced. Clones of a model share running statistics,
/// so syncing a clone syncs the model.
pub fn sync_running_stats<B: Backend, M: Module<B>>(model: &M) {
    let _ = model.clone().into_record();
}

#[derive(Default)]
struct PathCollector {
    stack: Vec<String>,
    paths: HashMap<ParamId, String>,
}

impl PathCollector {
    fn record(&mut self, id: ParamId) {
        self.paths.insert(id, self.stack.join("."));
    }
}

impl<B: Backend> ModuleVisitor<B> for PathCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.record(param.id);
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        self.record(param.id);
    }
}

/// The dotted path of every float and bool parameter of `model`, by id (stable across runs,
/// unlike ids: use it to save state keyed by parameter).
pub fn param_paths<B: Backend, M: Module<B>>(model: &M) -> HashMap<ParamId, String> {
    let mut collector = PathCollector::default();
    model.visit(&mut collector);
    collector.paths
}

struct InnerMaskCollector<'a, IB: Backend> {
    wanted: &'a HashMap<ParamId, usize>,
    found: Vec<Option<Tensor<IB, 1, Bool>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for InnerMaskCollector<'_, B::InnerBackend> {
    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        if let Some(&i) = self.wanted.get(&param.id) {
            let mask = param.val().inner();
            let n = mask.shape().num_elements();
            self.found[i] = Some(mask.reshape([n]));
        }
    }
}

/// The masks `ids` as flat tensors on the inner (non-autodiff) backend, staying on the device.
pub(crate) fn inner_masks<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    ids: &[ParamId],
) -> Vec<Tensor<B::InnerBackend, 1, Bool>> {
    let wanted: HashMap<ParamId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut collector = InnerMaskCollector {
        wanted: &wanted,
        found: vec![None; ids.len()],
    };
    model.visit(&mut collector);
    collector
        .found
        .into_iter()
        .map(|m| m.expect("mask ids come from the model"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{
        MaskedConv2d, MaskedConv2dConfig, MaskedLinear, MaskedLinearConfig, SubnetSwitch,
    };
    use crate::tests::{device, TestBackend};

    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        conv: MaskedConv2d<B>,
        blocks: Vec<MaskedConv2d<B>>,
        head: MaskedLinear<B>,
    }

    fn toy() -> Toy<TestBackend> {
        let device = device();
        let s = SubnetSwitch::new();
        Toy {
            conv: MaskedConv2dConfig::new([1, 2], [3, 3])
                .with_subnets(2)
                .init(&s, &device),
            blocks: vec![MaskedConv2dConfig::new([2, 2], [1, 1])
                .with_subnets(2)
                .init(&s, &device)],
            head: MaskedLinearConfig::new(2, 3)
                .with_subnets(2)
                .init(&s, &device),
        }
    }

    #[test]
    fn finds_masked_layers_with_paths_shapes_and_masks() {
        let layers = masked_layers(&toy());
        let paths: Vec<&str> = layers.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, vec!["conv", "blocks.0", "head"]);
        assert_eq!(layers[0].shape, vec![2, 1, 3, 3]);
        assert_eq!(layers[2].kind, LayerKind::Linear);
        assert_eq!(layers[2].input_axis(), 0);
        assert!(layers.iter().all(|l| l.mask_ids.len() == 2));
        assert_eq!(subnet_count(&layers), Ok(2));
    }

    #[test]
    fn replace_then_read_masks_and_measure_density_and_overlap() {
        let model = toy();
        let masks: Vec<TensorData> = masked_layers(&model)
            .iter()
            .map(|l| {
                let n = l.numel();
                TensorData::new(
                    (0..n).map(|i| i % 2 == 0).collect::<Vec<bool>>(),
                    l.shape.clone(),
                )
            })
            .collect();
        let model = replace_masks(model, 1, masks.clone()).unwrap();
        assert_eq!(read_masks(&model, 1).unwrap(), masks);
        // 18 + 4 + 6 = 28 weights; even positions: 9 + 2 + 3 = 14 ⇒ density 0.5.
        assert_eq!(density(&model, 1).unwrap(), 0.5);
        assert_eq!(density(&model, 0).unwrap(), 1.0);
        let o = overlap(&model, 0, 1).unwrap();
        assert_eq!((o[0].intersection, o[0].union, o[0].smaller), (9, 18, 9));
        assert_eq!(o[0].iou(), 0.5);
        assert_eq!(o[0].containment(), 1.0);
    }

    #[test]
    fn non_finite_parameters_are_found_by_path() {
        let model = toy();
        assert!(non_finite_params(&model).is_empty());
        let mut head = model.head;
        let w = head.weight.val();
        head.weight = Param::from_tensor(w.clone().slice_fill([0..1, 1..2], f32::NAN));
        let bias = head.bias.take().unwrap().val();
        head.bias = Some(Param::from_tensor(bias.slice_fill(2..3, f32::INFINITY)));
        let model = Toy { head, ..model };
        assert_eq!(non_finite_params(&model), ["head.weight", "head.bias"]);
    }

    #[test]
    fn wrong_masks_are_errors_not_panics() {
        let model = toy();
        let layers = masked_layers(&model);
        let mut masks: Vec<TensorData> = layers
            .iter()
            .map(|l| TensorData::new(vec![true; l.numel()], l.shape.clone()))
            .collect();
        assert_eq!(
            replace_masks(model.clone(), 2, masks.clone()).unwrap_err(),
            AstError::SubnetOutOfRange { index: 2, count: 2 }
        );
        masks[1] = TensorData::new(vec![true; 4], vec![4]);
        let err = replace_masks(model.clone(), 0, masks.clone()).unwrap_err();
        assert_eq!(
            err,
            AstError::MaskShape {
                layer: "blocks.0".into(),
                expected: vec![2, 2, 1, 1],
                got: vec![4]
            }
        );
        masks.pop();
        assert!(matches!(
            replace_masks(model, 0, masks),
            Err(AstError::MaskCount {
                expected: 3,
                got: 2
            })
        ));
    }

    #[test]
    fn parameter_paths_follow_the_module_tree() {
        let model = toy();
        let paths = param_paths(&model);
        let layers = masked_layers(&model);
        assert_eq!(paths[&layers[1].weight_id], "blocks.0.weight");
        assert_eq!(paths[&layers[2].mask_ids[1]], "head.masks.1");
        assert_eq!(paths.len(), 3 + 6 + 1, "3 weights, 6 masks, 1 bias");
    }

    #[test]
    fn replacing_a_mask_keeps_its_parameter_id() {
        let model = toy();
        let before = masked_layers(&model);
        let masks = read_masks(&model, 0).unwrap();
        let model = replace_masks(model, 0, masks).unwrap();
        assert_eq!(masked_layers(&model), before);
    }

    #[test]
    fn mask_vec_reads_every_boolean_storage() {
        let want = vec![true, false, false, true, true];
        let native = TensorData::new(want.clone(), [5]);
        assert_eq!(mask_vec(native), want);
        let bytes: Vec<u8> = want.iter().map(|&b| b as u8).collect();
        let u8s = TensorData::from_bytes_vec(bytes, [5], DType::Bool(BoolStore::U8));
        assert_eq!(mask_vec(u8s), want);
        let words: Vec<u8> = want
            .iter()
            .flat_map(|&b| (b as u32 * 0x0100_0001).to_le_bytes())
            .collect();
        let u32s = TensorData::from_bytes_vec(words, [5], DType::Bool(BoolStore::U32));
        assert_eq!(mask_vec(u32s), want);
    }
}
