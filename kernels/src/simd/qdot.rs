//! Quantized blocks on vectors: integer dot products (fast mode's inner loops) and
//! dequantization.
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

    /// 8 f32 from 8 bytes at `p` (unsigned when `signed` is false).
    #[inline(always)]
    unsafe fn bytes_to_f32(p: *const u8, signed: bool) -> __m256 {
        unsafe {
            let b = _mm_loadl_epi64(p as *const __m128i);
            _mm256_cvtepi32_ps(if signed {
                _mm256_cvtepi8_epi32(b)
            } else {
                _mm256_cvtepu8_epi32(b)
            })
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize(dtype: crate::quant::DType, bytes: &[u8], out: &mut [f32]) {
        use crate::quant::DType;
        unsafe {
            match dtype {
                DType::F16 => {
                    let mut halves = bytes.chunks_exact(16);
                    let mut outs = out.chunks_exact_mut(8);
                    for (h, o) in (&mut halves).zip(&mut outs) {
                        _mm256_storeu_ps(
                            o.as_mut_ptr(),
                            _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i)),
                        );
                    }
                    for (h, o) in halves
                        .remainder()
                        .chunks_exact(2)
                        .zip(outs.into_remainder())
                    {
                        *o = f16_to_f32([h[0], h[1]]);
                    }
                }
                DType::Q4_0 | DType::Q4_1 => {
                    let block = dtype.block_bytes();
                    for (b, y) in bytes.chunks_exact(block).zip(out.chunks_exact_mut(32)) {
                        let d = _mm256_set1_ps(f16_to_f32([b[0], b[1]]));
                        let (qs, m) = if dtype == DType::Q4_1 {
                            (&b[4..20], Some(_mm256_set1_ps(f16_to_f32([b[2], b[3]]))))
                        } else {
                            (&b[2..18], None)
                        };
                        let mut q = [0u8; 32];
                        _mm256_storeu_si256(
                            q.as_mut_ptr() as *mut __m256i,
                            nibbles(qs.try_into().expect("16 bytes")),
                        );
                        for g in 0..4 {
                            let v = bytes_to_f32(q.as_ptr().add(8 * g), false);
                            let r = match m {
                                Some(m) => _mm256_add_ps(_mm256_mul_ps(v, d), m),
                                None => _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(8.0)), d),
                            };
                            _mm256_storeu_ps(y.as_mut_ptr().add(8 * g), r);
                        }
                    }
                }
                DType::BF16 => {
                    let mut halves = bytes.chunks_exact(16);
                    let mut outs = out.chunks_exact_mut(8);
                    for (h, o) in (&mut halves).zip(&mut outs) {
                        let w =
                            _mm256_cvtepu16_epi32(_mm_loadu_si128(h.as_ptr() as *const __m128i));
                        _mm256_storeu_ps(
                            o.as_mut_ptr(),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w)),
                        );
                    }
                    for (h, o) in halves
                        .remainder()
                        .chunks_exact(2)
                        .zip(outs.into_remainder())
                    {
                        *o = crate::quant::bf16_to_f32([h[0], h[1]]);
                    }
                }
                DType::Q5_0 | DType::Q5_1 => {
                    let block = dtype.block_bytes();
                    let offset = if dtype == DType::Q5_1 { 2 } else { 0 };
                    for (b, y) in bytes.chunks_exact(block).zip(out.chunks_exact_mut(32)) {
                        let d = _mm256_set1_ps(f16_to_f32([b[0], b[1]]));
                        let qh = u32::from_le_bytes(
                            b[2 + offset..6 + offset].try_into().expect("4 bytes"),
                        );
                        let qs: &[u8; 16] =
                            b[6 + offset..22 + offset].try_into().expect("16 bytes");
                        // Bit j of qh to bit 4 of byte j.
                        let spread = _mm256_shuffle_epi8(
                            _mm256_set1_epi32(qh as i32),
                            _mm256_set_epi64x(
                                0x0303_0303_0303_0303,
                                0x0202_0202_0202_0202,
                                0x0101_0101_0101_0101,
                                0,
                            ),
                        );
                        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                        let high = _mm256_and_si256(
                            _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                            _mm256_set1_epi8(0x10),
                        );
                        let mut q = [0u8; 32];
                        _mm256_storeu_si256(
                            q.as_mut_ptr() as *mut __m256i,
                            _mm256_or_si256(nibbles(qs), high),
                        );
                        let m = (dtype == DType::Q5_1)
                            .then(|| _mm256_set1_ps(f16_to_f32([b[2], b[3]])));
                        for g in 0..4 {
                            let v = bytes_to_f32(q.as_ptr().add(8 * g), false);
                            let r = match m {
                                Some(m) => _mm256_add_ps(_mm256_mul_ps(v, d), m),
                                None => _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(16.0)), d),
                            };
                            _mm256_storeu_ps(y.as_mut_ptr().add(8 * g), r);
                        }
                    }
                }
                DType::Q4K => {
                    let blocks: &[crate::quant::BlockQ4K] = bytemuck::cast_slice(bytes);
                    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(256)) {
                        let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
                        for (i, (qs, y)) in
                            b.qs.chunks_exact(32)
                                .zip(y.chunks_exact_mut(64))
                                .enumerate()
                        {
                            let mut q = [0u8; 64];
                            let v = _mm256_loadu_si256(qs.as_ptr() as *const __m256i);
                            let lo = _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
                            let hi =
                                _mm256_and_si256(_mm256_srli_epi16::<4>(v), _mm256_set1_epi8(0x0f));
                            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, lo);
                            _mm256_storeu_si256(q.as_mut_ptr().add(32) as *mut __m256i, hi);
                            for half in 0..2 {
                                let (sc, mn) = crate::quant::scale_min_k4(2 * i + half, &b.scales);
                                let (ds, ms) = (
                                    _mm256_set1_ps(d * sc as f32),
                                    _mm256_set1_ps(dmin * mn as f32),
                                );
                                for g in 0..4 {
                                    let v = bytes_to_f32(q.as_ptr().add(32 * half + 8 * g), false);
                                    _mm256_storeu_ps(
                                        y.as_mut_ptr().add(32 * half + 8 * g),
                                        _mm256_sub_ps(_mm256_mul_ps(ds, v), ms),
                                    );
                                }
                            }
                        }
                    }
                }
                DType::Q6K => {
                    let blocks: &[crate::quant::BlockQ6K] = bytemuck::cast_slice(bytes);
                    let low = _mm256_set1_epi8(0x0f);
                    let two = _mm256_set1_epi8(3);
                    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(256)) {
                        let d = f16_to_f32(b.d);
                        for half in 0..2 {
                            let ql0 =
                                _mm256_loadu_si256(b.ql.as_ptr().add(64 * half) as *const __m256i);
                            let ql1 = _mm256_loadu_si256(
                                b.ql.as_ptr().add(64 * half + 32) as *const __m256i
                            );
                            let qh =
                                _mm256_loadu_si256(b.qh.as_ptr().add(32 * half) as *const __m256i);
                            let hbits = |shift: i32| -> __m256i {
                                let s = match shift {
                                    0 => qh,
                                    2 => _mm256_srli_epi16::<2>(qh),
                                    4 => _mm256_srli_epi16::<4>(qh),
                                    _ => _mm256_srli_epi16::<6>(qh),
                                };
                                _mm256_slli_epi16::<4>(_mm256_and_si256(s, two))
                            };
                            // The four 32-value groups of this half, as (q - 32) bytes.
                            let groups = [
                                _mm256_or_si256(_mm256_and_si256(ql0, low), hbits(0)),
                                _mm256_or_si256(_mm256_and_si256(ql1, low), hbits(2)),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                                    hbits(4),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                                    hbits(6),
                                ),
                            ];
                            let mut q = [0i8; 32];
                            for (k, grp) in groups.iter().enumerate() {
                                _mm256_storeu_si256(
                                    q.as_mut_ptr() as *mut __m256i,
                                    _mm256_sub_epi8(*grp, _mm256_set1_epi8(32)),
                                );
                                for g in 0..4 {
                                    // Values 16 apart share a scale: groups of 8 take scale 2k + g/2.
                                    let scale = d * b.scales[8 * half + 2 * k + g / 2] as f32;
                                    let v = bytes_to_f32(q.as_ptr().add(8 * g) as *const u8, true);
                                    _mm256_storeu_ps(
                                        y.as_mut_ptr().add(128 * half + 32 * k + 8 * g),
                                        _mm256_mul_ps(_mm256_set1_ps(scale), v),
                                    );
                                }
                            }
                        }
                    }
                }
                _ => {
                    // Q8_0
                    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                        let d = _mm256_set1_ps(f16_to_f32([b[0], b[1]]));
                        for g in 0..4 {
                            let v = bytes_to_f32(b.as_ptr().add(2 + 8 * g), true);
                            _mm256_storeu_ps(y.as_mut_ptr().add(8 * g), _mm256_mul_ps(v, d));
                        }
                    }
                }
            }
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

    /// Every level's dequantization is bit-exact to the scalar reference.
    #[test]
    fn every_level_dequantizes_bit_exactly() {
        use crate::quant::DType;
        for dtype in DType::ALL {
            let n = 256 * 3;
            let bytes: Vec<u8> = (0..dtype.bytes_for(n).unwrap())
                .map(|i| (i * 37 + 11) as u8)
                .collect();
            let mut want = vec![0.0f32; n];
            quant::dequantize(dtype, &bytes, &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; n];
                dequantize(isa, dtype, &bytes, &mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{dtype} at {isa:?}");
            }
        }
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

/// Dequantizes `bytes` of `dtype` into `out`, bit-exact to [`quant::dequantize`]: AVX2 for
/// every block format, F16 (F16C) and BF16 (the multiplies and adds stay separate roundings,
/// as in the reference); the scalar reference for F32 and on the portable level.
pub fn dequantize(isa: Isa, dtype: quant::DType, bytes: &[u8], out: &mut [f32]) {
    use quant::DType;
    assert_eq!(
        dtype.bytes_for(out.len()),
        Some(bytes.len()),
        "dequantize: {} bytes for {} {dtype} values",
        bytes.len(),
        out.len()
    );
    match (isa.level(), dtype) {
        // SAFETY: an `Isa` at these levels exists only on CPUs with AVX2, FMA and F16C; the
        // sizes were checked above.
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512 | Level::Avx2, DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::F16) => unsafe {
            x86::dequantize(dtype, bytes, out)
        },
        _ => quant::dequantize(dtype, bytes, out),
    }
}
