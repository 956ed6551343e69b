//! 2-D convolution whose dense weight is shared by `K` sub-nets, each with its own mask.

use burn::module::{Initializer, Param};
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

use super::{dense_masks, SubnetSwitch};
use crate::backend::masked_conv2d;

/// Configuration of a [`MaskedConv2d`].
#[derive(Config, Debug)]
pub struct MaskedConv2dConfig {
    /// Input and output channels `[C_in, C_out]`.
    pub channels: [usize; 2],
    /// Kernel size `[kh, kw]`.
    pub kernel_size: [usize; 2],
    /// Number of sub-nets `K` (one mask each).
    #[config(default = 1)]
    pub subnets: usize,
    /// Stride `[sh, sw]`.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Symmetric zero padding `[ph, pw]`.
    #[config(default = "[0, 0]")]
    pub padding: [usize; 2],
    /// Dilation `[dh, dw]`.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Groups (`C_in` for a depthwise convolution).
    #[config(default = 1)]
    pub groups: usize,
    /// Whether the layer has a bias (never masked).
    #[config(default = false)]
    pub bias: bool,
    /// Weight initializer; the default is PyTorch's Kaiming-normal with fan-out (ReLU gain).
    #[config(
        default = "Initializer::KaimingNormal { gain: core::f64::consts::SQRT_2, fan_out_only: true }"
    )]
    pub initializer: Initializer,
}

/// A convolution computing with `W ⊙ M_k`, `k` the sub-net selected by its [`SubnetSwitch`].
///
/// The weight `[C_out, C_in / groups, kh, kw]` is dense and shared; the masks have its shape
/// and are saved with the module but never optimised.
#[derive(Module, Debug)]
pub struct MaskedConv2d<B: Backend> {
    /// The dense weight shared by all sub-nets.
    pub weight: Param<Tensor<B, 4>>,
    /// Optional bias `[C_out]` (not masked).
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// One mask per sub-net, shaped like the weight.
    pub masks: Vec<Param<Tensor<B, 4, Bool>>>,
    /// Stride.
    pub stride: [usize; 2],
    /// Padding.
    pub padding: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Selects the active sub-net.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl MaskedConv2dConfig {
    /// Builds the layer with every sub-net dense, switched by `switch`.
    ///
    /// # Panics
    /// If `subnets` or `groups` is zero, or `groups` does not divide both channel counts.
    pub fn init<B: Backend>(&self, switch: &SubnetSwitch, device: &B::Device) -> MaskedConv2d<B> {
        let [c_in, c_out] = self.channels;
        assert!(self.subnets >= 1, "MaskedConv2d needs at least one sub-net");
        assert!(
            self.groups >= 1 && c_in % self.groups == 0 && c_out % self.groups == 0,
            "MaskedConv2d: groups {} must divide channels {:?}",
            self.groups,
            self.channels
        );
        let [kh, kw] = self.kernel_size;
        let shape = [c_out, c_in / self.groups, kh, kw];
        let fan_in = c_in / self.groups * kh * kw;
        let fan_out = c_out * kh * kw;
        let weight = self
            .initializer
            .init_with(shape, Some(fan_in), Some(fan_out), device);
        let bias = self
            .bias
            .then(|| Initializer::Zeros.init_with([c_out], Some(fan_in), Some(fan_out), device));
        MaskedConv2d {
            weight,
            bias,
            masks: dense_masks(self.subnets, shape, device),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
            switch: switch.clone(),
        }
    }
}

impl<B: Backend> MaskedConv2d<B> {
    /// Convolution with the active sub-net's masked weight.
    ///
    /// # Shapes
    /// - input `[batch, C_in, H, W]`
    /// - output `[batch, C_out, H_out, W_out]`
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of masks.
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        self.switch.note_forward();
        let mask = self.active_mask();
        let options = ConvOptions::new(self.stride, self.padding, self.dilation, self.groups);
        masked_conv2d(
            input,
            self.weight.val(),
            mask,
            self.bias.as_ref().map(Param::val),
            options,
            self.switch.dense_weight_grad(),
        )
    }
}

impl<B: Backend> MaskedConv2d<B> {
    /// The mask of the active sub-net.
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of masks.
    pub fn active_mask(&self) -> Tensor<B, 4, Bool> {
        super::active_mask(&self.switch, &self.masks)
    }
}

/// burn's plain (unmasked) [`Conv2d`](burn::nn::conv::Conv2d) computed through the backend's
/// masked convolution with an all-ones mask, so that it runs on the same kernels as the masked
/// layers (on Flex: ours, whose backward avoids burn-flex's strided copies). The value and the
/// gradients are those of `conv.forward(x)`. Asymmetric padding is left to `conv.forward`.
///
/// # Shapes
/// - input `[batch, C_in, H, W]`, output `[batch, C_out, H_out, W_out]`.
pub fn plain_conv2d<B: Backend>(conv: &burn::nn::conv::Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let burn::nn::PaddingConfig2d::Explicit(top, left, bottom, right) = conv.padding else {
        return conv.forward(x);
    };
    if top != bottom || left != right {
        return conv.forward(x);
    }
    let weight = conv.weight.val();
    let mask = Tensor::<B, 4, Bool>::full(weight.dims(), true, &weight.device());
    let options = ConvOptions::new(conv.stride, [top, left], conv.dilation, conv.groups);
    masked_conv2d(
        x,
        weight,
        mask,
        conv.bias.as_ref().map(Param::val),
        options,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::mask_param;
    use crate::tests::{device, TestBackend};
    use burn::tensor::Tolerance;

    #[test]
    fn a_plain_convolution_through_the_kernels_equals_burns() {
        use burn::nn::conv::Conv2dConfig;
        use burn::nn::PaddingConfig2d;
        type AD = burn::backend::Autodiff<TestBackend>;
        let device = device();
        TestBackend::seed(&device, 5);
        // Symmetric padding (the kernels), no padding with stride 2, asymmetric (burn's own).
        let cases = [
            (1, PaddingConfig2d::Explicit(1, 1, 1, 1)),
            (2, PaddingConfig2d::Explicit(0, 0, 0, 0)),
            (1, PaddingConfig2d::Explicit(1, 0, 0, 1)),
        ];
        for (stride, padding) in cases {
            let conv = Conv2dConfig::new([3, 4], [3, 3])
                .with_stride([stride, stride])
                .with_padding(padding)
                .init::<AD>(&device);
            let x =
                Tensor::<AD, 4>::random([2, 3, 7, 7], burn::tensor::Distribution::Default, &device)
                    .require_grad();
            let run = |fast: bool| {
                let y = if fast {
                    plain_conv2d(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let grads = (y.clone() * y.clone()).sum().backward();
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    conv.weight.grad(&grads).unwrap(),
                )
            };
            let (fast, reference) = (run(true), run(false));
            let tolerance = burn::tensor::Tolerance::<f32>::absolute(1e-4);
            fast.0
                .into_data()
                .assert_approx_eq::<f32>(&reference.0.into_data(), tolerance);
            fast.1
                .into_data()
                .assert_approx_eq::<f32>(&reference.1.into_data(), tolerance);
            fast.2
                .into_data()
                .assert_approx_eq::<f32>(&reference.2.into_data(), tolerance);
        }
    }

    #[test]
    fn forward_equals_conv_with_hand_masked_weight() {
        let device = device();
        let switch = SubnetSwitch::new();
        let conv = MaskedConv2dConfig::new([1, 1], [2, 2])
            .with_subnets(2)
            .init::<TestBackend>(&switch, &device);
        // W = [[1, 2], [3, 4]], sub-net 1 keeps the diagonal: W ⊙ M = [[1, 0], [0, 4]].
        let conv = MaskedConv2d {
            weight: Param::from_tensor(Tensor::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device)),
            masks: vec![
                conv.masks[0].clone(),
                mask_param(Tensor::from_data(
                    [[[[true, false], [false, true]]]],
                    &device,
                )),
            ],
            ..conv
        };
        // x = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]; 2×2 windows with [[1,0],[0,4]]:
        // (1 + 4·5, 2 + 4·6; 4 + 4·8, 5 + 4·9) = (21, 26; 36, 41).
        let x = Tensor::<TestBackend, 4>::from_floats(
            [[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]],
            &device,
        );
        switch.set(1);
        conv.forward(x.clone()).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[[21.0, 26.0], [36.0, 41.0]]]]),
            Tolerance::absolute(1e-5),
        );
        // Sub-net 0 is dense: (1+4+12+20, ...) = (37, 47; 67, 77).
        switch.set(0);
        conv.forward(x).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[[37.0, 47.0], [67.0, 77.0]]]]),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    fn depthwise_strided_padded_with_bias() {
        let device = device();
        let switch = SubnetSwitch::new();
        let conv = MaskedConv2dConfig::new([2, 2], [3, 3])
            .with_groups(2)
            .with_stride([2, 2])
            .with_padding([1, 1])
            .with_bias(true)
            .init::<TestBackend>(&switch, &device);
        assert_eq!(conv.weight.dims(), [2, 1, 3, 3]);
        let x = Tensor::<TestBackend, 4>::ones([1, 2, 5, 5], &device);
        assert_eq!(conv.forward(x).dims(), [1, 2, 3, 3]);
    }

    #[test]
    fn gradient_reaching_the_weight_is_dense() {
        // The effective weight W − stopgrad(W ⊙ ¬M) has gradient ∂L/∂(W⊙M) everywhere, so that
        // growth can rank inactive positions: here L = Σ conv(x, W⊙M) with x = 1, so every
        // position of the 1×1×2×2 weight gets gradient 4 (four output pixels see it).
        type AD = burn::backend::Autodiff<TestBackend>;
        let device = device();
        let switch = SubnetSwitch::new();
        let conv = MaskedConv2dConfig::new([1, 1], [2, 2]).init::<AD>(&switch, &device);
        let conv = MaskedConv2d {
            masks: vec![mask_param(Tensor::from_data(
                [[[[true, false], [false, false]]]],
                &device,
            ))],
            ..conv
        };
        let x = Tensor::<AD, 4>::ones([1, 1, 3, 3], &device);
        let grads = conv.forward(x).sum().backward();
        let g = conv.weight.grad(&grads).unwrap();
        g.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[[4.0, 4.0], [4.0, 4.0]]]]),
            Tolerance::absolute(1e-5),
        );
    }

    #[test]
    #[should_panic(expected = "groups 3 must divide channels")]
    fn groups_must_divide_channels() {
        let _ = MaskedConv2dConfig::new([4, 4], [3, 3])
            .with_groups(3)
            .init::<TestBackend>(&SubnetSwitch::new(), &device());
    }
}
