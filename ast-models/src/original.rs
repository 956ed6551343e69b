//! The original code's PyTorch state dicts (github.com/mengjian0502/AST) of its CIFAR models,
//! both ways: one sub-net out as a dense state dict of its model built with `nspars=1`
//! ([`OriginalModel::original_state_dict`]), and a trained checkpoint of all `K` sub-nets in
//! ([`OriginalModel::load_original`]).
//!
//! One table per model, [`OriginalModel::original_layout`], says where each of the original's
//! tensors lives in our model; both directions read it.

use std::collections::{HashMap, HashSet};

use ast_core::subnet::masked_layers;
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;

use crate::export::params;
use crate::mobilenet::MobileNetV1;
use crate::resnet::{Block, Norm, ResNet, Stem};
use crate::resnet_cifar::CifarResNet;
use crate::AstModel;

/// One tensor of a PyTorch state dict.
#[derive(Debug, Clone, PartialEq)]
pub enum StateTensor {
    /// Weights, masks, BatchNorm parameters and statistics.
    F32 {
        /// Shape.
        shape: Vec<usize>,
        /// Row-major values.
        values: Vec<f32>,
    },
    /// `num_batches_tracked` of a BatchNorm (a scalar, shape `[]`).
    I64 {
        /// Shape.
        shape: Vec<usize>,
        /// Values.
        values: Vec<i64>,
    },
}

/// The f32 tensors of a state dict by key, each with its shape.
pub type StateDict = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Which sub-nets a state dict holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginalSubnets {
    /// Our sub-net `k` alone, as the original's model built with `nspars=1`: weights `W ⊙ M_k`,
    /// `M_k` as `mask0`, sub-net `k`'s BatchNorms as `bn.0`.
    One(usize),
    /// Every sub-net, as the original's training checkpoints hold them (`nspars=K`): the shared
    /// weights `W`, `M_j` as `mask{j}`, sub-net `j`'s BatchNorms as `bn.{j}`.
    All,
}

/// Where a tensor of the original's state dict lives in our model.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Our float tensor at this path (a plain weight, a BatchNorm's parameter or statistic, a
    /// bias).
    Float(String),
    /// The weight of our masked layer at this path: as it is, or times sub-net `masked_by`'s
    /// mask; `transposed` for the classifier (ours `[in, out]`, PyTorch's `[out, in]`).
    Weight {
        /// The masked layer's path.
        layer: String,
        /// The sub-net whose mask multiplies it ([`OriginalSubnets::One`]).
        masked_by: Option<usize>,
        /// Stored transposed.
        transposed: bool,
    },
    /// Sub-net `subnet`'s mask of our masked layer at this path, as 0.0/1.0.
    Mask {
        /// The masked layer's path.
        layer: String,
        /// Our sub-net.
        subnet: usize,
        /// Stored transposed.
        transposed: bool,
    },
    /// A BatchNorm's `num_batches_tracked` (an i64 scalar): nothing of ours, written as 0 and
    /// not read back.
    Tracked,
}

/// One tensor of the original's state dict: its name, its shape there, and where it lives here.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalTensor {
    /// Its key in the state dict.
    pub name: String,
    /// Its shape in the state dict.
    pub shape: Vec<usize>,
    /// Where it lives in our model.
    pub source: Source,
}

/// A model the original code defines: where each tensor of its state dict lives in ours, and
/// from that the state dict both ways.
pub trait OriginalModel<B: Backend>: Module<B> {
    /// Every tensor of the original's state dict of this model holding `subnets`, with where
    /// each lives in ours.
    fn original_layout(&self, subnets: OriginalSubnets) -> Result<Vec<OriginalTensor>, String>;

    /// The original's state dict of this model holding `subnets`, in its key names
    /// ([`OriginalSubnets`]), the classifier transposed to PyTorch's `[out, in]`:
    /// `load_state_dict` of the original's model takes it as it is
    /// (`repro/check_pytorch_export.py`).
    fn original_state_dict(
        &self,
        subnets: OriginalSubnets,
    ) -> Result<Vec<(String, StateTensor)>, String> {
        state_dict(self, self.original_layout(subnets)?)
    }

    /// This model (built with the checkpoint's `K` sub-nets) with the weights, masks and
    /// BatchNorms of a state dict of the original code's model trained with `nspars=K`
    /// (`tensors`: every f32 tensor by key, with its shape; `num_batches_tracked` may be left
    /// out). Refused, naming the first, when a tensor is missing, has another shape, a mask holds
    /// a value other than 0 and 1, or the state dict holds a tensor the model has not (another
    /// `K`, another model).
    fn load_original(self, tensors: &StateDict) -> Result<Self, String> {
        let layout = self.original_layout(OriginalSubnets::All)?;
        load(self, layout, tensors)
    }
}

impl<B: Backend> CifarResNet<B> {
    /// Whether this is the wide ResNet-32 (switchable shortcut BatchNorms), which the original
    /// defines in `uspars_cifar_wide_resnet.py` (`ResNet`) under other names than ResNet-20/32/56
    /// (`uspars_cifar_resnet.py`, `CifarResNet`).
    fn is_wide(&self) -> bool {
        self.blocks.iter().any(|b| {
            matches!(
                b.shortcut.as_ref().map(|s| &s.norm),
                Some(Norm::Switchable(_))
            )
        })
    }
}

/// ResNet-20/32/56 (`models/uspars_cifar_resnet.py`'s `CifarResNet`) and the wide ResNet-32
/// (`models/uspars_cifar_wide_resnet.py`'s `ResNet`).
impl<B: Backend> OriginalModel<B> for CifarResNet<B> {
    fn original_layout(&self, subnets: OriginalSubnets) -> Result<Vec<OriginalTensor>, String> {
        let mut t = LayoutBuilder::new(self, subnets)?;
        let wide = self.is_wide();
        let (stem, stem_norm, stage, [conv_a, bn_a, conv_b, bn_b]) = match wide {
            true => ("conv1", "bn", "layer", ["conv1", "bn1", "conv2", "bn2"]),
            false => (
                "conv_1_3x3",
                "bn_1",
                "stage_",
                ["conv_a", "bn_a", "conv_b", "bn_b"],
            ),
        };
        let stem_shape = self.conv1.weight.shape().dims::<4>().to_vec();
        t.float(&format!("{stem}.weight"), stem_shape, "conv1.weight");
        t.norm("bn1", stem_norm)?;
        let per_stage = self.blocks.len() / 3;
        for (i, block) in self.blocks.iter().enumerate() {
            let ours = format!("blocks.{i}");
            let theirs = format!("{stage}{}.{}", i / per_stage + 1, i % per_stage);
            t.masked(&format!("{ours}.conv1"), &format!("{theirs}.{conv_a}"))?;
            t.switchable(&format!("{ours}.bn1"), &format!("{theirs}.{bn_a}"))?;
            t.masked(&format!("{ours}.conv2"), &format!("{theirs}.{conv_b}"))?;
            t.switchable(&format!("{ours}.bn2"), &format!("{theirs}.{bn_b}"))?;
            let Some(shortcut) = &block.shortcut else {
                continue;
            };
            t.masked(
                &format!("{ours}.shortcut.conv"),
                &format!("{theirs}.downsample.0"),
            )?;
            match &shortcut.norm {
                Norm::Shared(_) => t.norm(
                    &format!("{ours}.shortcut.norm.Shared"),
                    &format!("{theirs}.downsample.1"),
                )?,
                Norm::Switchable(_) => t.switchable(
                    &format!("{ours}.shortcut.norm.Switchable"),
                    &format!("{theirs}.bn3"),
                )?,
            }
        }
        let classifier = if wide { "linear" } else { "classifier" };
        t.masked("linear", classifier)?;
        t.bias(&format!("{classifier}.bias"), "linear.bias")?;
        Ok(t.out)
    }
}

/// ResNet-18/50 with the CIFAR stem (`models/uspars_resnet.py`'s `ResNet`); the ImageNet
/// ResNet-50 (`uspars_resnet_imagenet.py`) is refused.
impl<B: Backend> OriginalModel<B> for ResNet<B> {
    fn original_layout(&self, subnets: OriginalSubnets) -> Result<Vec<OriginalTensor>, String> {
        if self.stem != Stem::Cifar {
            return Err(
                "the original's names are not mapped for the ImageNet ResNet-50 yet (its \
                 CIFAR models are)"
                    .into(),
            );
        }
        let mut t = LayoutBuilder::new(self, subnets)?;
        let stem_shape = self.conv1.weight.shape().dims::<4>().to_vec();
        t.float("conv1.weight", stem_shape, "conv1.weight");
        t.norm("bn1", "bn1")?;
        // A block with a projection shortcut after the first starts a stage.
        let (mut stage, mut j) = (1, 0);
        for (i, block) in self.blocks.iter().enumerate() {
            let (variant, convs, shortcut) = match block {
                Block::Basic(b) => ("Basic", 2, b.shortcut.is_some()),
                Block::Bottleneck(b) => ("Bottleneck", 3, b.shortcut.is_some()),
            };
            if i > 0 && shortcut {
                (stage, j) = (stage + 1, 0);
            }
            let ours = format!("blocks.{i}.{variant}");
            let theirs = format!("layer{stage}.{j}");
            for c in 1..=convs {
                t.masked(&format!("{ours}.conv{c}"), &format!("{theirs}.conv{c}"))?;
                t.switchable(&format!("{ours}.bn{c}"), &format!("{theirs}.bn{c}"))?;
            }
            if shortcut {
                t.masked(
                    &format!("{ours}.shortcut.conv"),
                    &format!("{theirs}.shortcut.0"),
                )?;
                t.switchable(
                    &format!("{ours}.shortcut.norm.Switchable"),
                    &format!("{theirs}.shortcut.1"),
                )?;
            }
            j += 1;
        }
        t.masked("fc.Masked", "linear")?;
        t.bias("linear.bias", "fc.Masked.bias")?;
        Ok(t.out)
    }
}

/// MobileNet-V1 (`models/uspars_mobilenet.py`'s `Net`: `model.0` the stem conv + BN,
/// `model.{i}` for depth-wise block `i` with its depth-wise conv `.0`, BN `.1`, point-wise conv
/// `.3`, BN `.4`; `fc`).
impl<B: Backend> OriginalModel<B> for MobileNetV1<B> {
    fn original_layout(&self, subnets: OriginalSubnets) -> Result<Vec<OriginalTensor>, String> {
        let mut t = LayoutBuilder::new(self, subnets)?;
        t.masked("conv1", "model.0.0")?;
        t.switchable("bn1", "model.0.1")?;
        for i in 0..self.blocks.len() {
            let (ours, theirs) = (format!("blocks.{i}"), format!("model.{}", i + 1));
            t.masked(&format!("{ours}.depthwise"), &format!("{theirs}.0"))?;
            t.switchable(&format!("{ours}.bn1"), &format!("{theirs}.1"))?;
            t.masked(&format!("{ours}.pointwise"), &format!("{theirs}.3"))?;
            t.switchable(&format!("{ours}.bn2"), &format!("{theirs}.4"))?;
        }
        t.masked("linear", "fc")?;
        t.bias("fc.bias", "linear.bias")?;
        Ok(t.out)
    }
}

const NOT_MAPPED: &str = "the original's names are mapped for its CIFAR models (resnet20, \
     resnet32, resnet56, wide-resnet32, resnet18, resnet50, mobilenetv1), not for the small CNN \
     (not the original's)";

impl<B: Backend> AstModel<B> {
    /// The original's state dict holding `subnets` ([`OriginalModel::original_state_dict`]);
    /// other models are refused.
    pub fn original_state_dict(
        &self,
        subnets: OriginalSubnets,
    ) -> Result<Vec<(String, StateTensor)>, String> {
        match self {
            AstModel::CifarResNet(m) => m.original_state_dict(subnets),
            AstModel::ResNet(m) => m.original_state_dict(subnets),
            AstModel::MobileNet(m) => m.original_state_dict(subnets),
            AstModel::SmallCnn(_) => Err(NOT_MAPPED.into()),
        }
    }

    /// This model with a state dict of the original's ([`OriginalModel::load_original`]); other
    /// models are refused.
    pub fn load_original(self, tensors: &StateDict) -> Result<Self, String> {
        match self {
            AstModel::CifarResNet(m) => m.load_original(tensors).map(AstModel::CifarResNet),
            AstModel::ResNet(m) => m.load_original(tensors).map(AstModel::ResNet),
            AstModel::MobileNet(m) => m.load_original(tensors).map(AstModel::MobileNet),
            AstModel::SmallCnn(_) => Err(NOT_MAPPED.into()),
        }
    }
}

/// Builds a layout: the tensors of the original's state dict.
struct LayoutBuilder {
    /// (ours, theirs) sub-net indices.
    pairs: Vec<(usize, usize)>,
    masked_by: Option<usize>,
    shapes: HashMap<String, Vec<usize>>,
    floats: HashMap<String, Vec<f32>>,
    out: Vec<OriginalTensor>,
}

impl LayoutBuilder {
    fn new<B: Backend, M: Module<B>>(model: &M, subnets: OriginalSubnets) -> Result<Self, String> {
        let layers = masked_layers(model);
        let count = layers.first().map_or(0, |l| l.mask_ids.len());
        let (pairs, masked_by) = match subnets {
            OriginalSubnets::One(k) if k < count => (vec![(k, 0)], Some(k)),
            OriginalSubnets::One(k) => return Err(format!("sub-net {k} does not exist")),
            OriginalSubnets::All => ((0..count).map(|k| (k, k)).collect(), None),
        };
        Ok(Self {
            pairs,
            masked_by,
            shapes: layers.into_iter().map(|l| (l.path, l.shape)).collect(),
            floats: params(model).floats,
            out: Vec::new(),
        })
    }

    fn push(&mut self, name: String, shape: Vec<usize>, source: Source) {
        self.out.push(OriginalTensor {
            name,
            shape,
            source,
        });
    }

    /// A float tensor of ours as it is.
    fn float(&mut self, theirs: &str, shape: Vec<usize>, ours: &str) {
        self.push(theirs.into(), shape, Source::Float(ours.into()));
    }

    /// A bias (1-D) of ours.
    fn bias(&mut self, theirs: &str, ours: &str) -> Result<(), String> {
        let len = (self.floats.get(ours))
            .ok_or_else(|| format!("the model has no `{ours}`"))?
            .len();
        self.float(theirs, vec![len], ours);
        Ok(())
    }

    /// A plain BatchNorm: ours `gamma`/`beta`/statistics, theirs `weight`/`bias`/statistics and
    /// `num_batches_tracked`.
    fn norm(&mut self, ours: &str, theirs: &str) -> Result<(), String> {
        let len = (self.floats.get(&format!("{ours}.gamma")))
            .ok_or_else(|| format!("the model has no BatchNorm `{ours}`"))?
            .len();
        for (from, to) in [
            ("gamma", "weight"),
            ("beta", "bias"),
            ("running_mean", "running_mean"),
            ("running_var", "running_var"),
        ] {
            self.float(
                &format!("{theirs}.{to}"),
                vec![len],
                &format!("{ours}.{from}"),
            );
        }
        let tracked = format!("{theirs}.num_batches_tracked");
        self.push(tracked, vec![], Source::Tracked);
        Ok(())
    }

    /// A switchable BatchNorm: ours `norms.{k}`, theirs `bn.{j}` (`SwitchBatchNorm2d`).
    fn switchable(&mut self, ours: &str, theirs: &str) -> Result<(), String> {
        for (k, j) in self.pairs.clone() {
            self.norm(&format!("{ours}.norms.{k}"), &format!("{theirs}.bn.{j}"))?;
        }
        Ok(())
    }

    /// A masked layer: its weight and one `mask{j}` per sub-net (`SparsConv2d`,
    /// `SparsLinear`; the linear one transposed).
    fn masked(&mut self, ours: &str, theirs: &str) -> Result<(), String> {
        let mut shape =
            (self.shapes.get(ours).cloned()).ok_or_else(|| format!("no masked layer `{ours}`"))?;
        let transposed = shape.len() == 2;
        if transposed {
            shape.reverse();
        }
        let weight = Source::Weight {
            layer: ours.into(),
            masked_by: self.masked_by,
            transposed,
        };
        self.push(format!("{theirs}.weight"), shape.clone(), weight);
        for (k, j) in self.pairs.clone() {
            let mask = Source::Mask {
                layer: ours.into(),
                subnet: k,
                transposed,
            };
            self.push(format!("{theirs}.mask{j}"), shape.clone(), mask);
        }
        Ok(())
    }
}

/// The state dict of `layout` with `model`'s values.
fn state_dict<B: Backend, M: Module<B>>(
    model: &M,
    layout: Vec<OriginalTensor>,
) -> Result<Vec<(String, StateTensor)>, String> {
    let params = params(model);
    let float = |key: &str| {
        params
            .floats
            .get(key)
            .ok_or_else(|| format!("the model has no `{key}`"))
    };
    let mask = |layer: &str, k: usize| {
        params
            .masks
            .get(&format!("{layer}.masks.{k}"))
            .ok_or_else(|| format!("sub-net {k} does not exist"))
    };
    let mut out = Vec::with_capacity(layout.len());
    for OriginalTensor {
        name,
        shape,
        source,
    } in layout
    {
        let (values, transposed) = match source {
            Source::Float(path) => (float(&path)?.clone(), false),
            Source::Weight {
                layer,
                masked_by,
                transposed,
            } => {
                let weight = float(&format!("{layer}.weight"))?;
                let values = match masked_by {
                    Some(k) => (weight.iter().zip(mask(&layer, k)?))
                        .map(|(&w, &m)| if m { w } else { 0.0 })
                        .collect(),
                    None => weight.clone(),
                };
                (values, transposed)
            }
            Source::Mask {
                layer,
                subnet,
                transposed,
            } => {
                let bits = mask(&layer, subnet)?;
                let values = bits.iter().map(|&m| f32::from(u8::from(m))).collect();
                (values, transposed)
            }
            Source::Tracked => {
                let values = vec![0];
                out.push((name, StateTensor::I64 { shape, values }));
                continue;
            }
        };
        let values = match transposed {
            // Ours [rows, cols] = theirs' shape reversed.
            true => transpose(&values, shape[1], shape[0]),
            false => values,
        };
        out.push((name, StateTensor::F32 { shape, values }));
    }
    Ok(out)
}

/// `model` with the tensors of `layout` read from `tensors`.
fn load<B: Backend, M: Module<B>>(
    model: M,
    layout: Vec<OriginalTensor>,
    tensors: &StateDict,
) -> Result<M, String> {
    let known: HashSet<&str> = layout.iter().map(|t| t.name.as_str()).collect();
    let mut extra: Vec<&String> = (tensors.keys())
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    if let Some(first) = extra.first() {
        return Err(format!(
            "it holds {} tensors the model does not have (e.g. `{first}`)",
            extra.len()
        ));
    }
    let mut assign = Assign::default();
    for OriginalTensor {
        name,
        shape,
        source,
    } in layout
    {
        if source == Source::Tracked {
            continue;
        }
        let (theirs, values) = tensors
            .get(&name)
            .ok_or_else(|| format!("it has no `{name}`"))?;
        if *theirs != shape {
            return Err(format!(
                "`{name}` has shape {theirs:?}, the model's is {shape:?}"
            ));
        }
        let ours = |transposed: bool| match transposed {
            true => transpose(values, shape[0], shape[1]),
            false => values.clone(),
        };
        match source {
            Source::Float(path) => {
                assign.floats.insert(path, values.clone());
            }
            Source::Weight {
                layer, transposed, ..
            } => {
                assign
                    .floats
                    .insert(format!("{layer}.weight"), ours(transposed));
            }
            Source::Mask {
                layer,
                subnet,
                transposed,
            } => {
                let values = ours(transposed);
                if let Some(v) = values.iter().find(|&&v| v != 0.0 && v != 1.0) {
                    return Err(format!("mask `{name}` holds {v}, not only 0 and 1"));
                }
                let bits = values.iter().map(|&v| v == 1.0).collect();
                assign.masks.insert(format!("{layer}.masks.{subnet}"), bits);
            }
            Source::Tracked => {}
        }
    }
    let model = model.map(&mut assign);
    match assign.unassigned().first() {
        Some(path) => Err(format!("nothing was read into `{path}`")),
        None => Ok(model),
    }
}

/// `values` of a row-major `[rows, cols]` matrix, transposed to `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| values[(i % rows) * cols + i / rows])
        .collect()
}

/// Replaces float tensors and masks by dotted module path.
#[derive(Debug, Default)]
struct Assign {
    path: Vec<String>,
    floats: HashMap<String, Vec<f32>>,
    masks: HashMap<String, Vec<bool>>,
}

impl Assign {
    /// The paths given whose tensors the model has not (a bug of the layout, not of the file).
    fn unassigned(&self) -> Vec<&String> {
        self.floats.keys().chain(self.masks.keys()).collect()
    }
}

impl<B: Backend> ModuleMapper<B> for Assign {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(values) = self.floats.remove(&self.path.join(".")) else {
            return param;
        };
        param.map(|t| {
            let fresh = Tensor::from_data(TensorData::new(values, t.shape()), &t.device());
            match t.is_require_grad() {
                true => fresh.require_grad(),
                false => fresh,
            }
        })
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Bool>>,
    ) -> Param<Tensor<B, D, Bool>> {
        let Some(bits) = self.masks.remove(&self.path.join(".")) else {
            return param;
        };
        param.map(|t| Tensor::from_data(TensorData::new(bits, t.shape()), &t.device()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::{random_masks, Perturb};
    use crate::resnet_cifar::CifarResNetConfig;
    use crate::tests::{device, TB};
    use crate::ModelKind;

    /// Shape and values of the f32 tensor `name` of a state dict.
    fn f32_tensor(state: &[(String, StateTensor)], name: &str) -> (Vec<usize>, Vec<f32>) {
        match &state.iter().find(|(n, _)| n == name).unwrap().1 {
            StateTensor::F32 { shape, values } => (shape.clone(), values.clone()),
            StateTensor::I64 { .. } => panic!("{name} is not f32"),
        }
    }

    #[test]
    fn a_resnet20_sub_net_in_the_original_code_s_names() {
        // uspars_cifar_resnet.py with nspars=1: stem conv + BN, 9 blocks of two masked convs
        // (weight, mask0) and two BNs (5 tensors each), 2 shortcuts (conv + BN), classifier.
        let model = random_masks(CifarResNetConfig::resnet20(10, 2).init::<TB>(&device()), 2);
        let state = model.original_state_dict(OriginalSubnets::One(1)).unwrap();
        assert_eq!(state.len(), 1 + 5 + 9 * (2 * 2 + 2 * 5) + 2 * (2 + 5) + 3);
        let get = |name: &str| f32_tensor(&state, name);
        let params = params(&model);
        let (shape, w) = get("stage_2.0.conv_a.weight");
        assert_eq!(shape, vec![32, 16, 3, 3]);
        let (_, mask) = get("stage_2.0.conv_a.mask0");
        let ours = &params.floats["blocks.3.conv1.weight"];
        let bits = &params.masks["blocks.3.conv1.masks.1"];
        for i in 0..w.len() {
            assert_eq!(
                (w[i], mask[i]),
                if bits[i] { (ours[i], 1.0) } else { (0.0, 0.0) }
            );
        }
        assert_eq!(get("stage_3.0.downsample.1.running_var").0, vec![64]);
        assert_eq!(
            get("stage_2.1.bn_b.bn.0.weight").1,
            params.floats["blocks.4.bn2.norms.1.gamma"]
        );
        // The classifier transposed: theirs [10, 64] at (o, i) is ours [64, 10] at (i, o).
        let (shape, fc) = get("classifier.weight");
        assert_eq!(shape, vec![10, 64]);
        let (ours, bits) = (
            &params.floats["linear.weight"],
            &params.masks["linear.masks.1"],
        );
        let expected = if bits[5 * 10 + 3] {
            ours[5 * 10 + 3]
        } else {
            0.0
        };
        assert_eq!(fc[3 * 64 + 5], expected);
        assert!(model
            .original_state_dict(OriginalSubnets::One(2))
            .unwrap_err()
            .contains("sub-net 2 does not exist"));
    }

    #[test]
    fn a_wide_resnet32_sub_net_in_the_original_code_s_names() {
        // uspars_cifar_wide_resnet.py's ResNet with nspars=1: stem conv + plain BN `bn`, 15
        // blocks (conv1/bn1/conv2/bn2), 2 shortcuts (downsample.0 + switchable `bn3`), a masked
        // classifier `linear` with its bias.
        let model = CifarResNetConfig::wide_resnet32(10, 2).init::<TB>(&device());
        let model = random_masks(model, 2).map(&mut Perturb(5));
        let state = model.original_state_dict(OriginalSubnets::One(1)).unwrap();
        assert_eq!(state.len(), 1 + 5 + 15 * (2 * 2 + 2 * 5) + 2 * (2 + 5) + 3);
        let get = |name: &str| f32_tensor(&state, name);
        let params = params(&model);
        for name in [
            "conv1.weight",
            "bn.running_var",
            "layer3.4.conv2.mask0",
            "linear.bias",
        ] {
            assert!(state.iter().any(|(n, _)| n == name), "{name}");
        }
        // Sub-net 1's own shortcut BatchNorm, not sub-net 0's.
        let (shape, var) = get("layer2.0.bn3.bn.0.running_var");
        assert_eq!(shape, vec![64]);
        assert_eq!(
            var,
            params.floats["blocks.5.shortcut.norm.Switchable.norms.1.running_var"]
        );
        let (shape, _) = get("layer2.0.downsample.0.weight");
        assert_eq!(shape, vec![64, 32, 1, 1]);
        let (shape, _) = get("linear.weight");
        assert_eq!(shape, vec![10, 128]);
    }

    /// The f32 tensors of a state dict by key, as an importer reads them.
    fn by_key(state: Vec<(String, StateTensor)>) -> StateDict {
        state
            .into_iter()
            .map(|(name, t)| match t {
                StateTensor::F32 { shape, values } => (name, (shape, values)),
                StateTensor::I64 { shape, values } => {
                    (name, (shape, values.iter().map(|&v| v as f32).collect()))
                }
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_of_every_sub_net_loads_back_into_a_fresh_model() {
        for kind in [
            ModelKind::Resnet20,
            ModelKind::WideResnet32,
            ModelKind::Resnet18,
            ModelKind::Resnet50,
            ModelKind::Mobilenetv1,
        ] {
            let build = || AstModel::<TB>::new(kind, 10, 3, &device());
            let source = random_masks(build(), 3).map(&mut Perturb(11));
            let state = source.original_state_dict(OriginalSubnets::All).unwrap();
            let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
            for name in ["mask0", "mask1", "mask2", "bn.2.running_var"] {
                assert!(names.iter().any(|n| n.ends_with(name)), "{name}");
            }
            // A fresh model (other weights, dense masks) takes every tensor of the source.
            let fresh = build();
            assert_ne!(fresh.export_params().floats, source.export_params().floats);
            let loaded = fresh.load_original(&by_key(state)).unwrap();
            let (ours, theirs) = (loaded.export_params(), source.export_params());
            assert_eq!(ours.floats, theirs.floats);
            assert_eq!(ours.masks, theirs.masks);
        }
    }

    #[test]
    fn checkpoints_that_do_not_fit_are_refused_by_name() {
        let config = CifarResNetConfig::resnet20(10, 2);
        let source = random_masks(config.init::<TB>(&device()), 2);
        let state = by_key(source.original_state_dict(OriginalSubnets::All).unwrap());
        let refused = |state: &StateDict, config: &CifarResNetConfig| {
            config
                .init::<TB>(&device())
                .load_original(state)
                .unwrap_err()
        };
        // Another K: three sub-nets' masks into a model of two, and the other way round.
        let three = by_key(
            random_masks(CifarResNetConfig::resnet20(10, 3).init::<TB>(&device()), 3)
                .original_state_dict(OriginalSubnets::All)
                .unwrap(),
        );
        let err = refused(&three, &config);
        assert!(err.contains("tensors the model does not have"), "{err}");
        assert!(err.contains(".mask2`") || err.contains(".bn.2."), "{err}");
        let err = refused(&state, &CifarResNetConfig::resnet20(10, 3));
        assert!(err.contains("it has no `stage_1.0.conv_a.mask2`"), "{err}");
        // Another model: ResNet-20's names are not the wide ResNet-32's.
        let err = refused(&state, &CifarResNetConfig::wide_resnet32(10, 2));
        assert!(err.contains("tensors the model does not have"), "{err}");
        // Another shape, a mask that is not 0/1.
        let mut bent = state.clone();
        bent.get_mut("classifier.weight").unwrap().0 = vec![64, 10];
        let err = refused(&bent, &config);
        assert!(
            err.contains("`classifier.weight` has shape [64, 10], the model's is [10, 64]"),
            "{err}"
        );
        let mut soft = state.clone();
        soft.get_mut("stage_2.1.conv_b.mask1").unwrap().1[3] = 0.5;
        let err = refused(&soft, &config);
        assert!(
            err.contains("mask `stage_2.1.conv_b.mask1` holds 0.5"),
            "{err}"
        );
    }
}
