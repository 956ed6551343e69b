//! Linear layer whose dense weight is shared by `K` sub-nets, each with its own mask.

use burn::module::{Initializer, Param};
use burn::prelude::*;

use super::{dense_masks, SubnetSwitch};
use crate::backend::masked_linear;

/// Configuration of a [`MaskedLinear`].
#[derive(Config, Debug)]
pub struct MaskedLinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Number of sub-nets `K`.
    #[config(default = 1)]
    pub subnets: usize,
    /// Whether the layer has a bias (never masked).
    #[config(default = true)]
    pub bias: bool,
    /// Initializer of weight and bias; the default matches PyTorch's `nn.Linear`.
    #[config(
        default = "Initializer::KaimingUniform { gain: 1.0 / 3.0f64.sqrt(), fan_out_only: false }"
    )]
    pub initializer: Initializer,
    /// Initializer of the bias; `None`: the weight's (PyTorch's `nn.Linear` default).
    #[config(default = "None")]
    pub bias_initializer: Option<Initializer>,
}

/// A linear layer computing `x · (W ⊙ M_k) + b`.
///
/// The weight is stored `[d_input, d_output]` (burn's layout), so N:M groups, which run along
/// input features, run along dimension 0.
#[derive(Module, Debug)]
pub struct MaskedLinear<B: Backend> {
    /// The dense weight shared by all sub-nets, `[d_input, d_output]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Optional bias `[d_output]` (not masked).
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// One mask per sub-net, shaped like the weight.
    pub masks: Vec<Param<Tensor<B, 2, Bool>>>,
    /// Selects the active sub-net.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl MaskedLinearConfig {
    /// Builds the layer with every sub-net dense, switched by `switch`.
    ///
    /// # Panics
    /// If `subnets` is zero.
    pub fn init<B: Backend>(&self, switch: &SubnetSwitch, device: &B::Device) -> MaskedLinear<B> {
        assert!(self.subnets >= 1, "MaskedLinear needs at least one sub-net");
        let shape = [self.d_input, self.d_output];
        let fans = (Some(self.d_input), Some(self.d_output));
        let weight = self.initializer.init_with(shape, fans.0, fans.1, device);
        let bias = self.bias.then(|| {
            self.bias_initializer
                .as_ref()
                .unwrap_or(&self.initializer)
                .init_with([self.d_output], fans.0, fans.1, device)
        });
        MaskedLinear {
            weight,
            bias,
            masks: dense_masks(self.subnets, shape, device),
            switch: switch.clone(),
        }
    }
}

impl<B: Backend> MaskedLinear<B> {
    /// Applies the active sub-net's masked weight.
    ///
    /// # Shapes
    /// - input `[..., d_input]`
    /// - output `[..., d_output]`
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of masks.
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        self.switch.note_forward();
        masked_linear(
            input,
            self.weight.val(),
            self.active_mask(),
            self.bias.as_ref().map(Param::val),
        )
    }
}

impl<B: Backend> MaskedLinear<B> {
    /// The mask of the active sub-net.
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of masks.
    pub fn active_mask(&self) -> Tensor<B, 2, Bool> {
        super::active_mask(&self.switch, &self.masks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::mask_param;
    use crate::tests::{device, TestBackend};
    use burn::tensor::Tolerance;

    #[test]
    fn forward_uses_the_active_mask_and_an_unmasked_bias() {
        let device = device();
        let switch = SubnetSwitch::new();
        let layer = MaskedLinearConfig::new(2, 2)
            .with_subnets(2)
            .init::<TestBackend>(&switch, &device);
        // W = [[1, 2], [3, 4]] ([in, out]); sub-net 1 keeps W[0][1] and W[1][0].
        let layer = MaskedLinear {
            weight: Param::from_tensor(Tensor::from_floats([[1.0, 2.0], [3.0, 4.0]], &device)),
            bias: Some(Param::from_tensor(Tensor::from_floats(
                [0.5, -0.5],
                &device,
            ))),
            masks: vec![
                layer.masks[0].clone(),
                mask_param(Tensor::from_data([[false, true], [true, false]], &device)),
            ],
            ..layer
        };
        let x = Tensor::<TestBackend, 2>::from_floats([[1.0, 1.0]], &device);
        // dense: [1+3, 2+4] + b = [4.5, 5.5]; sub-net 1: [0+3, 2+0] + b = [3.5, 1.5].
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[4.5, 5.5]]), Tolerance::absolute(1e-6));
        switch.set(1);
        layer
            .forward(x)
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[3.5, 1.5]]), Tolerance::absolute(1e-6));
    }

    #[test]
    #[should_panic(expected = "sub-net 3 is active but the layer has 2 masks")]
    fn active_index_beyond_the_masks_panics() {
        let switch = SubnetSwitch::new();
        let layer = MaskedLinearConfig::new(2, 2)
            .with_subnets(2)
            .init::<TestBackend>(&switch, &device());
        switch.set(3);
        let _ = layer.active_mask();
    }
}
