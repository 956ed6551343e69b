//! Drop and grow scores, and unstructured prune-and-regrow (§5).
//!
//! Drop ranks active weights by the shared dense `|W|`; grow ranks inactive positions by the
//! dense gradient of the loss with respect to the effective weight `W ⊙ M` (which the masked
//! layers deliver, see [`crate::backend::masked_weight`]), so any position can be regrown.

use crate::mask::topk::top_k_indices;

/// Drop score: `|W|` (a weight with a small magnitude is dropped first).
pub fn magnitude(weight: &[f32]) -> Vec<f32> {
    weight.iter().map(|w| w.abs()).collect()
}

/// Grow score: `|∂L/∂(W ⊙ M)|`.
pub fn gradient_magnitude(grad: &[f32]) -> Vec<f32> {
    grad.iter().map(|g| g.abs()).collect()
}

/// Result of one prune-and-regrow on a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Regrowth {
    /// The new mask (same number of active positions as before).
    pub mask: Vec<bool>,
    /// Positions that became active.
    pub grown: Vec<usize>,
    /// Positions that became inactive.
    pub dropped: Vec<usize>,
}

/// Removes `⌈rate·nnz⌉` active weights with the smallest drop score, then activates as many
/// positions that are inactive after the removal with the largest grow score (a just-dropped
/// position may be re-picked, as in RigL). Ties go to the lower index.
pub fn prune_and_regrow(
    mask: &[bool],
    drop_score: &[f32],
    grow_score: &[f32],
    rate: f64,
) -> Regrowth {
    let active: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
    let count = ((rate * active.len() as f64).ceil() as usize).min(active.len());
    let mut next = mask.to_vec();
    let neg: Vec<f32> = active.iter().map(|&i| -drop_score[i]).collect();
    let removed: Vec<usize> = top_k_indices(&neg, count)
        .into_iter()
        .map(|j| active[j])
        .collect();
    for &i in &removed {
        next[i] = false;
    }
    let inactive: Vec<usize> = (0..mask.len()).filter(|&i| !next[i]).collect();
    let scores: Vec<f32> = inactive.iter().map(|&i| grow_score[i]).collect();
    let grown_now: Vec<usize> = top_k_indices(&scores, count)
        .into_iter()
        .map(|j| inactive[j])
        .collect();
    for &i in &grown_now {
        next[i] = true;
    }
    Regrowth {
        grown: grown_now.iter().copied().filter(|&i| !mask[i]).collect(),
        dropped: removed.iter().copied().filter(|&i| !next[i]).collect(),
        mask: next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_smallest_weights_grows_largest_gradients_keeps_nnz() {
        // 8 positions, 4 active (0, 1, 2, 3). rate 0.5 ⇒ ⌈2⌉ = 2 swaps.
        let mask = [true, true, true, true, false, false, false, false];
        let w = [0.9, -0.1, 0.5, 0.05, 3.0, 2.0, 1.0, 4.0];
        let g = [0.0, 0.0, 0.0, 0.0, 0.2, 0.7, 0.9, 0.1];
        let r = prune_and_regrow(&mask, &magnitude(&w), &gradient_magnitude(&g), 0.5);
        // Dropped |W| = 0.05 (3) and 0.1 (1); grown |g| = 0.9 (6) and 0.7 (5).
        assert_eq!(
            r.mask,
            vec![true, false, true, false, false, true, true, false]
        );
        assert_eq!(r.dropped, vec![1, 3]);
        assert_eq!(r.grown, vec![5, 6]);
        assert_eq!(r.mask.iter().filter(|&&m| m).count(), 4);
    }

    #[test]
    fn a_just_dropped_weight_with_the_strongest_gradient_stays() {
        let mask = [true, true, false];
        let r = prune_and_regrow(&mask, &[1.0, 0.1, 0.0], &[0.0, 5.0, 1.0], 0.5);
        assert_eq!(r.mask, vec![true, true, false]);
        assert!(r.grown.is_empty() && r.dropped.is_empty());
    }

    #[test]
    fn rate_zero_changes_nothing() {
        let mask = [true, false, true];
        let r = prune_and_regrow(&mask, &[1.0, 2.0, 3.0], &[9.0, 9.0, 9.0], 0.0);
        assert_eq!(r.mask, mask.to_vec());
    }
}
