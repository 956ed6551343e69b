//! The layer factory every model uses: one [`SubnetSwitch`], one `K`, one convolution init.

use core::f64::consts::SQRT_2;

use ast_core::{
    MaskedConv2d, MaskedConv2dConfig, MaskedLinear, MaskedLinearConfig, SubnetSwitch,
    SwitchableBatchNorm, SwitchableBatchNormConfig,
};
use burn::module::Initializer;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;

/// Builds the layers of one model: masked layers and switchable BatchNorms share `switch` and
/// have `subnets` masks / BatchNorms; convolutions are Kaiming-normal (gain √2) with fan-out or
/// fan-in, and padded by `kernel / 2` ("same" for odd kernels at stride 1).
pub(crate) struct LayerBuilder<'a, B: Backend> {
    pub switch: &'a SubnetSwitch,
    pub subnets: usize,
    pub fan_out: bool,
    pub device: &'a B::Device,
}

impl<B: Backend> LayerBuilder<'_, B> {
    fn kaiming(&self) -> Initializer {
        Initializer::KaimingNormal {
            gain: SQRT_2,
            fan_out_only: self.fan_out,
        }
    }

    /// A masked `kernel × kernel` convolution without bias.
    pub fn conv(&self, channels: [usize; 2], kernel: usize, stride: usize) -> MaskedConv2d<B> {
        self.grouped_conv(channels, kernel, stride, 1)
    }

    /// A masked grouped convolution without bias (`groups = C_in` for depthwise).
    pub fn grouped_conv(
        &self,
        channels: [usize; 2],
        kernel: usize,
        stride: usize,
        groups: usize,
    ) -> MaskedConv2d<B> {
        MaskedConv2dConfig::new(channels, [kernel, kernel])
            .with_subnets(self.subnets)
            .with_stride([stride, stride])
            .with_padding([kernel / 2, kernel / 2])
            .with_groups(groups)
            .with_bias(false)
            .with_initializer(self.kaiming())
            .init(self.switch, self.device)
    }

    /// A switchable BatchNorm (γ = 1, β = 0 in every sub-net).
    pub fn norm(&self, channels: usize) -> SwitchableBatchNorm<B> {
        SwitchableBatchNormConfig::new(channels)
            .with_subnets(self.subnets)
            .init(self.switch, self.device)
    }

    /// A masked linear layer with bias and PyTorch's default init.
    pub fn linear(&self, d_input: usize, d_output: usize) -> MaskedLinear<B> {
        self.linear_config(d_input, d_output)
            .init(self.switch, self.device)
    }

    /// A masked classifier initialised as the original's CIFAR ResNets do: weight from
    /// `weight`, bias zero.
    pub fn classifier(
        &self,
        d_input: usize,
        d_output: usize,
        weight: Initializer,
    ) -> MaskedLinear<B> {
        self.linear_config(d_input, d_output)
            .with_initializer(weight)
            .with_bias_initializer(Some(Initializer::Zeros))
            .init(self.switch, self.device)
    }

    fn linear_config(&self, d_input: usize, d_output: usize) -> MaskedLinearConfig {
        MaskedLinearConfig::new(d_input, d_output).with_subnets(self.subnets)
    }

    /// A plain (unmasked, shared) convolution without bias.
    pub fn plain_conv(&self, channels: [usize; 2], kernel: usize, stride: usize) -> Conv2d<B> {
        let p = kernel / 2;
        Conv2dConfig::new(channels, [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_bias(false)
            .with_initializer(self.kaiming())
            .init(self.device)
    }

    /// A plain BatchNorm shared by all sub-nets.
    pub fn plain_norm(&self, channels: usize) -> BatchNorm<B> {
        BatchNormConfig::new(channels).init(self.device)
    }
}
