//! `Q5_1`: 32 values `q * d + m`, `q` 5-bit unsigned, laid out as in `Q5_0`.

use bytemuck::{Pod, Zeroable};

use super::q5_0::{five_bit, five_bit_values};
use super::{Block, DType, Q8Row, f16_to_f32};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: [u8; 2],
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ5_1>() == 24);

impl Block for BlockQ5_1 {
    const DTYPE: DType = DType::Q5_1;
    const LEN: usize = 32;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d, &mut self.m]
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, m) = (f16_to_f32(self.d), f16_to_f32(self.m));
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = ((q & 0xf) | h0) as f32 * d + m;
            y[j + 16] = ((q >> 4) | h1) as f32 * d + m;
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let (d, m) = (V::splat(V::half(self.d)), V::splat(V::half(self.m)));
        let [q0, q1] = five_bit::<V>(&self.qs, self.qh);
        [
            V::u8_to_f32(q0).mul(d).add(m),
            V::u8_to_f32(q1).mul(d).add(m),
        ]
    }
}

impl BlockQ5_1 {
    /// `Σ w·x` of a row of blocks and a quantized activation row, block by block in integers:
    /// `d_w d_x Σ q_w q_x + m_w s_x` (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ5_1], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            let xq = &x.qs[32 * b..32 * b + 32];
            let q = five_bit_values(&blk.qs, blk.qh);
            let sum: i32 = q.iter().zip(xq).map(|(&q, &x)| q as i32 * x as i32).sum();
            acc = (sum as f32).mul_add(f16_to_f32(blk.d) * x.d[b], acc);
            acc = f16_to_f32(blk.m).mul_add(x.s[b], acc);
        }
        acc
    }
}
