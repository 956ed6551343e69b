//! Modules: masked convolution and linear layers, switchable BatchNorm, the sub-net switch.

mod batch_norm;
mod masked_conv2d;
mod masked_linear;
mod switch;
mod switch_norm;

pub use batch_norm::{batch_norm_2d, batch_norm_act};
pub use masked_conv2d::{plain_conv2d, MaskedConv2d, MaskedConv2dConfig};
pub use masked_linear::{MaskedLinear, MaskedLinearConfig};
pub use switch::SubnetSwitch;
pub use switch_norm::{SwitchableBatchNorm, SwitchableBatchNormConfig};

use burn::module::{Param, ParamId};
use burn::prelude::*;

/// `count` all-ones masks of `shape` (every sub-net starts dense), each its own parameter.
pub(crate) fn dense_masks<B: Backend, const D: usize>(
    count: usize,
    shape: [usize; D],
    device: &B::Device,
) -> Vec<Param<Tensor<B, D, Bool>>> {
    (0..count)
        .map(|_| mask_param(Tensor::<B, D, Int>::ones(shape, device).bool()))
        .collect()
}

/// Wraps a mask tensor as a parameter (saved with the module, never optimised).
pub fn mask_param<B: Backend, const D: usize>(
    mask: Tensor<B, D, Bool>,
) -> Param<Tensor<B, D, Bool>> {
    Param::initialized(ParamId::new(), mask)
}

/// The index of the active sub-net, checked against the `count` copies a layer holds.
///
/// # Panics
/// If the active sub-net index is not below `count`.
pub(crate) fn active_index(switch: &SubnetSwitch, count: usize, what: &str) -> usize {
    let k = switch.get();
    assert!(
        k < count,
        "sub-net {k} is active but the layer has {count} {what}"
    );
    k
}

/// The mask of the sub-net `switch` selects.
///
/// # Panics
/// If the active sub-net index is not below the number of masks.
pub(crate) fn active_mask<B: Backend, const D: usize>(
    switch: &SubnetSwitch,
    masks: &[Param<Tensor<B, D, Bool>>],
) -> Tensor<B, D, Bool> {
    masks[active_index(switch, masks.len(), "masks")].val()
}
