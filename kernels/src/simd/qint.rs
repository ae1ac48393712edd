//! Fast mode's matrix multiply: 8-bit activations against the weights' block formats in
//! integer dot products, as ggml computes quantized matmuls, with the weights repacked once
//! so that one vector instruction serves sixteen weight rows.
//!
//! **Activations** ([`QuantizedRows`]): each row of `x` in 8-bit blocks of 32, with each
//! block's scale `d`, `Σq` and `s = d Σq` in f32, and `Σq` of each half block (see
//! `quant::q8_act`). ggml quantizes the activations of a K-quant matmul in blocks of 256
//! (`Q8_K`); chord keeps blocks of 32 for every format, so one quantized input serves
//! matmuls of different formats (a layer's q, k and v), and fast mode's numbers on K-quants
//! differ from llama.cpp's by that rounding too.
//!
//! **Weights** ([`RepackedWeight`] in [`Layout::Dots`], see `simd::repack`): every block
//! format, rows regrouped by sixteen, four quant bytes of a row per 32-bit lane. The
//! unsigned values an operand holds:
//! - `Q4_0`, `Q4_1`, `Q4_K`: nibbles; `Q8_0`: `q + 128`;
//! - `Q5_0`, `Q5_1`, `Q5_K`: nibbles with the fifth bit ORed into bit 4 of each byte;
//! - `Q6_K`: a `ql` nibble with two `qh` bits in bits 4-5.
//!
//! **Dot products**: per record and activation row, steps of "16 lanes × 4 bytes of weights
//! times the row's 4 activation bytes, broadcast" (`vpdpbusd` on AVX512-VNNI; `maddubs` +
//! `madd` on AVX2; 16-bit pairs, `wide`'s `i16x8::dot`, on the portable level) give the 16
//! rows' integer sums `Σ q_w q_x` over one activation block (a `Q6_K` group of 16: half a
//! block). The offsets of the unsigned weights are taken back with the activations' `Σ q_x`
//! (`- 8 Σq_x` for `Q4_0`, `- 16` for `Q5_0`, `- 32` per group of 16 for `Q6_K`, `- 128` for
//! `Q8_0`); then, in f32,
//! `acc += (d_w d_x) · sum` (`d_w` is `d · scale` for a K-quant's sub-block or group), plus
//! `m_w · s_x` for `Q4_1` and `Q5_1` (minus `(dmin · min) s_x` for `Q4_K` and `Q5_K`).
//! Blocks accumulate in order, so a result does not depend on the thread count.

use std::sync::Mutex;

use super::Out;
#[cfg(target_arch = "x86_64")]
use super::amx;
use super::repack::{GROUP, Layout, Record, RepackedWeight, dots_chunk};
use super::v16::halves4;
use super::{Isa, Level};
use crate::quant::{DType, QuantizedRows, f16_to_f32, scale_min_k4};
use crate::team::Team;
use wide::{f32x4, i16x8, u8x16, u32x4};

/// Activation rows up to which a matmul runs as a decode (each weight group read once for
/// all rows, row by row); above, row blocks of [`MR`]. The portable level's 4-, 5- and
/// 8-bit formats take all rows at once instead ([`group_portable`]).
const MR: usize = 4;

/// Per-call scratch of the fast path: the quantized activations.
#[derive(Debug, Default)]
pub struct IntScratch {
    act: Mutex<QuantizedRows>,
}

impl IntScratch {
    pub fn new() -> IntScratch {
        IntScratch::default()
    }
}

/// The integer kernel a CPU runs, chosen once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotKind {
    /// AMX int8 tiles for prefill's full tiles of 16 activation rows (`simd::amx`), and
    /// [`DotKind::Vnni512`] for the rest.
    Amx,
    /// `vpdpbusd` on zmm (AVX512-VNNI with AVX512-BW).
    Vnni512,
    /// `maddubs` + `madd` on ymm (AVX2).
    Avx2,
    /// `wide`'s vectors: 16-bit pairs (`i16x8::dot`, `pmaddwd` on x86-64) for the 4-, 5-
    /// and 8-bit formats, plain loops for the K-quants.
    Portable,
}

fn dot_kind(isa: Isa) -> DotKind {
    match isa.level() {
        // An `Isa` at this level exists only with AVX512-VNNI/BW and the tiles granted.
        Level::Amx => DotKind::Amx,
        #[cfg(target_arch = "x86_64")]
        Level::Avx512
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") =>
        {
            DotKind::Vnni512
        }
        Level::Avx512 | Level::Avx2 => DotKind::Avx2,
        Level::Portable => DotKind::Portable,
    }
}

/// The name of the integer kernel `isa` runs (for benchmark rows).
pub fn int_kernel_name(isa: Isa) -> &'static str {
    match dot_kind(isa) {
        DotKind::Amx => "amx-int8",
        DotKind::Vnni512 => "avx512-vnni",
        DotKind::Avx2 => "avx2-maddubs",
        DotKind::Portable => "portable",
    }
}

/// Independent accumulator chains of [`int8_probe`]: enough to cover the latency of a dot
/// product step times its issue width.
const PROBE_CHAINS: usize = 16;

/// Integer operations one [`int8_probe`] iteration performs at `isa` (2 per 8-bit
/// multiply-add).
pub fn int8_probe_ops_per_iter(isa: Isa) -> usize {
    let macs = match dot_kind(isa) {
        // One probe round of four tile instructions, counted per chain.
        #[cfg(target_arch = "x86_64")]
        DotKind::Amx => return amx::PROBE_MACS * 2,
        DotKind::Vnni512 => 64,
        DotKind::Avx2 => 32,
        DotKind::Portable => 1,
    };
    PROBE_CHAINS * macs * 2
}

/// The 8-bit roof's probe: `iters` rounds of [`PROBE_CHAINS`] independent chains of the dot
/// product step fast mode's kernel at `isa` runs (`vpdpbusd`; `maddubs` + `madd` + add;
/// a plain multiply-add). Returns a value that depends on every step.
pub fn int8_probe(isa: Isa, iters: usize) -> i32 {
    match dot_kind(isa) {
        // SAFETY: the level holds only with the tiles granted.
        #[cfg(target_arch = "x86_64")]
        DotKind::Amx => unsafe { amx::probe(iters) },
        // SAFETY: dot_kind checked the features.
        #[cfg(target_arch = "x86_64")]
        DotKind::Vnni512 => unsafe { x86::probe_vnni(iters) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        DotKind::Avx2 => unsafe { x86::probe_avx2(iters) },
        _ => {
            let mut acc = [0i32; PROBE_CHAINS];
            let mut b = std::hint::black_box(3i32);
            for _ in 0..iters {
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = a.wrapping_add((c as i32 + 1).wrapping_mul(b));
                }
                b = std::hint::black_box(b ^ 1);
            }
            acc.iter().fold(0, |s, a| s.wrapping_add(*a))
        }
    }
}

/// Most weights one call runs as one job.
const MAX_WEIGHTS: usize = 4;

/// What the unsigned weights of `dtype` hold above their value: `q_w - offset` is the value
/// the scale multiplies (`Q4_1`/`Q5_1` have a min instead).
fn offset(dtype: DType) -> i32 {
    match dtype {
        DType::Q4_0 => 8,
        DType::Q5_0 => 16,
        DType::Q8_0 => 128,
        _ => 0,
    }
}

/// `ys[i] (m, n_i) = x (m, k) · W_iᵀ` in integers, `x` quantized once for all the weights
/// (a layer's q, k and v; gate and up), their groups split over `team` as one job.
pub fn matmuls(
    isa: Isa,
    team: &Team,
    scratch: &IntScratch,
    x: &[f32],
    ws: &[&RepackedWeight],
    ys: &mut [&mut [f32]],
    m: usize,
) {
    debug_assert!(ws.iter().all(|w| w.layout == Layout::Dots));
    let Some(first) = ws.first() else { return };
    let k = first.k;
    // The kernels read x's blocks by pointer, as many as each weight's: the shapes must
    // agree (the backend checks them and returns an error first).
    assert!(
        ws.len() == ys.len()
            && x.len() == m * k
            && ws
                .iter()
                .zip(ys.iter())
                .all(|(w, y)| w.k == k && y.len() == m * w.n),
        "matmuls: shapes disagree"
    );
    let mut act = scratch.act.lock().unwrap_or_else(|e| e.into_inner());
    act.quantize_on(team, x, m, k);
    let act = &*act;
    let kind = dot_kind(isa);
    for (ws, ys) in ws.chunks(MAX_WEIGHTS).zip(ys.chunks_mut(MAX_WEIGHTS)) {
        let mut counts = [0usize; MAX_WEIGHTS];
        let mut outs = [Out(std::ptr::null_mut()); MAX_WEIGHTS];
        for (i, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
            counts[i] = w.n.div_ceil(GROUP);
            outs[i] = Out(y.as_mut_ptr());
        }
        let counts = &counts[..ws.len()];
        // Decoding: a few long runs per thread; prefilling: a group per task.
        let runs = if m <= MR {
            team.decode_runs(counts)
        } else {
            counts.iter().sum()
        };
        team.run_parts(counts, runs, &|i, groups| {
            for g in groups {
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if kind == DotKind::Amx && m > MR {
                    // SAFETY: the level holds only with the tiles granted and AVX512-VNNI;
                    // group g's columns belong to this task.
                    done = unsafe { amx::group(ws[i], act, g, m, outs[i].get()) };
                }
                if kind == DotKind::Portable && ws[i].dtype.block_len() == 32 {
                    // SAFETY: as below.
                    unsafe { group_portable(ws[i], act, g, m, outs[i].get()) };
                    continue;
                }
                for i0 in (done..m).step_by(MR) {
                    let rows = MR.min(m - i0);
                    // SAFETY: group g's columns of rows i0.. of y belong to this task.
                    unsafe { group(kind, ws[i], act, g, i0, rows, outs[i].get()) };
                }
            }
        });
    }
}

/// `y[i][16g ..]` for activation rows `i0 .. i0 + rows` (at most [`MR`]) and weight group `g`.
///
/// # Safety
/// `y` points to `m * w.n` values; no other task writes these elements.
unsafe fn group(
    kind: DotKind,
    w: &RepackedWeight,
    x: &QuantizedRows,
    g: usize,
    i0: usize,
    rows: usize,
    y: *mut f32,
) {
    let mut out = [[0.0f32; GROUP]; MR];
    let k4 = matches!(w.dtype, DType::Q4K | DType::Q5K);
    let k6 = w.dtype == DType::Q6K;
    // The tiles' remainder (and decode) runs on the VNNI kernels.
    let kind = if kind == DotKind::Amx {
        DotKind::Vnni512
    } else {
        kind
    };
    match kind {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only on CPUs with AVX512-VNNI and AVX512-BW.
        DotKind::Vnni512 if k6 => unsafe { x86::group_vnni_k6(w, x, g, i0, rows, &mut out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only at AVX2 and above.
        DotKind::Avx2 if k6 => unsafe { x86::group_avx2_k6(w, x, g, i0, rows, &mut out) },
        _ if k6 => group_portable_k6(w, x, g, i0, rows, &mut out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only on CPUs with AVX512-VNNI and AVX512-BW.
        DotKind::Vnni512 if k4 => unsafe { x86::group_vnni_k4(w, x, g, i0, rows, &mut out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        DotKind::Vnni512 => unsafe { x86::group_vnni(w, x, g, i0, rows, &mut out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only at AVX2 and above.
        DotKind::Avx2 if k4 => unsafe { x86::group_avx2_k4(w, x, g, i0, rows, &mut out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        DotKind::Avx2 => unsafe { x86::group_avx2(w, x, g, i0, rows, &mut out) },
        _ if k4 => group_portable_k4(w, x, g, i0, rows, &mut out),
        _ => unreachable!("the portable level's {} runs in group_portable", w.dtype),
    }
    let cols = GROUP.min(w.n - g * GROUP);
    for (r, o) in out.iter().enumerate().take(rows) {
        for (j, &v) in o.iter().enumerate().take(cols) {
            // SAFETY: element (i0 + r, 16g + j) of y, per the contract.
            unsafe { *y.add((i0 + r) * w.n + g * GROUP + j) = v };
        }
    }
}

/// A block's 32 values as four vectors of eight.
#[inline(always)]
fn widen(v: [i16; 32]) -> [i16x8; 4] {
    // A loop, not `array::from_fn` (see `unpack_values`).
    let mut out = [i16x8::ZERO; 4];
    for (o, c) in out.iter_mut().zip(v.chunks_exact(8)) {
        *o = i16x8::new(c.try_into().expect("eight values"));
    }
    out
}

/// A record's sixteen weight rows for [`group_portable`], each as its 32 unsigned values in
/// value order widened to i16 (vector `c` values `8c .. 8c + 8`), from the record's quants
/// in [`Layout::Dots`] (`qs`; `qh` the fifth bits of `Q5_0`/`Q5_1`). Row `j`'s lane of
/// chunks 0 to 3 (little-endian `u32`s, as the chunks are laid out) side by side are its
/// sixteen quant bytes in value order: for the 4- and 5-bit formats low nibbles values
/// `0 .. 16` and high nibbles `16 .. 32`, each fifth bit shifted to bit 4 of its byte; for
/// `Q8_0` chunks 4 to 7 hold values `16 .. 32`. Unpacked a byte at a time, decoding on this
/// level ran at 0.6 GB/s.
#[inline(always)]
fn unpack_values(dtype: DType, qs: &[u8], qh: Option<&[u8]>) -> [[i16x8; 4]; GROUP] {
    let lane = |c: usize, j: usize| {
        u32::from_le_bytes(qs[64 * c + 4 * j..][..4].try_into().expect("four bytes"))
    };
    // Four lanes as sixteen bytes, lane c's bytes at 4c .. 4c + 4 (little-endian targets,
    // as the kernels' reading of GGUF blocks in place assumes throughout).
    let bytes = |v: u32x4| -> [i16x8; 2] {
        let b: u8x16 = bytemuck::cast(v);
        [i16x8::from_u8x16_low(b), i16x8::from_u8x16_high(b)]
    };
    // A loop, not `array::from_fn`: its closure was not inlined here (a fifth of decoding).
    let mut vals = [[i16x8::ZERO; 4]; GROUP];
    for (j, v) in vals.iter_mut().enumerate() {
        let first = u32x4::new([lane(0, j), lane(1, j), lane(2, j), lane(3, j)]);
        let [lo, hi] = if dtype == DType::Q8_0 {
            [
                first,
                u32x4::new([lane(4, j), lane(5, j), lane(6, j), lane(7, j)]),
            ]
        } else {
            let nibbles = u32x4::splat(0x0f0f_0f0f);
            let (mut lo, mut hi) = (first & nibbles, (first >> 4) & nibbles);
            if let Some(qh) = qh {
                // Row j's fifth bits: byte t, bit c holds value 4c + t's bit and bit 4 + c
                // value 16 + 4c + t's (see `simd::repack`); lane c shifted right by c (by
                // 4 + c) brings them to bit 0 of each byte.
                let h = u32::from_le_bytes(qh[4 * j..][..4].try_into().expect("four bytes"));
                let ones = u32x4::splat(0x0101_0101);
                lo |= (u32x4::new([h, h >> 1, h >> 2, h >> 3]) & ones) << 4;
                hi |= (u32x4::new([h >> 4, h >> 5, h >> 6, h >> 7]) & ones) << 4;
            }
            [lo, hi]
        };
        let ([a, b], [c, d]) = (bytes(lo), bytes(hi));
        *v = [a, b, c, d];
    }
    vals
}

/// The portable level's kernel for the 4-, 5- and 8-bit formats: `y[i][16g ..]` for every
/// activation row `i < m`, each record unpacked once for all of them (unpacked once per
/// [`MR`] rows, the unpacking took a third of this level's time). Per record and
/// activation row, four weight rows at a time: their dots' lane sums (integers below 2²⁴,
/// exact in f32) transposed and added into one vector of four sums, then scaled as the
/// other kernels scale them, in `wide`'s `f32x4::mul_add` (two roundings where the target
/// has no FMA: the bits differ from the x86 levels', as their fast-mode figures do).
///
/// # Safety
/// `y` points to `m * w.n` values; no other task writes group `g`'s columns of them.
unsafe fn group_portable(w: &RepackedWeight, x: &QuantizedRows, g: usize, m: usize, y: *mut f32) {
    let blocks = w.k / 32;
    let off = offset(w.dtype) as f32;
    // Row i's sixteen outputs, four weight rows per vector.
    let mut acc = vec![[f32x4::ZERO; GROUP / 4]; m];
    for b in 0..blocks {
        let Record {
            d, m: mins, qh, qs, ..
        } = w.record(g, b);
        // The record unpacked once for all the activation rows, its values widened to i16,
        // and each activation row's too: the dot is pairs of 16-bit products summed in 32
        // bits (`wide`'s `i16x8::dot`: `pmaddwd` on baseline x86-64). Written on bytes, the
        // compiler assembled each vector a byte at a time (baseline x86-64 has no byte
        // widening instruction), and the level ran 4x slower.
        let vals = unpack_values(w.dtype, qs, qh);
        // Loops and literals, not `array::from_fn`, here and below: its closures were not
        // inlined (a tenth of decoding).
        let fours = |h: &[u8]| {
            let mut v = [f32x4::ZERO; GROUP / 4];
            for (c, v) in v.iter_mut().enumerate() {
                *v = halves4(&h[8 * c..][..8]);
            }
            v
        };
        let dw = fours(d);
        let mw = mins.map(fours);
        for (i, acc) in acc.iter_mut().enumerate() {
            let xr = x.row(i);
            let xq: &[i8; 32] = xr.qs[32 * b..][..32].try_into().expect("a block");
            let xq = widen(xq.map(i16::from));
            let scale = f32x4::splat(xr.d[b]);
            // The weights' offset times Σ q_x: at most 128 · 32 · 127, exact in f32.
            let taken = f32x4::splat(off * xr.sum[b] as f32);
            for (c, a) in acc.iter_mut().enumerate() {
                // Each weight row's lane sums: eight products of at most 255 · 128 each,
                // exact in f32 (and their sum of four below 2²⁴).
                let lanes = |t: usize| {
                    let v = &vals[4 * c + t];
                    f32x4::from_i32x4(
                        (v[0].dot(xq[0]) + v[1].dot(xq[1])) + (v[2].dot(xq[2]) + v[3].dot(xq[3])),
                    )
                };
                let [l0, l1, l2, l3] = f32x4::transpose([lanes(0), lanes(1), lanes(2), lanes(3)]);
                let sum = ((l0 + l1) + (l2 + l3)) - taken;
                *a = sum.mul_add(dw[c] * scale, *a);
                if let Some(mw) = &mw {
                    *a = mw[c].mul_add(f32x4::splat(xr.s[b]), *a);
                }
            }
        }
    }
    let cols = GROUP.min(w.n - g * GROUP);
    for (i, a) in acc.iter().enumerate() {
        let row: [f32; GROUP] = std::array::from_fn(|j| a[j / 4].to_array()[j % 4]);
        // SAFETY: row i's columns 16g .. 16g + cols of y, per the contract.
        let out = unsafe { std::slice::from_raw_parts_mut(y.add(i * w.n + g * GROUP), cols) };
        out.copy_from_slice(&row[..cols]);
    }
}

/// The plain-loop `Q4_K` and `Q5_K` kernel: each row's sub-blocks in integers, scaled one
/// by one.
fn group_portable_k4(
    w: &RepackedWeight,
    x: &QuantizedRows,
    g: usize,
    i0: usize,
    rows: usize,
    out: &mut [[f32; GROUP]; MR],
) {
    for b in 0..w.blocks() {
        let rec = w.record(g, b);
        let (dmin, packed) = (rec.m.expect("dmin"), rec.scales.expect("scales"));
        for j in 0..GROUP {
            // Row j's quant byte i (Q5_K: qh at 128).
            let byte = |i: usize| rec.qs[64 * dots_chunk(w.dtype, i / 4) + 4 * j + i % 4];
            let d = f16_to_f32([rec.d[2 * j], rec.d[2 * j + 1]]);
            let dmin = f16_to_f32([dmin[2 * j], dmin[2 * j + 1]]);
            let scales: [u8; 12] = std::array::from_fn(|t| packed[GROUP * t + j]);
            for r in 0..rows {
                let xr = x.row(i0 + r);
                let acc = &mut out[r][j];
                for sub in 0..8 {
                    let (sc, m) = scale_min_k4(sub, &scales);
                    let a = 8 * b + sub;
                    let xq = &xr.qs[32 * a..][..32];
                    let mut sum = 0i32;
                    for (l, &xv) in xq.iter().enumerate() {
                        // Value l of the sub-block: byte 32 (sub / 2) + l, nibble sub % 2.
                        let q = byte(32 * (sub / 2) + l);
                        let mut q = if sub % 2 == 0 { q & 0xf } else { q >> 4 };
                        if w.dtype == DType::Q5K {
                            q |= (byte(128 + l) >> sub & 1) << 4;
                        }
                        sum += q as i32 * xv as i32;
                    }
                    *acc = (sum as f32).mul_add(d * sc as f32 * xr.d[a], *acc);
                    *acc = (-(dmin * m as f32)).mul_add(xr.s[a], *acc);
                }
            }
        }
    }
}

/// The plain-loop `Q6_K` kernel: each row's groups of 16 in integers, scaled one by one.
fn group_portable_k6(
    w: &RepackedWeight,
    x: &QuantizedRows,
    g: usize,
    i0: usize,
    rows: usize,
    out: &mut [[f32; GROUP]; MR],
) {
    for b in 0..w.blocks() {
        let rec = w.record(g, b);
        let scales = rec.scales.expect("Q6_K scales");
        for j in 0..GROUP {
            let d = f16_to_f32([rec.d[2 * j], rec.d[2 * j + 1]]);
            // Row j's quant byte i (ql, then qh at 128).
            let byte = |i: usize| rec.qs[64 * dots_chunk(DType::Q6K, i / 4) + 4 * j + i % 4];
            for r in 0..rows {
                let xr = x.row(i0 + r);
                for h in 0..2 {
                    for qr in 0..4 {
                        let a = 8 * b + 4 * h + qr;
                        for half in 0..2 {
                            let mut sum = 0i32;
                            for l in 16 * half..16 * half + 16 {
                                let low =
                                    (byte(64 * h + 32 * (qr % 2) + l) >> (4 * (qr / 2))) & 0xf;
                                let q = low | ((byte(128 + 32 * h + l) >> (2 * qr)) & 3) << 4;
                                sum += q as i32 * xr.qs[32 * a + l] as i32;
                            }
                            let sum = sum - 32 * xr.sum16[2 * a + half];
                            let sc = scales[GROUP * (8 * h + 2 * qr + half) + j] as i8;
                            out[r][j] = (sum as f32).mul_add(d * sc as f32 * xr.d[a], out[r][j]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, MR, QuantizedRows, Record, RepackedWeight, dots_chunk, offset};
    use crate::quant::DType;
    use crate::simd::v16::{Pair, V16};
    use crate::simd::vec::{Avx2, Avx512};

    /// The 16 rows' halves at `p` as f32.
    #[inline(always)]
    pub(in crate::simd) unsafe fn halves16(p: &[u8]) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.as_ptr() as *const __m256i)) }
    }

    /// Four activation bytes at `x + at` as one 32-bit lane, broadcast to eight.
    #[inline(always)]
    unsafe fn bcast4_256(x: *const i8, at: usize) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(x.add(at) as *const i32)) }
    }

    /// Four activation bytes at `x + at` as one 32-bit lane, broadcast to sixteen.
    #[inline(always)]
    unsafe fn bcast4(x: *const i8, at: usize) -> __m512i {
        unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(x.add(at) as *const i32)) }
    }

    /// The 32-value block formats, as const parameters of [`vnni_blocks`].
    pub(in crate::simd) const F_Q4_0: u8 = 0;
    pub(in crate::simd) const F_Q4_1: u8 = 1;
    pub(in crate::simd) const F_Q5_0: u8 = 2;
    pub(in crate::simd) const F_Q5_1: u8 = 3;
    pub(in crate::simd) const F_Q8_0: u8 = 4;

    /// The offset of format `F`'s stored values ([`offset`]), fixed at compile time so that
    /// the formats without one carry no test for it.
    pub(in crate::simd) const fn f_offset(f: u8) -> i32 {
        match f {
            F_Q4_0 => 8,
            F_Q5_0 => 16,
            F_Q8_0 => 128,
            _ => 0,
        }
    }

    /// [`vnni_blocks`] for `w`'s format and `rows` (1 to [`MR`]) activation rows, each a
    /// copy of its own: the format's branches and the rows' accumulators are then fixed
    /// at compile time (accumulators indexed at run time lived on the stack).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_vnni(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        macro_rules! by_rows {
            ($f:expr) => {
                match rows {
                    1 => vnni_blocks::<$f, 1>(w, x, g, i0, out),
                    2 => vnni_blocks::<$f, 2>(w, x, g, i0, out),
                    3 => vnni_blocks::<$f, 3>(w, x, g, i0, out),
                    _ => vnni_blocks::<$f, 4>(w, x, g, i0, out),
                }
            };
        }
        // SAFETY: this function's features are the kernel's.
        unsafe {
            match w.dtype {
                DType::Q4_0 => by_rows!(F_Q4_0),
                DType::Q4_1 => by_rows!(F_Q4_1),
                DType::Q5_0 => by_rows!(F_Q5_0),
                DType::Q5_1 => by_rows!(F_Q5_1),
                _ => {
                    debug_assert_eq!(w.dtype, DType::Q8_0);
                    by_rows!(F_Q8_0)
                }
            }
        }
    }

    /// A 32-value block format `F` against `R` activation rows: per record, the eight
    /// operands (16 rows × 4 values each), then per row eight `vpdpbusd` steps, the offset
    /// taken back, the scales (and the min) applied.
    #[inline(always)]
    unsafe fn vnni_blocks<const F: u8, const R: usize>(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let blocks = w.k / 32;
            let mut acc = [_mm512_setzero_ps(); R];
            let off = const { f_offset(F) };
            debug_assert_eq!(off, offset(w.dtype));
            let mins = F == F_Q4_1 || F == F_Q5_1;
            let xr = x.rows_from(i0, R);
            for b in 0..blocks {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let dw = halves16(rec.d);
                let ops = operands::<F>(&rec);
                for r in 0..R {
                    // SAFETY: r < R rows of the view, b < its blocks.
                    let xq = xr.qs(r, b);
                    let (xd, xsum, xs) = xr.block(r, b);
                    let mut sum = _mm512_setzero_si512();
                    if F == F_Q8_0 {
                        // Two chains of four steps: one chain of eight held two-thread
                        // decode of Q8_0 files to 0.9x its speed.
                        let mut s1 = _mm512_setzero_si512();
                        for c in 0..4 {
                            sum = _mm512_dpbusd_epi32(sum, ops[c], bcast4(xq, 4 * c));
                            s1 = _mm512_dpbusd_epi32(s1, ops[4 + c], bcast4(xq, 16 + 4 * c));
                        }
                        sum = _mm512_add_epi32(sum, s1);
                    } else {
                        for c in 0..4 {
                            sum = _mm512_dpbusd_epi32(sum, ops[c], bcast4(xq, 4 * c));
                            sum = _mm512_dpbusd_epi32(sum, ops[4 + c], bcast4(xq, 16 + 4 * c));
                        }
                    }
                    if off != 0 {
                        sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(off * xsum));
                    }
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(xd));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
                    if mins {
                        let mw = halves16(rec.m.expect("mins"));
                        acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs), acc[r]);
                    }
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }

    /// Format `F`'s record as its eight `vpdpbusd` operands, 16 rows × 4 values each, the
    /// unsigned values as stored (see the module docs): operand `c` holds values `4c ..
    /// 4c + 4` of each row (`4 + c`: the high nibbles, values `16 + 4c ..`).
    #[inline(always)]
    pub(in crate::simd) unsafe fn operands<const F: u8>(rec: &Record<'_>) -> [__m512i; 8] {
        unsafe {
            let mut ops = [_mm512_setzero_si512(); 8];
            if F == F_Q8_0 {
                for (c, op) in ops.iter_mut().enumerate() {
                    *op = _mm512_loadu_si512(rec.qs.as_ptr().add(64 * c) as *const __m512i);
                }
                return ops;
            }
            let nib = _mm512_set1_epi8(0x0f);
            let bit4 = _mm512_set1_epi8(0x10);
            let five = F == F_Q5_0 || F == F_Q5_1;
            let h = if five {
                let qh = rec.qh.expect("fifth bits");
                _mm512_loadu_si512(qh.as_ptr() as *const __m512i)
            } else {
                _mm512_setzero_si512()
            };
            for c in 0..4 {
                let p = rec.qs.as_ptr().add(64 * c) as *const __m512i;
                let q = _mm512_loadu_si512(p);
                ops[c] = _mm512_and_si512(q, nib);
                ops[4 + c] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib);
                if five {
                    // Bit 4 of each byte: chunk c's fifth bits (see `simd::repack`).
                    let lo = _mm512_sll_epi32(h, _mm_cvtsi32_si128(4 - c as i32));
                    let hi = _mm512_srl_epi32(h, _mm_cvtsi32_si128(c as i32));
                    ops[c] = _mm512_or_si512(ops[c], _mm512_and_si512(lo, bit4));
                    ops[4 + c] = _mm512_or_si512(ops[4 + c], _mm512_and_si512(hi, bit4));
                }
            }
            ops
        }
    }

    /// Bit `j` of each byte of `h` moved to bit 4, the other bits cleared (`Q5_K`'s fifth
    /// bits of sub-block `j`): a 16-bit shift, whose bits crossing bytes the mask clears.
    #[inline(always)]
    unsafe fn bit_to_4_512(h: __m512i, j: usize) -> __m512i {
        unsafe {
            let v = if j <= 4 {
                _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - j as i32))
            } else {
                _mm512_srl_epi16(h, _mm_cvtsi32_si128(j as i32 - 4))
            };
            _mm512_and_si512(v, _mm512_set1_epi8(0x10))
        }
    }

    /// [`bit_to_4_512`] on 32 bytes.
    #[inline(always)]
    unsafe fn bit_to_4_256(h: __m256i, j: usize) -> __m256i {
        unsafe {
            let v = if j <= 4 {
                _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - j as i32))
            } else {
                _mm256_srl_epi16(h, _mm_cvtsi32_si128(j as i32 - 4))
            };
            _mm256_and_si256(v, _mm256_set1_epi8(0x10))
        }
    }

    /// `Q4_K`/`Q5_K`'s sub-blocks `2i` and `2i + 1` of a record as two sets of eight
    /// `vpdpbusd` operands (unsigned, 16 rows × 4 values each): the low nibbles of chunks
    /// `8i .. 8i + 8` and the high (`Q5_K`: with their fifth bits).
    #[inline(always)]
    pub(in crate::simd) unsafe fn k4_operands(
        rec: &Record<'_>,
        dtype: DType,
        i: usize,
        nib: __m512i,
        five: bool,
    ) -> [[__m512i; 8]; 2] {
        unsafe {
            let mut lo = [_mm512_setzero_si512(); 8];
            let mut hi = [_mm512_setzero_si512(); 8];
            for c in 0..8 {
                let at = dots_chunk(dtype, 8 * i + c);
                let p = rec.qs.as_ptr().add(64 * at) as *const __m512i;
                let q = _mm512_loadu_si512(p);
                lo[c] = _mm512_and_si512(q, nib);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), nib);
                if five {
                    let at = dots_chunk(dtype, 32 + c);
                    let p = rec.qs.as_ptr().add(64 * at) as *const __m512i;
                    let h = _mm512_loadu_si512(p);
                    lo[c] = _mm512_or_si512(lo[c], bit_to_4_512(h, 2 * i));
                    hi[c] = _mm512_or_si512(hi[c], bit_to_4_512(h, 2 * i + 1));
                }
            }
            [lo, hi]
        }
    }

    /// `Q6_K`'s half `h` of a record, positions `16 half ..` of each of its four quarters, as
    /// `vpdpbusd` operands (unsigned `q`, 16 rows × 4 values each): `ops[c][quarter]` holds
    /// positions `16 half + 4c .. + 4` of the quarter (see `simd::repack`).
    #[inline(always)]
    pub(in crate::simd) unsafe fn k6_operands(
        rec: &Record<'_>,
        h: usize,
        half: usize,
        nib: __m512i,
        top: __m512i,
    ) -> [[__m512i; 4]; 4] {
        unsafe {
            let mut ops = [[_mm512_setzero_si512(); 4]; 4];
            for (c, ops) in ops.iter_mut().enumerate() {
                let p = rec.qs.as_ptr().add(64 * 3 * (8 * h + 4 * half + c));
                let a = _mm512_loadu_si512(p as *const __m512i);
                let bq = _mm512_loadu_si512(p.add(64) as *const __m512i);
                let q = _mm512_loadu_si512(p.add(128) as *const __m512i);
                // Each quarter: its `ql` nibble, with two `qh` bits moved to bits 4-5 (no
                // closure for the mask: it would be compiled without the caller's features).
                let (lo_a, lo_b) = (_mm512_and_si512(a, nib), _mm512_and_si512(bq, nib));
                let (hi_a, hi_b) = (
                    _mm512_and_si512(_mm512_srli_epi16::<4>(a), nib),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(bq), nib),
                );
                ops[0] = _mm512_or_si512(lo_a, _mm512_and_si512(_mm512_slli_epi16::<4>(q), top));
                ops[1] = _mm512_or_si512(lo_b, _mm512_and_si512(_mm512_slli_epi16::<2>(q), top));
                ops[2] = _mm512_or_si512(hi_a, _mm512_and_si512(q, top));
                ops[3] = _mm512_or_si512(hi_b, _mm512_and_si512(_mm512_srli_epi16::<2>(q), top));
            }
            ops
        }
    }

    /// `Q4_K` and `Q5_K`: per record, each pair of sub-blocks (`2i` in the low nibbles of
    /// chunks `8i .. 8i + 8`, `2i + 1` in the high; `Q5_K`'s fifth bits in bits `2i`,
    /// `2i + 1` of its `qh` chunks `32 ..`) as eight `vpdpbusd` steps each, then each
    /// sub-block's `d · scale` and `dmin · min` applied to its sum.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_vnni_k4(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); MR];
            let nib = _mm512_set1_epi8(0x0f);
            let five = w.dtype == DType::Q5K;
            let xr = x.rows_from(i0, rows);
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let d = <Avx512 as V16>::load_f16(rec.d.as_ptr());
                let dmin = <Avx512 as V16>::load_f16(rec.m.expect("dmin").as_ptr());
                // The record's eight sub-blocks' d · scale and dmin · min, unpacked once.
                let sm: [[__m512; 2]; 8] =
                    std::array::from_fn(|j| rec.k4_scale_min(d, dmin, j).map(|v| v.raw()));
                for i in 0..4 {
                    let [d0, m0] = sm[2 * i];
                    let [d1, m1] = sm[2 * i + 1];
                    let [lo, hi] = k4_operands(&rec, w.dtype, i, nib, five);
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let (a0, a1) = (8 * b + 2 * i, 8 * b + 2 * i + 1);
                        // SAFETY: r < rows of the view; a0, a1 < its blocks.
                        let (x0, x1) = (xr.qs(r, a0), xr.qs(r, a1));
                        let ((xd0, _, xs0), (xd1, _, xs1)) = (xr.block(r, a0), xr.block(r, a1));
                        let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for c in 0..8 {
                            s0 = _mm512_dpbusd_epi32(s0, lo[c], bcast4(x0, 4 * c));
                            s1 = _mm512_dpbusd_epi32(s1, hi[c], bcast4(x1, 4 * c));
                        }
                        let scale0 = _mm512_mul_ps(d0, _mm512_set1_ps(xd0));
                        let scale1 = _mm512_mul_ps(d1, _mm512_set1_ps(xd1));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), scale0, *acc);
                        *acc = _mm512_fnmadd_ps(m0, _mm512_set1_ps(xs0), *acc);
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), scale1, *acc);
                        *acc = _mm512_fnmadd_ps(m1, _mm512_set1_ps(xs1), *acc);
                    }
                }
            }
            for r in 0..rows {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }

    /// `Q4_K` and `Q5_K` on AVX2: [`group_vnni_k4`] in two halves of eight rows, `maddubs` +
    /// `madd` for each dot product step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2_k4(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let nib = _mm256_set1_epi8(0x0f);
            let five = w.dtype == DType::Q5K;
            let xr = x.rows_from(i0, rows);
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let d = <Pair<Avx2> as V16>::load_f16(rec.d.as_ptr());
                let dmin = <Pair<Avx2> as V16>::load_f16(rec.m.expect("dmin").as_ptr());
                // The record's eight sub-blocks' d · scale and dmin · min, unpacked once.
                let sm: [[[__m256; 2]; 2]; 8] = std::array::from_fn(|j| {
                    rec.k4_scale_min(d, dmin, j)
                        .map(|v| v.halves().map(|h| h.raw()))
                });
                for i in 0..4 {
                    let [d0, m0] = sm[2 * i];
                    let [d1, m1] = sm[2 * i + 1];
                    for h in 0..2 {
                        let mut lo = [_mm256_setzero_si256(); 8];
                        let mut hi = [_mm256_setzero_si256(); 8];
                        for c in 0..8 {
                            let at = dots_chunk(w.dtype, 8 * i + c);
                            let p = rec.qs.as_ptr().add(64 * at + 32 * h);
                            let q = _mm256_loadu_si256(p as *const __m256i);
                            lo[c] = _mm256_and_si256(q, nib);
                            hi[c] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), nib);
                            if five {
                                let at = dots_chunk(w.dtype, 32 + c);
                                let p = rec.qs.as_ptr().add(64 * at + 32 * h);
                                let f = _mm256_loadu_si256(p as *const __m256i);
                                lo[c] = _mm256_or_si256(lo[c], bit_to_4_256(f, 2 * i));
                                hi[c] = _mm256_or_si256(hi[c], bit_to_4_256(f, 2 * i + 1));
                            }
                        }
                        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                            let (a0, a1) = (8 * b + 2 * i, 8 * b + 2 * i + 1);
                            // SAFETY: r < rows of the view; a0, a1 < its blocks.
                            let (x0, x1) = (xr.qs(r, a0), xr.qs(r, a1));
                            let ((xd0, _, xs0), (xd1, _, xs1)) = (xr.block(r, a0), xr.block(r, a1));
                            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                            for c in 0..8 {
                                s0 = _mm256_add_epi32(s0, dot4(lo[c], bcast4_256(x0, 4 * c)));
                                s1 = _mm256_add_epi32(s1, dot4(hi[c], bcast4_256(x1, 4 * c)));
                            }
                            let scale0 = _mm256_mul_ps(d0[h], _mm256_set1_ps(xd0));
                            let scale1 = _mm256_mul_ps(d1[h], _mm256_set1_ps(xd1));
                            let a = &mut acc[h];
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), scale0, *a);
                            *a = _mm256_fnmadd_ps(m0[h], _mm256_set1_ps(xs0), *a);
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), scale1, *a);
                            *a = _mm256_fnmadd_ps(m1[h], _mm256_set1_ps(xs1), *a);
                        }
                    }
                }
            }
            for r in 0..rows {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[r][1]);
            }
        }
    }

    /// `Q6_K`: per record half and group of 16 positions, the four quarters' operands of
    /// four chunk triples, then per activation row and quarter four `vpdpbusd` steps, less
    /// `32 Σq_x`, times the group's `d · scale` and the block's `d_x`. The scales are
    /// converted where they are used: the record's sixteen held in an array spilled to the
    /// stack, and decode ran at a third of the speed.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group_vnni_k6(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); MR];
            let (nib, top) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
            let xr = x.rows_from(i0, rows);
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let d = <Avx512 as V16>::load_f16(rec.d.as_ptr());
                for h in 0..2 {
                    for half in 0..2 {
                        let ops = k6_operands(&rec, h, half, nib, top);
                        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                            for qr in 0..4 {
                                let a = 8 * b + 4 * h + qr;
                                // SAFETY: r < rows of the view; a < its blocks.
                                let (xq, (xd, _, _)) = (xr.qs(r, a).add(16 * half), xr.block(r, a));
                                let mut s = _mm512_setzero_si512();
                                for (c, ops) in ops.iter().enumerate() {
                                    s = _mm512_dpbusd_epi32(s, ops[qr], bcast4(xq, 4 * c));
                                }
                                let s = _mm512_sub_epi32(
                                    s,
                                    _mm512_set1_epi32(32 * xr.sum16(r, 2 * a + half)),
                                );
                                let scale = _mm512_mul_ps(
                                    rec.k6_scale(d, 8 * h + 2 * qr + half).raw(),
                                    _mm512_set1_ps(xd),
                                );
                                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
                            }
                        }
                    }
                }
            }
            for r in 0..rows {
                _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }

    /// `Q6_K` on AVX2: [`group_vnni_k6`] in two halves of eight rows, `maddubs` + `madd`
    /// for each dot product step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2_k6(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let (nib, top) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
            let xr = x.rows_from(i0, rows);
            for b in 0..w.blocks() {
                w.prefetch(g, b);
                let rec = w.record(g, b);
                let d = <Pair<Avx2> as V16>::load_f16(rec.d.as_ptr());
                for h in 0..2 {
                    for half in 0..2 {
                        for rh in 0..2 {
                            let mut ops = [[_mm256_setzero_si256(); 4]; 4];
                            for (c, ops) in ops.iter_mut().enumerate() {
                                let p = rec
                                    .qs
                                    .as_ptr()
                                    .add(64 * 3 * (8 * h + 4 * half + c) + 32 * rh);
                                let a = _mm256_loadu_si256(p as *const __m256i);
                                let bq = _mm256_loadu_si256(p.add(64) as *const __m256i);
                                let q = _mm256_loadu_si256(p.add(128) as *const __m256i);
                                let hi = |v: __m256i| _mm256_and_si256(v, top);
                                ops[0] = _mm256_or_si256(
                                    _mm256_and_si256(a, nib),
                                    hi(_mm256_slli_epi16::<4>(q)),
                                );
                                ops[1] = _mm256_or_si256(
                                    _mm256_and_si256(bq, nib),
                                    hi(_mm256_slli_epi16::<2>(q)),
                                );
                                ops[2] = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(a), nib),
                                    hi(q),
                                );
                                ops[3] = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(bq), nib),
                                    hi(_mm256_srli_epi16::<2>(q)),
                                );
                            }
                            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                                for qr in 0..4 {
                                    let a = 8 * b + 4 * h + qr;
                                    // SAFETY: r < rows of the view; a < its blocks.
                                    let (xq, (xd, _, _)) =
                                        (xr.qs(r, a).add(16 * half), xr.block(r, a));
                                    let mut s = _mm256_setzero_si256();
                                    for (c, ops) in ops.iter().enumerate() {
                                        s = _mm256_add_epi32(
                                            s,
                                            dot4(ops[qr], bcast4_256(xq, 4 * c)),
                                        );
                                    }
                                    let s = _mm256_sub_epi32(
                                        s,
                                        _mm256_set1_epi32(32 * xr.sum16(r, 2 * a + half)),
                                    );
                                    let sc = rec.k6_scale(d, 8 * h + 2 * qr + half);
                                    let scale =
                                        _mm256_mul_ps(sc.halves()[rh].raw(), _mm256_set1_ps(xd));
                                    acc[rh] =
                                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[rh]);
                                }
                            }
                        }
                    }
                }
            }
            for r in 0..rows {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[r][1]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn probe_vnni(iters: usize) -> i32 {
        let (a, mut b) = (
            _mm512_set1_epi8(3),
            _mm512_set1_epi8(std::hint::black_box(-2)),
        );
        let one = _mm512_set1_epi8(1);
        let mut acc = [_mm512_setzero_si512(); super::PROBE_CHAINS];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_dpbusd_epi32(*c, a, b);
            }
            // A new operand each round, so nothing is hoisted out of the loop.
            b = _mm512_xor_si512(b, one);
        }
        let s = acc
            .iter()
            .fold(_mm512_setzero_si512(), |s, c| _mm512_add_epi32(s, *c));
        _mm512_reduce_add_epi32(s)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn probe_avx2(iters: usize) -> i32 {
        unsafe {
            let (a, mut b) = (
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(std::hint::black_box(-2)),
            );
            let one = _mm256_set1_epi8(1);
            let mut acc = [_mm256_setzero_si256(); super::PROBE_CHAINS];
            for _ in 0..iters {
                for c in acc.iter_mut() {
                    *c = _mm256_add_epi32(*c, dot4(a, b));
                }
                b = _mm256_xor_si256(b, one);
            }
            let s = acc
                .iter()
                .fold(_mm256_setzero_si256(), |s, c| _mm256_add_epi32(s, *c));
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
            lanes.iter().fold(0, |t, v| t.wrapping_add(*v))
        }
    }

    /// `vpdpbusd` on 8 lanes from AVX2: `maddubs` (u8 × i8 pairs to i16) then `madd` with
    /// ones (i16 pairs to i32). The pairs cannot saturate: weights are at most 63 here
    /// (`Q6_K`; `2 · 63 · 128 < 2^15`).
    #[inline(always)]
    unsafe fn dot4(w: __m256i, x: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
    }

    /// Signed × signed on 8 lanes (`Q8_0`): `|w| · (x · sign w)`, at most 128 · 127 · 2 per
    /// pair, no saturation.
    #[inline(always)]
    unsafe fn dot4_signed(w: __m256i, x: __m256i) -> __m256i {
        unsafe { dot4(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_avx2(
        w: &RepackedWeight,
        x: &QuantizedRows,
        g: usize,
        i0: usize,
        rows: usize,
        out: &mut [[f32; GROUP]; MR],
    ) {
        unsafe {
            let blocks = w.k / 32;
            // Two halves of 8 rows each.
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let nib = _mm256_set1_epi8(0x0f);
            let bit4 = _mm256_set1_epi8(0x10);
            let flip = _mm256_set1_epi8(-128);
            let off = offset(w.dtype);
            let xr = x.rows_from(i0, rows);
            for b in 0..blocks {
                w.prefetch(g, b);
                let Record {
                    d, m: mins, qh, qs, ..
                } = w.record(g, b);
                for h in 0..2 {
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(16 * h) as *const __m128i));
                    let mw = mins.map(|m| {
                        _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(16 * h) as *const __m128i))
                    });
                    let mut ops = [_mm256_setzero_si256(); 8];
                    if w.dtype == DType::Q8_0 {
                        for (c, op) in ops.iter_mut().enumerate() {
                            let q = _mm256_loadu_si256(
                                qs.as_ptr().add(64 * c + 32 * h) as *const __m256i
                            );
                            *op = _mm256_xor_si256(q, flip); // back to signed
                        }
                    } else {
                        let fifth = qh.map(|qh| {
                            _mm256_loadu_si256(qh.as_ptr().add(32 * h) as *const __m256i)
                        });
                        for c in 0..4 {
                            let q = _mm256_loadu_si256(
                                qs.as_ptr().add(64 * c + 32 * h) as *const __m256i
                            );
                            ops[c] = _mm256_and_si256(q, nib);
                            ops[4 + c] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), nib);
                            if let Some(f) = fifth {
                                // Bit 4 of each byte: chunk c's fifth bits (see `simd::repack`).
                                let lo = _mm256_sll_epi32(f, _mm_cvtsi32_si128(4 - c as i32));
                                let hi = _mm256_srl_epi32(f, _mm_cvtsi32_si128(c as i32));
                                ops[c] = _mm256_or_si256(ops[c], _mm256_and_si256(lo, bit4));
                                ops[4 + c] =
                                    _mm256_or_si256(ops[4 + c], _mm256_and_si256(hi, bit4));
                            }
                        }
                    }
                    for r in 0..rows {
                        // SAFETY: r < rows of the view; b < its blocks.
                        let (xq, (xd, xsum, xs)) = (xr.qs(r, b), xr.block(r, b));
                        let mut sum = _mm256_setzero_si256();
                        if w.dtype == DType::Q8_0 {
                            for (c, op) in ops.iter().enumerate() {
                                sum =
                                    _mm256_add_epi32(sum, dot4_signed(*op, bcast4_256(xq, 4 * c)));
                            }
                        } else {
                            for c in 0..4 {
                                sum = _mm256_add_epi32(sum, dot4(ops[c], bcast4_256(xq, 4 * c)));
                                sum = _mm256_add_epi32(
                                    sum,
                                    dot4(ops[4 + c], bcast4_256(xq, 16 + 4 * c)),
                                );
                            }
                            if off != 0 {
                                sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(off * xsum));
                            }
                        }
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xd));
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r][h]);
                        if let Some(mw) = mw {
                            acc[r][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs), acc[r][h]);
                        }
                    }
                }
            }
            for r in 0..rows {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[r][1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{
        self, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
        Q8Row,
    };
    use crate::simd::qmatmul::BlockWeight;
    use crate::simd::repack::repackable;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i * 7919 + seed * 104_729) % 2011) as f32 / 1005.5 - 1.0)
                    * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    /// `bytes`, `n` rows of `k` values of `dtype`, repacked for fast mode.
    fn dots_weight(dtype: DType, n: usize, k: usize, bytes: &[u8]) -> RepackedWeight {
        let w = BlockWeight::new(dtype, n, k, bytes).unwrap();
        let team = Team::new(1).unwrap();
        RepackedWeight::new(&crate::arena::Arena::new(), &team, &w, Layout::Dots, |_| {}).unwrap()
    }

    /// Every format's reference dot (`dot_q8`) of a row of blocks with a quantized row.
    fn reference_dot(dtype: DType, blocks: &[u8], x: &Q8Row<'_>) -> f32 {
        let b = blocks;
        match dtype {
            DType::Q4_0 => BlockQ4_0::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q4_1 => BlockQ4_1::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q5_0 => BlockQ5_0::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q5_1 => BlockQ5_1::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q8_0 => BlockQ8_0::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q4K => BlockQ4K::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q5K => BlockQ5K::dot_q8(bytemuck::cast_slice(b), x),
            DType::Q6K => BlockQ6K::dot_q8(bytemuck::cast_slice(b), x),
            _ => panic!("no integer reference for {dtype}"),
        }
    }

    /// The block formats: all of them have integer kernels.
    fn block_formats() -> impl Iterator<Item = DType> {
        DType::ALL.into_iter().filter(|&d| repackable(d))
    }

    /// Each format's reference dot is the dequantized weights' dot product with the
    /// dequantized activations (`d_x q_x`), in f64, up to f32 rounding: this ties the integer
    /// references, and the activations' sums they use, to `quant::dequantize`.
    #[test]
    fn reference_dots_equal_the_dequantized_product() {
        let (n, k) = (5, 512);
        for dtype in block_formats() {
            let bytes = quant::sample_blocks(dtype, n * k, 9).unwrap();
            let mut wf = vec![0.0f32; n * k];
            quant::dequantize(dtype, &bytes, &mut wf);
            let mut act = QuantizedRows::default();
            act.quantize(&values(k, 3), 1, k);
            let x = act.row(0);
            let row_bytes = dtype.bytes_for(k).unwrap();
            for j in 0..n {
                let got = reference_dot(dtype, &bytes[j * row_bytes..][..row_bytes], &x);
                let (want, mag) = (0..k).fold((0.0f64, 0.0f64), |(s, m), v| {
                    let p = wf[j * k + v] as f64 * x.d[v / 32] as f64 * x.qs[v] as f64;
                    (s + p, m + p.abs())
                });
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * mag + 1e-6,
                    "{dtype} row {j}: {got}, want {want} (Σ|wx| {mag})"
                );
            }
        }
    }

    /// The AMX tiles give the AVX512-VNNI kernels' results bit for bit (the same integer
    /// sums, the same f32 steps in the same order), for every format, on full tiles, a
    /// remainder and a partial last group, on one thread and two.
    #[test]
    fn tiles_give_the_vnni_kernels_bits() {
        let (Some(tiles), Some(vnni)) = (Isa::new(Level::Amx), Isa::new(Level::Avx512)) else {
            eprintln!("this CPU has no AMX tiles: nothing to compare");
            return;
        };
        let n = 37;
        for dtype in block_formats() {
            let k = 3 * dtype.block_len();
            let bytes = quant::sample_blocks(dtype, n * k, 5).unwrap();
            let w = dots_weight(dtype, n, k, &bytes);
            for m in [16, 21, 48] {
                let x = values(m * k, 4);
                let run = |isa: Isa, threads: usize| {
                    let mut y = vec![f32::NAN; m * n];
                    let team = Team::new(threads).unwrap();
                    matmuls(isa, &team, &IntScratch::new(), &x, &[&w], &mut [&mut y], m);
                    y
                };
                let want = run(vnni, 1);
                for threads in [1, 2] {
                    let got = run(tiles, threads);
                    for (e, (g, v)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            v.to_bits(),
                            "{dtype} m {m} t{threads}: y[{e}] = {g}, VNNI {v}"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel of every level this CPU runs equals the format's reference dot of the
    /// original (unrepacked) blocks up to f32 rounding, for every format, on odd row counts
    /// and team sizes. (The VNNI kernels run only on a CPU with AVX512-VNNI; without it the
    /// AVX-512 level runs the AVX2 ones.)
    #[test]
    fn every_kernel_matches_the_reference_dots() {
        let n = 37;
        for dtype in block_formats() {
            let k = 3 * dtype.block_len();
            let bytes = match dtype {
                // No quantizer for these: seeded blocks of every bit pattern.
                DType::Q5_0 | DType::Q5_1 | DType::Q4K | DType::Q5K | DType::Q6K => {
                    quant::sample_blocks(dtype, n * k, 1).unwrap()
                }
                _ => quant::quantize(dtype, &values(n * k, 1)).unwrap(),
            };
            let w = dots_weight(dtype, n, k, &bytes);
            // Decode, prefill in blocks of MR rows, and (at the AMX level) full tiles of 16
            // rows with a remainder.
            for m in [1, 3, 6, 16, 35] {
                let x = values(m * k, 2);
                let mut act = QuantizedRows::default();
                act.quantize(&x, m, k);
                // Reference: each format's scalar dot of the original blocks with the same
                // quantized activations.
                let row_bytes = dtype.bytes_for(k).unwrap();
                let mut reference = vec![0.0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let blocks = &bytes[j * row_bytes..(j + 1) * row_bytes];
                        reference[i * n + j] = reference_dot(dtype, blocks, &act.row(i));
                    }
                }
                for isa in Isa::available() {
                    for threads in [1, 2, 3] {
                        let team = Team::new(threads).unwrap();
                        let mut y = vec![f32::NAN; m * n];
                        matmuls(isa, &team, &IntScratch::new(), &x, &[&w], &mut [&mut y], m);
                        for (e, (g, r)) in y.iter().zip(&reference).enumerate() {
                            assert!(
                                (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                "{dtype} m {m} {:?} t{threads}: y[{e}] = {g}, want {r}",
                                isa.level()
                            );
                        }
                    }
                }
            }
        }
    }
}
