//! `Q4_0`: 32 values `(q - 8) * d`, `q` 4-bit unsigned. Nibble order: `qs[j]` holds value
//! `j` in its low nibble and value `j + 16` in its high nibble.

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, Q8Row, f16_to_f32, f32_to_f16};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: [u8; 2],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);

impl Block for BlockQ4_0 {
    const DTYPE: DType = DType::Q4_0;
    const LEN: usize = 32;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d]
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = f16_to_f32(self.d);
        for (j, &q) in self.qs.iter().enumerate() {
            y[j] = ((q & 0xf) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let d = V::splat(V::half(self.d));
        // SAFETY: 16 bytes.
        let q = unsafe { V::load_u8(self.qs.as_ptr()) };
        let eight = V::splat(8.0);
        if V::LOOKUP16 {
            // The 16 possible values, each computed as below, then looked up.
            let table = V::iota16().sub(eight).mul(d);
            return [V::lookup16(table, q, false), V::lookup16(table, q, true)];
        }
        [
            V::u8_to_f32(V::low_nibbles(q)).sub(eight).mul(d),
            V::u8_to_f32(V::high_nibbles(q)).sub(eight).mul(d),
        ]
    }
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

impl BlockQ4_0 {
    /// `Σ w·x` of a row of blocks and a quantized activation row, block by block in integers:
    /// `d_w d_x Σ (q_w - 8) q_x` (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ4_0], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            let xq = &x.qs[32 * b..32 * b + 32];
            let mut sum = 0i32;
            for j in 0..16 {
                sum += ((blk.qs[j] & 0xf) as i32 - 8) * xq[j] as i32
                    + ((blk.qs[j] >> 4) as i32 - 8) * xq[j + 16] as i32;
            }
            acc = (sum as f32).mul_add(f16_to_f32(blk.d) * x.d[b], acc);
        }
        acc
    }
}
