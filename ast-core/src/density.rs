//! *How much per layer*: Erdős–Rényi-Kernel (ERK) density allocation (§3).

use crate::mask::topk::top_k_indices;
use crate::rng::MaskRng;

/// Per-layer densities whose weighted sum is `density` of all weights.
///
/// Raw score of a layer: `(Σ dims / Π dims)^power`. `ε` solves
/// `Σ_sparse ε·score_l·n_l = density·Σ_l n_l − Σ_dense n_l`; layers with `ε·score_l > 1` are made
/// dense and `ε` is solved again until none exceeds 1.
pub fn erk_densities(shapes: &[Vec<usize>], density: f64, power: f64) -> Vec<f64> {
    let sizes: Vec<f64> = shapes
        .iter()
        .map(|s| s.iter().product::<usize>() as f64)
        .collect();
    let scores: Vec<f64> = shapes
        .iter()
        .zip(&sizes)
        .map(|(s, n)| (s.iter().sum::<usize>() as f64 / n).powf(power))
        .collect();
    let total: f64 = sizes.iter().sum();
    let mut dense = vec![false; shapes.len()];
    loop {
        let dense_size: f64 = (0..shapes.len())
            .filter(|&l| dense[l])
            .map(|l| sizes[l])
            .sum();
        let divisor: f64 = (0..shapes.len())
            .filter(|&l| !dense[l])
            .map(|l| scores[l] * sizes[l])
            .sum();
        if divisor <= 0.0 {
            return vec![1.0; shapes.len()];
        }
        let eps = (density * total - dense_size) / divisor;
        let newly: Vec<usize> = (0..shapes.len())
            .filter(|&l| !dense[l] && eps * scores[l] > 1.0)
            .collect();
        if newly.is_empty() {
            return (0..shapes.len())
                .map(|l| if dense[l] { 1.0 } else { eps * scores[l] })
                .collect();
        }
        for l in newly {
            dense[l] = true;
        }
    }
}

/// Random masks keeping `round(d_l·n_l)` positions of each layer, chosen uniformly (seeded).
///
/// An exact count per layer rather than independent coin flips, so that a layer's density is
/// exactly its ERK allocation.
pub fn random_masks(sizes: &[usize], densities: &[f64], rng: &mut MaskRng) -> Vec<Vec<bool>> {
    sizes
        .iter()
        .zip(densities)
        .map(|(&n, &d)| {
            let keep = ((n as f64) * d).round() as usize;
            let scores: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32).collect();
            let mut mask = vec![false; n];
            for i in top_k_indices(&scores, keep) {
                mask[i] = true;
            }
            mask
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erk_on_a_toy_three_layer_model_with_the_dense_clamp() {
        // Layers: conv [4,1,3,3] (n = 36, Σ = 11), conv [8,4,3,3] (n = 288, Σ = 18),
        // linear [8,2] (n = 16, Σ = 10). Total 340, density 0.5 ⇒ 170 weights.
        // Raw scores 11/36, 18/288 = 1/16, 10/16. ε = 170 / (11 + 18 + 10) = 170/39:
        // ε·10/16 = 2.72 > 1 and ε·11/36 = 1.33 > 1 ⇒ both dense (52 weights).
        // Again: ε = (170 − 52) / 18 = 118/18, density of the middle layer 118/288.
        let d = erk_densities(&[vec![4, 1, 3, 3], vec![8, 4, 3, 3], vec![8, 2]], 0.5, 1.0);
        assert_eq!(d[0], 1.0);
        assert!((d[1] - 118.0 / 288.0).abs() < 1e-12, "{}", d[1]);
        assert_eq!(d[2], 1.0);
        let kept: f64 = d[0] * 36.0 + d[1] * 288.0 + d[2] * 16.0;
        assert!((kept - 170.0).abs() < 1e-9);
    }

    #[test]
    fn erk_without_clamping_is_proportional_to_the_score() {
        // Two layers [10, 10] (score 0.2) and [20, 20] (score 0.1), density 0.1 of 500:
        // ε·(0.2·100 + 0.1·400) = 50 ⇒ ε = 5/6, densities 1/6 and 1/12.
        let d = erk_densities(&[vec![10, 10], vec![20, 20]], 0.1, 1.0);
        assert!((d[0] - 1.0 / 6.0).abs() < 1e-12);
        assert!((d[1] - 1.0 / 12.0).abs() < 1e-12);
    }

    #[test]
    fn random_masks_keep_exact_counts_and_depend_on_the_seed() {
        let a = random_masks(&[100, 40], &[0.25, 0.5], &mut MaskRng::new(1, 0));
        let b = random_masks(&[100, 40], &[0.25, 0.5], &mut MaskRng::new(1, 0));
        let c = random_masks(&[100, 40], &[0.25, 0.5], &mut MaskRng::new(2, 0));
        assert_eq!(a[0].iter().filter(|&&m| m).count(), 25);
        assert_eq!(a[1].iter().filter(|&&m| m).count(), 20);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
