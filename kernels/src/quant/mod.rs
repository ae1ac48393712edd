//! GGUF storage formats: their block layouts, bit for bit as ggml defines them
//! (`ggml-common.h`, `ggml-quants.c`), one file per format.
//!
//! Each block format is a `#[repr(C)]` struct of byte arrays (alignment 1, so any byte slice
//! of whole blocks can be viewed as blocks with `bytemuck::try_cast_slice`), with a
//! compile-time size check and its nibble order spelled out. Beside it, in the same file:
//! the reference dequantization (ggml's `dequantize_row_*`, in scalar code) and the vector
//! one the kernels use ([`Block::load32`]), which computes every value with the same
//! operations in the same order, so the two agree bit for bit (tested). `d`/`m` are IEEE
//! half floats, little-endian; `q * d + m` is two roundings, never fused, as in ggml.
//! The float formats (F32, F16, BF16) are blocks of 32 values too, so every kernel walks
//! every format the same way.

use bytemuck::Pod;

use crate::simd::v16::V16;

mod float;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod q8_act;

pub use float::{BlockBF16, BlockF16, BlockF32};
pub use q4_0::{BlockQ4_0, quantize_q4_0};
pub use q4_1::{BlockQ4_1, quantize_q4_1};
pub use q4_k::{BlockQ4K, scale_min_k4};
pub use q5_0::BlockQ5_0;
pub use q5_1::BlockQ5_1;
pub use q5_k::BlockQ5K;
pub use q6_k::BlockQ6K;
pub use q8_0::{BlockQ8_0, quantize_q8_0};
pub use q8_act::{Q8Row, Q8Rows, QuantizedRows};

/// A block format: `LEN` values stored in `size_of::<Self>()` bytes.
pub(crate) trait Block: Pod + Send + Sync {
    /// The format's tag.
    const DTYPE: DType;
    /// Values per block: 32, or 256 for the K-quants.
    const LEN: usize;
    /// The block's values into `out` (`LEN` of them): ggml's reference dequantization.
    fn dequantize(&self, out: &mut [f32]);
    /// Values `32 s .. 32 s + 32` (`s < LEN / 32`) as two vectors of 16, each value computed
    /// as [`dequantize`](Block::dequantize) computes it.
    fn load32<V: V16>(&self, s: usize) -> [V; 2];
    /// Every half-float field of the block: the scale first, then the min where there is one
    /// (`F16`'s values; `BF16` and `F32` have none). [`sample_blocks`] sets them to finite
    /// values; [`dequantize_parts`] zeroes one.
    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        Vec::new()
    }
}

/// Calls `$f::<Block type>($args)` for the block type of a [`DType`].
macro_rules! with_block {
    ($dtype:expr, $f:ident, $($arg:expr),* $(,)?) => {
        match $dtype {
            $crate::quant::DType::F32 => $f::<$crate::quant::BlockF32>($($arg),*),
            $crate::quant::DType::F16 => $f::<$crate::quant::BlockF16>($($arg),*),
            $crate::quant::DType::BF16 => $f::<$crate::quant::BlockBF16>($($arg),*),
            $crate::quant::DType::Q4_0 => $f::<$crate::quant::BlockQ4_0>($($arg),*),
            $crate::quant::DType::Q4_1 => $f::<$crate::quant::BlockQ4_1>($($arg),*),
            $crate::quant::DType::Q5_0 => $f::<$crate::quant::BlockQ5_0>($($arg),*),
            $crate::quant::DType::Q5_1 => $f::<$crate::quant::BlockQ5_1>($($arg),*),
            $crate::quant::DType::Q8_0 => $f::<$crate::quant::BlockQ8_0>($($arg),*),
            $crate::quant::DType::Q4K => $f::<$crate::quant::BlockQ4K>($($arg),*),
            $crate::quant::DType::Q5K => $f::<$crate::quant::BlockQ5K>($($arg),*),
            $crate::quant::DType::Q6K => $f::<$crate::quant::BlockQ6K>($($arg),*),
        }
    };
}
pub(crate) use with_block;

/// A tensor storage format, with its ggml type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    /// Every supported format.
    pub const ALL: [DType; 11] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// The format of ggml type id `id`, if chord supports it.
    pub fn from_ggml(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_id() == id)
    }

    /// ggml's type id (`enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// ggml's name for the format (`Q4_K`, `F16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
        }
    }

    /// Values per block as ggml counts them (1 for the float formats): a row of a tensor
    /// holds a whole number of them.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => 256,
        }
    }

    /// Values per block as chord's kernels walk them: 32 for the float formats too, so
    /// rows of floats whose length is a multiple of 32 take the block kernels.
    pub fn kernel_block_len(self) -> usize {
        self.block_len().max(32)
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => size_of::<BlockQ4_0>(),
            DType::Q4_1 => size_of::<BlockQ4_1>(),
            DType::Q5_0 => size_of::<BlockQ5_0>(),
            DType::Q5_1 => size_of::<BlockQ5_1>(),
            DType::Q8_0 => size_of::<BlockQ8_0>(),
            DType::Q4K => size_of::<BlockQ4K>(),
            DType::Q5K => size_of::<BlockQ5K>(),
            DType::Q6K => size_of::<BlockQ6K>(),
        }
    }

    /// Whether a value is `scale · q + min` with a min of its own (`Q4_1`, `Q5_1`, and the
    /// K-quants `Q4_K`, `Q5_K` with `- dmin · m`), rather than `scale · q`.
    pub fn has_min(self) -> bool {
        matches!(self, DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K)
    }

    /// Bytes of `n` values, if `n` is a whole number of blocks and the size fits in `usize`.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    /// ggml's name, in any case: `q4_1`, `Q4_K`, `f16`, ...
    fn from_str(s: &str) -> Result<DType, String> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                format!("unknown format '{s}': expected one of {}", names.join(", "))
            })
    }
}

/// IEEE 754 half precision (little-endian bytes) to f32, exactly.
pub fn f16_to_f32(b: [u8; 2]) -> f32 {
    let h = u16::from_le_bytes(b) as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man * 2^-24; normalise into an f32.
            let shift = man.leading_zeros() - 21; // bring the leading 1 to bit 10
            let man = (man << shift) & 0x3ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (man << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13), // inf and NaN (payload kept)
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE half precision, rounding to nearest even (as `_cvtss_sh` does).
pub fn f32_to_f16(v: f32) -> [u8; 2] {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    let h: u16 = if exp == 0xff {
        // inf, or NaN made quiet.
        sign | 0x7c00
            | if man != 0 {
                0x200 | (man >> 13) as u16
            } else {
                0
            }
    } else {
        let e = exp - 127 + 15;
        if e >= 0x1f {
            sign | 0x7c00
        } else if e <= 0 {
            if e < -10 {
                sign
            } else {
                // Subnormal half: shift the implicit-1 mantissa right, round to nearest even.
                let m = man | 0x80_0000;
                let shift = (14 - e) as u32;
                let half = 1 << (shift - 1);
                let rest = m & ((1 << shift) - 1);
                let mut r = m >> shift;
                if rest > half || (rest == half && r & 1 == 1) {
                    r += 1;
                }
                sign | r as u16
            }
        } else {
            let mut r = ((e as u32) << 10) | (man >> 13);
            let rest = man & 0x1fff;
            if rest > 0x1000 || (rest == 0x1000 && r & 1 == 1) {
                r += 1; // may carry into the exponent, up to inf: correct
            }
            sign | r as u16
        }
    };
    h.to_le_bytes()
}

/// bfloat16 (little-endian bytes) to f32, exactly.
pub fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

/// Dequantizes `bytes`, whole blocks of `dtype`, into `out` (one f32 per value): the
/// reference, block by block with each format's [`Block::dequantize`].
///
/// # Panics
/// If `bytes` is not exactly the size of `out.len()` values of `dtype`: callers check shapes
/// (the GGUF reader checks every tensor) before calling.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        dtype.bytes_for(out.len()),
        Some(bytes.len()),
        "dequantize: {} bytes for {} {dtype} values",
        bytes.len(),
        out.len()
    );
    fn run<B: Block>(bytes: &[u8], out: &mut [f32]) {
        if B::DTYPE.kernel_block_len() != B::LEN || !out.len().is_multiple_of(B::LEN) {
            // Float rows of a length not a multiple of 32: value by value.
            for (i, o) in out.iter_mut().enumerate() {
                *o = float::value(B::DTYPE, bytes, i);
            }
            return;
        }
        let blocks: &[B] = bytemuck::try_cast_slice(bytes).expect("whole blocks of alignment 1");
        for (b, y) in blocks.iter().zip(out.chunks_exact_mut(B::LEN)) {
            b.dequantize(y);
        }
    }
    with_block!(dtype, run, bytes, out)
}

/// The two parts of every value of `bytes` (`n` values of `dtype`): `scaled = scale · q`
/// and `offset` (the min: `m`, or `- dmin · m` for the K-quants; zero for the formats
/// without one, see [`DType::has_min`]), each as [`dequantize`] computes it with the other
/// part's field set to zero. A kernel may sum a block's parts separately
/// (`d Σ q x + m Σ x`); the magnitudes `|scaled| + |offset|` bound its rounding where
/// `|value|` alone would not (the parts can cancel).
pub fn dequantize_parts(dtype: DType, bytes: &[u8], scaled: &mut [f32], offset: &mut [f32]) {
    if !dtype.has_min() {
        dequantize(dtype, bytes, scaled);
        offset.fill(0.0);
        return;
    }
    // The scale field (first) or the min field (second) of every block set to zero.
    fn without<B: Block>(bytes: &mut [u8], field: usize) {
        for b in bytemuck::cast_slice_mut::<u8, B>(bytes) {
            *b.halves_mut()[field] = [0, 0];
        }
    }
    let mut copy = bytes.to_vec();
    with_block!(dtype, without, &mut copy, 1);
    dequantize(dtype, &copy, scaled);
    copy.copy_from_slice(bytes);
    with_block!(dtype, without, &mut copy, 0);
    dequantize(dtype, &copy, offset);
}

/// Encodes f32 values as `dtype` (F32, F16, BF16 rounded to nearest even, or the 32-value
/// block formats with ggml's reference quantizers). `None` for the K-quants and Q5, which
/// chord reads but does not write.
pub fn quantize(dtype: DType, x: &[f32]) -> Option<Vec<u8>> {
    let n = dtype.bytes_for(x.len())?;
    let mut out = vec![0u8; n];
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(x)),
        DType::F16 => out
            .chunks_exact_mut(2)
            .zip(x)
            .for_each(|(o, &v)| o.copy_from_slice(&f32_to_f16(v))),
        DType::BF16 => out
            .chunks_exact_mut(2)
            .zip(x)
            .for_each(|(o, &v)| o.copy_from_slice(&f32_to_bf16(v))),
        DType::Q4_0 => quantize_q4_0(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q4_1 => quantize_q4_1(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q8_0 => quantize_q8_0(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q5_0 | DType::Q5_1 | DType::Q4K | DType::Q5K | DType::Q6K => return None,
    }
    Some(out)
}

/// `n` values of `dtype` as deterministic pseudo-random blocks (xorshift64 from `seed`) whose
/// every value is finite: random quants, with every scale and min (and every value of the
/// float formats) drawn from `[-1, 1]`. For tests and benchmarks of any format, including
/// those chord has no quantizer for. `None` if `n` is not a whole number of blocks.
pub fn sample_blocks(dtype: DType, n: usize, seed: u64) -> Option<Vec<u8>> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    if matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        let values: Vec<f32> = (0..n).map(|_| unit(next())).collect();
        return quantize(dtype, &values);
    }
    let mut bytes = vec![0u8; dtype.bytes_for(n)?];
    bytes.iter_mut().for_each(|b| *b = (next() >> 56) as u8);
    fn unit(r: u64) -> f32 {
        (r % 2001) as f32 / 1000.0 - 1.0
    }
    fn fill<B: Block>(bytes: &mut [u8], next: &mut dyn FnMut() -> u64) {
        let blocks: &mut [B] = bytemuck::cast_slice_mut(bytes);
        for b in blocks {
            for h in b.halves_mut() {
                *h = f32_to_f16(unit(next()));
            }
        }
    }
    with_block!(dtype, fill, &mut bytes, &mut next);
    Some(bytes)
}

/// f32 to bfloat16, rounding to nearest even (NaN kept quiet).
pub fn f32_to_bf16(v: f32) -> [u8; 2] {
    let bits = v.to_bits();
    let rounded = if v.is_nan() {
        (bits >> 16) | 0x40
    } else {
        (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    };
    (rounded as u16).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_every_half_and_matches_known_values() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h.to_le_bytes());
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
            } else {
                assert_eq!(f32_to_f16(f), h.to_le_bytes(), "half {h:#06x} -> {f}");
            }
        }
        assert_eq!(f16_to_f32(0x3c00u16.to_le_bytes()), 1.0);
        assert_eq!(f16_to_f32(0xc000u16.to_le_bytes()), -2.0);
        assert_eq!(f16_to_f32(0x0001u16.to_le_bytes()), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bffu16.to_le_bytes()), 65504.0);
        // Ties to even: 1 + 2^-11 is halfway between 1 and the next half; rounds down to 1.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00u16.to_le_bytes());
        assert_eq!(
            f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)),
            0x3c02u16.to_le_bytes()
        );
        assert_eq!(f32_to_f16(1e6), 0x7c00u16.to_le_bytes());
    }

    #[test]
    fn q4_1_block_dequantizes_by_the_ggml_nibble_order() {
        // d = 0.5, m = -1; byte j = (j + 1) << 4 | j: value j is j, value j + 16 is j + 1.
        let mut b = BlockQ4_1 {
            d: f32_to_f16(0.5),
            m: f32_to_f16(-1.0),
            qs: [0; 16],
        };
        for j in 0..16 {
            b.qs[j] = ((((j + 1) % 16) << 4) | j) as u8;
        }
        let mut y = [0.0f32; 32];
        dequantize(DType::Q4_1, bytemuck::bytes_of(&b), &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 - 1.0);
            assert_eq!(y[j + 16], ((j + 1) % 16) as f32 * 0.5 - 1.0);
        }
    }

    /// Each format reproduces its input within half a quantization step (one at Q4_0's
    /// clamped end).
    #[test]
    fn quantizers_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..32 * 40)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0 + (i / 32) as f32 * 0.01)
            .collect();
        for dtype in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q8_0,
            DType::F16,
            DType::BF16,
        ] {
            let bytes = quantize(dtype, &x).unwrap();
            let mut y = vec![0.0f32; x.len()];
            dequantize(dtype, &bytes, &mut y);
            for (b, (xb, yb)) in x.chunks_exact(32).zip(y.chunks_exact(32)).enumerate() {
                let (lo, hi) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let amax = lo.abs().max(hi.abs());
                let step = match dtype {
                    DType::Q4_0 => amax / 8.0,
                    DType::Q4_1 => (hi - lo) / 15.0,
                    DType::Q8_0 => amax / 127.0,
                    DType::F16 => amax * 2f32.powi(-10),
                    _ => amax * 2f32.powi(-7),
                };
                // Q4_0's grid is -8d ..= 7d: the end opposite the largest magnitude is clamped
                // one step short. Every other value rounds to within half a step.
                let bound = if dtype == DType::Q4_0 {
                    step
                } else {
                    0.5 * step
                };
                for (&a, &c) in xb.iter().zip(yb) {
                    // Plus the f16 rounding of the block's scale and offset.
                    assert!(
                        (a - c).abs() <= bound + amax * 2e-3,
                        "{dtype} block {b}: {a} -> {c} (step {step})"
                    );
                }
            }
        }
        assert!(quantize(DType::Q4K, &x[..256]).is_none());
    }

    #[test]
    fn q5_0_takes_the_fifth_bit_from_qh() {
        // All low nibbles 0; qh sets the fifth bit of values 0 and 31 only.
        let qh: u32 = 1 | (1 << 31);
        let b = BlockQ5_0 {
            d: f32_to_f16(1.0),
            qh: qh.to_le_bytes(),
            qs: [0; 16],
        };
        let mut y = [0.0f32; 32];
        dequantize(DType::Q5_0, bytemuck::bytes_of(&b), &mut y);
        for (j, &v) in y.iter().enumerate() {
            let expected = if j == 0 || j == 31 { 0.0 } else { -16.0 };
            assert_eq!(v, expected, "value {j}");
        }
    }

    #[test]
    fn q4_k_scales_and_mins_unpack_for_all_eight_sub_blocks() {
        // Sub-block j: scale j + 1, min 2j + 1, packed by the inverse of scale_min_k4.
        let mut s = [0u8; 12];
        for j in 0..8u8 {
            let (sc, mn) = (j + 1, 2 * j + 1);
            if j < 4 {
                s[j as usize] |= sc;
                s[j as usize + 4] |= mn;
            } else {
                let j = j as usize;
                s[j + 4] |= (sc & 0xf) | ((mn & 0xf) << 4);
                s[j - 4] |= (sc >> 4) << 6;
                s[j] |= (mn >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(
                scale_min_k4(j, &s),
                (j as u8 + 1, 2 * j as u8 + 1),
                "sub-block {j}"
            );
        }
        let b = BlockQ4K {
            d: f32_to_f16(1.0),
            dmin: f32_to_f16(0.5),
            scales: s,
            qs: [0x21; 128],
        };
        let mut y = [0.0f32; 256];
        dequantize(DType::Q4K, bytemuck::bytes_of(&b), &mut y);
        for (sub, chunk) in y.chunks_exact(32).enumerate() {
            let q = if sub % 2 == 0 { 1.0 } else { 2.0 };
            let expected = (sub as f32 + 1.0) * q - 0.5 * (2 * sub + 1) as f32;
            assert!(
                chunk.iter().all(|&v| v == expected),
                "sub-block {sub}: {chunk:?}"
            );
        }
    }

    #[test]
    fn q6_k_reassembles_six_bit_values_in_ggml_order() {
        // q = 33 everywhere (low 4 bits 1, high 2 bits 2): (q - 32) = 1; scales 1..=16.
        let mut b = BlockQ6K {
            ql: [0x11; 128],
            qh: [0xaa; 64],
            scales: [0; 16],
            d: f32_to_f16(1.0),
        };
        for (i, s) in b.scales.iter_mut().enumerate() {
            *s = i as i8 + 1;
        }
        let mut y = [0.0f32; 256];
        dequantize(DType::Q6K, bytemuck::bytes_of(&b), &mut y);
        for (i, &v) in y.iter().enumerate() {
            // Value i lies in scale group i / 16.
            assert_eq!(v, (i / 16 + 1) as f32, "value {i}");
        }
    }
}
