//! Exact mode on repacked weights: `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `Q4_K`, `Q5_K` and
//! `Q6_K` in [`Layout::Values`], sixteen rows to a record, each value position of the sixteen
//! rows a few instructions from one or two vectors (see `simd::repack`). The arithmetic is f32 on
//! the weights' exact values, as on rows of blocks (`simd::qmatmul`); the layout takes away
//! what that path pays per row and block.
//!
//! - **decode** (`m <= GEMV_ROWS`): a value position of a record becomes one vector of
//!   sixteen weight values (for `Q4_0` .. `Q5_1`, a shift of the chunk's 32-bit lanes +
//!   `vpermps`, plus 16 under the fifth bits' mask for a 5-bit format; for `Q4_K`/`Q5_K`'s
//!   nibbles `vpmovzxbd` + `vpermps`; `vpmovsxbd` + `vcvtdq2ps` for a byte), multiplied by one activation
//!   value, broadcast: a lane accumulates one output row, so there is no horizontal sum and
//!   no per-row scale table. Each block's sums are scaled once, sixteen rows at a time:
//!   `acc += d · Σ_v q_v x_v` (`q - 8` for `Q4_0`, `q - 16` for `Q5_0`), plus `m · Σ_v x_v`
//!   for `Q4_1` and `Q5_1`, the block sums of `x` computed once per call. `Q4_K` (`Q5_K`,
//!   its fifth bits added under masks as `Q5_0`'s) sums each sub-block of 32 apart and
//!   scales it by its own `d · scale`, less `dmin · min · Σ_v x_v`; `Q6_K` each group of 16
//!   by its `d · scale`, its values `q - 32` from the low nibble in lanes as `Q4_0`'s and
//!   the top two bits from lanes of their own (`V16::values6`). That is the dequantized
//!   weight's dot product with the scale taken out of each block's sum, as ggml computes
//!   it: the same value up to f32 rounding. Without a min it is a reordering of the sum; with one (`Q4_1`, `Q5_1`,
//!   `Q4_K`, `Q5_K`) the sum is rewritten as `d Σ q x + m Σ x`, whose rounding scales with
//!   `|d| Σ |q x| + |m| |Σ x|` rather than with `Σ |w x|`, and can cancel where a block's
//!   weights sit near its min.
//! - **prefill**: the packed GEMM of `simd::qmatmul`, its panels decoded from the records:
//!   sixteen rows of one value position are already one vector, so no transpose.
//!
//! Work is split by groups of sixteen rows (decode: contiguous runs over the weights of the
//! call, `RUNS_PER_THREAD` per thread) or by rows of `x` or panels (prefill, see
//! `qmatmul::prefill_part`), and no output's arithmetic
//! depends on the split: results are bitwise identical for any thread count.

use super::Isa;
use super::Out;
use super::qmatmul::{BlockScratch, GEMV_ROWS, Panels, prefill_on_team};
use super::repack::{GROUP, Layout, RepackedWeight, k5_mask_at, k6_place, values_chunk};
use super::v16::{Kernel16, V16, dispatch16};
use crate::quant::DType;
use crate::team::Team;

/// Most weights one call runs as one job.
const MAX_WEIGHTS: usize = 4;

/// `ys[i] (m, n_i) = x (m, k) · W_iᵀ` for repacked weights ([`Layout::Values`]) that read
/// the same input: decoding, one job of the team for all of them; prefilling, one job each.
pub fn matmuls(
    isa: Isa,
    team: &Team,
    scratch: &BlockScratch,
    x: &[f32],
    ws: &[&RepackedWeight],
    ys: &mut [&mut [f32]],
    m: usize,
) {
    debug_assert_eq!(ws.len(), ys.len());
    debug_assert!(ws.iter().all(|w| w.layout == Layout::Values));
    let Some(first) = ws.first() else { return };
    let k = first.k;
    if m > GEMV_ROWS {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            debug_assert!(x.len() == m * w.k && y.len() == m * w.n);
            let out = Out(y.as_mut_ptr());
            prefill_on_team(isa, team, scratch, x, &GroupPanels { w }, w.n, w.k, out, m);
        }
        return;
    }
    // The block sums of x (32 values each), for the mins of Q4_1, Q5_1 and Q4_K.
    let mut sums = scratch.sums.lock().unwrap_or_else(|e| e.into_inner());
    if ws.iter().any(|w| w.dtype.has_min()) {
        sums.clear();
        sums.extend(x[..m * k].chunks_exact(32).map(|c| c.iter().sum::<f32>()));
    }
    let sums = &sums[..];
    for (ws, ys) in ws.chunks(MAX_WEIGHTS).zip(ys.chunks_mut(MAX_WEIGHTS)) {
        let mut counts = [0usize; MAX_WEIGHTS];
        let mut outs = [Out(std::ptr::null_mut()); MAX_WEIGHTS];
        for (i, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
            debug_assert!(w.k == k && x.len() == m * k && y.len() == m * w.n);
            counts[i] = w.groups();
            outs[i] = Out(y.as_mut_ptr());
        }
        let counts = &counts[..ws.len()];
        team.run_parts(counts, team.decode_runs(counts), &|i, groups| {
            gemv(isa, m, ws[i], x, sums, groups, outs[i]);
        });
    }
}

/// Groups `groups` of `w` for `m` (at most [`GEMV_ROWS`]) activation rows, into `y`.
fn gemv(
    isa: Isa,
    m: usize,
    w: &RepackedWeight,
    x: &[f32],
    sums: &[f32],
    groups: std::ops::Range<usize>,
    y: Out,
) {
    let g = Gemv {
        w,
        x,
        sums,
        groups,
        y,
    };
    /// One activation-row count's arm for every format.
    macro_rules! formats {
        ($m:literal) => {
            match w.dtype {
                DType::Q4_0 => dispatch16(isa, GroupGemv::<$m, Q4_0>(g)),
                DType::Q4_1 => dispatch16(isa, GroupGemv::<$m, Q4_1>(g)),
                DType::Q5_0 => dispatch16(isa, GroupGemv::<$m, Q5_0>(g)),
                DType::Q5_1 => dispatch16(isa, GroupGemv::<$m, Q5_1>(g)),
                _ => {
                    debug_assert_eq!(w.dtype, DType::Q8_0);
                    dispatch16(isa, GroupGemv::<$m, Q8_0>(g))
                }
            }
        };
    }
    match (m, w.dtype) {
        (1, DType::Q4K) => dispatch16(isa, GroupGemvK4::<1, false>(g)),
        (2, DType::Q4K) => dispatch16(isa, GroupGemvK4::<2, false>(g)),
        (_, DType::Q4K) => dispatch16(isa, GroupGemvK4::<3, false>(g)),
        (1, DType::Q5K) => dispatch16(isa, GroupGemvK4::<1, true>(g)),
        (2, DType::Q5K) => dispatch16(isa, GroupGemvK4::<2, true>(g)),
        (_, DType::Q5K) => dispatch16(isa, GroupGemvK4::<3, true>(g)),
        (1, DType::Q6K) => dispatch16(isa, GroupGemvK6::<1>(g)),
        (2, DType::Q6K) => dispatch16(isa, GroupGemvK6::<2>(g)),
        (_, DType::Q6K) => dispatch16(isa, GroupGemvK6::<3>(g)),
        (1, _) => formats!(1),
        (2, _) => formats!(2),
        _ => formats!(3),
    }
}

/// The formats, as const parameters of the decode kernel.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;

/// Whether format `f` (a decode kernel constant) has mins.
const fn has_mins(f: u8) -> bool {
    f == Q4_1 || f == Q5_1
}

/// `q`'s offset in a format's values: `q - 8` (`Q4_0`), `q - 16` (`Q5_0`), `q - 32`
/// (`Q6_K`), else `q`.
fn value_offset(dtype: DType) -> f32 {
    match dtype {
        DType::Q4_0 => -8.0,
        DType::Q5_0 => -16.0,
        DType::Q6K => -32.0,
        _ => 0.0,
    }
}

/// `Q5_K`'s sixteen rows' values `q` in the low and high nibbles of a chunk, with the
/// fifth bits `[h0, h1]` (one mask per value position): `iota[q & 15]` plus 16 under the
/// mask where the level has a lookup; else the bytes with their fifth bit, converted.
#[inline(always)]
fn k5_nibbles<V: V16>(iota: V, q: V::U8, [h0, h1]: [u16; 2]) -> [V; 2] {
    if V::LOOKUP16 {
        let [lo, hi] = [V::lookup16(iota, q, false), V::lookup16(iota, q, true)];
        let sixteen = V::splat(16.0);
        [lo.add_where(h0, sixteen), hi.add_where(h1, sixteen)]
    } else {
        let bit = V::u8_splat(0x10);
        let lo = V::u8_or(V::low_nibbles(q), V::u8_and(V::u8_from_bits(h0), bit));
        let hi = V::u8_or(V::high_nibbles(q), V::u8_and(V::u8_from_bits(h1), bit));
        [V::u8_to_f32(lo), V::u8_to_f32(hi)]
    }
}

/// Sixteen rows' low and high nibbles of a chunk as f32 (`Q4_K`'s `q`): the lookup of
/// [`k5_nibbles`] where the level has one, else a conversion.
#[inline(always)]
fn k4_nibbles<V: V16>(iota: V, q: V::U8) -> [V; 2] {
    if V::LOOKUP16 {
        [V::lookup16(iota, q, false), V::lookup16(iota, q, true)]
    } else {
        [
            V::u8_to_f32(V::low_nibbles(q)),
            V::u8_to_f32(V::high_nibbles(q)),
        ]
    }
}

/// `Q5_K`: the fifth-bit masks of position `l` of sub-blocks `2i` and `2i + 1` (values
/// `64i + l` and `64i + 32 + l`, at bytes `640i + 2l` and 64 on), from a record's quants
/// (see `simd::repack`).
#[inline(always)]
fn k5_masks(qs: &[u8], i: usize, l: usize) -> [u16; 2] {
    debug_assert!(i < 4 && l < 32 && qs.len() >= 2560);
    debug_assert_eq!(640 * i + 2 * l, k5_mask_at(64 * i + l));
    // SAFETY: i < 4 and l < 32: inside the record's 2560 bytes of quants.
    unsafe {
        let p = qs.as_ptr().add(640 * i + 2 * l);
        [
            std::ptr::read_unaligned(p as *const u16).to_le(),
            std::ptr::read_unaligned(p.add(64) as *const u16).to_le(),
        ]
    }
}

/// `Q5_K`: value `v`'s fifth-bit mask in a record's quants.
#[inline(always)]
fn k5_mask(qs: &[u8], v: usize) -> u16 {
    let at = k5_mask_at(v);
    u16::from_le_bytes([qs[at], qs[at + 1]])
}

/// Value `v`'s fifth-bit mask in a record's `qh` (see `simd::repack`).
#[inline(always)]
fn fifth_mask(qh: Option<&[u8]>, v: usize) -> Option<u16> {
    qh.map(|qh| u16::from_le_bytes([qh[2 * v], qh[2 * v + 1]]))
}

/// The value of a 4- or 5-bit record's chunk `c` (see `simd::repack`) in nibble `n` of
/// every lane: value `4c + n / 2`, or 16 on for an odd `n`.
#[inline(always)]
fn lane_value(c: usize, n: usize) -> usize {
    4 * c + n / 2 + 16 * (n % 2)
}

/// The decode work of one task: groups `groups` of `w`.
struct Gemv<'a> {
    w: &'a RepackedWeight,
    x: &'a [f32],
    /// Block sums of `x`, 32 values each (the formats with a min).
    sums: &'a [f32],
    groups: std::ops::Range<usize>,
    y: Out,
}

/// [`Gemv`] with `M` activation rows of format `F`.
struct GroupGemv<'a, const M: usize, const F: u8>(Gemv<'a>);

impl<const M: usize, const F: u8> Kernel16 for GroupGemv<'_, M, F> {
    type Output = ();

    /// Per group, per block: the chunks' values times the broadcast activations into four
    /// chains per activation row (two value positions × low and high), then the block's
    /// scale (and min) applied to all sixteen rows at once.
    #[inline(always)]
    fn run<V: V16>(self) {
        let Gemv {
            w,
            x,
            sums,
            groups,
            y,
        } = self.0;
        let (k, n) = (w.k, w.n);
        let blocks = k / 32;
        let offset = V::splat(value_offset(w.dtype));
        let table = V::iota16().add(offset);
        let five = F == Q5_0 || F == Q5_1;
        for g in groups {
            let mut acc = [V::zero(); M];
            for b in 0..blocks {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let mut p = [[V::zero(); 4]; M];
                // This block's 32 values of each activation row.
                let xs: [&[f32]; M] = std::array::from_fn(|i| &x[i * k + 32 * b..][..32]);
                // Chains by constant index (a runtime index would keep `p` in memory).
                if F == Q8_0 {
                    for v in (0..32).step_by(4) {
                        // Not array::from_fn: its closure would not inherit the level's
                        // target features.
                        let mut ws = [V::zero(); 4];
                        for (u, w) in ws.iter_mut().enumerate() {
                            // SAFETY: a Q8_0 record holds 32 chunks of 16 bytes.
                            *w = unsafe {
                                V::i8_to_f32(V::load_u8(rec.qs.as_ptr().add(GROUP * (v + u))))
                            };
                        }
                        for (p, xb) in p.iter_mut().zip(&xs) {
                            p[0] = ws[0].fma(V::splat(xb[v]), p[0]);
                            p[1] = ws[1].fma(V::splat(xb[v + 1]), p[1]);
                            p[2] = ws[2].fma(V::splat(xb[v + 2]), p[2]);
                            p[3] = ws[3].fma(V::splat(xb[v + 3]), p[3]);
                        }
                    }
                } else {
                    for c in 0..4 {
                        // SAFETY: a 4- or 5-bit record holds 4 chunks of 64 bytes.
                        let q = unsafe { V::load_u32(rec.qs.as_ptr().add(64 * c)) };
                        // The chunk's eight values, nibble by nibble (a loop, not
                        // array::from_fn, as above; unrolled, so each shift is an immediate).
                        let mut ws = [V::zero(); 8];
                        for (n, w) in ws.iter_mut().enumerate() {
                            let h = if five {
                                fifth_mask(rec.qh, lane_value(c, n))
                            } else {
                                None
                            };
                            *w = V::nibble_value(table, offset, q, n as u32, h);
                        }
                        chunk_into_chains(&ws, &xs, 4 * c, 16, &mut p);
                    }
                }
                // SAFETY: 16 halves each.
                let d = unsafe { V::load_f16(rec.d.as_ptr()) };
                for (i, (a, p)) in acc.iter_mut().zip(&p).enumerate() {
                    let s = p[0].add(p[1]).add(p[2].add(p[3]));
                    *a = s.fma(d, *a);
                    if has_mins(F) {
                        // SAFETY: 16 halves.
                        let mins = unsafe { V::load_f16(rec.m.expect("mins").as_ptr()) };
                        *a = mins.fma(V::splat(sums[i * blocks + b]), *a);
                    }
                }
            }
            store_group(&acc, y, g, n);
        }
    }
}

/// [`Gemv`] of a `Q4_K` weight (`Q5_K` with `FIVE`) with `M` activation rows.
struct GroupGemvK4<'a, const M: usize, const FIVE: bool>(Gemv<'a>);

impl<const M: usize, const FIVE: bool> Kernel16 for GroupGemvK4<'_, M, FIVE> {
    type Output = ();

    /// Per group, per record, per pair of sub-blocks (`2i` in the low nibbles of chunks
    /// `32i .. 32i + 32`, `2i + 1` in the high; `Q5_K`'s fifth bits from masks `64i + l` and
    /// `64i + 32 + l`, added as in `Q5_0`): the chunks' values (`q`) times the broadcast activations
    /// into two chains per sub-block and activation row; then each sub-block's sum times its
    /// `d · scale`, less its `dmin · min` times its sum of `x`.
    #[inline(always)]
    fn run<V: V16>(self) {
        let Gemv {
            w,
            x,
            sums,
            groups,
            y,
        } = self.0;
        let (k, n) = (w.k, w.n);
        let table = V::iota16();
        for g in groups {
            let mut acc = [V::zero(); M];
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                // SAFETY: 16 halves each.
                let (d, dmin) = unsafe {
                    (
                        V::load_f16(rec.d.as_ptr()),
                        V::load_f16(rec.m.expect("dmin").as_ptr()),
                    )
                };
                // The record's eight sub-blocks' d · scale and dmin · min, unpacked once (a
                // loop, not a closure: a closure here would not inherit the level's target
                // features, and its intrinsics would become calls).
                let mut sm = [[V::zero(); 2]; 8];
                for (j, sm) in sm.iter_mut().enumerate() {
                    *sm = rec.k4_scale_min(d, dmin, j);
                }
                for i in 0..4 {
                    let mut p = [[V::zero(); 4]; M];
                    // This pair's 64 values of each activation row.
                    let xs: [&[f32]; M] =
                        std::array::from_fn(|r| &x[r * k + 256 * b + 64 * i..][..64]);
                    for l in (0..32).step_by(2) {
                        // Chunk 32i + l; Q5_K's after each pair's 8 chunks of masks (written
                        // out: values_chunk's division would stay in the loop).
                        let c = if FIVE { 40 * i + 8 + l } else { 32 * i + l };
                        debug_assert_eq!(c, values_chunk(w.dtype, 32 * i + l));
                        // SAFETY: a Q4_K record holds 128 chunks of 16 bytes, Q5_K 160.
                        let (q0, q1) = unsafe {
                            (
                                V::load_u8(rec.qs.as_ptr().add(GROUP * c)),
                                V::load_u8(rec.qs.as_ptr().add(GROUP * (c + 1))),
                            )
                        };
                        let ([lo0, hi0], [lo1, hi1]) = if FIVE {
                            let h0 = k5_masks(rec.qs, i, l);
                            let h1 = k5_masks(rec.qs, i, l + 1);
                            (k5_nibbles(table, q0, h0), k5_nibbles(table, q1, h1))
                        } else {
                            (k4_nibbles(table, q0), k4_nibbles(table, q1))
                        };
                        for (p, xb) in p.iter_mut().zip(&xs) {
                            p[0] = lo0.fma(V::splat(xb[l]), p[0]);
                            p[1] = lo1.fma(V::splat(xb[l + 1]), p[1]);
                            p[2] = hi0.fma(V::splat(xb[32 + l]), p[2]);
                            p[3] = hi1.fma(V::splat(xb[33 + l]), p[3]);
                        }
                    }
                    let ([d0, m0], [d1, m1]) = (sm[2 * i], sm[2 * i + 1]);
                    for (r, (a, p)) in acc.iter_mut().zip(&p).enumerate() {
                        // The sums of x over sub-blocks 2i and 2i + 1.
                        let at = r * (k / 32) + 8 * b + 2 * i;
                        *a = p[0].add(p[1]).fma(d0, *a);
                        *a = m0.fma(V::splat(-sums[at]), *a);
                        *a = p[2].add(p[3]).fma(d1, *a);
                        *a = m1.fma(V::splat(-sums[at + 1]), *a);
                    }
                }
            }
            store_group(&acc, y, g, n);
        }
    }
}

/// [`Gemv`] of a `Q6_K` weight with `M` activation rows.
struct GroupGemvK6<'a, const M: usize>(Gemv<'a>);

impl<const M: usize> Kernel16 for GroupGemvK6<'_, M> {
    type Output = ();

    /// Per record, per run of four chunks (`4j .. 4j + 4`, two pairs, see
    /// `repack::k6_place`): nibble `2t` of the run's `i`-th chunk is value `base + 4i + t`
    /// (`base = 128 (j / 4) + 32 (j / 2 % 2) + 16 (j % 2)`), so the low nibbles are the 16
    /// values of one scale group and the high nibbles the 16 of the group 64 values on; each
    /// value `q - 32` times the broadcast activation into two chains per group and
    /// activation row, then each group's sum times its `d · scale`.
    #[inline(always)]
    fn run<V: V16>(self) {
        let Gemv {
            w, x, groups, y, ..
        } = self.0;
        let (k, n) = (w.k, w.n);
        let offset = V::splat(value_offset(w.dtype));
        let table = V::iota16().add(offset);
        for g in groups {
            let mut acc = [V::zero(); M];
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                // SAFETY: 16 halves.
                let d = unsafe { V::load_f16(rec.d.as_ptr()) };
                for j in 0..8 {
                    let base = 128 * (j / 4) + 32 * (j / 2 % 2) + 16 * (j % 2);
                    debug_assert_eq!(k6_place(base), (4 * j, 0));
                    // The two groups' values of each activation row.
                    let xs: [&[f32]; M] =
                        std::array::from_fn(|r| &x[r * k + 256 * b + base..][..80]);
                    let mut p = [[V::zero(); 4]; M];
                    for pair in 0..2 {
                        for e in 0..2 {
                            let [top, q] = rec.k6_chunk::<V>(4 * j + 2 * pair + e);
                            let ws = V::values6(table, offset, q, top, e);
                            chunk_into_chains(&ws, &xs, 4 * (2 * pair + e), 64, &mut p);
                        }
                    }
                    let (lo, hi) = (rec.k6_scale(d, base / 16), rec.k6_scale(d, base / 16 + 4));
                    for (a, p) in acc.iter_mut().zip(&p) {
                        *a = p[0].add(p[2]).fma(lo, *a);
                        *a = p[1].add(p[3]).fma(hi, *a);
                    }
                }
            }
            store_group(&acc, y, g, n);
        }
    }
}

/// A chunk's eight values (`ws`, nibble by nibble) times the broadcast activations into
/// each activation row's four chains: nibble `2t` is value `v + t` of the row's `xs`, into
/// chains 0 and 2 by turns; nibble `2t + 1` value `v + hi + t`, into chains 1 and 3. Written
/// out: a chain chosen by a run-time index would keep `p` in memory.
#[inline(always)]
fn chunk_into_chains<V: V16, const M: usize>(
    ws: &[V; 8],
    xs: &[&[f32]; M],
    v: usize,
    hi: usize,
    p: &mut [[V; 4]; M],
) {
    for (p, xb) in p.iter_mut().zip(xs) {
        p[0] = ws[0].fma(V::splat(xb[v]), p[0]);
        p[1] = ws[1].fma(V::splat(xb[v + hi]), p[1]);
        p[2] = ws[2].fma(V::splat(xb[v + 1]), p[2]);
        p[3] = ws[3].fma(V::splat(xb[v + hi + 1]), p[3]);
        p[0] = ws[4].fma(V::splat(xb[v + 2]), p[0]);
        p[1] = ws[5].fma(V::splat(xb[v + hi + 2]), p[1]);
        p[2] = ws[6].fma(V::splat(xb[v + 3]), p[2]);
        p[3] = ws[7].fma(V::splat(xb[v + hi + 3]), p[3]);
    }
}

/// Stores a decode task's results for group `g`: `acc[i]` holds row `i` of `y (m, n)`,
/// columns `16g ..` (fewer in a partial last group).
#[inline(always)]
fn store_group<V: V16>(acc: &[V], y: Out, g: usize, n: usize) {
    let j0 = GROUP * g;
    let cols = GROUP.min(n - j0);
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: row i of y, columns j0 .. j0 + cols: the calling task's group.
        let out = unsafe { std::slice::from_raw_parts_mut(y.get().add(i * n + j0), cols) };
        store_lanes(*a, 0, out);
    }
}

/// Stores lanes `lane0 .. lane0 + out.len()` of `v`.
#[inline(always)]
fn store_lanes<V: V16>(v: V, lane0: usize, out: &mut [f32]) {
    if lane0 == 0 && out.len() == 16 {
        // SAFETY: 16 values.
        unsafe { v.store(out.as_mut_ptr()) };
    } else {
        let mut all = [0.0f32; 16];
        // SAFETY: 16 values.
        unsafe { v.store(all.as_mut_ptr()) };
        out.copy_from_slice(&all[lane0..lane0 + out.len()]);
    }
}

/// Prefill's panels from a repacked weight.
struct GroupPanels<'a> {
    w: &'a RepackedWeight,
}

impl Panels for GroupPanels<'_> {
    /// Per group of sixteen panel columns and block of 32: each value position of the
    /// sixteen rows decoded as one vector, exactly as `quant::dequantize` computes it
    /// (`(q - 8) · d`, `(q - 16) · d`, `q · d + m`, `q · d`; for the K-quants `(d · scale) ·
    /// q - dmin · min` and `(d · scale) · (q - 32)`), and stored as one panel row.
    #[inline(always)]
    fn decode_panel<W: V16>(
        &self,
        j0: usize,
        cols: usize,
        nr: usize,
        pc: usize,
        kc: usize,
        panel: &mut [f32],
    ) {
        let w = self.w;
        let lanes = GROUP.min(nr);
        let offset = W::splat(value_offset(w.dtype));
        let table = W::iota16().add(offset);
        for c0 in (0..nr).step_by(lanes) {
            let at = |p: usize| (p - pc) * nr + c0;
            if c0 >= cols {
                for p in pc..pc + kc {
                    panel[at(p)..at(p) + lanes].fill(0.0);
                }
                continue;
            }
            let (g, lane0) = ((j0 + c0) / GROUP, (j0 + c0) % GROUP);
            for p in (pc..pc + kc).step_by(32) {
                let rec = w.record(g, p / w.dtype.block_len());
                // SAFETY: 16 halves each.
                let d = unsafe { W::load_f16(rec.d.as_ptr()) };
                match w.dtype {
                    DType::Q6K => {
                        // Values p .. p + 32 of the block, of its scale groups p % 256 / 16
                        // and the next.
                        let (lo, hi) = (
                            rec.k6_scale(d, p % 256 / 16),
                            rec.k6_scale(d, p % 256 / 16 + 1),
                        );
                        for l in (0..32).step_by(4) {
                            let (c, n0) = k6_place(p % 256 + l);
                            // c % 2, written so that it is a literal once the loop is
                            // unrolled (p is a multiple of 32): values6's shifts are then
                            // immediates.
                            let e = l / 4 % 2;
                            debug_assert_eq!(e, c % 2);
                            let [top, q] = rec.k6_chunk::<W>(c);
                            let vals = W::values6(table, offset, q, top, e);
                            for t in 0..4 {
                                // Value p + l + t: nibble n0 + 2t of the chunk.
                                let val = vals[n0 + 2 * t].mul(if l < 16 { lo } else { hi });
                                let v = p + l + t;
                                store_lanes(val, lane0, &mut panel[at(v)..at(v) + lanes]);
                            }
                        }
                    }
                    DType::Q4K | DType::Q5K => {
                        // Sub-block j: the low (j even) or high nibbles of chunks 32 (j / 2) ..,
                        // Q5_K's fifth bits in masks 32 j + l.
                        let j = p % 256 / 32;
                        // SAFETY: 16 halves.
                        let dmin = unsafe { W::load_f16(rec.m.expect("dmin").as_ptr()) };
                        let [dj, mj] = rec.k4_scale_min(d, dmin, j);
                        for l in 0..32 {
                            // SAFETY: a Q4_K record holds 128 chunks of 16 bytes, Q5_K 160.
                            let q = unsafe {
                                let c = values_chunk(w.dtype, 32 * (j / 2) + l);
                                W::load_u8(rec.qs.as_ptr().add(GROUP * c))
                            };
                            let mut q = if j % 2 == 0 {
                                W::low_nibbles(q)
                            } else {
                                W::high_nibbles(q)
                            };
                            if w.dtype == DType::Q5K {
                                let mask = k5_mask(rec.qs, 32 * j + l);
                                let bit = W::u8_and(W::u8_from_bits(mask), W::u8_splat(0x10));
                                q = W::u8_or(q, bit);
                            }
                            let val = dj.mul(W::u8_to_f32(q)).sub(mj);
                            store_lanes(val, lane0, &mut panel[at(p + l)..at(p + l) + lanes]);
                        }
                    }
                    DType::Q8_0 => {
                        for v in 0..32 {
                            // SAFETY: a Q8_0 record holds 32 chunks of 16 bytes.
                            let q = unsafe { W::load_u8(rec.qs.as_ptr().add(GROUP * v)) };
                            let val = W::i8_to_f32(q).mul(d);
                            store_lanes(val, lane0, &mut panel[at(p + v)..at(p + v) + lanes]);
                        }
                    }
                    _ => {
                        let m = match rec.m {
                            // SAFETY: 16 halves.
                            Some(m) => unsafe { W::load_f16(m.as_ptr()) },
                            None => W::zero(),
                        };
                        for c in 0..4 {
                            // SAFETY: a 4- or 5-bit record holds 4 chunks of 64 bytes.
                            let q = unsafe { W::load_u32(rec.qs.as_ptr().add(64 * c)) };
                            for n in 0..8 {
                                let v = lane_value(c, n);
                                let h = fifth_mask(rec.qh, v);
                                let val = W::nibble_value(table, offset, q, n as u32, h);
                                let val = if rec.m.is_some() {
                                    val.mul(d).add(m)
                                } else {
                                    val.mul(d)
                                };
                                store_lanes(val, lane0, &mut panel[at(p + v)..at(p + v) + lanes]);
                            }
                        }
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
    use crate::simd::qmatmul::BlockWeight;
    use crate::simd::repack::repackable;
    use crate::simd::testing::multiplies_as_dequantized;

    /// Every level and team size, decode and prefill row counts, every format: the f64
    /// product of the dequantized weight within the bound of f32 sums, and the same bits
    /// for every thread count.
    #[test]
    fn every_format_multiplies_as_its_dequantized_weight_on_every_level_and_team_size() {
        // 70 rows: a partial last group and panel; k = 608: a partial depth block.
        let (n, k) = (70, 608);
        for dtype in DType::ALL.into_iter().filter(|&d| repackable(d)) {
            // K-quants: 768 values a row, three records.
            let k = if dtype.block_len() == 256 { 768 } else { k };
            let bytes = quant::sample_blocks(dtype, n * k, 5).unwrap();
            let mut wf = vec![0.0f32; n * k];
            quant::dequantize(dtype, &bytes, &mut wf);
            let w = RepackedWeight::new(
                &crate::arena::Arena::new(),
                &Team::new(1).unwrap(),
                &BlockWeight::new(dtype, n, k, &bytes).unwrap(),
                Layout::Values,
                |_| {},
            )
            .unwrap();
            multiplies_as_dequantized(&dtype.to_string(), &wf, n, k, |isa, team, t, x, y, m| {
                matmuls(isa, team, &BlockScratch::new(t), x, &[&w], &mut [y], m)
            });
        }
    }
}
