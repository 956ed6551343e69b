//! BatchNorm with one instance (affine parameters and running statistics) per sub-net.

use burn::nn::{BatchNorm, BatchNormConfig};
use burn::prelude::*;

use super::{active_index, batch_norm_2d, batch_norm_act, SubnetSwitch};

/// Configuration of a [`SwitchableBatchNorm`].
#[derive(Config, Debug)]
pub struct SwitchableBatchNormConfig {
    /// Number of features (channels).
    pub num_features: usize,
    /// Number of sub-nets `K` (one BatchNorm each).
    #[config(default = 1)]
    pub subnets: usize,
    /// Numerical stability term.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Running-statistics momentum (PyTorch's convention: weight of the new batch).
    #[config(default = 0.1)]
    pub momentum: f64,
}

/// `K` BatchNorms; the one of the active sub-net normalises the input.
///
/// Sub-nets with different masks produce differently distributed activations, so each keeps
/// its own statistics and affine parameters.
#[derive(Module, Debug)]
pub struct SwitchableBatchNorm<B: Backend> {
    /// One BatchNorm per sub-net.
    pub norms: Vec<BatchNorm<B>>,
    /// Selects the active sub-net.
    #[module(skip)]
    pub switch: SubnetSwitch,
}

impl SwitchableBatchNormConfig {
    /// Builds `subnets` BatchNorms (γ = 1, β = 0) switched by `switch`.
    ///
    /// # Panics
    /// If `subnets` is zero.
    pub fn init<B: Backend>(
        &self,
        switch: &SubnetSwitch,
        device: &B::Device,
    ) -> SwitchableBatchNorm<B> {
        assert!(
            self.subnets >= 1,
            "SwitchableBatchNorm needs at least one sub-net"
        );
        let config = BatchNormConfig::new(self.num_features)
            .with_epsilon(self.epsilon)
            .with_momentum(self.momentum);
        SwitchableBatchNorm {
            norms: (0..self.subnets).map(|_| config.init(device)).collect(),
            switch: switch.clone(),
        }
    }
}

impl<B: Backend> SwitchableBatchNorm<B> {
    /// Normalises with the active sub-net's BatchNorm.
    ///
    /// # Shapes
    /// - input `[batch, channels, height, width]`, output the same.
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of BatchNorms.
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let k = active_index(&self.switch, self.norms.len(), "BatchNorms");
        batch_norm_2d(&self.norms[k], input)
    }

    /// `act(bn(x) + r)` with the active sub-net's BatchNorm (see [`batch_norm_act`]).
    ///
    /// # Shapes
    /// - input and residual `[batch, channels, height, width]`, output the same.
    ///
    /// # Panics
    /// If the active sub-net index is not below the number of BatchNorms.
    pub fn forward_act(
        &self,
        input: Tensor<B, 4>,
        residual: Option<Tensor<B, 4>>,
        relu: bool,
    ) -> Tensor<B, 4> {
        let k = active_index(&self.switch, self.norms.len(), "BatchNorms");
        batch_norm_act(&self.norms[k], input, residual, relu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{device, TestBackend};

    #[test]
    fn only_the_active_subnet_updates_its_running_statistics() {
        type AD = burn::backend::Autodiff<TestBackend>;
        let device = device();
        let switch = SubnetSwitch::new();
        let bn = SwitchableBatchNormConfig::new(1)
            .with_subnets(2)
            .init::<AD>(&switch, &device);
        switch.set(1);
        let x = Tensor::<AD, 4>::from_floats([[[[1.0, 3.0]]], [[[5.0, 7.0]]]], &device);
        let _ = bn.forward(x);
        // Batch mean 4 ⇒ running mean 0.9·0 + 0.1·4 = 0.4 for sub-net 1 only.
        let m0: Vec<f32> = bn.norms[0]
            .running_mean
            .value_sync()
            .into_data()
            .to_vec()
            .unwrap();
        let m1: Vec<f32> = bn.norms[1]
            .running_mean
            .value_sync()
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(m0, vec![0.0]);
        assert!((m1[0] - 0.4).abs() < 1e-6, "{m1:?}");
    }
}
