//! `Q5_0`: 32 values `(q - 16) * d`, `q` 5-bit unsigned: the low nibbles as in `Q4_0`
//! (`qs[j]`: value `j` low, value `j + 16` high), the fifth bit of value `j` in bit `j` of the
//! little-endian `u32` `qh`.

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, Q8Row, f16_to_f32};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// The 5-bit values of a `Q5_0`/`Q5_1` block as two runs of 16 bytes.
#[inline(always)]
pub(super) fn five_bit<V: V16>(qs: &[u8; 16], qh: [u8; 4]) -> [V::U8; 2] {
    let qh = u32::from_le_bytes(qh);
    // SAFETY: 16 bytes.
    let q = unsafe { V::load_u8(qs.as_ptr()) };
    let bit = V::u8_splat(0x10);
    let h0 = V::u8_and(V::u8_from_bits(qh as u16), bit);
    let h1 = V::u8_and(V::u8_from_bits((qh >> 16) as u16), bit);
    [
        V::u8_or(V::low_nibbles(q), h0),
        V::u8_or(V::high_nibbles(q), h1),
    ]
}

impl Block for BlockQ5_0 {
    const DTYPE: DType = DType::Q5_0;
    const LEN: usize = 32;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d]
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = f16_to_f32(self.d);
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            y[j] = (((q & 0xf) | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let d = V::splat(V::half(self.d));
        let sixteen = V::splat(16.0);
        let [q0, q1] = five_bit::<V>(&self.qs, self.qh);
        [
            V::u8_to_f32(q0).sub(sixteen).mul(d),
            V::u8_to_f32(q1).sub(sixteen).mul(d),
        ]
    }
}

/// The 32 five-bit values of a `Q5_0`/`Q5_1` block, unsigned (`0 ..= 31`), in value order.
pub(super) fn five_bit_values(qs: &[u8; 16], qh: [u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    std::array::from_fn(|v| {
        let nibble = if v < 16 { qs[v] & 0xf } else { qs[v - 16] >> 4 };
        nibble | (((qh >> v) & 1) << 4) as u8
    })
}

impl BlockQ5_0 {
    /// `Σ w·x` of a row of blocks and a quantized activation row, block by block in integers:
    /// `d_w d_x (Σ q_w q_x - 16 Σ q_x)`, `q_w` unsigned (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ5_0], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            let xq = &x.qs[32 * b..32 * b + 32];
            let q = five_bit_values(&blk.qs, blk.qh);
            let sum: i32 = q.iter().zip(xq).map(|(&q, &x)| q as i32 * x as i32).sum();
            let sum = sum - 16 * x.sum[b];
            acc = (sum as f32).mul_add(f16_to_f32(blk.d) * x.d[b], acc);
        }
        acc
    }
}
