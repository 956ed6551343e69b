//! Deterministic top-k selection and global magnitude pruning (§4).

use core::cmp::Ordering;

/// Order: larger score first; equal scores (and NaNs, ranked lowest) by lower index first.
fn rank(scores: &[f32], a: usize, b: usize) -> Ordering {
    let (x, y) = (scores[a], scores[b]);
    match (x.is_nan(), y.is_nan()) {
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => y.partial_cmp(&x).unwrap_or(Ordering::Equal).then(a.cmp(&b)),
    }
}

/// Indices of the `k` largest scores (ties: lower index wins), in ascending index order.
pub fn top_k_indices(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| rank(scores, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// Number of weights kept at density `d` out of `n`: `⌊n·d⌋`, guarded against the float noise
/// of products such as `0.29·100 = 28.999…`.
pub fn kept_count(n: usize, density: f64) -> usize {
    ((n as f64 * density) + 1e-6).floor().min(n as f64) as usize
}

/// Global magnitude pruning: one threshold over all layers' `|W|`, keeping the
/// `⌊N·density⌋` largest (N = all weights; ties: earlier layer, then lower index, wins).
pub fn global_magnitude_masks(weights: &[Vec<f32>], density: f64) -> Vec<Vec<bool>> {
    let all: Vec<f32> = weights.iter().flatten().map(|w| w.abs()).collect();
    let keep = kept_count(all.len(), density);
    let mut flat = vec![false; all.len()];
    for i in top_k_indices(&all, keep) {
        flat[i] = true;
    }
    let mut masks = Vec::with_capacity(weights.len());
    let mut start = 0;
    for w in weights {
        masks.push(flat[start..start + w.len()].to_vec());
        start += w.len();
    }
    masks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 2), vec![1, 2]);
        assert_eq!(
            top_k_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 4),
            vec![1, 2, 3, 4]
        );
        assert_eq!(top_k_indices(&[f32::NAN, 0.0], 1), vec![1]);
        assert_eq!(top_k_indices(&[1.0], 5), vec![0]);
        assert!(top_k_indices(&[1.0], 0).is_empty());
    }

    #[test]
    fn global_pruning_keeps_floor_of_n_times_density() {
        // 10 weights, density 0.35 ⇒ ⌊3.5⌋ = 3: |W| = 9, 8, 7 survive, across both layers.
        let w = vec![
            vec![1.0, -9.0, 2.0, 0.5],
            vec![8.0, -3.0, 0.0, 7.0, -4.0, 6.0],
        ];
        let m = global_magnitude_masks(&w, 0.35);
        assert_eq!(m[0], vec![false, true, false, false]);
        assert_eq!(m[1], vec![true, false, false, true, false, false]);
        assert_eq!(kept_count(100, 0.29), 29);
        assert_eq!(kept_count(10, 1.0), 10);
    }

    #[test]
    fn global_pruning_ties_are_broken_the_same_way_every_run() {
        // Eight equal magnitudes, keep ⌊8·0.5⌋ = 4: always the first four in layer order.
        let w = vec![vec![1.0, -1.0, 1.0], vec![-1.0, 1.0, 1.0, -1.0, 1.0]];
        for _ in 0..5 {
            let m = global_magnitude_masks(&w, 0.5);
            assert_eq!(m[0], vec![true, true, true]);
            assert_eq!(m[1], vec![true, false, false, false, false]);
        }
    }
}
