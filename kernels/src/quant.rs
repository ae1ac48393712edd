//! GGUF storage formats: their block layouts, bit for bit as ggml defines them, and
//! dequantization to f32.
//!
//! Each block format is a `#[repr(C)]` struct of byte arrays (alignment 1, so any byte slice
//! of whole blocks can be viewed as blocks with `bytemuck::try_cast_slice`), with a
//! compile-time size check. `d`/`m` are IEEE half floats, little-endian. Dequantization
//! multiplies then adds in two roundings (`q * d + m`, never fused), as ggml's reference does.

use bytemuck::{Pod, Zeroable};

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
    Q6K,
}

impl DType {
    /// Every supported format.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q4K,
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
            DType::Q6K => "Q6_K",
        }
    }

    /// Values per block (1 for the float formats).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
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
            DType::Q6K => size_of::<BlockQ6K>(),
        }
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

/// `Q4_0`: 32 values `(q - 8) * d`; `qs[j]` holds value `j` in its low nibble and value
/// `j + 16` in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}

/// `Q4_1`: 32 values `q * d + m`; nibbles as in [`BlockQ4_0`].
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}

/// `Q5_0`: 32 values `(q - 16) * d` with 5-bit `q`: low nibbles as in [`BlockQ4_0`], the
/// fifth bit of value `j` in bit `j` of the little-endian `u32` `qh`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `Q5_1`: 32 values `q * d + m`, 5-bit `q` laid out as in [`BlockQ5_0`].
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// `Q8_0`: 32 values `q * d`, `q` signed bytes in order.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; 32],
}

/// `Q4_K`: 256 values in 8 sub-blocks of 32, `q * (d * scale) - dmin * min` with 6-bit
/// scales and mins packed in `scales` (see [`scale_min_k4`]); sub-blocks `2i` and `2i + 1`
/// share bytes `qs[32i .. 32i + 32]`, low and high nibbles.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

/// `Q6_K`: 256 values `d * scale * (q - 32)`, 6-bit `q`: low 4 bits in `ql`, high 2 in `qh`,
/// one signed 8-bit scale per 16 values.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: [u8; 2],
}

/// `Q8_1`: 32 values `q * d`, with `s = d * Σq` kept for the `m` term of `Q4_1` dots. The
/// activation format of fast mode against `Q4_1` weights.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; 32],
}

const _: () = {
    assert!(size_of::<BlockQ8_1>() == 36);
    assert!(size_of::<BlockQ4_0>() == 18);
    assert!(size_of::<BlockQ4_1>() == 20);
    assert!(size_of::<BlockQ5_0>() == 22);
    assert!(size_of::<BlockQ5_1>() == 24);
    assert!(size_of::<BlockQ8_0>() == 34);
    assert!(size_of::<BlockQ4K>() == 144);
    assert!(size_of::<BlockQ6K>() == 210);
};

/// Scale and min of sub-block `j` (0..8) of a `Q4_K` block: 6 bits each, the first four in
/// the low bits of bytes `j` and `j + 4`, the last four split between the low/high nibbles of
/// bytes `j + 4` and the top two bits of bytes `j - 4` and `j`.
pub fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Dequantizes `bytes`, whole blocks of `dtype`, into `out` (one f32 per value).
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
    fn blocks<B: Pod>(bytes: &[u8]) -> &[B] {
        bytemuck::try_cast_slice(bytes).expect("whole blocks of alignment 1")
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, c)| *o = f16_to_f32([c[0], c[1]])),
        DType::BF16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, c)| *o = bf16_to_f32([c[0], c[1]])),
        DType::Q4_0 => {
            for (b, y) in blocks::<BlockQ4_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(32))
            {
                let d = f16_to_f32(b.d);
                for (j, &q) in b.qs.iter().enumerate() {
                    y[j] = ((q & 0xf) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (b, y) in blocks::<BlockQ4_1>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(32))
            {
                let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
                for (j, &q) in b.qs.iter().enumerate() {
                    y[j] = (q & 0xf) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        DType::Q5_0 => {
            for (b, y) in blocks::<BlockQ5_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(32))
            {
                let d = f16_to_f32(b.d);
                let qh = u32::from_le_bytes(b.qh);
                for (j, &q) in b.qs.iter().enumerate() {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = (((q & 0xf) | h0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        DType::Q5_1 => {
            for (b, y) in blocks::<BlockQ5_1>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(32))
            {
                let (d, m) = (f16_to_f32(b.d), f16_to_f32(b.m));
                let qh = u32::from_le_bytes(b.qh);
                for (j, &q) in b.qs.iter().enumerate() {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = ((q & 0xf) | h0) as f32 * d + m;
                    y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
                }
            }
        }
        DType::Q8_0 => {
            for (b, y) in blocks::<BlockQ8_0>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(32))
            {
                let d = f16_to_f32(b.d);
                for (o, &q) in y.iter_mut().zip(&b.qs) {
                    *o = q as f32 * d;
                }
            }
        }
        DType::Q4K => {
            for (b, y) in blocks::<BlockQ4K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(256))
            {
                let (d, dmin) = (f16_to_f32(b.d), f16_to_f32(b.dmin));
                for (i, (q, y)) in
                    b.qs.chunks_exact(32)
                        .zip(y.chunks_exact_mut(64))
                        .enumerate()
                {
                    let (s0, m0) = scale_min_k4(2 * i, &b.scales);
                    let (s1, m1) = scale_min_k4(2 * i + 1, &b.scales);
                    let (d0, min0) = (d * s0 as f32, dmin * m0 as f32);
                    let (d1, min1) = (d * s1 as f32, dmin * m1 as f32);
                    for (l, &v) in q.iter().enumerate() {
                        y[l] = d0 * (v & 0xf) as f32 - min0;
                        y[l + 32] = d1 * (v >> 4) as f32 - min1;
                    }
                }
            }
        }
        DType::Q6K => {
            for (b, y) in blocks::<BlockQ6K>(bytes)
                .iter()
                .zip(out.chunks_exact_mut(256))
            {
                let d = f16_to_f32(b.d);
                for half in 0..2 {
                    let (ql, qh) = (&b.ql[64 * half..][..64], &b.qh[32 * half..][..32]);
                    let sc = &b.scales[8 * half..][..8];
                    let y = &mut y[128 * half..][..128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// Quantizes 32-value blocks of `x` to `Q8_0` as ggml's reference does: `d = max|x| / 127`,
/// `q = round(x / d)` (halves away from zero).
///
/// ggml's x86 path multiplies by `127 / max|x|` and rounds ties to even instead; against
/// llama.cpp's Q4_1 reference outputs that variant measured further off (top-1 agreement
/// 94.5% against 95.4%, last logits within 0.91 against 0.83), so chord keeps this one.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, qs) = q8_block(xb);
        *b = BlockQ8_0 {
            d: f32_to_f16(d),
            qs,
        };
    }
}

/// Quantizes 32-value blocks of `x` to `Q8_1` as [`quantize_q8_0`] does, with `s = d · Σq`.
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, qs) = q8_block(xb);
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        *b = BlockQ8_1 {
            d: f32_to_f16(d),
            s: f32_to_f16(sum as f32 * d),
            qs,
        };
    }
}

/// One block of 32 values as 8-bit quants: `d = max|x| / 127`, `q = round(x / d)`.
fn q8_block(xb: &[f32]) -> (f32, [i8; 32]) {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, std::array::from_fn(|j| (xb[j] * id).round() as i8))
}

/// Quantizes 32-value blocks of `x` to `Q4_0` as ggml's reference does: `d = v / -8` where `v`
/// is the value of largest magnitude, `q = min(15, trunc(x / d + 8.5))`.
pub fn quantize_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for j in 0..16 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + 16] * id + 8.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Quantizes 32-value blocks of `x` to `Q4_1` as ggml's reference does: `m = min`,
/// `d = (max - min) / 15`, `q = min(15, trunc((x - m) / d + 0.5))`.
pub fn quantize_q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    debug_assert_eq!(x.len(), out.len() * 32);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        let min = xb.iter().copied().fold(f32::MAX, f32::min);
        let max = xb.iter().copied().fold(-f32::MAX, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        b.m = f32_to_f16(min);
        for j in 0..16 {
            let q0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((xb[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Encodes f32 values as `dtype` (F32, F16, BF16 rounded to nearest even, or the 32-value
/// block formats with ggml's reference quantizers). `None` for the K-quants, which chord
/// reads but does not write.
pub fn quantize(dtype: DType, x: &[f32]) -> Option<Vec<u8>> {
    let n = dtype.bytes_for(x.len())?;
    let mut out = vec![0u8; n];
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(x)),
        DType::F16 => out
            .chunks_exact_mut(2)
            .zip(x)
            .for_each(|(o, &v)| o.copy_from_slice(&f32_to_f16(v))),
        DType::BF16 => out.chunks_exact_mut(2).zip(x).for_each(|(o, &v)| {
            let bits = v.to_bits();
            let rounded = if v.is_nan() {
                (bits >> 16) | 0x40
            } else {
                (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
            };
            o.copy_from_slice(&(rounded as u16).to_le_bytes());
        }),
        DType::Q4_0 => quantize_q4_0(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q4_1 => quantize_q4_1(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q8_0 => quantize_q8_0(x, bytemuck::cast_slice_mut(&mut out)),
        DType::Q5_0 | DType::Q5_1 | DType::Q4K | DType::Q6K => return None,
    }
    Some(out)
}

/// `Σ w·x` of a `Q4_1` row and a `Q8_1` row, block by block in integers:
/// `d_w d_x Σ q_w q_x + m_w s_x` per block, summed in f32 (the scalar reference).
pub fn dot_q4_1_q8_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (a.qs[j] & 0xf) as i32 * b.qs[j] as i32
                + (a.qs[j] >> 4) as i32 * b.qs[j + 16] as i32;
        }
        sum += f16_to_f32(a.d) * f16_to_f32(b.d) * sumi as f32 + f16_to_f32(a.m) * f16_to_f32(b.s);
    }
    sum
}

/// `Σ w·x` of a `Q4_0` row and a `Q8_0` row: `d_w d_x Σ (q_w - 8) q_x` per block.
pub fn dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += ((a.qs[j] & 0xf) as i32 - 8) * b.qs[j] as i32
                + ((a.qs[j] >> 4) as i32 - 8) * b.qs[j + 16] as i32;
        }
        sum += f16_to_f32(a.d) * f16_to_f32(b.d) * sumi as f32;
    }
    sum
}

/// `Σ w·x` of two `Q8_0` rows: `d_w d_x Σ q_w q_x` per block.
pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in w.iter().zip(x) {
        let sumi: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sum += f16_to_f32(a.d) * f16_to_f32(b.d) * sumi as f32;
    }
    sum
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
