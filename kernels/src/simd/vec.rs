//! One vector abstraction, three implementations.
//!
//! Every SIMD kernel is written once, generic over [`F32Vec`], and stamped out per
//! instruction set inside a `#[target_feature]` wrapper (see `stamp!` in `mod.rs`). The
//! methods are `#[inline(always)]` so that, once inlined into the wrapper, the intrinsics
//! compile with the wrapper's features: `Avx512` to zmm code, `Avx2` to ymm code with FMA.
//! `Portable` uses `wide::f32x8`, which picks its instructions at compile time (SSE2 on the
//! baseline x86-64 target, AVX when built with `-C target-cpu=native`, NEON on aarch64).

/// `LANES` f32 values in one register. All loads and stores are unaligned.
pub(crate) trait F32Vec: Copy {
    /// Number of f32 lanes; at most 16.
    const LANES: usize;
    /// Loads `LANES` values.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` f32 values.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `LANES` values.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` f32 values.
    unsafe fn store(self, p: *mut f32);
    fn splat(v: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    /// `self * b + c`, one rounding where the ISA has FMA.
    fn fma(self, b: Self, c: Self) -> Self;
    /// Sum of the lanes, in a fixed order.
    fn reduce_add(self) -> f32;
    /// Maximum of the lanes.
    fn reduce_max(self) -> f32;
    /// Round to the nearest integer (ties to even).
    fn round(self) -> Self;
    /// `2^self` for integer-valued lanes in `[-126, 127]`, built in the exponent bits.
    fn pow2i(self) -> Self;
    /// 0 where `x < threshold` (`x` is `-inf` included), `self` elsewhere (`x` NaN included).
    fn zero_where_below(self, x: Self, threshold: f32) -> Self;
    /// Swaps adjacent lanes: `[a0, a1, a2, a3, ...] -> [a1, a0, a3, a2, ...]`.
    fn swap_pairs(self) -> Self;

    #[inline(always)]
    fn zero() -> Self {
        Self::splat(0.0)
    }
}

/// Loads `s.len() < LANES` values, filling the missing lanes with `fill`.
#[inline(always)]
pub(crate) fn load_partial<V: F32Vec>(s: &[f32], fill: f32) -> V {
    let mut buf = [fill; 16];
    buf[..s.len()].copy_from_slice(s);
    // SAFETY: `buf` holds 16 >= LANES values.
    unsafe { V::load(buf.as_ptr()) }
}

/// Stores the first `d.len() < LANES` lanes of `v` into `d`.
#[inline(always)]
pub(crate) fn store_partial<V: F32Vec>(v: V, d: &mut [f32]) {
    let mut buf = [0.0f32; 16];
    // SAFETY: `buf` holds 16 >= LANES values.
    unsafe { v.store(buf.as_mut_ptr()) };
    let n = d.len();
    d.copy_from_slice(&buf[..n]);
}

/// `exp(x)` lane by lane, within 2 ulp of the true value for `x` in `[-87.3, 88.3]` and 6
/// from there to f32's overflow (`x` about 88.72), `+inf` above it; 0 below `-87.3` (true
/// value < 1.2e-38); NaN for NaN, on every level.
///
/// Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2/2`, then the degree-6 polynomial of
/// Cephes' `expf` for `exp(r)`, scaled by `2^n` through the exponent bits. `n` comes from `x`
/// clamped to `[-87.3, 88.3]`, so that `2^n` is a normal float; `r` from `x` itself, so that
/// a NaN stays NaN and an `x` past the clamp grows `r` (to `+inf` past the overflow)
/// instead of returning `exp(88.3)`.
#[inline(always)]
pub(crate) fn exp<V: F32Vec>(x: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: ln 2 to 9 bits, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.min(V::splat(88.3)).max(V::splat(-87.3));
    let n = xc.mul(V::splat(LOG2E)).round();
    let r = n.fma(V::splat(-LN2_HI), x);
    let r = n.fma(V::splat(-LN2_LO), r);
    let mut p = V::splat(1.987_569_1e-4);
    p = p.fma(r, V::splat(1.398_199_9e-3));
    p = p.fma(r, V::splat(8.333_452e-3));
    p = p.fma(r, V::splat(4.166_579_6e-2));
    p = p.fma(r, V::splat(1.666_666_5e-1));
    p = p.fma(r, V::splat(5e-1));
    let r2 = r.mul(r);
    let y = p.fma(r2, r).add(V::splat(1.0));
    y.mul(n.pow2i()).zero_where_below(x, -87.3)
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::F32Vec;
    use std::arch::x86_64::*;

    /// 16 lanes in a zmm register. Only used inside `avx512f`-enabled wrappers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl Avx512 {
        /// The vector holding `v`.
        #[inline(always)]
        pub(crate) fn from_raw(v: __m512) -> Self {
            Self(v)
        }
        /// The register.
        #[inline(always)]
        pub(crate) fn raw(self) -> __m512 {
            self.0
        }
    }

    // SAFETY (every `unsafe` block below): these methods are only reached from functions
    // compiled with `avx512f` enabled, which are only called after run-time detection.
    impl F32Vec for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Self(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { Self(_mm512_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { Self(_mm512_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
        #[inline(always)]
        fn round(self) -> Self {
            unsafe {
                Self(_mm512_roundscale_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(self.0))
            }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm512_cvtps_epi32(self.0);
                let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)));
                Self(_mm512_castsi512_ps(bits))
            }
        }
        #[inline(always)]
        fn zero_where_below(self, x: Self, threshold: f32) -> Self {
            unsafe {
                // Not less than, unordered: true for a NaN `x`, as the other levels keep it.
                let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x.0, _mm512_set1_ps(threshold));
                Self(_mm512_maskz_mov_ps(keep, self.0))
            }
        }
        #[inline(always)]
        fn swap_pairs(self) -> Self {
            unsafe { Self(_mm512_permute_ps::<0b10_11_00_01>(self.0)) }
        }
    }

    /// 8 lanes in a ymm register, with FMA. Only used inside `avx2,fma`-enabled wrappers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256);

    impl Avx2 {
        /// The vector holding `v`.
        #[inline(always)]
        pub(crate) fn from_raw(v: __m256) -> Self {
            Self(v)
        }
        /// The register.
        #[inline(always)]
        pub(crate) fn raw(self) -> __m256 {
            self.0
        }
    }

    // SAFETY (every `unsafe` block below): only reached from functions compiled with
    // `avx2,fma` enabled, which are only called after run-time detection.
    impl F32Vec for Avx2 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Self(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Self(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm256_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn max(self, o: Self) -> Self {
            unsafe { Self(_mm256_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn min(self, o: Self) -> Self {
            unsafe { Self(_mm256_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            unsafe {
                let s = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s)))
            }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe {
                let s = _mm_max_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<0x55>(s, s)))
            }
        }
        #[inline(always)]
        fn round(self) -> Self {
            unsafe {
                Self(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(self.0))
            }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm256_cvtps_epi32(self.0);
                let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)));
                Self(_mm256_castsi256_ps(bits))
            }
        }
        #[inline(always)]
        fn zero_where_below(self, x: Self, threshold: f32) -> Self {
            unsafe {
                let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x.0, _mm256_set1_ps(threshold));
                Self(_mm256_andnot_ps(below, self.0))
            }
        }
        #[inline(always)]
        fn swap_pairs(self) -> Self {
            unsafe { Self(_mm256_permute_ps::<0b10_11_00_01>(self.0)) }
        }
    }
}

/// 8 lanes of `wide::f32x8`: the path for CPUs without AVX2+FMA and for other architectures.
#[derive(Clone, Copy)]
pub(crate) struct Portable(wide::f32x8);

impl F32Vec for Portable {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable values; read_unaligned needs no alignment.
        Self(wide::f32x8::from(unsafe {
            (p as *const [f32; 8]).read_unaligned()
        }))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable values.
        unsafe { (p as *mut [f32; 8]).write_unaligned(self.0.to_array()) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Self(wide::f32x8::splat(v))
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Self(self.0 + o.0)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Self(self.0 - o.0)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Self(self.0 * o.0)
    }
    #[inline(always)]
    fn div(self, o: Self) -> Self {
        Self(self.0 / o.0)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        Self(self.0.max(o.0))
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        Self(self.0.min(o.0))
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        Self(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        self.0.reduce_add()
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.0
            .to_array()
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    fn round(self) -> Self {
        Self(self.0.round())
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        let bits = (self.0.round_int() + wide::i32x8::splat(127)) << 23;
        Self(bytemuck::cast(bits))
    }
    #[inline(always)]
    fn zero_where_below(self, x: Self, threshold: f32) -> Self {
        let below = x.0.simd_lt(wide::f32x8::splat(threshold));
        Self(below.select(wide::f32x8::ZERO, self.0))
    }
    #[inline(always)]
    fn swap_pairs(self) -> Self {
        let a = self.0.to_array();
        Self(wide::f32x8::from([
            a[1], a[0], a[3], a[2], a[5], a[4], a[7], a[6],
        ]))
    }
}
