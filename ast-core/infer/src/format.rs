//! The file: one safetensors file with every exported sub-net of a run, each layer's weights
//! stored once. The layout, key by key, is in `docs/model-format.md`; in short:
//!
//! - a masked layer `L`: `L.values` (the weights at the union of the sub-nets' masks, in
//!   weight order; f32, f16 or bf16), `L.union` (u8: the union as packed bits over the dense
//!   weight, position `p` at bit `p mod 8` of byte `p / 8`) or, where smaller, `L.union_gaps`
//!   (u8: per kept position the count of positions skipped before it, 255 skipping 255 and
//!   keeping none), or, for N:M sub-nets where smaller, `L.union_nm` (u8: each N:M group's
//!   in-group indices, ⌈log2 M⌉ bits each) with `L.union_nm_pattern` (u32 `[N, M, A, C, B]`:
//!   the pattern and the weight viewed as `[A, C, B]`, groups along `C`), and per sub-net `j`
//!   either
//!   `L.subnet.j.bits` (u8: packed bits over the union's positions) or `L.subnet.j.index`
//!   (u32: the union positions it keeps), whichever is smaller, or nothing when it keeps the
//!   whole union (the report's encoding `"all"`); `L.bias` (f32) if any;
//! - a plain layer (dense for every sub-net): `L.weight`, and `L.bias` if any;
//! - a BatchNorm `N`, folded to `y = scale·x + shift` per channel: `N.subnet.j.scale` /
//!   `N.subnet.j.shift` when each sub-net has its own, `N.scale` / `N.shift` when shared;
//! - `__metadata__` holds one key, `ast`: a JSON [`Header`] (format, version, model, value
//!   type, the [`Graph`], the sub-nets with their densities and accuracies, a per-layer report,
//!   and the SHA-256 of the tensors).
//!
//! Weights keep their training layout: convolutions `[C_out, C_in/groups, kh, kw]`, linear
//! layers `[d_in, d_out]` (burn's).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use ast_kernels::conv::{ConvGeometry, MaskedConvPlan};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bits::{gaps, pack, pack_in_group, ungap, unpack, unpack_in_group, GroupView};
use crate::error::{corrupt, InferError, Result};
use crate::graph::{ConvSpec, Graph, NormRef, Op};

/// The `format` of the header.
pub const FORMAT: &str = "ast-subnets";
/// The newest format version, which this build reads with every older one. Version 2 added
/// in-group indices (`L.union_nm`) and sub-nets that keep a layer's whole union with nothing
/// stored (encoding `"all"`); a file with neither is written as version 1, so that builds
/// before it read it.
pub const VERSION: u32 = 2;
/// The one `__metadata__` key.
pub const METADATA_KEY: &str = "ast";

/// How the weight values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Values {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Values {
    /// Every value type, for error messages and flags.
    pub const ALL: [Values; 3] = [Values::F32, Values::F16, Values::Bf16];

    /// The name in flags and headers.
    pub fn name(self) -> &'static str {
        match self {
            Values::F32 => "f32",
            Values::F16 => "f16",
            Values::Bf16 => "bf16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Values::F32 => Dtype::F32,
            Values::F16 => Dtype::F16,
            Values::Bf16 => Dtype::BF16,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Values::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Values::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Values::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

impl FromStr for Values {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Values::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown value type `{s}`: use f32, f16 or bf16"))
    }
}

/// One exported sub-net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubnetInfo {
    /// Its index in the training run.
    pub trained_index: usize,
    /// Its target: a density (`0.1`) or an N:M pattern (`2:4`).
    pub target: String,
    /// Its density over the masked layers (set by the export).
    pub density: f64,
    /// Top-1 accuracy (%) where it was evaluated.
    pub top1: Option<f64>,
    /// Top-5 accuracy (%).
    pub top5: Option<f64>,
    /// The data the accuracies were measured on.
    pub evaluated_on: Option<String>,
}

/// What the export stored for one masked layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Module path.
    pub layer: String,
    /// Weights of the dense layer.
    pub weights: usize,
    /// Positions in the union of the sub-nets' masks.
    pub union: usize,
    /// How the union is stored: `"bits"`, `"gaps"` or in-group indices (`"2:4"`).
    #[serde(default)]
    pub union_encoding: String,
    /// Per sub-net: its density in this layer.
    pub density: Vec<f64>,
    /// Per sub-net: `"bits"` or `"index"` (how its positions are stored), or `"all"` when it
    /// keeps the whole union (nothing stored).
    pub encoding: Vec<String>,
    /// Per sub-net: the form inference runs it in at batch 1 (`"sparse"` or `"dense"`), for
    /// convolutions.
    pub form: Vec<String>,
    /// Bytes stored for the layer (values, union, sub-nets, bias).
    pub bytes: usize,
    /// Bytes of the dense layer in f32.
    pub dense_f32_bytes: usize,
}

/// The JSON header in `__metadata__["ast"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written.
    pub version: u32,
    /// The model's name (`resnet32`).
    pub model: String,
    /// How the weight values are stored.
    pub values: Values,
    /// The forward pass.
    pub graph: Graph,
    /// The sub-nets, in file order (`j`).
    pub subnets: Vec<SubnetInfo>,
    /// Per masked layer: what was stored.
    pub report: Vec<LayerReport>,
    /// `sha256:` and the hex SHA-256 of the tensors (see [`checksum`]).
    pub checksum: String,
    /// The training run's configuration (as `ast-cli` wrote it), so that tools read and
    /// preprocess data the way training did; `null` when unknown.
    #[serde(default)]
    pub training: serde_json::Value,
    /// Latencies measured on a machine (`ast-cli calibrate`), which
    /// [`crate::InferenceModel::pick_within_budget`] reads instead of measuring when the
    /// machine, thread count and batch size match.
    #[serde(default)]
    pub calibration: Vec<Calibration>,
}

/// Each sub-net's latency on one machine at one batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The CPU's model name.
    pub cpu: String,
    /// The SIMD level the kernels dispatched to.
    pub simd: String,
    /// Threads of the rayon pool.
    pub threads: usize,
    /// Images per forward pass.
    pub batch: usize,
    /// Median milliseconds per forward pass, per sub-net.
    pub median_ms: Vec<f64>,
}

/// `bytes`, a model file, with `header` as its header and the same tensors (so the same
/// checksum): how a calibration is stored.
pub fn with_header(bytes: &[u8], header: &Header) -> Result<Vec<u8>> {
    let file = ModelFile::parse(bytes)?;
    let json = serde_json::to_string(header).map_err(|e| corrupt(e.to_string()))?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    // `serialize` orders the tensors itself (by dtype, then name): the same bytes every time.
    safetensors::serialize(file.tensors.tensors(), Some(metadata))
        .map_err(|e| corrupt(e.to_string()))
}

/// A model's parameters by module path, as the export reads them: float tensors flat
/// (`blocks.0.conv1.weight`, `bn1.running_var`, `blocks.0.bn1.norms.2.gamma`) and masks
/// (`blocks.0.conv1.masks.2`).
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// Float parameters and buffers.
    pub floats: HashMap<String, Vec<f32>>,
    /// Masks.
    pub masks: HashMap<String, Vec<bool>>,
}

impl Params {
    fn floats(&self, key: &str, len: usize) -> Result<&[f32]> {
        match self.floats.get(key) {
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(InferError::Export(format!(
                "`{key}` holds {} values, the graph needs {len}",
                v.len()
            ))),
            None => Err(InferError::Export(format!("the model has no `{key}`"))),
        }
    }

    fn mask(&self, key: &str, len: usize) -> Result<&[bool]> {
        match self.masks.get(key) {
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(InferError::Export(format!(
                "mask `{key}` holds {} values, the graph needs {len}",
                v.len()
            ))),
            None => Err(InferError::Export(format!("the model has no mask `{key}`"))),
        }
    }
}

/// A tensor to write.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_tensor(values: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape: vec![values.len()],
        data: Values::F32.encode(values),
    }
}

fn u8_tensor(bytes: Vec<u8>) -> Owned {
    Owned {
        dtype: Dtype::U8,
        shape: vec![bytes.len()],
        data: bytes,
    }
}

/// The SHA-256 of tensors given as (name, dtype, shape, bytes), in name order: each name, a
/// zero byte, the dtype's name, the shape as little-endian u64s, then the bytes.
pub fn checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hash = Sha256::new();
    for (name, dtype, shape, bytes) in sorted {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(format!("{dtype:?}").as_bytes());
        for &d in shape {
            hash.update((d as u64).to_le_bytes());
        }
        hash.update(bytes);
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The kernels' geometry of a convolution for one image.
pub(crate) fn geometry(conv: &ConvSpec) -> ConvGeometry {
    ConvGeometry {
        batch: 1,
        c_in: conv.c_in,
        in_hw: conv.in_hw,
        c_out: conv.c_out,
        kernel: conv.kernel,
        stride: conv.stride,
        padding: conv.padding,
        dilation: conv.dilation,
        groups: conv.groups,
    }
}

/// Writes the file: the chosen sub-nets (`subnets`, by their index in the run) of a model
/// whose forward pass is `graph` and whose parameters are `params`, with the run's
/// configuration `training` (or `null`). Fills each sub-net's density; returns the file's
/// bytes and its header.
pub fn export(
    model: &str,
    graph: &Graph,
    params: &Params,
    mut subnets: Vec<SubnetInfo>,
    values: Values,
    training: serde_json::Value,
) -> Result<(Vec<u8>, Header)> {
    graph
        .buffer_lens()
        .map_err(|e| InferError::Export(format!("the model's graph: {e}")))?;
    if subnets.is_empty() {
        return Err(InferError::Export("no sub-net chosen".into()));
    }
    let mut tensors: BTreeMap<String, Owned> = BTreeMap::new();
    let mut report = Vec::new();
    let (mut active, mut total) = (vec![0usize; subnets.len()], 0usize);
    // 1 unless in-group indices or `"all"` sub-nets are stored, which need version 2.
    let mut version = 1;
    for op in &graph.ops {
        // The weight as `[A, C, B]` with its input channels as `C` (for N:M groups).
        let (layer, masked, view, bias_len, conv, norm) = match op {
            Op::Conv {
                layer,
                masked,
                conv,
                norm,
                ..
            } => (
                layer,
                *masked,
                [
                    conv.c_out,
                    conv.c_in / conv.groups.max(1),
                    conv.kernel[0] * conv.kernel[1],
                ],
                conv.bias.then_some(conv.c_out),
                Some(conv),
                norm.as_ref(),
            ),
            Op::Linear {
                layer,
                masked,
                d_in,
                d_out,
                bias,
                ..
            } => (
                layer,
                *masked,
                [1, *d_in, *d_out],
                bias.then_some(*d_out),
                None,
                None,
            ),
            Op::GlobalAvgPool { .. } => continue,
        };
        let len = view.iter().product();
        let weight = params.floats(&format!("{layer}.weight"), len)?;
        let mut bytes = 0;
        if let Some(n) = bias_len {
            let bias = f32_tensor(params.floats(&format!("{layer}.bias"), n)?);
            bytes += bias.data.len();
            tensors.insert(format!("{layer}.bias"), bias);
        }
        if let Some(norm) = norm {
            let channels = conv.map_or(0, |c| c.c_out);
            fold_norm(&mut tensors, params, norm, channels, &subnets)?;
        }
        if !masked {
            let stored = Owned {
                dtype: values.dtype(),
                shape: vec![len],
                data: values.encode(weight),
            };
            tensors.insert(format!("{layer}.weight"), stored);
            continue;
        }
        let masks = subnets
            .iter()
            .map(|s| params.mask(&format!("{layer}.masks.{}", s.trained_index), len))
            .collect::<Result<Vec<_>>>()?;
        let union: Vec<bool> = (0..len).map(|p| masks.iter().any(|m| m[p])).collect();
        let positions: Vec<usize> = (0..len).filter(|&p| union[p]).collect();
        let kept: Vec<f32> = positions.iter().map(|&p| weight[p]).collect();
        let stored = Owned {
            dtype: values.dtype(),
            shape: vec![kept.len()],
            data: values.encode(&kept),
        };
        bytes += stored.data.len();
        tensors.insert(format!("{layer}.values"), stored);
        // The smallest of bits, gaps and (N:M sub-nets) in-group indices; ties: the first.
        let mut encodings = vec![
            ("bits", pack(union.iter().copied()), None),
            ("gaps", gaps(&positions), None),
        ];
        for m in nm_group_sizes(&subnets) {
            let Some(groups) = GroupView::new(view, m) else {
                continue;
            };
            if let Some((n, packed)) = pack_in_group(&union, groups) {
                encodings.push(("nm", packed, Some([n, m])));
            }
        }
        let (encoding, union_bytes, pattern) = encodings
            .into_iter()
            .min_by_key(|(_, b, p)| b.len() + if p.is_some() { 20 } else { 0 })
            .expect("bits and gaps");
        bytes += union_bytes.len();
        let union_encoding = match pattern {
            None => encoding.to_string(),
            Some([n, m]) => {
                let pattern = [n, m, view[0], view[1], view[2]];
                let data: Vec<u8> = pattern
                    .iter()
                    .flat_map(|&x| (x as u32).to_le_bytes())
                    .collect();
                bytes += data.len();
                let t = Owned {
                    dtype: Dtype::U32,
                    shape: vec![5],
                    data,
                };
                tensors.insert(format!("{layer}.union_nm_pattern"), t);
                version = version.max(2);
                format!("{n}:{m}")
            }
        };
        let union_key = match encoding {
            "bits" => "union",
            "gaps" => "union_gaps",
            _ => "union_nm",
        };
        tensors.insert(format!("{layer}.{union_key}"), u8_tensor(union_bytes));
        total += len;
        let (mut density, mut encoding, mut form) = (Vec::new(), Vec::new(), Vec::new());
        for (j, mask) in masks.iter().enumerate() {
            let chosen: Vec<u32> = positions
                .iter()
                .enumerate()
                .filter(|&(_, &p)| mask[p])
                .map(|(i, _)| i as u32)
                .collect();
            active[j] += chosen.len();
            density.push(chosen.len() as f64 / len as f64);
            let bits_len = positions.len().div_ceil(8);
            if chosen.len() == positions.len() {
                // Keeps the whole union (a sub-net exported alone): nothing to store.
                encoding.push("all".to_string());
                version = version.max(2);
            } else {
                let (key, tensor) = if chosen.len() * 4 < bits_len {
                    let data: Vec<u8> = chosen.iter().flat_map(|i| i.to_le_bytes()).collect();
                    let t = Owned {
                        dtype: Dtype::U32,
                        shape: vec![chosen.len()],
                        data,
                    };
                    ("index", t)
                } else {
                    let t = u8_tensor(pack(positions.iter().map(|&p| mask[p])));
                    ("bits", t)
                };
                bytes += tensor.data.len();
                encoding.push(key.to_string());
                tensors.insert(format!("{layer}.subnet.{j}.{key}"), tensor);
            }
            form.push(match conv {
                Some(c) => {
                    let sparse = MaskedConvPlan::picks_sparse(&geometry(c), chosen.len());
                    if sparse { "sparse" } else { "dense" }.to_string()
                }
                None => "dense".to_string(),
            });
        }
        report.push(LayerReport {
            layer: layer.clone(),
            weights: len,
            union: positions.len(),
            union_encoding,
            density,
            encoding,
            form,
            bytes,
            dense_f32_bytes: 4 * (len + bias_len.unwrap_or(0)),
        });
    }
    if total == 0 {
        return Err(InferError::Export("the graph has no masked layer".into()));
    }
    for (s, a) in subnets.iter_mut().zip(&active) {
        s.density = *a as f64 / total as f64;
    }
    let header = Header {
        format: FORMAT.into(),
        version,
        model: model.into(),
        values,
        graph: graph.clone(),
        subnets,
        report,
        checksum: checksum(
            tensors
                .iter()
                .map(|(k, t)| (k.as_str(), t.dtype, t.shape.as_slice(), t.data.as_slice())),
        ),
        training,
        calibration: Vec::new(),
    };
    let json = serde_json::to_string(&header).map_err(|e| InferError::Export(e.to_string()))?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
            .map_err(|e| InferError::Export(e.to_string()))?;
    Ok((bytes, header))
}

/// The distinct `M` of the N:M sub-nets among `subnets` (targets `"N:M"`), ascending.
fn nm_group_sizes(subnets: &[SubnetInfo]) -> Vec<usize> {
    let mut ms: Vec<usize> = subnets
        .iter()
        .filter_map(|s| s.target.split_once(':')?.1.parse().ok())
        .collect();
    ms.sort_unstable();
    ms.dedup();
    ms
}

/// `N.subnet.j.scale|shift` (switchable) or `N.scale|shift` (shared):
/// `scale = γ/√(σ² + ε)`, `shift = β − μ·scale`.
fn fold_norm(
    tensors: &mut BTreeMap<String, Owned>,
    params: &Params,
    norm: &NormRef,
    channels: usize,
    subnets: &[SubnetInfo],
) -> Result<()> {
    let fold = |prefix: &str| -> Result<(Vec<f32>, Vec<f32>)> {
        let get = |name: &str| params.floats(&format!("{prefix}.{name}"), channels);
        let (gamma, beta) = (get("gamma")?, get("beta")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let scale: Vec<f32> = gamma
            .iter()
            .zip(var)
            .map(|(&g, &v)| (g as f64 / (v as f64 + norm.epsilon).sqrt()) as f32)
            .collect();
        let shift = beta
            .iter()
            .zip(mean.iter().zip(&scale))
            .map(|(&b, (&m, &s))| b - m * s)
            .collect();
        Ok((scale, shift))
    };
    let path = &norm.path;
    if norm.switchable {
        for (j, s) in subnets.iter().enumerate() {
            let (scale, shift) = fold(&format!("{path}.norms.{}", s.trained_index))?;
            tensors.insert(format!("{path}.subnet.{j}.scale"), f32_tensor(&scale));
            tensors.insert(format!("{path}.subnet.{j}.shift"), f32_tensor(&shift));
        }
    } else {
        let (scale, shift) = fold(path)?;
        tensors.insert(format!("{path}.scale"), f32_tensor(&scale));
        tensors.insert(format!("{path}.shift"), f32_tensor(&shift));
    }
    Ok(())
}

/// A read file: its header and its tensors (checked against the checksum).
#[derive(Debug)]
pub struct ModelFile<'a> {
    /// The header.
    pub header: Header,
    tensors: SafeTensors<'a>,
}

impl<'a> ModelFile<'a> {
    /// Reads and checks `bytes`: a safetensors file with our header, of this format version,
    /// whose tensors match their checksum and whose graph chains.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let (_, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| InferError::NotSafetensors(e.to_string()))?;
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or(InferError::Foreign)?;
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| corrupt(format!("its header: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(InferError::Foreign);
        }
        let found = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if !(1..=VERSION).contains(&found) {
            return Err(InferError::Version {
                found,
                supported: VERSION,
            });
        }
        let header: Header =
            serde_json::from_value(value).map_err(|e| corrupt(format!("its header: {e}")))?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| InferError::NotSafetensors(e.to_string()))?;
        let views = tensors.tensors();
        let sum = checksum(
            views
                .iter()
                .map(|(k, t)| (k.as_str(), t.dtype(), t.shape(), t.data())),
        );
        if sum != header.checksum {
            return Err(InferError::Checksum);
        }
        header.graph.buffer_lens().map_err(corrupt)?;
        Ok(Self { header, tensors })
    }

    fn tensor(&self, key: &str, dtype: Dtype, len: usize) -> Result<&'a [u8]> {
        let t = self
            .tensors
            .tensor(key)
            .map_err(|_| corrupt(format!("no tensor `{key}`")))?;
        if t.dtype() != dtype || t.shape() != [len] {
            return Err(corrupt(format!(
                "`{key}` is {:?} {:?}, not {dtype:?} [{len}]",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data())
    }

    /// Whether the file has a tensor `key`.
    pub fn has(&self, key: &str) -> bool {
        self.tensors.tensor(key).is_ok()
    }

    /// An f32 tensor of `len` values.
    pub fn f32s(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let bytes = self.tensor(key, Dtype::F32, len)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A weight tensor of `len` values in the file's value type, as f32.
    pub fn weights(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let values = self.header.values;
        let bytes = self.tensor(key, values.dtype(), len)?;
        let two = |b: &[u8]| [b[0], b[1]];
        Ok(match values {
            Values::F32 => return self.f32s(key, len),
            Values::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(two(b)).to_f32())
                .collect(),
            Values::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes(two(b)).to_f32())
                .collect(),
        })
    }

    /// Packed bits of `len` positions.
    pub fn bits(&self, key: &str, len: usize) -> Result<Vec<bool>> {
        let bytes = self.tensor(key, Dtype::U8, len.div_ceil(8))?;
        unpack(bytes, len).ok_or_else(|| corrupt(format!("`{key}` sets bits past {len}")))
    }

    /// The element count of tensor `key`.
    fn len_of(&self, key: &str) -> Result<usize> {
        let t = self.tensors.tensor(key);
        Ok(t.map_err(|_| corrupt(format!("no tensor `{key}`")))?
            .shape()
            .iter()
            .product())
    }

    /// A u32 tensor (its length read from the file).
    pub fn indices(&self, key: &str) -> Result<Vec<u32>> {
        let bytes = self.tensor(key, Dtype::U32, self.len_of(key)?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Sub-net `j`'s weight of masked layer `layer` (`len` weights), dense: the union's values
    /// at its positions, zero elsewhere; and its mask.
    pub fn subnet_weight(
        &self,
        layer: &str,
        len: usize,
        j: usize,
    ) -> Result<(Vec<f32>, Vec<bool>)> {
        let positions = self.union(layer, len)?;
        let values = self.weights(&format!("{layer}.values"), positions.len())?;
        let bits_key = format!("{layer}.subnet.{j}.bits");
        let keeps_all = self
            .header
            .report
            .iter()
            .any(|r| r.layer == layer && r.encoding.get(j).is_some_and(|e| e == "all"));
        let keep: Vec<bool> = if keeps_all {
            vec![true; positions.len()]
        } else if self.has(&bits_key) {
            self.bits(&bits_key, positions.len())?
        } else {
            let mut keep = vec![false; positions.len()];
            for i in self.indices(&format!("{layer}.subnet.{j}.index"))? {
                *keep.get_mut(i as usize).ok_or_else(|| {
                    corrupt(format!("`{layer}` sub-net {j}: index {i} past the union"))
                })? = true;
            }
            keep
        };
        let (mut weight, mut mask) = (vec![0.0; len], vec![false; len]);
        for ((&p, &v), &k) in positions.iter().zip(&values).zip(&keep) {
            if k {
                weight[p] = v;
                mask[p] = true;
            }
        }
        Ok((weight, mask))
    }

    /// The union positions of masked layer `layer` (`len` weights), ascending: from
    /// `layer.union` (bits), `layer.union_gaps` (gap bytes) or `layer.union_nm` (in-group
    /// indices).
    pub fn union(&self, layer: &str, len: usize) -> Result<Vec<usize>> {
        let key = format!("{layer}.union_nm");
        if self.has(&key) {
            let pattern = self.indices(&format!("{layer}.union_nm_pattern"))?;
            let bad = || {
                corrupt(format!(
                    "`{layer}.union_nm_pattern` does not fit {len} weights"
                ))
            };
            let &[n, m, a, c, b] = pattern.as_slice() else {
                return Err(bad());
            };
            let [n, m, a, c, b] = [n, m, a, c, b].map(|x| x as usize);
            let fits = a.checked_mul(c).and_then(|x| x.checked_mul(b)) == Some(len) && n < m;
            let view = GroupView::new([a, c, b], m)
                .filter(|_| fits)
                .ok_or_else(bad)?;
            let bytes = self.tensor(&key, Dtype::U8, self.len_of(&key)?)?;
            return unpack_in_group(bytes, view, n)
                .ok_or_else(|| corrupt(format!("`{key}` is not {n}:{m} in-group indices")));
        }
        let key = format!("{layer}.union_gaps");
        if !self.has(&key) {
            let union = self.bits(&format!("{layer}.union"), len)?;
            return Ok((0..len).filter(|&p| union[p]).collect());
        }
        let t = self
            .tensors
            .tensor(&key)
            .map_err(|_| corrupt(format!("no tensor `{key}`")))?;
        if t.dtype() != Dtype::U8 || t.shape().len() != 1 {
            return Err(corrupt(format!("`{key}` is not a u8 vector")));
        }
        ungap(t.data(), len).ok_or_else(|| corrupt(format!("`{key}` reaches past {len}")))
    }

    /// The folded BatchNorm `(scale, shift)` of sub-net `j`.
    pub fn norm(&self, norm: &NormRef, channels: usize, j: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let prefix = if norm.switchable {
            format!("{}.subnet.{j}", norm.path)
        } else {
            norm.path.clone()
        };
        Ok((
            self.f32s(&format!("{prefix}.scale"), channels)?,
            self.f32s(&format!("{prefix}.shift"), channels)?,
        ))
    }
}
