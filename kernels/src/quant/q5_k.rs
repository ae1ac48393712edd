//! `Q5_K`: 256 values in 8 sub-blocks of 32, value `d * scale * q - dmin * min`, `q` 5-bit
//! unsigned. Scales and mins as in `Q4_K`; the low 4 bits as in `Q4_K` (sub-blocks `2i` and
//! `2i + 1` share bytes `qs[32i .. 32i + 32]`, low and high nibbles); the fifth bit of value
//! `l` of sub-block `s` is bit `s` of `qh[l]`.

use bytemuck::{Pod, Zeroable};

use super::q4_k::sub_scale;
use super::{Block, DType, Q8Row, f16_to_f32};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

const _: () = assert!(size_of::<BlockQ5K>() == 176);

impl Block for BlockQ5K {
    const DTYPE: DType = DType::Q5K;
    const LEN: usize = 256;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d, &mut self.dmin]
    }

    fn dequantize(&self, y: &mut [f32]) {
        for s in 0..8 {
            let (d, min) = sub_scale(self.d, self.dmin, &self.scales, s, f16_to_f32);
            let q = &self.qs[32 * (s / 2)..][..32];
            for l in 0..32 {
                let low = if s.is_multiple_of(2) {
                    q[l] & 0xf
                } else {
                    q[l] >> 4
                };
                let high = if self.qh[l] >> s & 1 == 1 { 16 } else { 0 };
                y[32 * s + l] = d * (low + high) as f32 - min;
            }
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, s: usize) -> [V; 2] {
        let (d, min) = sub_scale(self.d, self.dmin, &self.scales, s, V::half);
        let (d, min) = (V::splat(d), V::splat(min));
        let p = self.qs[32 * (s / 2)..].as_ptr();
        let h = self.qh.as_ptr();
        let mut out = [V::zero(); 2];
        for (c, o) in out.iter_mut().enumerate() {
            // SAFETY: 16 bytes at each of p + 16c and h + 16c.
            let (q, qh) = unsafe { (V::load_u8(p.add(16 * c)), V::load_u8(h.add(16 * c))) };
            let low = if s.is_multiple_of(2) {
                V::low_nibbles(q)
            } else {
                V::high_nibbles(q)
            };
            let high = V::u8_shl(V::u8_and(V::u8_shr(qh, s as u32), V::u8_splat(1)), 4);
            *o = d.mul(V::u8_to_f32(V::u8_or(low, high))).sub(min);
        }
        out
    }
}

impl BlockQ5K {
    /// `Σ w·x` of a row of blocks and a quantized activation row (whose blocks of 32 are the
    /// sub-blocks), sub-block by sub-block in integers: `(d · scale) d_x Σ q_w q_x - (dmin ·
    /// min) s_x` (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ5K], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            for j in 0..8 {
                let (d, min) = sub_scale(blk.d, blk.dmin, &blk.scales, j, f16_to_f32);
                let a = 8 * b + j;
                let mut sum = 0i32;
                for l in 0..32 {
                    let q = blk.qs[32 * (j / 2) + l];
                    let low = if j % 2 == 0 { q & 0xf } else { q >> 4 };
                    let q = low | (blk.qh[l] >> j & 1) << 4;
                    sum += q as i32 * x.qs[32 * a + l] as i32;
                }
                acc = (sum as f32).mul_add(d * x.d[a], acc);
                acc = (-min).mul_add(x.s[a], acc);
            }
        }
        acc
    }
}
