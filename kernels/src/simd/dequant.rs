//! Dequantizing whole rows of any format with the vector decoders of the block formats
//! ([`crate::quant`]'s `Block::load32`), bit for bit as the reference does.

use super::Isa;
use super::v16::{Kernel16, V16, dispatch16};
use crate::quant::{self, Block, DType, with_block};

/// Dequantizes `bytes`, whole blocks of `dtype`, into `out`, with `isa`'s vectors; the same
/// values as [`quant::dequantize`]. Float rows whose length is no multiple of 32 take the
/// reference path.
///
/// # Panics
/// If `bytes` is not exactly the size of `out.len()` values of `dtype`.
pub fn dequantize(isa: Isa, dtype: DType, bytes: &[u8], out: &mut [f32]) {
    if !out.len().is_multiple_of(dtype.kernel_block_len()) {
        return quant::dequantize(dtype, bytes, out);
    }
    assert_eq!(
        dtype.bytes_for(out.len()),
        Some(bytes.len()),
        "dequantize: {} bytes for {} {dtype} values",
        bytes.len(),
        out.len()
    );
    fn run<B: Block>(isa: Isa, bytes: &[u8], out: &mut [f32]) {
        let blocks: &[B] = bytemuck::try_cast_slice(bytes).expect("whole blocks of alignment 1");
        dispatch16(isa, Dequant { blocks, out });
    }
    with_block!(dtype, run, isa, bytes, out)
}

struct Dequant<'a, B> {
    blocks: &'a [B],
    out: &'a mut [f32],
}

impl<B: Block> Kernel16 for Dequant<'_, B> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        for (b, y) in self.blocks.iter().zip(self.out.chunks_exact_mut(B::LEN)) {
            for s in 0..B::LEN / 32 {
                let [lo, hi] = b.load32::<V>(s);
                // SAFETY: `y` holds LEN >= 32 (s + 1) values.
                unsafe {
                    lo.store(y.as_mut_ptr().add(32 * s));
                    hi.store(y.as_mut_ptr().add(32 * s + 16));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_blocks(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        quant::sample_blocks(dtype, n * dtype.kernel_block_len(), seed).expect("whole blocks")
    }

    #[test]
    fn every_format_dequantizes_bit_for_bit_as_the_reference_at_every_level() {
        for dtype in DType::ALL {
            let n = 7;
            let len = n * dtype.kernel_block_len();
            for seed in 0..20 {
                let bytes = random_blocks(dtype, n, seed);
                let mut want = vec![0.0f32; len];
                quant::dequantize(dtype, &bytes, &mut want);
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; len];
                    dequantize(isa, dtype, &bytes, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{dtype} at {:?}, seed {seed}, value {i}: {g} vs {w}",
                            isa.level()
                        );
                    }
                }
            }
        }
    }

    /// Any bytes at all (NaN and infinite halves included) dequantize as the reference does.
    #[test]
    fn arbitrary_bytes_dequantize_as_the_reference_does() {
        use crate::quant::DType;
        for dtype in DType::ALL {
            let n = 256 * 3;
            let bytes: Vec<u8> = (0..dtype.bytes_for(n).unwrap())
                .map(|i| (i * 37 + 11) as u8)
                .collect();
            let mut want = vec![0.0f32; n];
            quant::dequantize(dtype, &bytes, &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; n];
                dequantize(isa, dtype, &bytes, &mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{dtype} at {isa:?}");
            }
        }
    }
}
