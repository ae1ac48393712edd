//! `Q6_K`: 256 values `d * scale * (q - 32)`, `q` 6-bit unsigned, one signed 8-bit scale
//! per 16 values. Layout, per half `h` of 128 values (`ql[64h ..]`, `qh[32h ..]`,
//! `scales[8h ..]`), value `l` (0..32) of each quarter:
//! - quarter 0: low nibble of `ql[l]`, bits 0-1 of `qh[l]`;
//! - quarter 1: low nibble of `ql[l + 32]`, bits 2-3 of `qh[l]`;
//! - quarter 2: high nibble of `ql[l]`, bits 4-5 of `qh[l]`;
//! - quarter 3: high nibble of `ql[l + 32]`, bits 6-7 of `qh[l]`;
//!
//! and the scale of value `l` of quarter `r` is `scales[8h + 2r + l / 16]`.

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, Q8Row, f16_to_f32};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: [u8; 2],
}

const _: () = assert!(size_of::<BlockQ6K>() == 210);

impl Block for BlockQ6K {
    const DTYPE: DType = DType::Q6K;
    const LEN: usize = 256;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d]
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = f16_to_f32(self.d);
        for half in 0..2 {
            let (ql, qh) = (&self.ql[64 * half..][..64], &self.qh[32 * half..][..32]);
            let sc = &self.scales[8 * half..][..8];
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

    #[inline(always)]
    fn load32<V: V16>(&self, s: usize) -> [V; 2] {
        let d = V::half(self.d);
        let (half, r) = (s / 4, s % 4);
        let ql = self.ql[64 * half + 32 * (r % 2)..].as_ptr();
        let qh = self.qh[32 * half..].as_ptr();
        let thirty_two = V::splat(32.0);
        let mut out = [V::zero(); 2];
        for (c, o) in out.iter_mut().enumerate() {
            let scale = V::splat(d * self.scales[8 * half + 2 * r + c] as f32);
            // SAFETY: 16 bytes at each of ql + 16c and qh + 16c.
            let (lo, hi) = unsafe { (V::load_u8(ql.add(16 * c)), V::load_u8(qh.add(16 * c))) };
            let low = if r < 2 {
                V::low_nibbles(lo)
            } else {
                V::high_nibbles(lo)
            };
            let high = V::u8_shl(V::u8_and(V::u8_shr(hi, 2 * r as u32), V::u8_splat(3)), 4);
            *o = scale.mul(V::u8_to_f32(V::u8_or(low, high)).sub(thirty_two));
        }
        out
    }
}

impl BlockQ6K {
    /// `Σ w·x` of a row of blocks and a quantized activation row (each quarter of a half
    /// one activation block of 32), group of 16 by group in integers: `(d · scale) d_x
    /// (Σ q_w q_x - 32 Σ q_x)`, `q_w` unsigned (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ6K], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            let d = f16_to_f32(blk.d);
            for h in 0..2 {
                let (ql, qh) = (&blk.ql[64 * h..][..64], &blk.qh[32 * h..][..32]);
                for r in 0..4 {
                    let a = 8 * b + 4 * h + r;
                    for half in 0..2 {
                        let mut sum = 0i32;
                        for l in 16 * half..16 * half + 16 {
                            let low = (ql[32 * (r % 2) + l] >> (4 * (r / 2))) & 0xf;
                            let q = low | ((qh[l] >> (2 * r)) & 3) << 4;
                            sum += q as i32 * x.qs[32 * a + l] as i32;
                        }
                        let sum = sum - 32 * x.sum16[2 * a + half];
                        let scale = d * blk.scales[8 * h + 2 * r + half] as f32;
                        acc = (sum as f32).mul_add(scale * x.d[a], acc);
                    }
                }
            }
        }
        acc
    }
}
