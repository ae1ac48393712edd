//! Quantized blocks on vectors: integer dot products (fast mode's inner loops).
//!
//! Per block of 32: widen the weight's quants to 32 bytes, multiply with the activation's
//! signed bytes and add adjacent pairs (`maddubs`: u8 × i8 → i16, no overflow for these
//! ranges), add pairs again to i32 (`madd` with ones), convert to f32 and accumulate with the
//! block's scale product. Signed × signed products use the sign trick: `|a| · (b · sign a)`.
//! The scalar kernels in [`crate::quant`] are the reference; the results differ from them
//! only in the order of the f32 sums.

use super::{Isa, Level};
use crate::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

/// `Σ w·x` of a `Q4_1` row and a `Q8_1` row, as [`quant::dot_q4_1_q8_1`].
pub fn dot_q4_1_q8_1(isa: Isa, w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    match isa.level() {
        // SAFETY: an `Isa` at these levels exists only on CPUs with AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { x86::q4_1_q8_1(w, x) },
        _ => quant::dot_q4_1_q8_1(w, x),
    }
}

/// `Σ w·x` of a `Q4_0` row and a `Q8_0` row, as [`quant::dot_q4_0_q8_0`].
pub fn dot_q4_0_q8_0(isa: Isa, w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    match isa.level() {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { x86::q4_0_q8_0(w, x) },
        _ => quant::dot_q4_0_q8_0(w, x),
    }
}

/// `Σ w·x` of two `Q8_0` rows, as [`quant::dot_q8_0_q8_0`].
pub fn dot_q8_0_q8_0(isa: Isa, w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    match isa.level() {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx2 => unsafe { x86::q8_0_q8_0(w, x) },
        _ => quant::dot_q8_0_q8_0(w, x),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

    /// Half to f32 in one instruction (F16C); exact, as `quant::f16_to_f32`.
    #[inline(always)]
    unsafe fn f16_to_f32(h: [u8; 2]) -> f32 {
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(
                _mm_cvtsi32_si128(u16::from_le_bytes(h) as i32),
            ))
        }
    }

    /// The 32 nibbles of a 4-bit block as bytes: low nibbles (values 0..16) in the low lane,
    /// high nibbles (values 16..32) in the high lane.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        unsafe {
            let q = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
        }
    }

    /// 8 partial i32 sums of `u · s` over 32 byte pairs, `u` unsigned, `s` signed.
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }

    /// 8 partial i32 sums of `a · b` over 32 signed byte pairs.
    #[inline(always)]
    unsafe fn dot_i8_i8(a: __m256i, b: __m256i) -> __m256i {
        unsafe { dot_u8_i8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)) }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0.0f32;
            for (a, b) in w.iter().zip(x) {
                let y = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(dot_u8_i8(nibbles(&a.qs), y));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(a.d) * f16_to_f32(b.d)), p, acc);
                mins += f16_to_f32(a.m) * f16_to_f32(b.s);
            }
            hsum(acc) + mins
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for (a, b) in w.iter().zip(x) {
                let q = _mm256_sub_epi8(nibbles(&a.qs), _mm256_set1_epi8(8));
                let y = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(dot_i8_i8(q, y));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(a.d) * f16_to_f32(b.d)), p, acc);
            }
            hsum(acc)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for (a, b) in w.iter().zip(x) {
                let q = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                let y = _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(dot_i8_i8(q, y));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(a.d) * f16_to_f32(b.d)), p, acc);
            }
            hsum(acc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, f32_to_f16};

    fn blocks(
        seed: u32,
    ) -> (
        Vec<BlockQ4_1>,
        Vec<BlockQ4_0>,
        Vec<BlockQ8_0>,
        Vec<BlockQ8_1>,
    ) {
        let n = 7; // blocks per row
        let mut r = seed;
        let mut next = || {
            r = r.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (r >> 8) as u8
        };
        let w41: Vec<BlockQ4_1> = (0..n)
            .map(|i| BlockQ4_1 {
                d: f32_to_f16(0.01 * (i + 1) as f32),
                m: f32_to_f16(-0.05),
                qs: std::array::from_fn(|_| next()),
            })
            .collect();
        let w40: Vec<BlockQ4_0> = (0..n)
            .map(|i| BlockQ4_0 {
                d: f32_to_f16(0.02 * (i + 1) as f32),
                qs: std::array::from_fn(|_| next()),
            })
            .collect();
        let w80: Vec<BlockQ8_0> = (0..n)
            .map(|i| BlockQ8_0 {
                d: f32_to_f16(0.003 * (i + 1) as f32),
                qs: std::array::from_fn(|_| next() as i8),
            })
            .collect();
        let x: Vec<f32> = (0..n * 32).map(|_| next() as f32 / 64.0 - 2.0).collect();
        let mut x81 = vec![
            BlockQ8_1 {
                d: [0; 2],
                s: [0; 2],
                qs: [0; 32]
            };
            n
        ];
        quant::quantize_q8_1(&x, &mut x81);
        (w41, w40, w80, x81)
    }

    /// Every level's integer dots equal the scalar reference up to the order of f32 sums
    /// (relative 1e-5 of the sum of absolute block terms).
    #[test]
    fn every_level_matches_the_scalar_reference() {
        for seed in 0..20 {
            let (w41, w40, w80, x81) = blocks(seed);
            let x80: Vec<BlockQ8_0> = x81.iter().map(|b| BlockQ8_0 { d: b.d, qs: b.qs }).collect();
            for isa in Isa::available() {
                let pairs = [
                    (
                        dot_q4_1_q8_1(isa, &w41, &x81),
                        quant::dot_q4_1_q8_1(&w41, &x81),
                    ),
                    (
                        dot_q4_0_q8_0(isa, &w40, &x80),
                        quant::dot_q4_0_q8_0(&w40, &x80),
                    ),
                    (
                        dot_q8_0_q8_0(isa, &w80, &x80),
                        quant::dot_q8_0_q8_0(&w80, &x80),
                    ),
                ];
                for (k, (got, want)) in pairs.into_iter().enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "seed {seed}, dot {k}, {isa:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
