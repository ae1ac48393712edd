//! AMX int8 tiles (Intel Sapphire Rapids and later) for fast mode's prefill: the same
//! integer sums as the `vpdpbusd` kernels of `simd::qint`, sixteen activation rows by
//! sixteen weight rows per tile instruction, and the same f32 steps after them, so that the
//! results are bit for bit the AVX512-VNNI kernels'.
//!
//! **Per weight group** (16 rows), the group's records are unpacked once into a *panel* of
//! units, one per activation block of 32 values (a K-quant's sub-block; for `Q6_K` one per
//! group of 16, in its VNNI kernel's order):
//! - up to 512 bytes: the weights as signed bytes (`q - offset`, see `qint::offset`; `q -
//!   32` for `Q6_K`) in the tile layout `tdpbssd` reads as its second source: `len / 4`
//!   rows of 64 bytes, row `c` holding values `4c .. 4c + 4` of each weight row (weight row
//!   `j` at bytes `4j .. 4j + 4`), the `vpdpbusd` operand order of `simd::repack`'s
//!   `Layout::Dots`;
//! - 16 f32: each row's scale (`d`; a K-quant's `d · scale`);
//! - 16 f32: each row's min term (`m` for `Q4_1`/`Q5_1`, `-dmin · min` for `Q4_K`/`Q5_K`).
//!
//! **Per tile of 16 activation rows** and unit: `tdpbssd` (Intel SDM, "TDPBSSD") sums
//! `C[i][j] = Σ x_q[i][v] · w_q[j][v]` over the unit's values in int32, the tile is stored
//! to a 1 KiB buffer, and each row is scaled as `simd::qint` scales its sums: `acc += f32(C)
//! · (d_w · d_x)`, then `acc += m_w · s_x`. Units go through a two-deep pipeline: unit
//! `u + 1`'s tile instructions are issued before unit `u`'s scaling. The tile unit and the
//! vector units still overlap little: on a Xeon (model 207) a tile-block of 16 × 16 × 32
//! took about 47 ns, of which the tile instructions alone 31-32 and the scaling alone 23-26
//! (deeper pipelines, and four groups per tile of activations, measured no faster).
//!
//! **Enabling**: Linux grants the 8 KiB of tile data to a process that asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, kernel documentation
//! "x86/amx"); [`granted`] asks once. Stable Rust has no AMX intrinsics, so the tile
//! instructions are inline `asm!`; no register of the compiler's is touched by them.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::qint::x86::{
    F_Q4_0, F_Q4_1, F_Q5_0, F_Q5_1, F_Q8_0, f_offset, halves16, k4_operands, k6_operands, operands,
};
use super::repack::{GROUP, RepackedWeight};
use crate::quant::{DType, Q8Rows};
use crate::simd::v16::V16;
use crate::simd::vec::Avx512;

/// Activation rows of a tile.
pub(super) const ROWS: usize = 16;

/// Bytes of one unit of a panel: up to 512 of weights (256 for `Q6_K`'s groups of 16), 16
/// f32 scales, 16 f32 min terms.
const UNIT_BYTES: usize = 512 + 64 + 64;

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25) and Linux
/// granted this process the tile data state. Asked once; the grant holds for every thread.
pub fn granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        if (leaf7.edx >> 24) & 3 != 3 {
            return false;
        }
        // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18): 0 when granted.
        let ret: i64;
        // SAFETY: a system call that only changes this process's permitted xsave state; the
        // registers it clobbers are declared.
        unsafe {
            asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64,
                 in("rsi") 18i64, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    })
}

/// Values per panel unit: a block of 32, or one of `Q6_K`'s groups of 16.
fn unit_len(dtype: DType) -> usize {
    if dtype == DType::Q6K { 16 } else { 32 }
}

/// The tile configuration (Intel SDM, `LDTILECFG`) for units of `len` values: palette 1;
/// tiles 0 and 3 the int32 sums (16 rows × 64 bytes), 1 and 4 the activations (16 rows ×
/// `len` bytes), 2 and 5 the weights (`len / 4` rows × 64 bytes). Two of each, for the
/// pipeline.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Palette 1, every tile unused.
    fn empty() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        TileConfig(c)
    }

    /// Tile `t` as `rows` rows of `bytes` bytes.
    fn set(&mut self, t: usize, rows: usize, bytes: usize) {
        self.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
        self.0[48 + t] = rows as u8;
    }

    fn new(len: usize) -> TileConfig {
        let mut c = TileConfig::empty();
        for t in [0, 3] {
            c.set(t, 16, 64);
        }
        for t in [1, 4] {
            c.set(t, 16, len);
        }
        for t in [2, 5] {
            c.set(t, len / 4, 64);
        }
        c
    }
}

thread_local! {
    /// Each thread's panel, grown to the largest group it has unpacked.
    static PANEL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `y[i][16g ..]` for the first `16 ⌊m / 16⌋` rows of `x` and weight group `g`; returns the
/// rows done (the rest are the caller's).
///
/// # Safety
/// [`granted`] is true and the CPU has AVX512-F/BW/VNNI; `w` is in `Layout::Dots`; `x` has `m` rows of `w.k`; `y` points to `m * w.n` values of which no
/// other task writes group `g`'s columns.
pub(super) unsafe fn group(
    w: &RepackedWeight,
    x: &crate::quant::QuantizedRows,
    g: usize,
    m: usize,
    y: *mut f32,
) -> usize {
    let tiles = m / ROWS;
    if tiles == 0 {
        return 0;
    }
    PANEL.with(|p| {
        let mut panel = p.borrow_mut();
        let len = unit_len(w.dtype);
        let units = w.k / len;
        panel.resize(units * UNIT_BYTES, 0);
        // SAFETY: the caller's contract covers both.
        unsafe {
            unpack(w, g, &mut panel);
            let cfg = TileConfig::new(len);
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            let cols = GROUP.min(w.n - g * GROUP);
            for t in 0..tiles {
                let out = y.add(t * ROWS * w.n + g * GROUP);
                let xr = x.rows_from(t * ROWS, ROWS);
                match (w.dtype.has_min(), len) {
                    (true, _) => tile::<true, 32>(&panel, units, xr, w.k, out, w.n, cols),
                    (false, 32) => tile::<false, 32>(&panel, units, xr, w.k, out, w.n, cols),
                    _ => tile::<false, 16>(&panel, units, xr, w.k, out, w.n, cols),
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    });
    tiles * ROWS
}

/// Group `g`'s records into `panel` (see the module docs).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn unpack(w: &RepackedWeight, g: usize, panel: &mut [u8]) {
    /// Block `a`'s part of the panel: the weights made signed, the scales, the min terms.
    #[inline(always)]
    unsafe fn put(panel: &mut [u8], a: usize, ops: &[__m512i], off: i8, d: __m512, m: __m512) {
        let at = &mut panel[a * UNIT_BYTES..][..UNIT_BYTES];
        unsafe {
            let p = at.as_mut_ptr();
            for (c, op) in ops.iter().enumerate() {
                let v = _mm512_sub_epi8(*op, _mm512_set1_epi8(off));
                _mm512_storeu_si512(p.add(64 * c) as *mut __m512i, v);
            }
            _mm512_storeu_ps(p.add(512) as *mut f32, d);
            _mm512_storeu_ps(p.add(576) as *mut f32, m);
        }
    }
    macro_rules! blocks32 {
        ($f:expr) => {
            for b in 0..w.blocks() {
                let rec = w.record(g, b);
                let ops = unsafe { operands::<{ $f }>(&rec) };
                let d = unsafe { halves16(rec.d) };
                let m = rec
                    .m
                    .map_or(_mm512_setzero_ps(), |m| unsafe { halves16(m) });
                // The offsets are at most 128, which wraps to -128 as an i8: the byte
                // subtraction then gives `q + 128 - 128` all the same.
                unsafe { put(panel, b, &ops, f_offset($f) as i8, d, m) };
            }
        };
    }
    match w.dtype {
        DType::Q4_0 => blocks32!(F_Q4_0),
        DType::Q4_1 => blocks32!(F_Q4_1),
        DType::Q5_0 => blocks32!(F_Q5_0),
        DType::Q5_1 => blocks32!(F_Q5_1),
        DType::Q8_0 => blocks32!(F_Q8_0),
        DType::Q6K => {
            let (nib, top) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
            for b in 0..w.blocks() {
                let rec = w.record(g, b);
                // SAFETY: the record's 16 halves.
                let d = unsafe { <Avx512 as V16>::load_f16(rec.d.as_ptr()) };
                // The VNNI kernel's order: half h, half of each quarter, quarter.
                for h in 0..2 {
                    for half in 0..2 {
                        // SAFETY: h, half < 2.
                        let ops = unsafe { k6_operands(&rec, h, half, nib, top) };
                        for qr in 0..4 {
                            let rows: [__m512i; 4] =
                                [ops[0][qr], ops[1][qr], ops[2][qr], ops[3][qr]];
                            let s = rec.k6_scale(d, 8 * h + 2 * qr + half).raw();
                            let u = 16 * b + 8 * h + 4 * half + qr;
                            unsafe { put(panel, u, &rows, 32, s, _mm512_setzero_ps()) };
                        }
                    }
                }
            }
        }
        _ => {
            debug_assert!(matches!(w.dtype, DType::Q4K | DType::Q5K));
            let nib = _mm512_set1_epi8(0x0f);
            let five = w.dtype == DType::Q5K;
            for b in 0..w.blocks() {
                let rec = w.record(g, b);
                // SAFETY: the record's halves, 16 each.
                let (d, dmin) = unsafe {
                    (
                        <Avx512 as V16>::load_f16(rec.d.as_ptr()),
                        <Avx512 as V16>::load_f16(rec.m.expect("dmin").as_ptr()),
                    )
                };
                for i in 0..4 {
                    // SAFETY: i < 4 pairs of sub-blocks.
                    let ops = unsafe { k4_operands(&rec, w.dtype, i, nib, five) };
                    for (h, ops) in ops.iter().enumerate() {
                        let [s, mn] = rec.k4_scale_min(d, dmin, 2 * i + h).map(|v| v.raw());
                        // `-(dmin · min)`: added, as the VNNI kernel subtracts it.
                        let neg = _mm512_sub_ps(_mm512_setzero_ps(), mn);
                        unsafe { put(panel, 8 * b + 2 * i + h, ops, 0, s, neg) };
                    }
                }
            }
        }
    }
}

/// Unit `u` of a panel of `LEN`-value units: the activation block it meets and the byte
/// of that block where its values start. Blocks of 32 are units in order; `Q6_K`'s groups
/// of 16 are ordered as its VNNI kernel sums them (per superblock: half `h`, then half of
/// each quarter, then quarter `qr`: see `unpack`).
#[inline(always)]
fn unit_at<const LEN: usize>(u: usize) -> (usize, usize) {
    if LEN == 32 {
        (u, 0)
    } else {
        let (qr, half, h, b) = (u % 4, (u / 4) % 2, (u / 8) % 2, u / 16);
        (8 * b + 4 * h + qr, 16 * half)
    }
}

/// One tile of 16 activation rows against a panel of `units` units of `LEN` values:
/// `out[r * ldo + j]` for `r < 16`, `j < cols`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn tile<const MINS: bool, const LEN: usize>(
    panel: &[u8],
    units: usize,
    xr: Q8Rows<'_>,
    k: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    #[repr(C, align(64))]
    struct Sums([[i32; 256]; 2]);
    let mut sums = Sums([[0; 256]; 2]);
    let mut acc = [_mm512_setzero_ps(); ROWS];
    // Unit u's tile instructions into tiles 0-2 (even u) or 3-5 (odd), its sums stored to
    // sums[u % 2].
    let issue = |u: usize, sums: &mut Sums| {
        let (a, at) = unit_at::<LEN>(u);
        // SAFETY: row r of the activation tile is x's row r from value 32a + at (LEN
        // values of k a row); the panel holds `units` units; the sums buffer is 16 rows of
        // 64 bytes.
        unsafe {
            let (xa, wa) = (xr.qs(0, a).add(at), panel.as_ptr().add(u * UNIT_BYTES));
            let s = sums.0[u % 2].as_mut_ptr();
            macro_rules! step {
                ($c:literal, $x:literal, $w:literal) => {
                    asm!(concat!("tilezero tmm", $c),
                         concat!("tileloadd tmm", $x, ", [{x} + {k} * 1]"),
                         concat!("tileloadd tmm", $w, ", [{w} + {s64} * 1]"),
                         concat!("tdpbssd tmm", $c, ", tmm", $x, ", tmm", $w),
                         concat!("tilestored [{s} + {s64} * 1], tmm", $c),
                         x = in(reg) xa, k = in(reg) k, w = in(reg) wa, s = in(reg) s,
                         s64 = in(reg) 64usize, options(nostack))
                };
            }
            if u.is_multiple_of(2) {
                step!("0", "1", "2");
            } else {
                step!("3", "4", "5");
            }
        }
    };
    issue(0, &mut sums);
    for u in 0..units {
        if u + 1 < units {
            issue(u + 1, &mut sums);
        }
        let (a, _) = unit_at::<LEN>(u);
        // SAFETY: unit u of the panel; rows r < 16 of the view, a < its blocks.
        unsafe {
            let p = panel.as_ptr().add(u * UNIT_BYTES);
            let dw = _mm512_loadu_ps(p.add(512) as *const f32);
            let mw = _mm512_loadu_ps(p.add(576) as *const f32);
            let s = sums.0[u % 2].as_ptr();
            for (r, acc) in acc.iter_mut().enumerate() {
                let (xd, _, xs) = xr.block(r, a);
                let c = _mm512_cvtepi32_ps(_mm512_loadu_si512(s.add(16 * r) as *const __m512i));
                // The VNNI kernel's steps, in its order.
                *acc = _mm512_fmadd_ps(c, _mm512_mul_ps(dw, _mm512_set1_ps(xd)), *acc);
                if MINS {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs), *acc);
                }
            }
        }
    }
    let mask: __mmask16 = if cols >= 16 { !0 } else { (1 << cols) - 1 };
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r's columns j < cols, per the contract.
        unsafe { _mm512_mask_storeu_ps(out.add(r * ldo), mask, *acc) };
    }
}

/// The tile roof's probe: `iters` rounds of four independent `tdpbssd` on full tiles (16
/// rows × 64 bytes each source), 4 · 16 · 16 · 64 multiply-adds a round. Returns a value
/// that depends on every step.
///
/// # Safety
/// [`granted`] is true.
pub(super) unsafe fn probe(iters: usize) -> i32 {
    let mut cfg = TileConfig::empty();
    for t in 0..8 {
        cfg.set(t, 16, 64);
    }
    let src = [3i8; 1024];
    let mut sums = [0i32; 256];
    // SAFETY: tiles of 16 rows × 64 bytes read from and written to 1 KiB buffers.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
             "tileloadd tmm4, [{p} + {s} * 1]", "tileloadd tmm5, [{p} + {s} * 1]",
             p = in(reg) src.as_ptr(), s = in(reg) 64usize, options(nostack));
        for _ in 0..iters {
            asm!(
                "tdpbssd tmm0, tmm4, tmm5",
                "tdpbssd tmm1, tmm4, tmm5",
                "tdpbssd tmm2, tmm4, tmm5",
                "tdpbssd tmm3, tmm4, tmm5",
                options(nostack, nomem)
            );
        }
        asm!("tilestored [{p} + {s} * 1], tmm3", p = in(reg) sums.as_mut_ptr(),
             s = in(reg) 64usize, options(nostack));
        asm!("tilerelease", options(nostack, nomem));
    }
    sums.iter().fold(0, |s, v| s.wrapping_add(*v))
}

/// Multiply-adds of one [`probe`] round.
pub(super) const PROBE_MACS: usize = 4 * 16 * 16 * 64;
