//! # ast-kernels — the CPU kernels of `ast`, on host slices
//!
//! Plain Rust over `f32` slices, with no burn types: `ast-core`'s Flex backend trains with
//! them, and an exported sub-net can run inference with them.
//!
//! - [`conv`]: masked 2-D convolution, dense (direct kernel or im2col + GEMM) or sparse (active
//!   weights only), forward, input gradient, and weight gradient at every or only the active
//!   positions; a cost model picks the form per layer ([`conv::MaskedConvPlan`]);
//! - [`norm`]: training-mode batch norm with the residual add and ReLU after it fused in;
//! - [`pool`]: recycled activation buffers, which the kernels' outputs take without clearing.
//!
//! Every sum is taken in a fixed order whatever the thread count (rayon's), so results are
//! bit-identical run to run. SIMD loops are compiled for the CPU's level at run time through
//! `pulp`'s dispatch ([`simd_level`] names it).
//!
//! The crate's one `unsafe` block is the call into the `gemm` crate, in a private module whose
//! checks (overflow-checked, every stride and extent) are its safety argument.

pub mod conv;
mod gemm;
pub mod norm;
pub mod pool;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
#[cfg(test)]
mod tests;

/// The SIMD instruction set the kernels run at: the widest this CPU has (`pulp`'s dispatch)
/// unless [`limit_simd`] lowered it: `"AVX-512"`, `"AVX2+FMA"`, `"NEON"` or `"scalar"` (what a
/// benchmark figure must name).
pub fn simd_level() -> &'static str {
    struct Level;
    impl pulp::WithSimd for Level {
        type Output = &'static str;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> &'static str {
            let name = core::any::type_name::<S>();
            if name.ends_with("V4") {
                "AVX-512"
            } else if name.ends_with("V3") {
                "AVX2+FMA"
            } else if name.contains("Neon") {
                "NEON"
            } else {
                "scalar"
            }
        }
    }
    dispatch(Level)
}

/// Whether the kernels run on 16-lane vectors (AVX-512, with its 32 registers), the level the
/// direct dense kernels are fitted to; on 8-lane AVX2 (16 registers) and narrower, im2col +
/// GEMM beats them (see [`conv::dense::direct_is_faster`]).
pub(crate) fn wide_vectors() -> bool {
    struct Lanes;
    impl pulp::WithSimd for Lanes {
        type Output = bool;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> bool {
            S::F32_LANES >= 16
        }
    }
    dispatch(Lanes)
}

/// The widest SIMD level the kernels may use (see [`limit_simd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLimit {
    /// The widest this CPU has.
    Native,
    /// AVX2 with FMA at most (on x86_64 CPUs that have it): how the kernels run on the many
    /// CPUs without AVX-512, measurable on one with it.
    Avx2,
    /// No SIMD.
    Scalar,
}

impl SimdLimit {
    /// `native`, `avx2` or `scalar`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "native" => Some(Self::Native),
            "avx2" => Some(Self::Avx2),
            "scalar" => Some(Self::Scalar),
            _ => None,
        }
    }
}

static LIMIT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Limits the SIMD level of every kernel from now on, in the whole process (for benchmarks of
/// the narrower levels and for tests that run them; the kernels give the same bits at every
/// level, their sums being taken in the same order with fused multiply-adds, exact where the
/// CPU has none). A level the CPU lacks falls back to what it has.
pub fn limit_simd(limit: SimdLimit) {
    let code = match limit {
        SimdLimit::Native => 0,
        SimdLimit::Avx2 => 1,
        SimdLimit::Scalar => 2,
    };
    LIMIT.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `op` compiled for the SIMD level the kernels may use ([`limit_simd`]).
pub(crate) fn dispatch<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    use pulp::Simd;
    match LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        #[cfg(target_arch = "x86_64")]
        1 => match pulp::x86::V3::try_new() {
            Some(v3) => <pulp::x86::V3 as Simd>::vectorize(v3, op),
            None => pulp::Arch::new().dispatch(op),
        },
        2 => <pulp::Scalar as Simd>::vectorize(pulp::Scalar::new(), op),
        _ => pulp::Arch::new().dispatch(op),
    }
}

#[cfg(test)]
mod level_tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_simd_level_is_one_this_cpu_has() {
        let level = super::simd_level();
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = is_x86_feature_detected!("avx512f");
        match level {
            "AVX-512" => assert!(avx512 && avx2),
            "AVX2+FMA" => assert!(avx2),
            "scalar" => assert!(!avx2),
            other => panic!("{other} on x86_64"),
        }
    }
}
