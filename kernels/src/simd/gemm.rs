//! Packed matrix multiply: `y (m, n) = x (m, k) · W (n, k)ᵀ`.
//!
//! The weight is packed once ([`pack_weight`]) into panels of `NR` rows, each panel stored
//! `k`-major: `panel[p][j] = W[panel_start + j][p]`, zero-padded to a whole panel. This is
//! the `B` operand of a BLIS-style GEMM already in its micro-panel layout, so a call packs
//! only the activations.
//!
//! The microkernel computes an `MR × NR` tile of `y` as `MR * NR/LANES` vector
//! accumulators: per step of `k`, `NR/LANES` vector loads of the weight panel, `MR`
//! broadcasts of `x`, `MR * NR/LANES` FMAs. Tile sizes per level, chosen so that the
//! accumulators, the weight vectors and one broadcast fit the register file, with as few
//! broadcasts per FMA as that allows:
//!
//! | level    | vector | MR | NR | accumulators | registers used |
//! |----------|--------|----|----|--------------|----------------|
//! | avx512   | 16     | 6  | 64 | 24           | 29 of 32 zmm   |
//! | avx2     | 8      | 6  | 16 | 12           | 15 of 16 ymm   |
//! | portable | 8      | 4  | 8  | 4            | 8+ of 16 xmm   |
//!
//! On Zen 4 the 6 × 64 AVX-512 tile (6 broadcasts per 24 FMAs) measured 8-10% faster than
//! 12 × 32 (12 per 24), whose inner loop was already free of spills.
//!
//! The loop nest (BLIS numbering; the weight is prepacked so there is no `B` packing loop):
//! - loop 5, over tasks: each task owns a contiguous range of panels (columns of `y`);
//! - loop 4 `pc`, over `k` in steps of `KC` (see `KC` for the cache each block lives in);
//! - loop 3 `ic`, over `m` in steps of `MC`: `x` block packed into `MR`-row micro-panels
//!   (`MC × KC`, in L2);
//! - loop 2 `pj`, over the task's panels: the weight micro-panel stays in L1 while
//! - loop 1 `ir`, over the packed `x` micro-panels, runs the microkernel.
//!
//! With `m = 1` (decode) the weight streams from memory once: a GEMV over the same panels,
//! split into strips (see `tile`), with four independent accumulator sets per strip.

use std::sync::Mutex;

use crate::arena::{Arena, Chunk};

use super::Out;
use super::vec::{F32Vec, Portable};
use super::{Isa, Level};

/// Depth of one packed block. Each block ends in a read-modify-write of the output tile, so
/// deeper blocks mean fewer of them; the weight micro-panel (`KC × NR`, 128 KiB at NR = 64)
/// then lives in L2 beside the packed `x` block, with one `x` micro-panel (`MR × KC`, 12 KiB)
/// in L1. Measured on Zen 4 (32 KiB L1, 1 MiB L2), 1024³ and 2048³ on one thread: 512 beat
/// 384, 256 and 128 by 2%, 6% and 12%.
pub(super) const KC: usize = 512;
/// Rows of `x` packed at once: `MC × KC` f32 = 240 KiB, inside L2. A multiple of every MR.
const MC: usize = 120;
/// Largest `MR * NR` of any level: the stack tile for edge writes.
const MAX_TILE: usize = 6 * 64;

/// Panel width `NR` for a level, and the strips a panel splits into for decode (tasks take
/// whole strips). One strip per panel: on Zen 4, decoding 32-wide strips of 64-wide panels
/// (two of the four cache lines of each step of `k`, then the other two) streamed at 17-20
/// GB/s against 26 for whole panels, although 576 rows then split 5/4 over two threads.
pub(super) fn tile(level: Level) -> (usize, usize) {
    match level {
        Level::Amx | Level::Avx512 => (64, 1),
        Level::Avx2 => (16, 1),
        Level::Portable => (8, 1),
    }
}

/// A weight `W (n, k)` packed for one level's microkernel (see the module docs).
#[derive(Clone, Debug)]
pub struct PackedWeight {
    isa: Isa,
    n: usize,
    k: usize,
    nr: usize,
    /// `(ceil(n / nr), k, nr)` f32, zero-padded rows past `n`.
    data: Chunk,
}

impl PackedWeight {
    /// `n`: rows of `W` (outputs per row of `x`).
    pub fn rows(&self) -> usize {
        self.n
    }
    /// `k`: columns of `W` (inputs).
    pub fn cols(&self) -> usize {
        self.k
    }
    /// The level whose microkernel this layout is for.
    pub fn isa(&self) -> Isa {
        self.isa
    }
    /// The packed panels.
    fn values(&self) -> &[f32] {
        bytemuck::cast_slice(&self.data)
    }
}

/// Packs `W (n, k)`, row-major, for `isa`'s microkernel, in memory from `arena`.
pub fn pack_weight(arena: &Arena, isa: Isa, w: &[f32], n: usize, k: usize) -> PackedWeight {
    assert_eq!(w.len(), n * k, "pack_weight: W must hold n * k values");
    let (nr, _) = tile(isa.level());
    let mut data = arena.alloc(n.div_ceil(nr) * k * nr * size_of::<f32>());
    let values: &mut [f32] = bytemuck::cast_slice_mut(&mut data);
    for (j, row) in w.chunks_exact(k).enumerate() {
        let panel = &mut values[(j / nr) * k * nr..][..k * nr];
        for (p, &v) in row.iter().enumerate() {
            panel[p * nr + j % nr] = v;
        }
    }
    PackedWeight {
        isa,
        n,
        k,
        nr,
        data: data.freeze(),
    }
}

/// Per-task packing buffers for `x`, owned by the caller (a backend holds one for its pool).
#[derive(Debug)]
pub struct GemmScratch {
    slots: Vec<Mutex<Vec<f32>>>,
}

impl GemmScratch {
    /// Buffers for up to `tasks` concurrent tasks (the thread count of the pool used).
    pub fn new(tasks: usize) -> GemmScratch {
        let slots = (0..tasks.max(1))
            .map(|_| Mutex::new(vec![0.0; MC * KC]))
            .collect();
        GemmScratch { slots }
    }
}

/// `y (m, n) = x (m, k) · Wᵀ` with `W` packed by [`pack_weight`], on up to
/// `team.threads()` tasks (at most the slots of `scratch`), each owning a
/// contiguous range of panels. The summation order depends only on `KC`, not on the thread
/// count: results are bitwise identical for any number of threads.
pub fn matmul(
    team: &crate::team::Team,
    scratch: &GemmScratch,
    x: &[f32],
    w: &PackedWeight,
    y: &mut [f32],
    m: usize,
) {
    debug_assert!(m > 0 && x.len() == m * w.k && y.len() == m * w.n);
    // Units of work: panels, or strips of panels when decoding.
    let strips = if m == 1 { tile(w.isa.level()).1 } else { 1 };
    let units = w.n.div_ceil(w.nr) * strips;
    let tasks = team.threads().min(scratch.slots.len()).min(units).max(1);
    let out = Out(y.as_mut_ptr());
    let task = |t: usize| {
        let (p0, p1) = (units * t / tasks, units * (t + 1) / tasks);
        let mut buf = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: shapes checked above; task `t` writes only the columns of units p0..p1.
        unsafe { run(x, w, out.get(), m, p0, p1, &mut buf) };
    };
    team.run(tasks, &task);
}

/// Runs units `p0..p1` (panels; strips of panels when `m = 1`) with the kernels of `w`'s level.
///
/// # Safety
/// `y` must point to `m * w.n` writable values, `x` hold `m * w.k`; no other task may write
/// the columns of these panels.
unsafe fn run(
    x: &[f32],
    w: &PackedWeight,
    y: *mut f32,
    m: usize,
    p0: usize,
    p1: usize,
    buf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512(
        x: &[f32],
        w: &PackedWeight,
        y: *mut f32,
        m: usize,
        p0: usize,
        p1: usize,
        buf: &mut [f32],
    ) {
        unsafe { body::<super::vec::Avx512, 6, 4, 4>(x, w, y, m, p0, p1, buf) }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(
        x: &[f32],
        w: &PackedWeight,
        y: *mut f32,
        m: usize,
        p0: usize,
        p1: usize,
        buf: &mut [f32],
    ) {
        unsafe { body::<super::vec::Avx2, 6, 2, 2>(x, w, y, m, p0, p1, buf) }
    }
    // SAFETY: `w.isa` was constructed only for a level this CPU runs; pointers per the contract.
    unsafe {
        match w.isa.level() {
            #[cfg(target_arch = "x86_64")]
            Level::Amx | Level::Avx512 => avx512(x, w, y, m, p0, p1, buf),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => avx2(x, w, y, m, p0, p1, buf),
            _ => body::<Portable, 4, 1, 1>(x, w, y, m, p0, p1, buf),
        }
    }
}

#[inline(always)]
unsafe fn body<V: F32Vec, const MR: usize, const NV: usize, const SV: usize>(
    x: &[f32],
    w: &PackedWeight,
    y: *mut f32,
    m: usize,
    p0: usize,
    p1: usize,
    buf: &mut [f32],
) {
    let (n, k, nr) = (w.n, w.k, w.nr);
    debug_assert_eq!(nr, NV * V::LANES);
    if m == 1 {
        // Units are strips of SV vectors; a panel holds NV / SV of them.
        let (per_panel, sw) = (NV / SV, SV * V::LANES);
        for u in p0..p1 {
            let (pj, s) = (u / per_panel, u % per_panel);
            let j0 = pj * nr + s * sw;
            if j0 >= n {
                continue; // a strip wholly in a panel's zero padding
            }
            // SAFETY: strip `s` of panel `pj` is in range; its columns are this task's.
            unsafe {
                let b = w.values().as_ptr().add(pj * k * nr + s * sw);
                gemv_strip::<V, SV>(x, b, k, nr, y.add(j0), sw.min(n - j0));
            }
        }
        return;
    }
    // Loop 4: depth blocks.
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        // Loop 3: row blocks of x, packed.
        for ic in (0..m).step_by(MC) {
            let mc = MC.min(m - ic);
            pack_x::<MR>(x, k, ic, mc, pc, kc, buf);
            // Loop 2: this task's weight panels.
            for pj in p0..p1 {
                let j0 = pj * nr;
                let cols = nr.min(n - j0);
                // SAFETY: panel `pj`, depth `pc..pc + kc`, lies inside `w.data`.
                let b = unsafe { w.values().as_ptr().add(pj * k * nr + pc * nr) };
                // Loop 1: micro-panels of x.
                for ir in (0..mc).step_by(MR) {
                    let rows = MR.min(mc - ir);
                    // SAFETY: the packed micro-panel holds kc * MR values; the tile
                    // (ic + ir .., j0 ..) of rows × cols lies inside y.
                    unsafe {
                        let a = buf.as_ptr().add(ir * kc);
                        let c = y.add((ic + ir) * n + j0);
                        microkernel::<V, MR, NV>(kc, a, b, c, n, pc > 0, rows, cols);
                    }
                }
            }
        }
    }
}

/// Packs rows `ic..ic + mc`, columns `pc..pc + kc` of `x (m, k)` into `MR`-row micro-panels,
/// each `k`-major (`buf[panel][p][i]`), zero-padding rows past `mc`. Reads `MR` row streams
/// and writes one contiguous stream.
#[inline(always)]
pub(super) fn pack_x<const MR: usize>(
    x: &[f32],
    k: usize,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    buf: &mut [f32],
) {
    for (panel, ir) in (0..mc).step_by(MR).enumerate() {
        let dst = &mut buf[panel * MR * kc..][..MR * kc];
        let rows = MR.min(mc - ir);
        if rows < MR {
            dst.fill(0.0);
        }
        let src: [&[f32]; MR] = std::array::from_fn(|i| {
            if i < rows {
                &x[(ic + ir + i) * k + pc..][..kc]
            } else {
                &[]
            }
        });
        for (p, out) in dst.chunks_exact_mut(MR).enumerate() {
            for i in 0..rows {
                out[i] = src[i][p];
            }
        }
    }
}

/// One `MR × NR` tile: `c[i][j] (+)= Σ_p a[p][i] * b[p][j]`; writes only `rows × cols`.
///
/// # Safety
/// `a` holds `kc * MR` values, `b` holds `kc * NR` values (row stride NR), and `c` is valid
/// for `rows` rows of `cols` values at row stride `ldc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn microkernel<V: F32Vec, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    rows: usize,
    cols: usize,
) {
    let l = V::LANES;
    let nr = NV * l;
    let mut acc = [[V::zero(); NV]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, per the contract.
        unsafe {
            let bp = b.add(p * nr);
            let ap = a.add(p * MR);
            let mut bv = [V::zero(); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = V::load(bp.add(v * l));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = V::splat(*ap.add(i));
                for (v, slot) in row.iter_mut().enumerate() {
                    *slot = av.fma(bv[v], *slot);
                }
            }
        }
    }
    if rows == MR && cols == nr {
        for (i, row) in acc.iter().enumerate() {
            for (v, &r) in row.iter().enumerate() {
                // SAFETY: full tile, per the contract.
                unsafe {
                    let p = c.add(i * ldc + v * l);
                    let r = if accumulate { r.add(V::load(p)) } else { r };
                    r.store(p);
                }
            }
        }
    } else {
        let mut tile = [0.0f32; MAX_TILE];
        for (i, row) in acc.iter().enumerate() {
            for (v, &r) in row.iter().enumerate() {
                // SAFETY: MR * NR <= MAX_TILE.
                unsafe { r.store(tile.as_mut_ptr().add(i * nr + v * l)) };
            }
        }
        for i in 0..rows {
            for j in 0..cols {
                // SAFETY: i < rows, j < cols, per the contract.
                unsafe {
                    let p = c.add(i * ldc + j);
                    *p = if accumulate {
                        *p + tile[i * nr + j]
                    } else {
                        tile[i * nr + j]
                    };
                }
            }
        }
    }
}

/// One strip of a GEMV: `y[j] = Σ_p x[p] * b[p * nr + j]` for `j < cols`, the strip being
/// `SV` vectors wide inside panels of row stride `nr`.
///
/// # Safety
/// `b` is valid for `k` rows of `SV * LANES` values at stride `nr`; `y` for `cols` writes.
#[inline(always)]
unsafe fn gemv_strip<V: F32Vec, const SV: usize>(
    x: &[f32],
    b: *const f32,
    k: usize,
    nr: usize,
    y: *mut f32,
    cols: usize,
) {
    // Independent accumulator sets, to cover the FMA latency.
    const U: usize = 4;
    let l = V::LANES;
    let mut acc = [[V::zero(); SV]; U];
    let mut p = 0;
    while p + U <= k {
        for (u, set) in acc.iter_mut().enumerate() {
            let xv = V::splat(x[p + u]);
            for (v, slot) in set.iter_mut().enumerate() {
                // SAFETY: p + u < k.
                *slot = xv.fma(unsafe { V::load(b.add((p + u) * nr + v * l)) }, *slot);
            }
        }
        p += U;
    }
    while p < k {
        let xv = V::splat(x[p]);
        for (v, slot) in acc[0].iter_mut().enumerate() {
            // SAFETY: p < k.
            *slot = xv.fma(unsafe { V::load(b.add(p * nr + v * l)) }, *slot);
        }
        p += 1;
    }
    let mut out = [0.0f32; 64];
    for v in 0..SV {
        let s = acc[0][v].add(acc[1][v]).add(acc[2][v].add(acc[3][v]));
        // SAFETY: SV * LANES <= 64.
        unsafe { s.store(out.as_mut_ptr().add(v * l)) };
    }
    for (j, &v) in out[..cols].iter().enumerate() {
        // SAFETY: j < cols.
        unsafe { *y.add(j) = v };
    }
}

impl PackedWeight {
    /// Copies row `r` of the original `W` into `out (k,)`.
    pub fn copy_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.n && out.len() == self.k,
            "copy_row: row {r} of {} × {}",
            self.n,
            self.k
        );
        let panel = &self.values()[(r / self.nr) * self.k * self.nr..][..self.k * self.nr];
        for (p, o) in out.iter_mut().enumerate() {
            *o = panel[p * self.nr + r % self.nr];
        }
    }
}
