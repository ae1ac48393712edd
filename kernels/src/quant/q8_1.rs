//! `Q8_1`: 32 values `q * d`, `q` signed bytes in order, with `s = d · Σq` kept for the `m`
//! term of `Q4_1` dots. The activation format of fast mode against `Q4_1` weights; never a
//! weight format, so it has no [`super::Block`] impl.

use bytemuck::{Pod, Zeroable};

use super::f32_to_f16;
use super::q8_0::q8_block;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; 32],
}

const _: () = assert!(size_of::<BlockQ8_1>() == 36);

/// Quantizes 32-value blocks of `x` to `Q8_1` as `quantize_q8_0` does, with `s = d · Σq`.
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
