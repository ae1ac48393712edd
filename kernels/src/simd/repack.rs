//! Weights of every block format (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `Q4_K`, `Q5_K`,
//! `Q6_K`) regrouped sixteen rows at a time, so that one vector of sixteen lanes holds one
//! value position of sixteen weight rows: a weight is read as one stream, and a lane's
//! result is a whole output (no horizontal sums). The same number of bytes as the file
//! (ggml's repacked `Q4_0x8` does the same for eight rows); rows past `n` in the last group
//! are zero.
//!
//! For a group of 16 rows and one block column (32 values; 256 for the K-quants), a
//! **record** holds, in order:
//! 1. the 16 rows' `d` (halves, row `r` at bytes `2r .. 2r + 2`);
//! 2. `Q4_1`/`Q5_1`: the 16 rows' `m`; `Q4_K`/`Q5_K`: their `dmin`;
//! 3. `Q5_0`/`Q5_1`: 64 bytes of fifth bits (below);
//! 4. K-quants: the sub-block scales as chunks of 16 bytes, chunk `t` holding each row's
//!    `scales[t]` (byte `r` row `r`'s): `Q4_K`/`Q5_K` their 12 bytes of packed 6-bit scales
//!    and mins, `Q6_K` its 16 signed scales;
//! 5. the quants: the block's quant bytes as one stream (`qs`; `Q5_K` its `qs` then its
//!    `qh`; `Q6_K` its `ql` then its `qh`), in one of two layouts.
//!
//! [`Layout::Values`] (exact mode): one 16-byte chunk per quant byte, byte `r` of a chunk row
//! `r`'s. One `vpmovzxbd`/`vpmovsxbd` makes sixteen lanes of one value position.
//! - 4- and 5-bit formats: 16 chunks, chunk `j` each row's `qs[j]` (low nibble value `j`,
//!   high nibble value `j + 16`, the block's own order). `Q5_0`/`Q5_1`'s fifth bits are 32
//!   little-endian `u16` masks, mask `v` holding value `v`'s bit of row `r` in bit `r`: one
//!   mask register adds 16 to the lanes that have it.
//! - `Q8_0`: 32 chunks, chunk `v` each row's `qs[v]` as stored (`i8`).
//! - `Q4_K`: 128 chunks, chunk `p` each row's `qs[p]` (low nibble value `64 (p / 32) + p %
//!   32`, high nibble 32 values on).
//! - `Q5_K`: the same chunks, each pair of sub-blocks' 32 led by the pair's 64 fifth-bit
//!   masks (as `Q5_0`'s, see [`k5_mask_at`], [`values_chunk`]).
//! - `Q6_K`: 192 chunks, three per half `h` and position `l` side by side: `ql[64h + l]`,
//!   `ql[64h + 32 + l]`, `qh[32h + l]`.
//!
//! Each record is laid out to be read front to back: a record read as two or three streams
//! a few hundred bytes apart stalled on its loads (`Q6_K` decoded at 5.4 GB/s that way,
//! 12.6 as one stream).
//!
//! [`Layout::Dots`] (fast mode): chunks of 64 bytes, each holding four consecutive quant
//! bytes of each row (row `r` at bytes `4r .. 4r + 4`): one 32-bit lane is the operand of one
//! `vpdpbusd` step for its row. Chunk `c` holds quant bytes `4c .. 4c + 4` (see
//! [`dots_chunk`] for the two exceptions):
//! - 4- and 5-bit formats: 4 chunks (low nibbles values `4c ..`, high nibbles `16 + 4c ..`).
//!   `Q5_0`/`Q5_1`'s fifth bits are 16 little-endian `u32` lanes, row `r`'s at bytes
//!   `4r .. 4r + 4`, arranged to meet the quant lanes: byte `t`, bit `c` holds value
//!   `4c + t`'s bit and bit `4 + c` value `16 + 4c + t`'s, so that chunk `c`'s fifth bits
//!   are the lane shifted left by `4 - c` (low nibbles) or right by `c` (high nibbles),
//!   masked to bit 4 of each byte.
//! - `Q8_0`: 8 chunks, each byte stored as `q + 128` (unsigned).
//! - `Q4_K`: 32 chunks of `qs`; `Q5_K` 8 more of its `qh`, the first pair's `qs` chunks
//!   alternating with them.
//! - `Q6_K`: 48 chunks, in triples `ql[64h + 4c' ..]`, `ql[64h + 32 + 4c' ..]`,
//!   `qh[32h + 4c' ..]`.

use super::v16::V16;
use crate::arena::{Arena, Chunk};
use crate::quant::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, DType,
    f16_to_f32, scale_min_k4,
};

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
        DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::Q4K
            | DType::Q5K
            | DType::Q6K
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
    /// Records, group-major: record `(g, b)` at `(g * blocks + b) * record_bytes`, `blocks`
    /// the blocks of a row.
    data: Chunk,
    /// Where a record's parts lie, computed once: [`record`](Self::record) runs once per
    /// record and activation-row block, and a division or a match there cost fast-mode
    /// prefill a fifth of its speed.
    shape: RecordShape,
}

/// A record's geometry for one format (see the module docs).
#[derive(Clone, Copy, Debug)]
struct RecordShape {
    /// Blocks of a row, and bytes of a record.
    blocks: usize,
    bytes: usize,
    has_min: bool,
    /// Parts 3 (fifth bits) and 4 (sub-block scales), if the format has them, and where
    /// the quants start.
    qh: Option<(usize, usize)>,
    scales: Option<(usize, usize)>,
    qs: usize,
}

impl RecordShape {
    fn new(dtype: DType, k: usize) -> RecordShape {
        let [h0, s0, q0] = parts_at(dtype);
        RecordShape {
            blocks: k / dtype.block_len(),
            bytes: record_bytes(dtype),
            has_min: dtype.has_min(),
            qh: has_fifth_bits(dtype).then_some((h0, s0)),
            scales: (scale_bytes(dtype) > 0).then_some((s0, q0)),
            qs: q0,
        }
    }
}

/// One record: the 16 rows' scales and mins (halves), fifth bits, packed sub-block scales
/// and quants.
pub(super) struct Record<'a> {
    pub d: &'a [u8],
    pub m: Option<&'a [u8]>,
    pub qh: Option<&'a [u8]>,
    pub scales: Option<&'a [u8]>,
    pub qs: &'a [u8],
}

impl Record<'_> {
    /// `Q4_K`: the 16 rows' `d · scale` and `dmin · min` of sub-block `j` (0..8), each
    /// product computed as the reference dequantizer computes it (see
    /// [`crate::quant::scale_min_k4`] for the packing).
    #[inline(always)]
    pub(super) fn k4_scale_min<V: V16>(&self, d: V, dmin: V, j: usize) -> [V; 2] {
        let s = self.scales.expect("Q4_K/Q5_K scales");
        // SAFETY: 12 chunks of 16 bytes.
        let b = |t: usize| unsafe { V::load_u8(s.as_ptr().add(GROUP * t)) };
        let six = V::u8_splat(63);
        let (sc, m) = if j < 4 {
            (V::u8_and(b(j), six), V::u8_and(b(j + 4), six))
        } else {
            let top = |t: usize| V::u8_shl(V::u8_shr(b(t), 6), 4);
            (
                V::u8_or(V::u8_and(b(j + 4), V::u8_splat(0xf)), top(j - 4)),
                V::u8_or(V::u8_shr(b(j + 4), 4), top(j)),
            )
        };
        [d.mul(V::u8_to_f32(sc)), dmin.mul(V::u8_to_f32(m))]
    }
}

impl Record<'_> {
    /// `Q6_K`: the 16 rows' `d · scales[t]` (`t` in 0..16), as the reference dequantizer
    /// computes it.
    #[inline(always)]
    pub(super) fn k6_scale<V: V16>(&self, d: V, t: usize) -> V {
        let s = self.scales.expect("Q6_K scales");
        // SAFETY: 16 chunks of 16 bytes.
        d.mul(V::i8_to_f32(unsafe {
            V::load_u8(s.as_ptr().add(GROUP * t))
        }))
    }

    /// `Q6_K` in [`Layout::Values`]: the 16 rows' values `q - 32` at position `128 h + 32 r
    /// + l` (half `h`, quarter `r` in 0..4, `l` in 0..32) as f32: the low (`r < 2`) or high
    /// nibble of `ql[64 h + 32 (r % 2) + l]`, bits `2r, 2r + 1` of `qh[32 h + l]` above it
    /// (see `quant::q6_k`; the chunks as [`values_chunk`] places them).
    #[inline(always)]
    pub(super) fn k6_value<V: V16>(&self, h: usize, r: usize, l: usize) -> V {
        let t = 32 * h + l;
        // SAFETY: 192 chunks of 16 bytes.
        let (lo, hi) = unsafe {
            (
                V::load_u8(self.qs.as_ptr().add(GROUP * (3 * t + r % 2))),
                V::load_u8(self.qs.as_ptr().add(GROUP * (3 * t + 2))),
            )
        };
        let lo = if r < 2 {
            V::low_nibbles(lo)
        } else {
            V::high_nibbles(lo)
        };
        // Bits 2r, 2r + 1 of qh into bits 4, 5.
        let hi = match r {
            0 => V::u8_shl(hi, 4),
            1 => V::u8_shl(hi, 2),
            2 => hi,
            _ => V::u8_shr(hi, 2),
        };
        let q = V::u8_or(lo, V::u8_and(hi, V::u8_splat(0x30)));
        V::i8_to_f32(V::u8_sub(q, V::u8_splat(32)))
    }
}

/// Bytes of one record (16 rows × one block) of `dtype`.
fn record_bytes(dtype: DType) -> usize {
    GROUP * dtype.block_bytes()
}

/// Whether a record of `dtype` has part 3, `Q5_0`/`Q5_1`'s 64 bytes of fifth bits
/// (`Q5_K`'s live among its quants).
fn has_fifth_bits(dtype: DType) -> bool {
    matches!(dtype, DType::Q5_0 | DType::Q5_1)
}

/// Bytes of sub-block scales a block of `dtype` holds (`Q4_K`: 6-bit scales and mins
/// packed in 12; `Q6_K`: 16 signed scales).
fn scale_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4K | DType::Q5K => 12,
        DType::Q6K => 16,
        _ => 0,
    }
}

/// Offsets in a record of `dtype`: its fifth bits, sub-block scales and quants.
fn parts_at(dtype: DType) -> [usize; 3] {
    let qh = if dtype.has_min() { 64 } else { 32 };
    let scales = if has_fifth_bits(dtype) { qh + 64 } else { qh };
    [qh, scales, scales + scale_bytes(dtype) * GROUP]
}

/// A block's parts as the file stores them.
struct Parts<'a> {
    d: [u8; 2],
    m: Option<[u8; 2]>,
    qh: Option<[u8; 4]>,
    scales: Option<&'a [u8]>,
    /// The quant bytes: `qs`, then `more` (`Q5_K`, `Q6_K`: their `qh`).
    qs: &'a [u8],
    more: &'a [u8],
}

/// The parts of `blk`, one block of `dtype` (one of [`repackable`]).
fn parts(dtype: DType, blk: &[u8]) -> Parts<'_> {
    let plain = |d, qs| Parts {
        d,
        m: None,
        qh: None,
        scales: None,
        qs,
        more: &[],
    };
    match dtype {
        DType::Q4_0 => {
            let b: &BlockQ4_0 = bytemuck::from_bytes(blk);
            plain(b.d, &b.qs)
        }
        DType::Q4_1 => {
            let b: &BlockQ4_1 = bytemuck::from_bytes(blk);
            Parts {
                m: Some(b.m),
                ..plain(b.d, &b.qs)
            }
        }
        DType::Q5_0 => {
            let b: &BlockQ5_0 = bytemuck::from_bytes(blk);
            Parts {
                qh: Some(b.qh),
                ..plain(b.d, &b.qs)
            }
        }
        DType::Q5_1 => {
            let b: &BlockQ5_1 = bytemuck::from_bytes(blk);
            Parts {
                m: Some(b.m),
                qh: Some(b.qh),
                ..plain(b.d, &b.qs)
            }
        }
        DType::Q4K => {
            let b: &BlockQ4K = bytemuck::from_bytes(blk);
            Parts {
                m: Some(b.dmin),
                scales: Some(&b.scales),
                ..plain(b.d, &b.qs)
            }
        }
        DType::Q5K => {
            let b: &BlockQ5K = bytemuck::from_bytes(blk);
            Parts {
                m: Some(b.dmin),
                scales: Some(&b.scales),
                more: &b.qh,
                ..plain(b.d, &b.qs)
            }
        }
        DType::Q6K => {
            let b: &BlockQ6K = bytemuck::from_bytes(blk);
            Parts {
                scales: Some(bytemuck::cast_slice(&b.scales)),
                more: &b.qh,
                ..plain(b.d, &b.ql)
            }
        }
        _ => {
            let b: &BlockQ8_0 = bytemuck::from_bytes(blk);
            plain(b.d, bytemuck::cast_slice(&b.qs))
        }
    }
}

/// The chunk of a [`Layout::Values`] record that holds quant byte `i` of a block: byte `i`'s
/// own, but for `Q6_K`, whose decode reads `ql[64h + l]`, `ql[64h + 32 + l]` and
/// `qh[32h + l]` together: those three sit side by side as chunks `3t`, `3t + 1` and
/// `3t + 2`, `t = 32h + l`, so that a record is read as one stream; and for `Q5_K`, whose
/// record holds per pair of sub-blocks `p` the pair's 64 fifth-bit masks (8 chunks, see
/// [`k5_mask_at`]) and then its 32 chunks of `qs`.
pub(super) fn values_chunk(dtype: DType, i: usize) -> usize {
    match dtype {
        DType::Q5K => {
            debug_assert!(i < 128, "Q5_K's qh is held as masks");
            40 * (i / 32) + 8 + i % 32
        }
        DType::Q6K if i < 128 => {
            let (h, second, l) = (i / 64, i % 64 / 32, i % 32);
            3 * (32 * h + l) + second
        }
        DType::Q6K => 3 * (i - 128) + 2,
        _ => i,
    }
}

/// `Q5_K` in [`Layout::Values`]: the byte offset in a record's quants of value `v`'s
/// fifth-bit mask (two bytes, bit `r` row `r`'s): the masks of pair `v / 64` lead its
/// chunks (see [`values_chunk`]).
pub(super) fn k5_mask_at(v: usize) -> usize {
    640 * (v / 64) + 2 * (v % 64)
}

/// The chunk of a [`Layout::Dots`] record that holds quant bytes `4c .. 4c + 4` of a block:
/// chunk `c`, but for `Q5_K` (below) and `Q6_K`, whose kernel reads `ql[64h + 4c' ..]`, `ql[64h + 32 + 4c' ..]`
/// and `qh[32h + 4c' ..]` together (`c'` in 0..8): those three sit side by side as chunks
/// `3t`, `3t + 1`, `3t + 2`, `t = 8h + c'`.
pub(super) fn dots_chunk(dtype: DType, c: usize) -> usize {
    match dtype {
        // Q5_K: the first pair's qs chunks alternate with the qh chunks (which every pair
        // reads, from cache after the first).
        DType::Q5K if c < 8 => 2 * c,
        DType::Q5K if c < 32 => c + 8,
        DType::Q5K => 2 * (c - 32) + 1,
        DType::Q6K if c < 32 => {
            let (h, second, c) = (c / 16, c % 16 / 8, c % 8);
            3 * (8 * h + c) + second
        }
        DType::Q6K => 3 * (c - 32) + 2,
        _ => c,
    }
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
    /// Repacks `bytes`, `n` rows of `k` values in blocks of `dtype` (one of [`repackable`]),
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
            || dtype.bytes_for(k).and_then(|r| r.checked_mul(n)) != Some(bytes.len())
        {
            return None;
        }
        let (blocks, rec, bb) = (
            k / dtype.block_len(),
            record_bytes(dtype),
            dtype.block_bytes(),
        );
        let mut data = arena.alloc(n.div_ceil(GROUP) * blocks * rec);
        let (row_bytes, [h0, s0, q0]) = (blocks * bb, parts_at(dtype));
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
                let p = parts(dtype, &row[b * bb..][..bb]);
                out[2 * r..2 * r + 2].copy_from_slice(&p.d);
                if let Some(m) = p.m {
                    out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&m);
                }
                if let Some(qh) = p.qh {
                    let qh = u32::from_le_bytes(qh);
                    for v in 0..32 {
                        let (at, bit) = fifth_bit_at(layout, r, v);
                        out[h0 + at] |= (((qh >> v) & 1) as u8) << bit;
                    }
                }
                if let Some(scales) = p.scales {
                    for (t, &s) in scales.iter().enumerate() {
                        out[s0 + GROUP * t + r] = s;
                    }
                }
                let out = &mut out[q0..];
                for (i, &q) in p.qs.iter().chain(p.more).enumerate() {
                    match layout {
                        Layout::Values if dtype == DType::Q5K && i >= 128 => {
                            // qh[l] bit j: value 32 j + l's fifth bit, as a mask bit.
                            let l = i - 128;
                            for j in 0..8 {
                                let at = k5_mask_at(32 * j + l) + r / 8;
                                out[at] |= (q >> j & 1) << (r % 8);
                            }
                        }
                        Layout::Values => out[GROUP * values_chunk(dtype, i) + r] = q,
                        Layout::Dots => {
                            let (c, v) = (dots_chunk(dtype, i / 4), i % 4);
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
            shape: RecordShape::new(dtype, k),
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
    /// Blocks of a row (32 values each; 256 for the K-quants).
    pub(super) fn blocks(&self) -> usize {
        self.shape.blocks
    }
    /// Groups of 16 rows (the last one zero-padded).
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    /// The record of group `g`, block `b`.
    #[inline(always)]
    pub(super) fn record(&self, g: usize, b: usize) -> Record<'_> {
        let s = &self.shape;
        let r = &self.data[(g * s.blocks + b) * s.bytes..][..s.bytes];
        Record {
            d: &r[..32],
            m: s.has_min.then(|| &r[32..64]),
            qh: s.qh.map(|(a, b)| &r[a..b]),
            scales: s.scales.map(|(a, b)| &r[a..b]),
            qs: &r[s.qs..],
        }
    }

    /// Row `j` of the original `W`, dequantized into `out (k,)` exactly as
    /// [`crate::quant::dequantize`] does (embedding lookups).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (g, r) = (j / GROUP, j % GROUP);
        let len = self.dtype.block_len();
        for b in 0..self.blocks() {
            let rec = self.record(g, b);
            let y = &mut out[len * b..len * (b + 1)];
            let d = f16_to_f32([rec.d[2 * r], rec.d[2 * r + 1]]);
            // Quant byte `i` of the block as stored.
            let byte = |i: usize| match self.layout {
                Layout::Values => rec.qs[GROUP * values_chunk(self.dtype, i) + r],
                Layout::Dots => {
                    let q = rec.qs[64 * dots_chunk(self.dtype, i / 4) + 4 * r + i % 4];
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
                DType::Q6K => {
                    let s = rec.scales.expect("Q6_K scales");
                    // The row's block as the file stores it: ql then qh, and the scales.
                    let q: [u8; 192] = std::array::from_fn(&byte);
                    let (ql, qh) = q.split_at(128);
                    for h in 0..2 {
                        for l in 0..32 {
                            for qr in 0..4 {
                                let low = ql[64 * h + 32 * (qr % 2) + l] >> (4 * (qr / 2)) & 0xf;
                                let high = (qh[32 * h + l] >> (2 * qr)) & 3;
                                let sc = s[GROUP * (8 * h + 2 * qr + l / 16) + r] as i8;
                                let q = (low | high << 4) as i32 - 32;
                                y[128 * h + 32 * qr + l] = d * sc as f32 * q as f32;
                            }
                        }
                    }
                }
                DType::Q4K | DType::Q5K => {
                    let (m, s) = (rec.m.expect("dmin"), rec.scales.expect("scales"));
                    let dmin = f16_to_f32([m[2 * r], m[2 * r + 1]]);
                    let scales: [u8; 12] = std::array::from_fn(|t| s[GROUP * t + r]);
                    // Q5_K: the fifth bit of value l of sub-block j: bit j of qh[l] (the
                    // stream's byte 128 + l), or in exact mode's records bit r of mask
                    // 32 j + l.
                    let fifth_k = |j: usize, l: usize| match (self.dtype, self.layout) {
                        (DType::Q5K, Layout::Dots) => (byte(128 + l) >> j & 1) << 4,
                        (DType::Q5K, Layout::Values) => {
                            (rec.qs[k5_mask_at(32 * j + l) + r / 8] >> (r % 8) & 1) << 4
                        }
                        _ => 0,
                    };
                    for i in 0..4 {
                        let (s0, m0) = scale_min_k4(2 * i, &scales);
                        let (s1, m1) = scale_min_k4(2 * i + 1, &scales);
                        let (d0, min0) = (d * s0 as f32, dmin * m0 as f32);
                        let (d1, min1) = (d * s1 as f32, dmin * m1 as f32);
                        for l in 0..32 {
                            let q = byte(32 * i + l);
                            let (lo, hi) = (
                                (q & 0xf) | fifth_k(2 * i, l),
                                (q >> 4) | fifth_k(2 * i + 1, l),
                            );
                            y[64 * i + l] = d0 * lo as f32 - min0;
                            y[64 * i + 32 + l] = d1 * hi as f32 - min1;
                        }
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
        let n = 37;
        for dtype in DType::ALL.into_iter().filter(|&d| repackable(d)) {
            let k = 3 * dtype.block_len();
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
                DType::BF16,
                Layout::Values,
                1,
                256,
                &[0; 512],
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
