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
//! [`Layout::Values`] (exact mode): sixteen lanes of one value position from one or two
//! vectors, in a few instructions.
//! - `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`: the quants as [`Layout::Dots`] holds them, 4 chunks of
//!   64 bytes, chunk `c` each row's `qs[4c .. 4c + 4]` as one 32-bit lane (row `r` at bytes
//!   `4r .. 4r + 4`): nibble `2t` of a lane is value `4c + t`, nibble `2t + 1` value
//!   `16 + 4c + t`. One shift brings a nibble to the bottom of every lane and one `vpermps`
//!   reads it through a 16-entry table. With one 16-byte chunk per quant byte (as the
//!   K-quants below), each chunk took a `vpmovzxbd` as well, on the port the permutes use:
//!   `Q4_1` decoded from L2 at 14.9 GB/s on one thread of an Intel Xeon (family 6 model 207)
//!   against 17.0 in lanes. `Q4_K` in lanes measured no faster (12.8 either way), so the
//!   K-quants keep their chunks.
//!   `Q5_0`/`Q5_1`'s fifth bits are 32 little-endian `u16` masks, mask `v` holding value
//!   `v`'s bit of row `r` in bit `r`: one mask register adds 16 to the lanes that have it.
//! - `Q6_K`: its `ql` in lanes as the 4-bit formats', 32 chunks of 64 bytes, chunk `c` each
//!   row's `ql[4c .. 4c + 4]` (which values those are: [`k6_place`]); its `qh` in lanes
//!   too, one lane per row for the two bits above each of a pair of chunks' 16 nibbles,
//!   leading the pair ([`K6_PAIR`], [`k6_top`]). On AVX-512 a value position is two shifts
//!   and two `vpermps` (one shift serves two values' top bits), an add and the FMA: 11.1-11.5
//!   GB/s from L2 on one thread of an Intel Xeon (family 6 model 207), against 8.3-8.6 for
//!   16-byte chunks of `ql`, `ql` and `qh` side by side (seven byte operations and a
//!   `vpmovsxbd` per value position), and 10.0 with the top bits as masks, as `Q5_0`'s
//!   fifth bits (a `kmovw` from memory takes port 5 there, beside the permutes). AVX2 joins
//!   nibbles and top bits as bytes, a chunk at a time (8.1 against 7.7).
//! - The other formats: one 16-byte chunk per quant byte, byte `r` of a chunk row `r`'s. One
//!   `vpmovzxbd`/`vpmovsxbd` makes sixteen lanes of one value position.
//! - `Q8_0`: 32 chunks, chunk `v` each row's `qs[v]` as stored (`i8`).
//! - `Q4_K`: 128 chunks, chunk `p` each row's `qs[p]` (low nibble value `64 (p / 32) + p %
//!   32`, high nibble 32 values on).
//! - `Q5_K`: the same chunks, each pair of sub-blocks' 32 led by the pair's 64 fifth-bit
//!   masks (as `Q5_0`'s, see [`k5_mask_at`], [`values_chunk`]).
//!
//! Each record is laid out to be read front to back: a record read as two or three streams
//! a few hundred bytes apart stalled on its loads (`Q6_K`'s old chunks decoded at 5.4 GB/s
//! that way on an AMD Zen 4, 12.6 as one stream).
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

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m128i;
use std::sync::Mutex;

use super::qmatmul::BlockWeight;
use super::v16::V16;
use crate::arena::{Arena, Chunk};
use crate::quant::{
    self, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    DType,
};
use crate::team::Team;

/// Weight rows per group.
pub const GROUP: usize = 16;

/// How far ahead of the record being read [`RepackedWeight::prefetch`] asks for bytes. On
/// an Intel Xeon (family 6 model 207), default model, `chord bench model --tg 128`,
/// alternating runs: 2 KiB and 4 KiB both beat none (exact decode on one thread 68-82
/// tokens/s without, 93-142 with), 4 KiB by a little; 1 KiB gained less, 8 KiB no more.
const PREFETCH_AHEAD: usize = 4096;

/// Whether decode kernels prefetch their weight stream ([`RepackedWeight::prefetch`]):
/// `CHORD_PREFETCH=1` or `0` forces it; otherwise it is on where it was measured to pay:
/// - Intel CPUs, whose hardware prefetchers fell behind the decode kernels' single stream
///   (they read 33% of the read roof on one thread);
/// - AMD from Zen 5 on (family 26): `chord bench model --pp 0 --tg 64`, 3 alternating
///   rounds, 2 threads, exact mode, tokens/s without → with: Gemma 3 270M 120-122 → 139-180
///   (its K-quants' long records starve the hardware prefetchers: Q6_K decode streamed at
///   6 GB/s on one thread without, 12 with), Q4_0 350-439 → 435-515, Q8_0 205-268 →
///   260-280, Q4_1 250-362 → 343-398.
///
/// Off on AMD before Zen 5. On Zen 4 (family 25 model 17) it cost: the same runs, medians
/// without → with, one thread: Q4_1 194 → 167, Q8_0 145 → 137, Gemma 3 72 → 64; two
/// threads: Q8_0 207 → 186, Gemma 3 108 → 95, only Q4_1 262 → 269. Earlier Zen and other
/// vendors are unmeasured.
pub fn prefetching() -> bool {
    static ON: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| match std::env::var("CHORD_PREFETCH").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => match cpu_vendor_family() {
                Some((Vendor::Intel, _)) => true,
                Some((Vendor::Amd, family)) => family >= 0x1a,
                None => false,
            },
        });
    *ON
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Vendor {
    Intel,
    Amd,
}

/// The CPU's vendor (CPUID leaf 0) and family (leaf 1: the base family, plus the extended
/// family when the base is 15), for the two vendors that decide a default here.
fn cpu_vendor_family() -> Option<(Vendor, u32)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        let l = __cpuid(0);
        let b = |r: u32| r.to_le_bytes();
        let vendor = match &[b(l.ebx), b(l.edx), b(l.ecx)].concat()[..] {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" => Vendor::Amd,
            _ => return None,
        };
        let eax = __cpuid(1).eax;
        let base = (eax >> 8) & 0xf;
        let family = if base == 0xf {
            base + ((eax >> 20) & 0xff)
        } else {
            base
        };
        Some((vendor, family))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Source bytes per thread per call of [`RepackedWeight::new`]'s `done` (at least one
/// group of 16 rows).
const RELEASE_BYTES: usize = 4 << 20;

/// Tasks per thread per call of `done`, handed out in turn: a worker that wakes late (it
/// parks between weights) still finds some. With one task of 1 MiB a thread, the calling
/// thread of a two-thread team did nearly all of a load's repacking alone on an AMD EPYC
/// (family 25 model 17): `perf` put nearly every sample of the worker in its wait loop.
const TASKS_PER_THREAD: usize = 4;

/// How a record's quants are arranged (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Sixteen rows of a value position from one or two vectors (32-bit lanes for the 4-,
    /// 5- and 6-bit formats, else a 16-byte chunk per value position): exact mode's f32
    /// kernels.
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
    /// Where a record's bytes come from.
    map: ByteMap,
    /// [`prefetching`], read once: a decode kernel reads this field, where a call to the
    /// lazily set flag in its loop would make it save its vector registers around it.
    prefetch: bool,
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

    /// `Q6_K` in [`Layout::Values`]: chunk `c`'s pair's lanes of top bits and the chunk's
    /// lanes of low nibbles (see [`K6_PAIR`]).
    #[inline(always)]
    pub(super) fn k6_chunk<V: V16>(&self, c: usize) -> [V::U32; 2] {
        assert!(c < 32 && self.qs.len() >= 16 * K6_PAIR);
        // SAFETY: c < 32: both 64-byte runs lie inside pair c / 2 of the 16 checked above.
        unsafe {
            [
                V::load_u32(self.qs.as_ptr().add(k6_top_at(c))),
                V::load_u32(self.qs.as_ptr().add(k6_chunk_at(c))),
            ]
        }
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

/// A block's parts as the file stores them, borrowed from it.
struct Parts<'a> {
    d: &'a [u8],
    m: Option<&'a [u8]>,
    /// `Q5_0`/`Q5_1`: the fifth bits, a little-endian `u32` (bit `v` value `v`'s).
    qh: Option<&'a [u8]>,
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
            plain(&b.d, &b.qs)
        }
        DType::Q4_1 => {
            let b: &BlockQ4_1 = bytemuck::from_bytes(blk);
            Parts {
                m: Some(&b.m),
                ..plain(&b.d, &b.qs)
            }
        }
        DType::Q5_0 => {
            let b: &BlockQ5_0 = bytemuck::from_bytes(blk);
            Parts {
                qh: Some(&b.qh),
                ..plain(&b.d, &b.qs)
            }
        }
        DType::Q5_1 => {
            let b: &BlockQ5_1 = bytemuck::from_bytes(blk);
            Parts {
                m: Some(&b.m),
                qh: Some(&b.qh),
                ..plain(&b.d, &b.qs)
            }
        }
        DType::Q4K => {
            let b: &BlockQ4K = bytemuck::from_bytes(blk);
            Parts {
                m: Some(&b.dmin),
                scales: Some(&b.scales),
                ..plain(&b.d, &b.qs)
            }
        }
        DType::Q5K => {
            let b: &BlockQ5K = bytemuck::from_bytes(blk);
            Parts {
                m: Some(&b.dmin),
                scales: Some(&b.scales),
                more: &b.qh,
                ..plain(&b.d, &b.qs)
            }
        }
        DType::Q6K => {
            let b: &BlockQ6K = bytemuck::from_bytes(blk);
            Parts {
                scales: Some(bytemuck::cast_slice(&b.scales)),
                more: &b.qh,
                ..plain(&b.d, &b.ql)
            }
        }
        _ => {
            let b: &BlockQ8_0 = bytemuck::from_bytes(blk);
            plain(&b.d, bytemuck::cast_slice(&b.qs))
        }
    }
}

/// Where each byte of a record comes from, for one format and layout: the module docs'
/// layout as a table, built once per weight from [`parts`] and the chunk functions the
/// kernels read with. Repacking fills a record front to back from fixed offsets into the
/// group's rows, bytes that stay together moved together ([`Runs`]): byte by byte, 2.0-2.3
/// GB/s on one thread (Zen 4), where a loop deciding each byte's place as it went ran at
/// about 0.3, and the same table read through an array of the rows' blocks at 0.9. Reading
/// a row back inverts it.
#[derive(Clone, Debug)]
struct ByteMap {
    /// Record byte `p` is byte `from[p].src` of row `from[p].row`'s block, XOR `flip`; row
    /// [`GROUP`] stands for zeros (fifth-bit bytes, filled from `bits`).
    from: Vec<Source>,
    /// `from` for a group's rows laid end to end, rows of `row_bytes`, as runs of bytes that
    /// move together: record bytes `p .. p + width` of block `b` are bytes `b · block_bytes
    /// + src ..` of the group's bytes (zeros: from byte 0, put right after); a run of width
    /// [`TILE`] is 16 bytes of each of 16 rows, transposed.
    runs: Vec<Runs>,
    /// The bytes the runs must reach from a block's start: `15 · row_bytes + block_bytes`.
    reach: usize,
    /// Record bytes that are zero before the fifth bits go in.
    zeros: Vec<u16>,
    /// `Q8_0` in [`Layout::Dots`]: where the quants start, each stored XOR 0x80.
    flip_from: Option<usize>,
    /// The bits that move alone (`Q5_0`/`Q5_1`'s fifth bits; `Q5_K`'s and `Q6_K`'s `qh` in
    /// [`Layout::Values`]), boxed (`SimdWeight`, an enum, holds a weight and its map).
    bits: Box<BitSpread>,
    row_bytes: usize,
}

/// A map's [`BitMove`]s, as [`ByteMap::gather`] reads them back, and grouped for
/// [`ByteMap::fill`] to write: one at a time, a bit of each of 16 rows took a few
/// nanoseconds, and `Q6_K`'s 8192 a record (its `qh` in lanes) repacked at 0.11 GB/s on one
/// thread (Intel Xeon, family 6 model 207).
#[derive(Clone, Debug, Default)]
struct BitSpread {
    moves: Vec<BitMove>,
    /// Moves into lanes, by source byte and record byte: row `r`'s byte `at + 4r` gains
    /// `table[x]`, `x` the row's byte `src`.
    lanes: Vec<LaneTable>,
    /// Moves into masks, by source byte: `(src, [(src_bit, at)])`, the mask at `at` (two
    /// bytes) gaining bit `src_bit` of each row's byte `src` as its bit `r`.
    masks: Vec<(u8, Vec<(u8, u16)>)>,
    /// `Q6_K` in [`Layout::Values`]: where its `qh` starts in a block and its quants in a
    /// record. Its 512 moves into lanes, as tables, still cost two lookups per `qh` byte
    /// and row (0.9 GB/s); eight bytes at a time they are a few shifts and masks.
    k6: Option<(usize, usize)>,
}

#[derive(Clone, Debug)]
struct LaneTable {
    src: u8,
    at: u16,
    table: Box<[u8; 256]>,
}

impl BitSpread {
    /// `moves`; for `Q6_K` in [`Layout::Values`], [`k6`](Self::k6), which writes them all.
    fn new(moves: Vec<BitMove>, k6: Option<(usize, usize)>) -> BitSpread {
        let mut spread = BitSpread::default();
        if k6.is_some() {
            return BitSpread {
                moves,
                k6,
                ..spread
            };
        }
        for b in &moves {
            if b.lane {
                let i = match spread
                    .lanes
                    .iter()
                    .position(|t| (t.src, t.at) == (b.src, b.at))
                {
                    Some(i) => i,
                    None => {
                        spread.lanes.push(LaneTable {
                            src: b.src,
                            at: b.at,
                            table: Box::new([0; 256]),
                        });
                        spread.lanes.len() - 1
                    }
                };
                for (x, out) in spread.lanes[i].table.iter_mut().enumerate() {
                    *out |= ((x >> b.src_bit & 1) as u8) << b.bit;
                }
            } else {
                match spread.masks.iter_mut().find(|(src, _)| *src == b.src) {
                    Some((_, moves)) => moves.push((b.src_bit, b.at)),
                    None => spread.masks.push((b.src, vec![(b.src_bit, b.at)])),
                }
            }
        }
        BitSpread { moves, ..spread }
    }

    /// ORs the moved bits into `rec`, from 16 rows of `row_bytes` at `blk`.
    #[inline]
    fn fill(&self, blk: &[u8], row_bytes: usize, rec: &mut [u8]) {
        if let Some((src, q0)) = self.k6 {
            for r in 0..GROUP {
                let qh = &blk[r * row_bytes + src..][..64];
                // qh[32h + 8a + 4e + t] holds the top bits of values 32q + 128h + 8a + 4e + t:
                // those with q % 2 = s go to byte t of row r's lane of pair 8h + 4s + a, in
                // its high four bits for e = 0 and its low four for e = 1 (see `k6_top`),
                // the bits of q < 2 below those of q >= 2.
                for (i, x) in qh.chunks_exact(8).enumerate() {
                    let x = u64::from_le_bytes(x.try_into().expect("8 bytes"));
                    let (h, a) = (i / 4, i % 4);
                    for s in 0..2 {
                        let y = x >> (2 * s) & 0x3333_3333_3333_3333;
                        let z = (y | y >> 2) & 0x0f0f_0f0f_0f0f_0f0f;
                        let lane = (z as u32) << 4 | (z >> 32) as u32;
                        let at = q0 + k6_top_at(2 * (8 * h + 4 * s + a)) + 4 * r;
                        rec[at..at + 4].copy_from_slice(&lane.to_le_bytes());
                    }
                }
            }
        }
        for t in &self.lanes {
            for r in 0..GROUP {
                rec[t.at as usize + 4 * r] |= t.table[blk[r * row_bytes + t.src as usize] as usize];
            }
        }
        for (src, moves) in &self.masks {
            let column: [u8; GROUP] = std::array::from_fn(|r| blk[r * row_bytes + *src as usize]);
            let halves = [0, 8].map(|i| u64::from_le_bytes(column[i..i + 8].try_into().unwrap()));
            for &(bit, at) in moves {
                // Bit `bit` of each of eight bytes, gathered into one byte (byte k's as bit
                // k): the products of the isolated bits and the multiplier's bytes 2^(7 - j)
                // meet, without carries, in the top byte.
                let [lo, hi] = halves.map(|h| {
                    ((h >> bit & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56)
                        as u8
                });
                rec[at as usize] |= lo;
                rec[at as usize + 1] |= hi;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Source {
    row: u8,
    src: u8,
    flip: u8,
}

/// Bit `src_bit` of byte `src` of row `r`'s block is, in the record, a mask bit (`lane`
/// false: byte `at + r / 8`, bit `r % 8`) or a bit of row `r`'s 32-bit lane (byte
/// `at + 4 r`, bit `bit`).
#[derive(Clone, Copy, Debug)]
struct BitMove {
    src: u8,
    src_bit: u8,
    at: u16,
    lane: bool,
    bit: u8,
}

impl BitMove {
    /// The record byte and bit of row `r`'s bit.
    #[inline(always)]
    fn place(&self, r: usize) -> (usize, u8) {
        if self.lane {
            (self.at as usize + 4 * r, self.bit)
        } else {
            (self.at as usize + r / 8, (r % 8) as u8)
        }
    }
}

impl ByteMap {
    /// The map for rows of `row_bytes`.
    fn new(dtype: DType, layout: Layout, row_bytes: usize) -> ByteMap {
        let blk = vec![0u8; dtype.block_bytes()];
        let p = parts(dtype, &blk);
        // Offsets in a block (at most 210 bytes) and a record (at most 3360).
        let off = |s: &[u8]| s.as_ptr() as usize - blk.as_ptr() as usize;
        let [h0, s0, q0] = parts_at(dtype);
        let zero = Source {
            row: GROUP as u8,
            src: 0,
            flip: 0,
        };
        let (mut from, mut bits) = (vec![zero; record_bytes(dtype)], Vec::new());
        // Byte `src` of row r's block goes to `at + r * stride`.
        let mut byte = |src: usize, at: usize, stride: usize, flip: u8| {
            for r in 0..GROUP {
                let (row, src) = (r as u8, src as u8);
                from[at + r * stride] = Source { row, src, flip };
            }
        };
        for i in 0..2 {
            byte(off(p.d) + i, i, 2, 0);
            if let Some(m) = p.m {
                byte(off(m) + i, 32 + i, 2, 0);
            }
        }
        if let Some(scales) = p.scales {
            for t in 0..scales.len() {
                byte(off(scales) + t, s0 + GROUP * t, 1, 0);
            }
        }
        let stream = (0..p.qs.len())
            .map(|i| off(p.qs) + i)
            .chain((0..p.more.len()).map(|i| off(p.more) + i));
        for (i, src) in stream.enumerate() {
            match layout {
                Layout::Values if dtype == DType::Q5K && i >= 128 => {
                    // qh[l] bit j: value 32 j + l's fifth bit, as a mask bit.
                    for j in 0..8 {
                        bits.push(BitMove {
                            src: src as u8,
                            src_bit: j as u8,
                            at: (q0 + k5_mask_at(32 * j + i - 128)) as u16,
                            lane: false,
                            bit: 0,
                        });
                    }
                }
                Layout::Values if dtype == DType::Q6K && i < 128 => {
                    // ql[4c .. 4c + 4] as row r's lane of chunk c, after its pair's top bits.
                    byte(src, q0 + k6_chunk_at(i / 4) + i % 4, 4, 0)
                }
                Layout::Values if dtype == DType::Q6K => {
                    // qh[32h + l] bits 2q, 2q + 1: bits 4 and 5 of value 128h + 32q + l,
                    // as field k6_top(c % 2, n) of row r's top-bits lane of pair c / 2,
                    // where nibble n of chunk c holds the value's low bits (`k6_place`).
                    let (h, l) = ((i - 128) / 32, (i - 128) % 32);
                    for q in 0..4 {
                        let (c, n) = k6_place(128 * h + 32 * q + l);
                        for hb in 0..2 {
                            let bit = 2 * k6_top(c % 2, n) + hb;
                            bits.push(BitMove {
                                src: src as u8,
                                src_bit: (2 * q + hb) as u8,
                                at: (q0 + k6_top_at(c) + bit / 8) as u16,
                                lane: true,
                                bit: (bit % 8) as u8,
                            });
                        }
                    }
                }
                Layout::Values if !in_lanes(dtype) => {
                    byte(src, q0 + GROUP * values_chunk(dtype, i), 1, 0)
                }
                // Dots, and the formats Values holds in lanes as Dots does.
                Layout::Values | Layout::Dots => {
                    let flip = if dtype == DType::Q8_0 { 0x80 } else { 0 };
                    byte(src, q0 + 64 * dots_chunk(dtype, i / 4) + i % 4, 4, flip);
                }
            }
        }
        // Q5_0/Q5_1's fifth bits: value v's is bit v % 8 of byte v / 8.
        if let Some(qh) = p.qh {
            for v in 0..32 {
                let (src, src_bit) = ((off(qh) + v / 8) as u8, (v % 8) as u8);
                bits.push(match layout {
                    // Mask v: two bytes, bit r row r's.
                    Layout::Values => BitMove {
                        src,
                        src_bit,
                        at: (h0 + 2 * v) as u16,
                        lane: false,
                        bit: 0,
                    },
                    // Row r's lane: byte t, bit c holds value 4c + t's bit, bit 4 + c value
                    // 16 + 4c + t's.
                    Layout::Dots => BitMove {
                        src,
                        src_bit,
                        at: (h0 + v % 4) as u16,
                        lane: true,
                        bit: (v % 16 / 4 + if v >= 16 { 4 } else { 0 }) as u8,
                    },
                });
            }
        }
        let at: Vec<u32> = from
            .iter()
            .map(|s| match s.row as usize {
                GROUP => 0,
                r => u32::try_from(r * row_bytes + s.src as usize)
                    .expect("a group of 16 rows spans less than 4 GiB"),
            })
            .collect();
        let zeros = (0..from.len())
            .filter(|&p| from[p].row as usize == GROUP)
            .map(|p| p as u16)
            .collect();
        let flip_from = (layout == Layout::Dots && dtype == DType::Q8_0).then_some(q0);
        ByteMap {
            runs: Runs::split(&at, row_bytes),
            from,
            reach: (GROUP - 1) * row_bytes + dtype.block_bytes(),
            zeros,
            flip_from,
            bits: Box::new(BitSpread::new(
                bits,
                (layout == Layout::Values && dtype == DType::Q6K).then(|| (off(p.more), q0)),
            )),
            row_bytes,
        }
    }

    /// Writes a record: `blk` starts at the record's block in the first of 16 rows laid end
    /// to end (rows past the weight's last zero).
    #[inline]
    fn fill(&self, blk: &[u8], rec: &mut [u8]) {
        assert!(blk.len() >= self.reach && rec.len() == self.from.len());
        for run in &self.runs {
            let out = &mut rec[run.at..][..run.width * run.src.len()];
            // SAFETY: every byte a run reads is some record byte's source, below `reach <=
            // blk.len()` as `new` builds them (row < 16, a byte of a block; zeros read
            // byte 0); `out` is the run's.
            unsafe {
                match run.width {
                    TILE => transpose_runs(blk, &run.src, self.row_bytes, out),
                    16 => copy_runs::<16>(blk, &run.src, out),
                    8 => copy_runs::<8>(blk, &run.src, out),
                    4 => copy_runs::<4>(blk, &run.src, out),
                    2 => copy_runs::<2>(blk, &run.src, out),
                    _ => copy_runs::<1>(blk, &run.src, out),
                }
            }
        }
        if let Some(q0) = self.flip_from {
            rec[q0..].iter_mut().for_each(|q| *q ^= 0x80);
        }
        for &p in &self.zeros {
            rec[p as usize] = 0;
        }
        self.bits.fill(blk, self.row_bytes, rec);
    }

    /// Reads row `r`'s block back from `rec` into `blk` (zeroed).
    fn gather(&self, rec: &[u8], r: usize, blk: &mut [u8]) {
        for (&q, s) in rec.iter().zip(&self.from) {
            if s.row as usize == r {
                blk[s.src as usize] = q ^ s.flip;
            }
        }
        for b in &self.bits.moves {
            let (at, bit) = b.place(r);
            blk[b.src as usize] |= (rec[at] >> bit & 1) << b.src_bit;
        }
    }
}

/// Record bytes `at ..` in runs of `width` bytes, run `i` copied from `src[i] ..` of a block's
/// group of rows: a repack moves two or four bytes of a row at once where the layout keeps
/// them together (scales, lanes). On one thread (AMD EPYC family 26, a 1536 × 576 weight in
/// cache), byte by byte → in runs: Q4_0 and Q4_1 2.9-3.1 → 10.0 GB/s, `Layout::Dots` Q8_0
/// 2.9 → 9.9, Q5_0 1.5 → 3.1, Q6_K 2.0 → 2.9, Q4_K 3.1 → 4.2 (the last three mostly
/// runs of one byte).
///
/// A run of width [`TILE`] is a 16 × 16 byte transpose instead ([`transpose_runs`]): the 16
/// chunks of 16 bytes whose byte `r` is row `r`'s, from 16 consecutive bytes of each row
/// (`Layout::Values`' chunks of `Q8_0`, `Q4_K` and `Q5_K`).
#[derive(Clone, Debug)]
struct Runs {
    at: usize,
    width: usize,
    src: Vec<u32>,
}

/// Bytes of a 16 × 16 transpose, the width of such a [`Runs`].
const TILE: usize = GROUP * 16;

impl Runs {
    /// `at` (record byte `p` from byte `at[p]`, rows `row_bytes` apart) as runs: at each
    /// byte, a [`TILE`] if the next 256 bytes are one, else the widest of 16, 8, 4, 2 or 1
    /// bytes that starts at a multiple of its width and reads consecutive bytes; runs of one
    /// width in a row share a [`Runs`].
    fn split(at: &[u32], row_bytes: usize) -> Vec<Runs> {
        let tile = |p: usize| {
            p.is_multiple_of(16)
                && p + TILE <= at.len()
                && (0..TILE).all(|i| {
                    let (c, r) = (i / GROUP, i % GROUP);
                    at[p + i] as usize == at[p] as usize + c + r * row_bytes
                })
        };
        let mut runs: Vec<Runs> = Vec::new();
        let mut p = 0;
        while p < at.len() {
            let width = match tile(p) {
                true => TILE,
                false => [16, 8, 4, 2, 1]
                    .into_iter()
                    .find(|&w| {
                        p % w == 0
                            && p + w <= at.len()
                            && (1..w).all(|j| at[p + j] == at[p] + j as u32)
                    })
                    .expect("width 1 always fits"),
            };
            match runs.last_mut() {
                Some(r) if r.width == width && r.at + width * r.src.len() == p => r.src.push(at[p]),
                _ => runs.push(Runs {
                    at: p,
                    width,
                    src: vec![at[p]],
                }),
            }
            p += width;
        }
        runs
    }
}

/// Asks for every cache line of `bytes` (a hint: it reads nothing and cannot fault).
#[inline(always)]
fn prefetch_lines(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..bytes.len()).step_by(64) {
        // SAFETY: a prefetch reads nothing and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(i).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Copies `W` bytes from `blk[s ..]` for each `s` of `src`, into `out` in turn.
///
/// # Safety
/// `s + W <= blk.len()` for every `s` of `src` (`ByteMap::fill` checks `reach`, which
/// bounds them), and `out` holds `W · src.len()` bytes.
#[inline(always)]
unsafe fn copy_runs<const W: usize>(blk: &[u8], src: &[u32], out: &mut [u8]) {
    debug_assert!(out.len() == W * src.len());
    let (from, to) = (blk.as_ptr(), out.as_mut_ptr());
    for (i, &s) in src.iter().enumerate() {
        // SAFETY: per the contract.
        unsafe { std::ptr::copy_nonoverlapping(from.add(s as usize), to.add(W * i), W) };
    }
}

/// For each `s` of `src`, the 16 × 16 bytes `blk[s + c + r · row_bytes]` (16 bytes of each
/// of 16 rows) into `out` transposed, as 16 chunks whose byte `r` is row `r`'s: 16 loads,
/// 64 unpacks and 16 stores where one byte at a time took 256 loads and stores. One thread
/// of an AMD EPYC (family 25 model 17), a 1536 × 768 weight in cache, `Layout::Values`:
/// `Q8_0` 2.5 → 8.1 GB/s, `Q4_K` 2.2 → 7.6. Loading the default model converted to `Q8_0`
/// (`chord generate --json`'s `load_seconds`, 5 alternating runs on warm memory): 136 →
/// 83 ms; Gemma 3 270M, whose 178 MB embedding is `Q8_0`, 287 → 243 ms.
///
/// # Safety
/// `s + 15 · row_bytes + 16 <= blk.len()` for every `s` of `src` (`ByteMap::fill` checks
/// `reach`, which bounds them), and `out` holds [`TILE`] `· src.len()` bytes.
#[inline(always)]
unsafe fn transpose_runs(blk: &[u8], src: &[u32], row_bytes: usize, out: &mut [u8]) {
    debug_assert!(out.len() == TILE * src.len());
    for (t, &s) in src.iter().enumerate() {
        let at = |r: usize| s as usize + r * row_bytes;
        let to = &mut out[TILE * t..][..TILE];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE2 is part of x86-64; each row's 16 bytes lie in `blk` per the contract.
        unsafe {
            use std::arch::x86_64::*;
            let rows: [__m128i; 16] =
                std::array::from_fn(|r| _mm_loadu_si128(blk.as_ptr().add(at(r)).cast()));
            // Four rounds of interleaving: of bytes, pairs, quads and eights. After the round
            // of `s`-byte units, a unit of `2s` bytes is one column of `2s` consecutive rows;
            // after the last, vector `c` is column `c`.
            let v = interleave(
                rows,
                1,
                |x, y| _mm_unpacklo_epi8(x, y),
                |x, y| _mm_unpackhi_epi8(x, y),
            );
            let v = interleave(
                v,
                2,
                |x, y| _mm_unpacklo_epi16(x, y),
                |x, y| _mm_unpackhi_epi16(x, y),
            );
            let v = interleave(
                v,
                4,
                |x, y| _mm_unpacklo_epi32(x, y),
                |x, y| _mm_unpackhi_epi32(x, y),
            );
            let v = interleave(
                v,
                8,
                |x, y| _mm_unpacklo_epi64(x, y),
                |x, y| _mm_unpackhi_epi64(x, y),
            );
            for (chunk, v) in to.chunks_exact_mut(16).zip(v) {
                _mm_storeu_si128(chunk.as_mut_ptr().cast(), v);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for c in 0..16 {
            for r in 0..GROUP {
                to[16 * c + r] = blk[at(r) + c];
            }
        }
    }
}

/// One round of [`transpose_runs`]: vector `i` joins vectors `x` and `x + s`, `x = 2s ⌊i /
/// 2s⌋ + (i mod 2s) / 2`, through `lo` (their low halves' units interleaved) for even `i` and
/// `hi` (high halves) for odd. Before the round a unit of `s` bytes is one column of `s`
/// consecutive rows, and vectors `x` and `x + s` hold the same columns of the next rows: the
/// units they make together are one column of `2s` rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn interleave(
    v: [__m128i; 16],
    s: usize,
    lo: impl Fn(__m128i, __m128i) -> __m128i,
    hi: impl Fn(__m128i, __m128i) -> __m128i,
) -> [__m128i; 16] {
    std::array::from_fn(|i| {
        let x = i / (2 * s) * 2 * s + i % (2 * s) / 2;
        match i % 2 {
            0 => lo(v[x], v[x + s]),
            _ => hi(v[x], v[x + s]),
        }
    })
}

/// Whether [`Layout::Values`] holds `dtype`'s quants in 32-bit lanes, four bytes of a row
/// each, as [`Layout::Dots`] does (the 4- and 5-bit formats of 32-value blocks).
pub(super) fn in_lanes(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1)
}

/// The 16-byte chunk of a [`Layout::Values`] record (`Q8_0`, `Q4_K`, `Q5_K`) that holds
/// quant byte `i` of a block: byte `i`'s own, but for `Q5_K`, whose record holds per pair
/// of sub-blocks `p` the pair's 64 fifth-bit masks (8 chunks, see [`k5_mask_at`]) and then
/// its 32 chunks of `qs`.
pub(super) fn values_chunk(dtype: DType, i: usize) -> usize {
    debug_assert!(!in_lanes(dtype) && dtype != DType::Q6K);
    match dtype {
        DType::Q5K => {
            debug_assert!(i < 128, "Q5_K's qh is held as masks");
            40 * (i / 32) + 8 + i % 32
        }
        _ => i,
    }
}

/// `Q6_K` in [`Layout::Values`]: bytes of one of a record's 16 pairs of chunks: 16 lanes of
/// the top bits of the pair's values (see [`k6_top`]), then the two chunks' lanes of low
/// nibbles.
const K6_PAIR: usize = 192;

/// `Q6_K` in [`Layout::Values`]: where the lanes of top bits of chunk `c`'s pair start in a
/// record's quants.
#[inline(always)]
fn k6_top_at(c: usize) -> usize {
    K6_PAIR * (c / 2)
}

/// `Q6_K` in [`Layout::Values`]: where chunk `c`'s lanes of low nibbles start in a record's
/// quants.
#[inline(always)]
fn k6_chunk_at(c: usize) -> usize {
    k6_top_at(c) + 64 * (1 + c % 2)
}

/// `Q6_K` in [`Layout::Values`]: the field (bits `2m, 2m + 1`) of a pair's top-bits lane
/// that holds the top bits of nibble `n` of chunk `e` (0 or 1) of the pair. Byte `t` of the
/// lane holds those of nibbles `2t` and `2t + 1` of chunk 1 in its low four bits and of chunk
/// 0 in its high four: so the top bits of a lane byte's two nibbles (byte `t` of the chunk)
/// sit in one 4-bit window, one shift from an index, and for every byte `t` at the same
/// distance from bits 4 and 5 of byte `t`, where they join the nibble as a byte.
#[inline(always)]
pub(super) fn k6_top(e: usize, n: usize) -> usize {
    debug_assert!(e < 2 && n < 8);
    4 * (n / 2) + 2 * (1 - e) + n % 2
}

/// `Q6_K` in [`Layout::Values`]: the chunk (0..32) and the nibble of its lanes (0..8) that
/// hold value `v`'s low four bits. Chunk `c` holds `ql[4c .. 4c + 4]` of each row as one
/// lane; `ql[64h + 32s + l]` holds value `128h + 32s + l` in its low nibble and 64 on in
/// its high (`quant::q6_k`), so nibble `2t` of chunk `16h + 8s + c'` is value `128h + 32s +
/// 4c' + t` and nibble `2t + 1` value 64 on.
#[inline(always)]
pub(super) fn k6_place(v: usize) -> (usize, usize) {
    let (h, q, l) = (v / 128, v % 128 / 32, v % 32);
    (16 * h + 8 * (q % 2) + l / 4, 2 * (l % 4) + q / 2)
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

impl RepackedWeight {
    /// Repacks `w` (one of the [`repackable`] formats) into `layout`, in memory from `arena`,
    /// on `team`'s threads. `None` if the format cannot be repacked or `w`'s bytes are not
    /// its `n` rows of `k`. `done` is called with each run of `w.bytes` once it has been
    /// copied (whole groups of 16 rows, about 4 MiB a thread at a time, in order), so that
    /// a caller can let go of the source as the copy grows.
    pub fn new(
        arena: &Arena,
        team: &Team,
        w: &BlockWeight<'_>,
        layout: Layout,
        mut done: impl FnMut(&[u8]),
    ) -> Option<RepackedWeight> {
        // BlockWeight's fields are public: its shape is checked again, by its own check.
        let w = BlockWeight::new(w.dtype, w.n, w.k, w.bytes)?;
        let (dtype, n, k) = (w.dtype, w.n, w.k);
        if !repackable(dtype) {
            return None;
        }
        let shape = RecordShape::new(dtype, k);
        let (blocks, rec, bb) = (shape.blocks, shape.bytes, dtype.block_bytes());
        let (row_bytes, group_bytes) = (blocks * bb, blocks * rec);
        let map = ByteMap::new(dtype, layout, row_bytes);
        let mut data = arena.alloc(n.div_ceil(GROUP) * group_bytes);
        // Groups per call of `done`: about 4 MiB of source a thread.
        let batch = (RELEASE_BYTES * team.threads() / (GROUP * row_bytes)).max(1);
        for (i, out) in data.chunks_mut(batch * group_bytes).enumerate() {
            let g0 = i * batch;
            let groups = out.len() / group_bytes;
            let per_task = groups.div_ceil(TASKS_PER_THREAD * team.threads());
            let parts: Vec<Mutex<&mut [u8]>> = out
                .chunks_mut(per_task * group_bytes)
                .map(Mutex::new)
                .collect();
            team.run(parts.len(), &|t| {
                let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
                for (gi, out) in part.chunks_mut(group_bytes).enumerate() {
                    let first = GROUP * (g0 + t * per_task + gi);
                    // The group's rows; the last group's zero-padded to 16.
                    let padded;
                    let rows = match w.bytes.get(first * row_bytes..(first + GROUP) * row_bytes) {
                        Some(rows) => rows,
                        None => {
                            let mut v = w.bytes[first * row_bytes..].to_vec();
                            v.resize(GROUP * row_bytes, 0);
                            padded = v;
                            &padded
                        }
                    };
                    // The next group's rows, asked for a slice per record: sixteen short
                    // streams the hardware prefetchers barely follow. On Zen 4 the loop
                    // took a third of the samples of a Q8_0 load it took without.
                    let next = w
                        .bytes
                        .get((first + GROUP) * row_bytes..)
                        .map_or(&[][..], |b| &b[..b.len().min(GROUP * row_bytes)]);
                    let ahead = (GROUP * row_bytes).div_ceil(blocks).next_multiple_of(64);
                    for (b, rec) in out.chunks_exact_mut(rec).enumerate() {
                        prefetch_lines(
                            next.get(b * ahead..)
                                .map_or(&[], |s| &s[..s.len().min(ahead)]),
                        );
                        map.fill(&rows[b * bb..], rec);
                    }
                }
            });
            let rows = GROUP * g0..n.min(GROUP * (g0 + groups));
            done(&w.bytes[rows.start * row_bytes..rows.end * row_bytes]);
        }
        Some(RepackedWeight {
            dtype,
            layout,
            n,
            k,
            data: data.freeze(),
            shape,
            map,
            prefetch: prefetching(),
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
        let (s, r) = (&self.shape, self.record_slice(g, b));
        Record {
            d: &r[..32],
            m: s.has_min.then(|| &r[32..64]),
            qh: s.qh.map(|(a, b)| &r[a..b]),
            scales: s.scales.map(|(a, b)| &r[a..b]),
            qs: &r[s.qs..],
        }
    }

    /// Asks for the bytes [`PREFETCH_AHEAD`] past the start of record `(g, b)`, one line per
    /// 64 bytes of a record, where [`prefetching`] holds (a decode kernel calls it once per
    /// record, so its stream is asked for that far ahead). A prefetch past the weight's end
    /// is only a hint: it cannot fault.
    #[inline(always)]
    pub(super) fn prefetch(&self, g: usize, b: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.prefetch {
            let s = &self.shape;
            let at = (g * s.blocks + b) * s.bytes + PREFETCH_AHEAD;
            let p = self.data.as_ptr().wrapping_add(at);
            for line in (0..s.bytes).step_by(64) {
                // SAFETY: a prefetch reads nothing and cannot fault.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        p.wrapping_add(line) as *const i8,
                    )
                };
            }
        }
    }

    /// The bytes of the record of group `g`, block `b`.
    #[inline(always)]
    fn record_slice(&self, g: usize, b: usize) -> &[u8] {
        let s = &self.shape;
        &self.data[(g * s.blocks + b) * s.bytes..][..s.bytes]
    }

    /// Row `j` of the original `W`, dequantized into `out (k,)` by
    /// [`crate::quant::dequantize`] from its blocks, read back from the records (embedding
    /// lookups).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.k,
            "dequantize_row: {} values, rows of {}",
            out.len(),
            self.k
        );
        let (g, r) = (j / GROUP, j % GROUP);
        let mut blk = vec![0u8; self.dtype.block_bytes()];
        for (b, y) in out.chunks_exact_mut(self.dtype.block_len()).enumerate() {
            blk.fill(0);
            self.map.gather(self.record_slice(g, b), r, &mut blk);
            quant::dequantize(self.dtype, &blk, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts keep every value of every format, on a row count that leaves the last
    /// group partial, and every team size writes the same records.
    #[test]
    fn repacking_keeps_every_value_in_both_layouts_on_every_team_size() {
        let n = 37;
        let teams: Vec<Team> = (1..=3).map(|t| Team::new(t).unwrap()).collect();
        for dtype in DType::ALL.into_iter().filter(|&d| repackable(d)) {
            let k = 3 * dtype.block_len();
            let bytes = quant::sample_blocks(dtype, n * k, 3).unwrap();
            let src = BlockWeight::new(dtype, n, k, &bytes).unwrap();
            let mut want = vec![0.0f32; n * k];
            quant::dequantize(dtype, &bytes, &mut want);
            for layout in [Layout::Values, Layout::Dots] {
                let repack = |team| RepackedWeight::new(&Arena::new(), team, &src, layout, |_| {});
                let w = repack(&teams[0]).unwrap();
                for team in &teams[1..] {
                    let other = repack(team).unwrap();
                    assert!(
                        *other.data == *w.data,
                        "{dtype} {layout:?} {} threads",
                        team.threads()
                    );
                }
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
        // Bytes that are not n rows of k (BlockWeight's fields are public), and other
        // formats, are refused.
        for (n, k, len) in [(2, 32, 34), (1, 0, 0), (1, 16, 17)] {
            let bad = BlockWeight {
                dtype: DType::Q8_0,
                n,
                k,
                bytes: &[0; 34][..len],
            };
            let r = RepackedWeight::new(&Arena::new(), &teams[0], &bad, Layout::Values, |_| {});
            assert!(r.is_none(), "{n} x {k} in {len} bytes");
        }
        let bf16 = BlockWeight::new(DType::BF16, 1, 256, &[0; 512]).unwrap();
        assert!(
            RepackedWeight::new(&Arena::new(), &teams[0], &bf16, Layout::Values, |_| {}).is_none()
        );
    }

    /// `done` hands back the source in order, in runs of whole rows that tile it exactly:
    /// 5.4 MB of Q8_0 rows, about 4 MiB a thread at a time.
    #[test]
    fn the_source_is_handed_back_in_order_as_it_is_copied() {
        let (n, k) = (160_000, 32);
        let bytes = quant::sample_blocks(DType::Q8_0, n * k, 7).unwrap();
        let src = BlockWeight::new(DType::Q8_0, n, k, &bytes).unwrap();
        for (threads, want_runs) in [(1, 2), (2, 1)] {
            let mut runs: Vec<(usize, usize)> = Vec::new();
            let base = bytes.as_ptr() as usize;
            let team = Team::new(threads).unwrap();
            RepackedWeight::new(&Arena::new(), &team, &src, Layout::Values, |p| {
                runs.push((p.as_ptr() as usize - base, p.len()))
            })
            .unwrap();
            assert_eq!(runs.len(), want_runs, "{threads} threads: {runs:?}");
            let mut at = 0;
            for &(start, len) in &runs {
                assert_eq!(start, at);
                assert!(len.is_multiple_of(34));
                at += len;
            }
            assert_eq!(at, bytes.len());
        }
    }
}
