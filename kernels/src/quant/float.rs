//! The float formats as 32-value blocks: `F32` (4 bytes a value), `F16` (IEEE half) and
//! `BF16` (the top half of an f32), all little-endian. Their rows are block rows when their
//! length is a multiple of 32; [`value`] reads any other row value by value.

use bytemuck::{Pod, Zeroable};

use super::{Block, DType, bf16_to_f32, f16_to_f32};
use crate::simd::v16::V16;

/// 32 `f32` values.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockF32 {
    pub v: [[u8; 4]; 32],
}

/// 32 IEEE half floats.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockF16 {
    pub v: [[u8; 2]; 32],
}

/// 32 bfloat16 values.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockBF16 {
    pub v: [[u8; 2]; 32],
}

const _: () = {
    assert!(size_of::<BlockF32>() == 128);
    assert!(size_of::<BlockF16>() == 64);
    assert!(size_of::<BlockBF16>() == 64);
};

/// Value `i` of a row of `dtype` floats stored in `bytes`.
pub(super) fn value(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        DType::F16 => f16_to_f32([bytes[2 * i], bytes[2 * i + 1]]),
        DType::BF16 => bf16_to_f32([bytes[2 * i], bytes[2 * i + 1]]),
        _ => unreachable!("{dtype} is a block format"),
    }
}

impl Block for BlockF32 {
    const DTYPE: DType = DType::F32;
    const LEN: usize = 32;

    fn dequantize(&self, out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(&self.v) {
            *o = f32::from_le_bytes(*v);
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let p = self.v.as_ptr() as *const f32;
        // SAFETY: the block holds 32 values; the loads are unaligned.
        unsafe { [V::load(p), V::load(p.add(16))] }
    }
}

impl Block for BlockF16 {
    const DTYPE: DType = DType::F16;
    const LEN: usize = 32;

    fn halves_mut(&mut self) -> Vec<&mut [u8; 2]> {
        self.v.iter_mut().collect()
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(&self.v) {
            *o = f16_to_f32(v);
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let p = self.v.as_ptr() as *const u8;
        // SAFETY: the block holds 64 bytes.
        unsafe { [V::load_f16(p), V::load_f16(p.add(32))] }
    }
}

impl Block for BlockBF16 {
    const DTYPE: DType = DType::BF16;
    const LEN: usize = 32;

    fn dequantize(&self, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(&self.v) {
            *o = bf16_to_f32(v);
        }
    }

    #[inline(always)]
    fn load32<V: V16>(&self, _s: usize) -> [V; 2] {
        let p = self.v.as_ptr() as *const u8;
        // SAFETY: the block holds 64 bytes.
        unsafe { [V::load_bf16(p), V::load_bf16(p.add(32))] }
    }
}
