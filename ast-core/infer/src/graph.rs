//! The computation of a model, as the runtime runs it: numbered buffers (0 is the input image)
//! and operations that read and write them. Each model of `ast-models` describes itself in
//! these terms; the file stores the graph, so the runtime needs no model code.

use serde::{Deserialize, Serialize};

/// A model's forward pass for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// Channels, height and width of an input image.
    pub input: [usize; 3],
    /// Output classes (the length of the last operation's output).
    pub classes: usize,
    /// The operations, in order; the last one writes the logits.
    pub ops: Vec<Op>,
}

/// One operation of a [`Graph`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `output = act(norm(conv(input)) + residual)`, `[C, H, W]` planes.
    Conv {
        /// The buffer read.
        input: usize,
        /// The buffer written.
        output: usize,
        /// The module path of the convolution (`blocks.0.conv1`).
        layer: String,
        /// Whether the layer is masked (one mask per sub-net) or plain (dense for all).
        masked: bool,
        /// Shape and hyper-parameters.
        conv: ConvSpec,
        /// The BatchNorm after it, if any.
        norm: Option<NormRef>,
        /// A buffer of the output's shape added after the BatchNorm.
        residual: Option<usize>,
        /// Whether a ReLU follows (after the residual add).
        relu: bool,
    },
    /// The mean of each channel: `[C, H, W]` → `[C]`.
    GlobalAvgPool {
        /// The buffer read.
        input: usize,
        /// The buffer written.
        output: usize,
        /// Channels.
        channels: usize,
    },
    /// `output = input · W + b`, `W` stored `[d_in, d_out]` (burn's layout).
    Linear {
        /// The buffer read.
        input: usize,
        /// The buffer written.
        output: usize,
        /// The module path of the layer.
        layer: String,
        /// Whether the layer is masked or plain.
        masked: bool,
        /// Input features.
        d_in: usize,
        /// Output features.
        d_out: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
}

/// A convolution's shape and hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSpec {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Symmetric zero padding.
    pub padding: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Whether the convolution has a bias.
    pub bias: bool,
}

impl ConvSpec {
    /// Weights: `C_out · C_in/groups · kh · kw`.
    pub fn weight_len(&self) -> usize {
        self.c_out * self.c_in / self.groups.max(1) * self.kernel[0] * self.kernel[1]
    }

    /// Output height and width, or `None` when the kernel does not fit the padded input.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let dim = |i: usize| {
            let span = self.dilation[i] * self.kernel[i].checked_sub(1)? + 1;
            let padded = self.in_hw[i] + 2 * self.padding[i];
            (padded >= span && self.stride[i] > 0).then(|| (padded - span) / self.stride[i] + 1)
        };
        Some([dim(0)?, dim(1)?])
    }
}

/// A BatchNorm after a convolution: where its parameters are, and whether there is one per
/// sub-net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormRef {
    /// The module path of the BatchNorm (`blocks.0.bn1`; its copies are `norms.k` below it
    /// when switchable).
    pub path: String,
    /// One BatchNorm per sub-net, or one shared.
    pub switchable: bool,
    /// `ε` added to the variance.
    pub epsilon: f64,
}

impl Graph {
    /// The length of every buffer, checking that each operation's input exists and has the
    /// length it needs.
    pub fn buffer_lens(&self) -> Result<Vec<usize>, String> {
        let [c, h, w] = self.input;
        let mut lens = vec![c * h * w];
        let set = |lens: &mut Vec<usize>, at: usize, len: usize| -> Result<(), String> {
            if at >= lens.len() {
                lens.resize(at + 1, 0);
            }
            match lens[at] {
                0 => {
                    lens[at] = len;
                    Ok(())
                }
                l if l == len => Ok(()),
                l => Err(format!("buffer {at} holds {l} values and {len}")),
            }
        };
        let get = |lens: &Vec<usize>, at: usize, what: &str| -> Result<usize, String> {
            lens.get(at)
                .copied()
                .filter(|&l| l > 0)
                .ok_or_else(|| format!("{what} reads buffer {at} before anything writes it"))
        };
        for op in &self.ops {
            match op {
                Op::Conv {
                    input,
                    output,
                    layer,
                    conv,
                    residual,
                    ..
                } => {
                    let [ho, wo] = conv
                        .out_hw()
                        .ok_or_else(|| format!("`{layer}`: the kernel does not fit its input"))?;
                    if *input == *output || residual.is_some_and(|r| r == *output) {
                        return Err(format!("`{layer}` writes the buffer it reads"));
                    }
                    let need = conv.c_in * conv.in_hw[0] * conv.in_hw[1];
                    if get(&lens, *input, layer)? != need {
                        return Err(format!("`{layer}`: its input is not {need} values"));
                    }
                    let out = conv.c_out * ho * wo;
                    if let Some(r) = residual {
                        if get(&lens, *r, layer)? != out {
                            return Err(format!("`{layer}`: its residual is not {out} values"));
                        }
                    }
                    set(&mut lens, *output, out)?;
                }
                Op::GlobalAvgPool {
                    input,
                    output,
                    channels,
                } => {
                    let len = get(&lens, *input, "a pooling")?;
                    if *channels == 0 || len % channels != 0 {
                        return Err(format!(
                            "a pooling of {channels} channels reads {len} values"
                        ));
                    }
                    set(&mut lens, *output, *channels)?;
                }
                Op::Linear {
                    input,
                    output,
                    layer,
                    d_in,
                    d_out,
                    ..
                } => {
                    if get(&lens, *input, layer)? != *d_in {
                        return Err(format!("`{layer}`: its input is not {d_in} values"));
                    }
                    set(&mut lens, *output, *d_out)?;
                }
            }
        }
        match self.ops.last().map(Op::output) {
            Some(last) if lens[last] == self.classes => Ok(lens),
            _ => Err(format!(
                "the last operation does not write {} logits",
                self.classes
            )),
        }
    }

    /// The layers with one mask per sub-net, in order: (path, weight count).
    pub fn masked_layers(&self) -> Vec<(&str, usize)> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Conv {
                    layer,
                    masked: true,
                    conv,
                    ..
                } => Some((layer.as_str(), conv.weight_len())),
                Op::Linear {
                    layer,
                    masked: true,
                    d_in,
                    d_out,
                    ..
                } => Some((layer.as_str(), d_in * d_out)),
                _ => None,
            })
            .collect()
    }
}

impl Op {
    /// The buffer the operation writes.
    pub fn output(&self) -> usize {
        match self {
            Op::Conv { output, .. }
            | Op::GlobalAvgPool { output, .. }
            | Op::Linear { output, .. } => *output,
        }
    }
}
