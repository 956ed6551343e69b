//! N:M structured masks: groups of `M` consecutive input channels (§8).

use crate::mask::topk::top_k_indices;
use crate::rng::MaskRng;

/// How a weight tensor splits into N:M groups along its input-channel axis.
///
/// For a conv weight `[C_out, C_in, kh, kw]` the axis is 1: a group is `M` consecutive input
/// channels at fixed `(out, kh, kw)`. For a linear weight stored `[d_in, d_out]` the axis is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLayout {
    outer: usize,
    channels: usize,
    inner: usize,
    m: usize,
}

impl GroupLayout {
    /// The layout of `shape` with groups of `m` along `axis`; `None` if `m` does not divide the
    /// axis length.
    pub fn new(shape: &[usize], axis: usize, m: usize) -> Option<Self> {
        let channels = shape[axis];
        if m == 0 || !channels.is_multiple_of(m) {
            return None;
        }
        Some(Self {
            outer: shape[..axis].iter().product(),
            channels,
            inner: shape[axis + 1..].iter().product(),
            m,
        })
    }

    /// Number of groups.
    pub fn group_count(&self) -> usize {
        self.outer * (self.channels / self.m) * self.inner
    }

    /// Flat indices of the `M` elements of group `g`.
    pub fn group(&self, g: usize) -> impl Iterator<Item = usize> + '_ {
        let blocks = self.channels / self.m;
        let r = g % self.inner;
        let b = (g / self.inner) % blocks;
        let o = g / (self.inner * blocks);
        let base = o * self.channels * self.inner + b * self.m * self.inner + r;
        (0..self.m).map(move |j| base + j * self.inner)
    }

    fn group_l1(&self, values: &[f32], g: usize) -> f32 {
        self.group(g).map(|i| values[i].abs()).sum()
    }

    /// Whether every position of group `g` is active.
    pub fn is_dense(&self, mask: &[bool], g: usize) -> bool {
        self.group(g).all(|i| mask[i])
    }
}

/// The N:M mask of `weight`: groups flagged in `dense` keep all `M`, the others their `N`
/// largest `|W|` (ties: lower index).
pub fn nm_mask(weight: &[f32], layout: &GroupLayout, n: usize, dense: &[bool]) -> Vec<bool> {
    let mut mask = vec![false; weight.len()];
    for g in 0..layout.group_count() {
        let idx: Vec<usize> = layout.group(g).collect();
        if dense[g] {
            idx.iter().for_each(|&i| mask[i] = true);
        } else {
            let mags: Vec<f32> = idx.iter().map(|&i| weight[i].abs()).collect();
            for j in top_k_indices(&mags, n) {
                mask[idx[j]] = true;
            }
        }
    }
    mask
}

/// During the ramp a fraction `1 − q` of the groups, chosen at random, stays dense.
pub fn ramp_dense_groups(groups: usize, sparse_fraction: f64, rng: &mut MaskRng) -> Vec<bool> {
    let dense_count = ((1.0 - sparse_fraction) * groups as f64).round() as usize;
    let mut dense = vec![false; groups];
    for &g in rng.permutation(groups).iter().take(dense_count) {
        dense[g] = true;
    }
    dense
}

/// Group prune-and-regrow: `⌊rate·dense_groups⌋` dense groups with the smallest `|W|` L1 become
/// N:M, and as many groups that were N:M, those with the largest `|∇W|` L1, become dense again.
/// The number of dense groups is preserved.
pub fn nm_prune_regrow(
    mask: &[bool],
    weight: &[f32],
    grad: &[f32],
    layout: &GroupLayout,
    n: usize,
    rate: f64,
) -> Vec<bool> {
    let groups = layout.group_count();
    let dense: Vec<bool> = (0..groups).map(|g| layout.is_dense(mask, g)).collect();
    let dense_ids: Vec<usize> = (0..groups).filter(|&g| dense[g]).collect();
    let sparse_ids: Vec<usize> = (0..groups).filter(|&g| !dense[g]).collect();
    let count = ((rate * dense_ids.len() as f64).floor() as usize).min(sparse_ids.len());
    let mut next = dense.clone();
    // Smallest |W| first: rank by −L1.
    let drop_scores: Vec<f32> = dense_ids
        .iter()
        .map(|&g| -layout.group_l1(weight, g))
        .collect();
    for j in top_k_indices(&drop_scores, count) {
        next[dense_ids[j]] = false;
    }
    let grow_scores: Vec<f32> = sparse_ids
        .iter()
        .map(|&g| layout.group_l1(grad, g))
        .collect();
    for j in top_k_indices(&grow_scores, count) {
        next[sparse_ids[j]] = true;
    }
    nm_mask(weight, layout, n, &next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_run_along_input_channels_of_a_conv_weight() {
        // [C_out = 1, C_in = 4, 1, 2]: flat index = c·2 + w; a group is 4 channels at fixed w.
        let layout = GroupLayout::new(&[1, 4, 1, 2], 1, 4).unwrap();
        assert_eq!(layout.group_count(), 2);
        assert_eq!(layout.group(0).collect::<Vec<_>>(), vec![0, 2, 4, 6]);
        assert_eq!(layout.group(1).collect::<Vec<_>>(), vec![1, 3, 5, 7]);
        assert!(GroupLayout::new(&[1, 6, 1, 2], 1, 4).is_none());
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_of_each_group() {
        let layout = GroupLayout::new(&[1, 4, 1, 2], 1, 4).unwrap();
        // group 0 = [0.1, -5, 3, 0.2] at indices 0,2,4,6; group 1 = [4, 1, -2, 0] at 1,3,5,7.
        let w = [0.1, 4.0, -5.0, 1.0, 3.0, -2.0, 0.2, 0.0];
        let m = nm_mask(&w, &layout, 2, &[false, false]);
        assert_eq!(m, vec![false, true, true, false, true, true, false, false]);
        let m = nm_mask(&w, &layout, 1, &[false, true]);
        assert_eq!(m, vec![false, true, true, true, false, true, false, true]);
    }

    #[test]
    fn ramp_keeps_the_complement_fraction_dense_at_random() {
        let dense = ramp_dense_groups(100, 0.75, &mut MaskRng::new(3, 1));
        assert_eq!(dense.iter().filter(|&&d| d).count(), 25);
        assert_ne!(dense[..25], [true; 25], "not the first groups");
        assert_eq!(
            ramp_dense_groups(10, 1.0, &mut MaskRng::new(0, 0)),
            vec![false; 10]
        );
    }

    #[test]
    fn group_prune_regrow_swaps_weakest_dense_for_strongest_gradient() {
        // Linear weight [d_in = 2, d_out = 4] with 1:2 groups along d_in: group g = {g, 4 + g}.
        let layout = GroupLayout::new(&[2, 4], 0, 2).unwrap();
        let w = [1.0, 0.1, 5.0, 2.0, 1.0, 0.1, 5.0, 2.0];
        let g = [0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0];
        // Groups 0, 1, 2 dense; group 3 1:2. rate 0.5 ⇒ ⌊1.5⌋ = 1 swap: group 1 (L1 0.2)
        // becomes 1:2, group 3 (gradient L1 18) dense.
        let mask = [true, true, true, true, true, true, true, false];
        let next = nm_prune_regrow(&mask, &w, &g, &layout, 1, 0.5);
        let dense: Vec<bool> = (0..4).map(|i| layout.is_dense(&next, i)).collect();
        assert_eq!(dense, vec![true, false, true, true]);
        assert_eq!(next.iter().filter(|&&m| m).count(), 7);
    }
}
