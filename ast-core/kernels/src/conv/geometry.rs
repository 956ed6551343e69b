//! Shape and hyper-parameters of one convolution, and every size the kernels derive from them
//! (output plane, padded and wide planes, the sparse kernels' buffers).

/// Shape and hyper-parameters of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size `N`.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub in_hw: [usize; 2],
    /// Output channels.
    pub c_out: usize,
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
}

impl ConvGeometry {
    /// Output height and width, or `None` when the kernel does not fit the padded input.
    pub fn out_hw(&self) -> Option<[usize; 2]> {
        let dim = |i: usize| {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            let padded = self.in_hw[i] + 2 * self.padding[i];
            (padded >= span).then(|| (padded - span) / self.stride[i] + 1)
        };
        Some([dim(0)?, dim(1)?])
    }

    /// Whether the kernels here handle this geometry (else: use the generic path).
    pub fn supported(&self) -> bool {
        self.groups >= 1
            && self.c_in.is_multiple_of(self.groups)
            && self.c_out.is_multiple_of(self.groups)
            && self.kernel.iter().all(|&k| k >= 1)
            && self.stride.iter().all(|&s| s >= 1)
            && self.dilation.iter().all(|&d| d >= 1)
            && self.out_hw().is_some()
    }

    pub(crate) fn cin_g(&self) -> usize {
        self.c_in / self.groups
    }

    pub(crate) fn cout_g(&self) -> usize {
        self.c_out / self.groups
    }

    /// Weights per output channel: `C_in/groups · kh · kw`.
    pub fn row_len(&self) -> usize {
        self.cin_g() * self.kernel[0] * self.kernel[1]
    }

    /// Number of weights.
    pub fn weight_len(&self) -> usize {
        self.c_out * self.row_len()
    }

    /// Values of one input sample.
    pub fn in_len(&self) -> usize {
        self.c_in * self.in_hw[0] * self.in_hw[1]
    }

    /// Positions of one output plane, `H_out · W_out`.
    pub fn out_plane(&self) -> usize {
        let [h, w] = self.out_hw().expect("geometry checked by `supported`");
        h * w
    }

    /// Values of one output sample.
    pub fn out_len(&self) -> usize {
        self.c_out * self.out_plane()
    }

    /// Height and width of the zero-padded input.
    pub fn padded_hw(&self) -> [usize; 2] {
        [
            self.in_hw[0] + 2 * self.padding[0],
            self.in_hw[1] + 2 * self.padding[1],
        ]
    }

    pub(crate) fn padded_len(&self) -> usize {
        let [hp, wp] = self.padded_hw();
        self.c_in * hp * wp
    }

    /// One output plane with the padded input's row pitch: `H_out × (W + 2p_w)`.
    pub(crate) fn wide_len(&self) -> usize {
        let [ho, _] = self.out_hw().expect("supported geometry");
        ho * self.padded_hw()[1]
    }

    /// Positions of a wide output plane that hold outputs: `(H_out − 1)·(W + 2p_w) + W_out`.
    pub(crate) fn span_len(&self) -> usize {
        let [ho, wo] = self.out_hw().expect("supported geometry");
        (ho - 1) * self.padded_hw()[1] + wo
    }

    /// The span rounded up to whole 16-lane vectors: the sparse kernels' products run over this
    /// many positions, so that no product ends in a scalar tail (spans are short on small
    /// planes: 78 at 8×8). The positions past the span only touch buffer slack, border or
    /// zeros (see [`SparseWeight`]).
    pub(crate) fn lanes_len(&self) -> usize {
        self.span_len().next_multiple_of(16)
    }

    /// The sparse kernels' padded-input buffer: the padded input plus the slack that products
    /// over [`Self::lanes_len`] positions reach past it.
    pub(crate) fn padded_buffer_len(&self) -> usize {
        self.padded_len() + 16 * self.stride[1]
    }

    /// Positions of one stride phase of the padded input (positions `r, r + s, r + 2s, …` for
    /// stride `s`, phase `r`).
    pub(crate) fn phase_len(&self) -> usize {
        self.padded_buffer_len().div_ceil(self.stride[1])
    }

    /// The sparse kernels' padded buffer: the padded input and, for a stride `s > 1`, its `s`
    /// phases one after another (plus the slack products reach past the last one). On the
    /// phases a product of stride `s` is a contiguous one.
    pub(crate) fn sparse_buffer_len(&self) -> usize {
        let s = self.stride[1];
        let phases = if s == 1 {
            0
        } else {
            s * self.phase_len() + self.lanes_len()
        };
        self.padded_buffer_len() + phases
    }

    /// Where the product of an active weight at padded position `offset` starts: the position
    /// itself for stride 1, else its place in the phases (`offset mod s` picks the phase).
    pub(crate) fn phase_offset(&self, offset: usize) -> usize {
        let s = self.stride[1];
        (offset % s) * self.phase_len() + offset / s
    }

    /// The sparse kernels' wide-plane buffer: at least [`Self::lanes_len`] positions.
    pub(crate) fn wide_buffer_len(&self) -> usize {
        self.wide_len().max(self.lanes_len())
    }

    /// The largest in-plane offset of a kernel position in the padded input,
    /// `(kh − 1)·d_h·(W + 2p_w) + (kw − 1)·d_w`: the zero margin in front of each channel of the
    /// stride-1 input gradient's `dy` buffer, so that reading it backwards never leaves it.
    pub(crate) fn dy_margin(&self) -> usize {
        let wp = self.padded_hw()[1];
        (self.kernel[0] - 1) * self.dilation[0] * wp + (self.kernel[1] - 1) * self.dilation[1]
    }

    /// Positions of the padded input plane rounded up to whole 16-value vectors: what the
    /// stride-1 input gradient computes per input channel.
    pub(crate) fn padded_plane_blocks(&self) -> usize {
        let [hp, wp] = self.padded_hw();
        (hp * wp).next_multiple_of(16)
    }

    /// One channel of the stride-1 input gradient's `dy` buffer: the margin, then the wide
    /// `dy` plane (rows `W + 2p_w` apart) with zeros around it, as long as any read reaches.
    pub(crate) fn dy_channel_len(&self) -> usize {
        self.dy_margin() + self.padded_plane_blocks()
    }

    /// The two zeroed buffers of the stride-1 sparse input gradient, per thread: `dy` laid out
    /// behind its margins ([`lay_out_dy`]) and one padded gradient plane.
    pub(crate) fn by_input_buffers(&self) -> (Vec<f32>, Vec<f32>) {
        (
            vec![0.0; self.c_out * self.dy_channel_len()],
            vec![0.0; self.padded_plane_blocks()],
        )
    }

    /// A 1×1, stride-1, unpadded convolution: its im2col is the input itself.
    pub(crate) fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// For kernel offset `k` along axis `i`: the output range whose input index
    /// `o·stride + k·dilation − padding` lies inside the input, and that index at its start.
    pub(crate) fn valid(&self, i: usize, k: usize, out: usize) -> (usize, usize, usize) {
        let (s, shift, n) = (
            self.stride[i] as isize,
            (k * self.dilation[i]) as isize - self.padding[i] as isize,
            self.in_hw[i] as isize,
        );
        // o·s + shift ≥ 0  ⇔  o ≥ ceil(−shift / s);  o·s + shift < n  ⇔  o ≤ (n − 1 − shift) / s.
        let lo = if shift >= 0 { 0 } else { (-shift + s - 1) / s };
        let hi = if n - 1 - shift < 0 {
            0
        } else {
            ((n - 1 - shift) / s + 1).min(out as isize)
        };
        let lo = lo.min(hi);
        (lo as usize, hi as usize, (lo * s + shift).max(0) as usize)
    }
}

pub(crate) fn check(g: &ConvGeometry, x: usize, w: usize, y: usize) {
    assert!(g.supported(), "conv kernels: unsupported geometry {g:?}");
    assert_eq!(x, g.batch * g.in_len(), "conv kernels: input length");
    assert_eq!(w, g.weight_len(), "conv kernels: weight length");
    assert_eq!(y, g.batch * g.out_len(), "conv kernels: output length");
}
