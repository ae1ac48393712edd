//! `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` and `Q8_0` weights regrouped sixteen rows at a time, so that one vector
//! of sixteen lanes holds one value position of sixteen weight rows: a weight is read as one
//! stream, and a lane's result is a whole output (no horizontal sums). The same bytes as the
//! file, rearranged (ggml's repacked `Q4_0x8` does the same for eight rows); rows past `n`
//! in the last group are zero.
//!
//! For a group of 16 rows and one block column, a **record** holds the 16 rows' `d` (halves,
//! row `r` at bytes `2r .. 2r + 2`), for `Q4_1`/`Q5_1` then the 16 rows' `m`, for
//! `Q5_0`/`Q5_1` then 64 bytes of fifth bits (`qh`), then the quants, each part in one of two
//! layouts:
//! - [`Layout::Values`] (exact mode): one 16-byte chunk per value position, byte `r` of a
//!   chunk row `r`'s. 4- and 5-bit formats: 16 chunks, chunk `j` holding each row's `qs[j]`
//!   (low nibble value `j`, high nibble value `j + 16`, the block's own order); `Q8_0`: 32
//!   chunks, chunk `v` each row's `qs[v]` as stored (`i8`). One `vpmovzxbd`/`vpmovsxbd`
//!   makes sixteen lanes of one value position. The fifth bits are 32 little-endian `u16`
//!   masks, mask `v` holding value `v`'s bit of row `r` in bit `r`: one mask register adds
//!   16 to the lanes that have it.
//! - [`Layout::Dots`] (fast mode): chunks of 64 bytes, chunk `c` holding four consecutive
//!   quant bytes of each row, row `r` at bytes `4r .. 4r + 4`. 4- and 5-bit formats: 4 chunks
//!   of `qs[4c .. 4c + 4]` (low nibbles values `4c ..`, high nibbles `16 + 4c ..`); `Q8_0`: 8
//!   chunks of `qs[4c .. 4c + 4]`, each stored as `q + 128` (unsigned). One 32-bit lane is
//!   the operand of one `vpdpbusd` step for its row. The fifth bits are 16 little-endian
//!   `u32` lanes, row `r`'s at bytes `4r .. 4r + 4`, arranged to meet the quant lanes: byte
//!   `t`, bit `c` holds value `4c + t`'s bit and bit `4 + c` value `16 + 4c + t`'s, so that
//!   chunk `c`'s fifth bits are the lane shifted left by `4 - c` (low nibbles) or right by
//!   `c` (high nibbles), masked to bit 4 of each byte.

use crate::arena::{Arena, Chunk};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, DType, f16_to_f32};

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
    matches!(
        dtype,
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0
    )
}

/// A weight `W (n, k)` of blocks of one of the [`repackable`] formats, repacked (see the
/// module docs).
#[derive(Clone, Debug)]
pub struct RepackedWeight {
    pub(super) dtype: DType,
    pub(super) layout: Layout,
    pub(super) n: usize,
    pub(super) k: usize,
    /// Records, group-major: record `(g, b)` at `(g * k / 32 + b) * record_bytes`.
    data: Chunk,
}

/// One record: the 16 rows' scales and mins (halves), fifth bits and quants.
pub(super) struct Record<'a> {
    pub d: &'a [u8],
    pub m: Option<&'a [u8]>,
    pub qh: Option<&'a [u8]>,
    pub qs: &'a [u8],
}

/// Bytes of one record (16 rows × one block) of `dtype`.
fn record_bytes(dtype: DType) -> usize {
    GROUP * dtype.block_bytes()
}

/// Whether `dtype`'s blocks carry a min `m`.
fn has_mins(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q5_1)
}

/// Whether `dtype`'s values have a fifth bit.
fn has_fifth_bits(dtype: DType) -> bool {
    matches!(dtype, DType::Q5_0 | DType::Q5_1)
}

/// Offsets of the fifth bits and of the quants in a record of `dtype`.
fn parts_at(dtype: DType) -> (usize, usize) {
    let qh = if has_mins(dtype) { 64 } else { 32 };
    (qh, if has_fifth_bits(dtype) { qh + 64 } else { qh })
}

/// Where value `v`'s fifth bit of row `r` goes in a record's 64 bytes of fifth bits: the
/// byte and the bit (see the module docs).
fn fifth_bit_at(layout: Layout, r: usize, v: usize) -> (usize, u8) {
    match layout {
        Layout::Values => (2 * v + r / 8, (r % 8) as u8),
        Layout::Dots => {
            let (c, t, high) = (v % 16 / 4, v % 4, v >= 16);
            (4 * r + t, (c + if high { 4 } else { 0 }) as u8)
        }
    }
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
        let (row_bytes, (h0, q0)) = (blocks * dtype.block_bytes(), parts_at(dtype));
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
                    DType::Q5_0 | DType::Q5_1 => {
                        let (d, m, qh, qs) = if dtype == DType::Q5_0 {
                            let blk: &BlockQ5_0 = bytemuck::from_bytes(blk);
                            (blk.d, None, blk.qh, &blk.qs)
                        } else {
                            let blk: &BlockQ5_1 = bytemuck::from_bytes(blk);
                            (blk.d, Some(blk.m), blk.qh, &blk.qs)
                        };
                        out[2 * r..2 * r + 2].copy_from_slice(&d);
                        if let Some(m) = m {
                            out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&m);
                        }
                        let qh = u32::from_le_bytes(qh);
                        for v in 0..32 {
                            let (at, bit) = fifth_bit_at(layout, r, v);
                            out[h0 + at] |= (((qh >> v) & 1) as u8) << bit;
                        }
                        qs
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
        let (h0, q0) = parts_at(self.dtype);
        Record {
            d: &r[..32],
            m: has_mins(self.dtype).then(|| &r[32..64]),
            qh: has_fifth_bits(self.dtype).then(|| &r[h0..q0]),
            qs: &r[q0..],
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
            // Value `v`'s fifth bit, as 16 or 0.
            let fifth = |v: usize| match rec.qh {
                Some(qh) => {
                    let (at, bit) = fifth_bit_at(self.layout, r, v);
                    ((qh[at] >> bit) & 1) << 4
                }
                None => 0,
            };
            match self.dtype {
                DType::Q4_0 | DType::Q5_0 => {
                    let offset = if self.dtype == DType::Q4_0 { 8 } else { 16 };
                    for i in 0..16 {
                        let q = byte(i);
                        y[i] = (((q & 0xf) | fifth(i)) as i32 - offset) as f32 * d;
                        y[i + 16] = (((q >> 4) | fifth(i + 16)) as i32 - offset) as f32 * d;
                    }
                }
                DType::Q4_1 | DType::Q5_1 => {
                    let m = rec.m.map_or(0.0, |m| f16_to_f32([m[2 * r], m[2 * r + 1]]));
                    for i in 0..16 {
                        let q = byte(i);
                        y[i] = ((q & 0xf) | fifth(i)) as f32 * d + m;
                        y[i + 16] = ((q >> 4) | fifth(i + 16)) as f32 * d + m;
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
        for dtype in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q8_0,
        ] {
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
