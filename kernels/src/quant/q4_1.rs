//! `Q4_1`: 32 values `q * d + m`, `q` 4-bit unsigned; nibbles as in `Q4_0` (`qs[j]`: value
//! `j` low, value `j + 16` high).

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, Q8Row, f16_to_f32, f32_to_f16};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ4_1>() == 20);

impl Block for BlockQ4_1 {
    const DTYPE: DType = DType::Q4_1;
    const LEN: usize = 32;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d, &mut self.m]
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (f16_to_f32(self.d), f16_to_f32(self.m));
        for (j, &q) in self.qs.iter().enumerate() {
            y[j] = (q & 0xf) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let (d, m) = (V::splat(V::half(self.d)), V::splat(V::half(self.m)));
        // SAFETY: 16 bytes.
        let q = unsafe { V::load_u8(self.qs.as_ptr()) };
        if V::LOOKUP16 {
            // The 16 possible values, each computed as below, then looked up.
            let table = V::iota16().mul(d).add(m);
            return [V::lookup16(table, q, false), V::lookup16(table, q, true)];
        }
        [
            V::u8_to_f32(V::low_nibbles(q)).mul(d).add(m),
            V::u8_to_f32(V::high_nibbles(q)).mul(d).add(m),
        ]
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

impl BlockQ4_1 {
    /// `Σ w·x` of a row of blocks and a quantized activation row, block by block in integers:
    /// `d_w d_x Σ q_w q_x + m_w s_x` (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ4_1], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            let xq = &x.qs[32 * b..32 * b + 32];
            let mut sum = 0i32;
            for j in 0..16 {
                sum += (blk.qs[j] & 0xf) as i32 * xq[j] as i32
                    + (blk.qs[j] >> 4) as i32 * xq[j + 16] as i32;
            }
            acc = (sum as f32).mul_add(f16_to_f32(blk.d) * x.d[b], acc);
            acc = f16_to_f32(blk.m).mul_add(x.s[b], acc);
        }
        acc
    }
}
