//! `Q4_0`, `Q4_1` and `Q8_0` weights regrouped sixteen rows at a time, so that one vector
//! of sixteen lanes holds one value position of sixteen weight rows: a weight is read as one
//! stream, and a lane's result is a whole output (no horizontal sums). The same bytes as the
//! file, rearranged (ggml's repacked `Q4_0x8` does the same for eight rows); rows past `n`
//! in the last group are zero.
//!
//! For a group of 16 rows and one block column, a **record** holds the 16 rows' `d` (halves,
//! row `r` at bytes `2r .. 2r + 2`), for `Q4_1` then the 16 rows' `m`, then the quants in
//! one of two layouts:
//! - [`Layout::Values`] (exact mode): one 16-byte chunk per value position, byte `r` of a
//!   chunk row `r`'s. `Q4_0`/`Q4_1`: 16 chunks, chunk `j` holding each row's `qs[j]` (low
//!   nibble value `j`, high nibble value `j + 16`, the block's own order); `Q8_0`: 32
//!   chunks, chunk `v` each row's `qs[v]` as stored (`i8`). One `vpmovzxbd`/`vpmovsxbd`
//!   makes sixteen lanes of one value position.
//! - [`Layout::Dots`] (fast mode): chunks of 64 bytes, chunk `c` holding four consecutive
//!   quant bytes of each row, row `r` at bytes `4r .. 4r + 4`. `Q4_0`/`Q4_1`: 4 chunks of
//!   `qs[4c .. 4c + 4]` (low nibbles values `4c ..`, high nibbles `16 + 4c ..`); `Q8_0`: 8
//!   chunks of `qs[4c .. 4c + 4]`, each stored as `q + 128` (unsigned). One 32-bit lane is
//!   the operand of one `vpdpbusd` step for its row.

use crate::arena::{Arena, Chunk};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, DType, f16_to_f32};

/// Weight rows per group.
pub const GROUP: usize = 16;

/// Source bytes per call of [`RepackedWeight::new`]'s `done`.
const RELEASE_BYTES: usize = 1 << 20;

/// How a record's quants are arranged (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A 16-byte chunk per value position: exact mode's f32 kernels.
    Values,
    /// Four values of a row per 32-bit lane: fast mode's integer dot products.
    Dots,
}

/// Whether `dtype` can be repacked.
pub fn repackable(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
}

/// A weight `W (n, k)` of `Q4_0`, `Q4_1` or `Q8_0` blocks, repacked (see the module docs).
#[derive(Clone, Debug)]
pub struct RepackedWeight {
    pub(super) dtype: DType,
    pub(super) layout: Layout,
    pub(super) n: usize,
    pub(super) k: usize,
    /// Records, group-major: record `(g, b)` at `(g * k / 32 + b) * record_bytes`.
    data: Chunk,
}

/// One record: the 16 rows' scales and mins (halves) and their quants.
pub(super) struct Record<'a> {
    pub d: &'a [u8],
    pub m: Option<&'a [u8]>,
    pub qs: &'a [u8],
}

/// Bytes of one record (16 rows × one block) of `dtype`.
fn record_bytes(dtype: DType) -> usize {
    GROUP * dtype.block_bytes()
}

/// Offset of the quants in a record.
fn quants_at(dtype: DType) -> usize {
    if dtype == DType::Q4_1 { 64 } else { 32 }
}

impl RepackedWeight {
    /// Repacks `bytes`, `n` rows of `k / 32` blocks of `dtype` (one of [`repackable`]),
    /// into `layout`, in memory from `arena`. `None` if the format or the shapes do not fit.
    /// `done` is called with each run of `bytes` once it has been copied (about 1 MiB at a
    /// time, in order), so that a caller can let go of the source as the copy grows.
    pub fn new(
        arena: &Arena,
        dtype: DType,
        layout: Layout,
        n: usize,
        k: usize,
        bytes: &[u8],
        mut done: impl FnMut(&[u8]),
    ) -> Option<RepackedWeight> {
        if !repackable(dtype)
            || n == 0
            || k == 0
            || !k.is_multiple_of(32)
            || dtype.bytes_for(k).and_then(|r| r.checked_mul(n)) != Some(bytes.len())
        {
            return None;
        }
        let (blocks, rec) = (k / 32, record_bytes(dtype));
        let mut data = arena.alloc(n.div_ceil(GROUP) * blocks * rec);
        let (row_bytes, q0) = (blocks * dtype.block_bytes(), quants_at(dtype));
        // Rows per call of `done`: about 1 MiB of source.
        let run = (RELEASE_BYTES / row_bytes).max(1);
        for j in 0..n {
            if j > 0 && j % run == 0 {
                done(&bytes[(j - run) * row_bytes..j * row_bytes]);
            }
            let (g, r) = (j / GROUP, j % GROUP);
            let row = &bytes[j * row_bytes..][..row_bytes];
            for b in 0..blocks {
                let out = &mut data[(g * blocks + b) * rec..][..rec];
                let blk = &row[b * dtype.block_bytes()..][..dtype.block_bytes()];
                // Scales, mins, and the quant bytes as the block stores them.
                let qs: &[u8] = match dtype {
                    DType::Q4_0 => {
                        let blk: &BlockQ4_0 = bytemuck::from_bytes(blk);
                        out[2 * r..2 * r + 2].copy_from_slice(&blk.d);
                        &blk.qs
                    }
                    DType::Q4_1 => {
                        let blk: &BlockQ4_1 = bytemuck::from_bytes(blk);
                        out[2 * r..2 * r + 2].copy_from_slice(&blk.d);
                        out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk.m);
                        &blk.qs
                    }
                    _ => {
                        let blk: &BlockQ8_0 = bytemuck::from_bytes(blk);
                        out[2 * r..2 * r + 2].copy_from_slice(&blk.d);
                        bytemuck::cast_slice(&blk.qs)
                    }
                };
                let out = &mut out[q0..];
                for (i, &q) in qs.iter().enumerate() {
                    match layout {
                        Layout::Values => out[GROUP * i + r] = q,
                        Layout::Dots => {
                            let (c, v) = (i / 4, i % 4);
                            let q = if dtype == DType::Q8_0 { q ^ 0x80 } else { q };
                            out[64 * c + 4 * r + v] = q;
                        }
                    }
                }
            }
        }
        done(&bytes[(n - 1) / run * run * row_bytes..]);
        Some(RepackedWeight {
            dtype,
            layout,
            n,
            k,
            data,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// `n`: rows of `W`.
    pub fn rows(&self) -> usize {
        self.n
    }
    /// `k`: columns of `W`.
    pub fn cols(&self) -> usize {
        self.k
    }
    /// Groups of 16 rows (the last one zero-padded).
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// The record of group `g`, block `b`.
    #[inline(always)]
    pub(super) fn record(&self, g: usize, b: usize) -> Record<'_> {
        let rec = record_bytes(self.dtype);
        let r = &self.data[(g * (self.k / 32) + b) * rec..][..rec];
        match self.dtype {
            DType::Q4_1 => Record {
                d: &r[..32],
                m: Some(&r[32..64]),
                qs: &r[64..],
            },
            _ => Record {
                d: &r[..32],
                m: None,
                qs: &r[32..],
            },
        }
    }

    /// Row `j` of the original `W`, dequantized into `out (k,)` exactly as
    /// [`crate::quant::dequantize`] does (embedding lookups).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (g, r) = (j / GROUP, j % GROUP);
        for b in 0..self.k / 32 {
            let rec = self.record(g, b);
            let y = &mut out[32 * b..32 * b + 32];
            let d = f16_to_f32([rec.d[2 * r], rec.d[2 * r + 1]]);
            // Quant byte `i` of the block as stored.
            let byte = |i: usize| match self.layout {
                Layout::Values => rec.qs[GROUP * i + r],
                Layout::Dots => {
                    let q = rec.qs[64 * (i / 4) + 4 * r + i % 4];
                    if self.dtype == DType::Q8_0 {
                        q ^ 0x80
                    } else {
                        q
                    }
                }
            };
            match self.dtype {
                DType::Q4_0 => {
                    for i in 0..16 {
                        let q = byte(i);
                        y[i] = ((q & 0xf) as i32 - 8) as f32 * d;
                        y[i + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                    }
                }
                DType::Q4_1 => {
                    let m = rec.m.map_or(0.0, |m| f16_to_f32([m[2 * r], m[2 * r + 1]]));
                    for i in 0..16 {
                        let q = byte(i);
                        y[i] = (q & 0xf) as f32 * d + m;
                        y[i + 16] = (q >> 4) as f32 * d + m;
                    }
                }
                _ => {
                    for (i, v) in y.iter_mut().enumerate() {
                        *v = byte(i) as i8 as f32 * d;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;

    /// Both layouts keep every value of every format, on a row count that leaves the last
    /// group partial.
    #[test]
    fn repacking_keeps_every_value_in_both_layouts() {
        let (n, k) = (37, 96);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let bytes = quant::sample_blocks(dtype, n * k, 3).unwrap();
            let mut want = vec![0.0f32; n * k];
            quant::dequantize(dtype, &bytes, &mut want);
            for layout in [Layout::Values, Layout::Dots] {
                let w = RepackedWeight::new(&Arena::new(), dtype, layout, n, k, &bytes, |_| {})
                    .unwrap();
                let mut row = vec![0.0f32; k];
                for j in 0..n {
                    w.dequantize_row(j, &mut row);
                    let same = row
                        .iter()
                        .zip(&want[j * k..])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype} {layout:?} row {j}");
                }
            }
        }
        // Other formats, and bytes that are not n rows of k, are refused.
        assert!(
            RepackedWeight::new(
                &Arena::new(),
                DType::Q4K,
                Layout::Values,
                1,
                256,
                &[0; 144],
                |_| {}
            )
            .is_none()
        );
        assert!(
            RepackedWeight::new(
                &Arena::new(),
                DType::Q8_0,
                Layout::Values,
                2,
                32,
                &[0; 34],
                |_| {}
            )
            .is_none()
        );
    }

    /// `done` hands back the source in order, in runs of whole rows that tile it exactly:
    /// 1.4 MB of Q8_0 rows in two runs.
    #[test]
    fn the_source_is_handed_back_in_order_as_it_is_copied() {
        let (n, k) = (40_000, 32);
        let bytes = quant::sample_blocks(DType::Q8_0, n * k, 7).unwrap();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let base = bytes.as_ptr() as usize;
        RepackedWeight::new(
            &Arena::new(),
            DType::Q8_0,
            Layout::Values,
            n,
            k,
            &bytes,
            |p| runs.push((p.as_ptr() as usize - base, p.len())),
        )
        .unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        let mut at = 0;
        for &(start, len) in &runs {
            assert_eq!(start, at);
            assert!(len.is_multiple_of(34));
            at += len;
        }
        assert_eq!(at, bytes.len());
    }
}
