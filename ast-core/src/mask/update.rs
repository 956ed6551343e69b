//! One mask event of one sub-net, on the host: from the shared weights, the sub-net's masks and
//! the dense gradients to its new masks. A ramp event recomputes the masks at the ramp's density
//! (§4: global magnitude top-k; §8: random dense N:M groups), then every event prunes and
//! regrows (§5). A pure function of its inputs: [`crate::AstStep`] reads them from the model and
//! writes the result back.

use crate::config::SubnetTarget;
use crate::criteria::{gradient_magnitude, magnitude, prune_and_regrow};
use crate::mask::nm::{nm_mask, nm_prune_regrow, ramp_dense_groups, GroupLayout};
use crate::mask::topk::global_magnitude_masks;
use crate::rng::MaskRng;
use crate::schedule::{cubic_density, nm_sparse_fraction, MaskEvent};

/// A sub-net's masks at one event, per masked layer (flat, the weights' order).
#[derive(Debug, Clone, Copy)]
pub struct MaskInputs<'a> {
    /// The shared weights `W`.
    pub weights: &'a [Vec<f32>],
    /// The sub-net's masks before the event.
    pub masks: &'a [Vec<bool>],
    /// The dense gradients `∂L/∂(W ⊙ M)` (zeros for a layer without one).
    pub grads: &'a [Vec<f32>],
}

/// The sub-net's new masks after `event` for `target`: ramp events start from the masks at
/// the ramp's density (from `init_density`; N:M layers by their `layouts`, dense groups drawn
/// from `rng`), regrow events from the current masks; then prune-and-regrow at `rate`.
///
/// # Panics
/// If an N:M target meets a layer without a layout (`AstStep::new` builds them).
pub fn updated_masks(
    target: SubnetTarget,
    event: MaskEvent,
    init_density: f64,
    rate: f64,
    inputs: MaskInputs<'_>,
    layouts: &[Option<GroupLayout>],
    rng: &mut MaskRng,
) -> Vec<Vec<bool>> {
    let MaskInputs {
        weights,
        masks,
        grads,
    } = inputs;
    match target {
        SubnetTarget::Density(d) => {
            let base = match event {
                MaskEvent::Ramp { progress } => {
                    global_magnitude_masks(weights, cubic_density(progress, init_density, d))
                }
                MaskEvent::Regrow => masks.to_vec(),
            };
            base.iter()
                .zip(weights.iter().zip(grads))
                .map(|(m, (w, g))| {
                    prune_and_regrow(m, &magnitude(w), &gradient_magnitude(g), rate).mask
                })
                .collect()
        }
        SubnetTarget::Nm { n, .. } => layouts
            .iter()
            .zip(masks.iter().zip(weights.iter().zip(grads)))
            .map(|(layout, (m, (w, g)))| {
                let layout = layout
                    .as_ref()
                    .expect("N:M layouts are built in AstStep::new");
                let base = match event {
                    MaskEvent::Ramp { progress } => {
                        let dense = ramp_dense_groups(
                            layout.group_count(),
                            nm_sparse_fraction(progress),
                            rng,
                        );
                        nm_mask(w, layout, n, &dense)
                    }
                    MaskEvent::Regrow => m.clone(),
                };
                nm_prune_regrow(&base, w, g, layout, n, rate)
            })
            .collect(),
    }
}

/// What changed between two sets of masks: per layer the positions that became active, the
/// count of positions that changed, and the new density.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskChange {
    /// Per layer, the positions active in the new masks and not in the old.
    pub grown: Vec<Vec<usize>>,
    /// Positions whose bit changed, over all layers.
    pub changed: usize,
    /// Active positions of the new masks over all positions.
    pub density: f64,
}

/// The [`MaskChange`] from `old` to `new`.
pub fn mask_change(old: &[Vec<bool>], new: &[Vec<bool>]) -> MaskChange {
    let grown = old
        .iter()
        .zip(new)
        .map(|(o, n)| (0..o.len()).filter(|&i| n[i] && !o[i]).collect())
        .collect();
    let changed = old
        .iter()
        .zip(new)
        .map(|(o, n)| o.iter().zip(n).filter(|(a, b)| a != b).count())
        .sum();
    let active: usize = new.iter().map(|m| m.iter().filter(|&&b| b).count()).sum();
    let total: usize = new.iter().map(Vec::len).sum();
    MaskChange {
        grown,
        changed,
        density: active as f64 / total.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(event: MaskEvent, rate: f64, masks: &[Vec<bool>]) -> Vec<Vec<bool>> {
        // Two layers of four weights; the gradient is largest at layer 0 position 3.
        let weights = [vec![0.9, -0.1, 0.5, 0.05], vec![-0.8, 0.2, 0.3, -0.7]];
        let grads = [vec![0.0, 0.1, 0.2, 5.0], vec![0.0, 0.3, 0.0, 0.0]];
        let inputs = MaskInputs {
            weights: &weights,
            masks,
            grads: &grads,
        };
        let target = SubnetTarget::Density(0.5);
        updated_masks(
            target,
            event,
            1.0,
            rate,
            inputs,
            &[],
            &mut MaskRng::new(1, 0),
        )
    }

    #[test]
    fn a_ramp_keeps_the_largest_weights_globally_by_hand() {
        // Progress 1 from a dense start: density 0.5, the 4 largest |W| of 8: 0.9, 0.5 in
        // layer 0 and −0.8, −0.7 in layer 1 (no regrowth at rate 0).
        let full = vec![vec![true; 4]; 2];
        let new = run(MaskEvent::Ramp { progress: 1.0 }, 0.0, &full);
        assert_eq!(
            new,
            vec![
                vec![true, false, true, false],
                vec![true, false, false, true]
            ]
        );
        let change = mask_change(&full, &new);
        assert_eq!((change.changed, change.density), (4, 0.5));
        assert_eq!(change.grown, vec![Vec::<usize>::new(), vec![]]);
    }

    #[test]
    fn a_regrow_swaps_the_smallest_active_weight_for_the_largest_gradient_by_hand() {
        // Rate 0.5 of 2 active per layer: one drop each. Layer 0 drops 0.5 (smaller than 0.9)
        // and grows position 3 (gradient 5.0); layer 1 drops −0.7 and grows position 1 (0.3).
        let old = vec![
            vec![true, false, true, false],
            vec![true, false, false, true],
        ];
        let new = run(MaskEvent::Regrow, 0.5, &old);
        assert_eq!(
            new,
            vec![
                vec![true, false, false, true],
                vec![true, true, false, false]
            ]
        );
        let change = mask_change(&old, &new);
        assert_eq!(change.grown, vec![vec![3], vec![1]]);
        assert_eq!((change.changed, change.density), (4, 0.5));
    }
}
