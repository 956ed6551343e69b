//! Helpers for tests that run these kernels (here, and in crates that compare their own paths
//! with them): a seeded generator of test values, a relative error, and a geometry shorthand.

use crate::conv::ConvGeometry;

/// A small seeded generator (xorshift64*) for test data; not for masks or anything a run
/// depends on.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` values uniform in `[−1, 1)`.
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    }

    /// `n` mask bits, each true with probability `density`.
    pub fn mask(&mut self, n: usize, density: f64) -> Vec<bool> {
        (0..n).map(|_| self.next_f64() < density).collect()
    }
}

/// Largest `|a − b|` relative to the largest `|b|` (so that near-zero entries do not dominate).
///
/// # Panics
/// If the lengths differ.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths");
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A square-kernel convolution of `batch` samples, `c_in → c_out` channels, on `hw × (hw + 1)`
/// planes (unequal sides catch swapped axes), undilated.
pub fn geometry(
    batch: usize,
    [c_in, c_out]: [usize; 2],
    hw: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
) -> ConvGeometry {
    ConvGeometry {
        batch,
        c_in,
        in_hw: [hw, hw + 1],
        c_out,
        kernel: [kernel, kernel],
        stride: [stride, stride],
        padding: [padding, padding],
        dilation: [1, 1],
        groups,
    }
}
