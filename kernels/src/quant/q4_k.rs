//! `Q4_K`: 256 values in 8 sub-blocks of 32, value `d * scale * q - dmin * min`, `q` 4-bit
//! unsigned, with a 6-bit scale and min per sub-block packed in `scales` (see
//! [`scale_min_k4`]). Sub-blocks `2i` and `2i + 1` share bytes `qs[32i .. 32i + 32]`: the
//! low nibbles are sub-block `2i`, the high nibbles sub-block `2i + 1`, byte `l` holding
//! value `l` of each.

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, Q8Row, f16_to_f32};
use crate::simd::v16::V16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: [u8; 2],
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}

const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Scale and min of sub-block `j` (0..8) of a `Q4_K`/`Q5_K` block: 6 bits each, the first
/// four in the low bits of bytes `j` and `j + 4`, the last four split between the low/high
/// nibbles of bytes `j + 4` and the top two bits of bytes `j - 4` and `j`.
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

/// Sub-block `s`'s `(d * scale, dmin * min)`, as the reference computes them, the halves
/// converted by `half`.
#[inline(always)]
pub(super) fn sub_scale(
    d: [u8; 2],
    dmin: [u8; 2],
    scales: &[u8; 12],
    s: usize,
    half: impl Fn([u8; 2]) -> f32,
) -> (f32, f32) {
    let (sc, m) = scale_min_k4(s, scales);
    (half(d) * sc as f32, half(dmin) * m as f32)
}

impl Block for BlockQ4K {
    const DTYPE: DType = DType::Q4K;
    const LEN: usize = 256;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        vec![&mut self.d, &mut self.dmin]
    }

    fn dequantize(&self, y: &mut [f32]) {
        for (i, (q, y)) in self
            .qs
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (d0, min0) = sub_scale(self.d, self.dmin, &self.scales, 2 * i, f16_to_f32);
            let (d1, min1) = sub_scale(self.d, self.dmin, &self.scales, 2 * i + 1, f16_to_f32);
            for (l, &v) in q.iter().enumerate() {
                y[l] = d0 * (v & 0xf) as f32 - min0;
                y[l + 32] = d1 * (v >> 4) as f32 - min1;
            }
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, s: usize) -> [V; 2] {
        let (d, min) = sub_scale(self.d, self.dmin, &self.scales, s, V::half);
        let (d, min) = (V::splat(d), V::splat(min));
        let p = self.qs[32 * (s / 2)..].as_ptr();
        // SAFETY: 32 bytes from `p`.
        let (q0, q1) = unsafe { (V::load_u8(p), V::load_u8(p.add(16))) };
        if V::LOOKUP16 {
            let table = d.mul(V::iota16()).sub(min);
            let high = s % 2 == 1;
            return [V::lookup16(table, q0, high), V::lookup16(table, q1, high)];
        }
        let (q0, q1) = if s.is_multiple_of(2) {
            (V::low_nibbles(q0), V::low_nibbles(q1))
        } else {
            (V::high_nibbles(q0), V::high_nibbles(q1))
        };
        [
            d.mul(V::u8_to_f32(q0)).sub(min),
            d.mul(V::u8_to_f32(q1)).sub(min),
        ]
    }
}

impl BlockQ4K {
    /// `Σ w·x` of a row of blocks and a quantized activation row (whose blocks of 32 are the
    /// sub-blocks), sub-block by sub-block in integers: `(d · scale) d_x Σ q_w q_x - (dmin ·
    /// min) s_x` (the reference of fast mode's kernels).
    pub fn dot_q8(w: &[BlockQ4K], x: &Q8Row<'_>) -> f32 {
        let mut acc = 0.0f32;
        for (b, blk) in w.iter().enumerate() {
            for j in 0..8 {
                let (d, min) = sub_scale(blk.d, blk.dmin, &blk.scales, j, f16_to_f32);
                let a = 8 * b + j;
                let xq = &x.qs[32 * a..32 * a + 32];
                let qs = &blk.qs[32 * (j / 2)..][..32];
                let sum: i32 = qs
                    .iter()
                    .zip(xq)
                    .map(|(&q, &x)| (if j % 2 == 0 { q & 0xf } else { q >> 4 }) as i32 * x as i32)
                    .sum();
                acc = (sum as f32).mul_add(d * x.d[a], acc);
                acc = (-min).mul_add(x.s[a], acc);
            }
        }
        acc
    }
}
