//! Matrix multiply on weights as the file stores them: `y (m, n) = x (m, k) · W (n, k)ᵀ`
//! with `W` in any GGUF format, its rows of blocks read in place (typically from the
//! memory-mapped file) and dequantized on the fly, the arithmetic in f32: exact mode.
//!
//! Two paths, by the number of activation rows `m`:
//! - **decode** (`m <= GEMV_ROWS`): each weight row is read once from memory, its blocks
//!   decoded in registers ([`Block::load32`]) and multiplied into the `m` rows of `x`,
//!   four weight rows at a time with two accumulators each. Memory-bound by design: this is
//!   where a token's time goes.
//! - **prefill**: the packed GEMM of [`super::gemm`], its `B` panels (`KC × NR` values of
//!   `NR` weight rows) decoded into a per-task scratch panel (16 rows × 32 values at a time,
//!   transposed in registers) once per depth block, then swept by the microkernel over every
//!   row of `x`, itself packed once per depth block. The decoding costs a few operations per
//!   weight value against `m / 16` multiply-adds per value.
//!
//! Either way a weight value is exactly the value [`Block::dequantize`] gives: the result is
//! the f32 matmul of the dequantized weight, up to the order of the sums. Work is split over
//! a [`Team`] by weight rows (decode: contiguous runs, `RUNS_PER_THREAD` per thread) or
//! panels (prefill), and no row's arithmetic depends on the split: results are bitwise
//! identical for any thread count.

use std::sync::Mutex;

use super::Out;
use super::gemm::{KC, microkernel, pack_x, tile};
use super::v16::{Kernel16, V16, dispatch16};
use super::vec::F32Vec;
use super::{Isa, Level};
use crate::quant::{Block, DType, with_block};
use crate::team::Team;

/// Activation rows up to which the decode path runs.
pub const GEMV_ROWS: usize = 3;

/// A weight `W (n, k)` in its storage format: `n` rows of `k / block length` blocks.
#[derive(Clone, Copy, Debug)]
pub struct BlockWeight<'w> {
    pub dtype: DType,
    /// Rows (outputs).
    pub n: usize,
    /// Values per row (inputs); a multiple of [`DType::kernel_block_len`].
    pub k: usize,
    /// `n` rows of blocks, row-major.
    pub bytes: &'w [u8],
}

impl<'w> BlockWeight<'w> {
    /// The weight, if `bytes` holds exactly `n` rows of `k` values of `dtype` and `k` is a
    /// whole number of the kernels' blocks.
    pub fn new(dtype: DType, n: usize, k: usize, bytes: &'w [u8]) -> Option<Self> {
        let ok = n > 0
            && k > 0
            && k.is_multiple_of(dtype.kernel_block_len())
            && dtype.bytes_for(k).and_then(|r| r.checked_mul(n)) == Some(bytes.len());
        ok.then_some(BlockWeight { dtype, n, k, bytes })
    }
}

/// Scratch of the exact paths, owned by the caller (a backend holds one for its team):
/// per prefill task, the packed rows of `x` for one depth block and one decoded weight
/// panel; for the repacked decode, the block sums of `x`.
#[derive(Debug)]
pub struct BlockScratch {
    pub(super) slots: Vec<Mutex<(Vec<f32>, Vec<f32>)>>,
    pub(super) sums: Mutex<Vec<f32>>,
}

impl BlockScratch {
    /// Scratch for up to `tasks` concurrent tasks (the team's thread count).
    pub fn new(tasks: usize) -> BlockScratch {
        BlockScratch {
            slots: (0..tasks.max(1))
                .map(|_| Mutex::new((Vec::new(), Vec::new())))
                .collect(),
            sums: Mutex::new(Vec::new()),
        }
    }
}

/// `y (m, n) = x (m, k) · Wᵀ` on `team`, `W` decoded from its blocks (see the module docs).
pub fn matmul(
    isa: Isa,
    team: &Team,
    scratch: &BlockScratch,
    x: &[f32],
    w: &BlockWeight<'_>,
    y: &mut [f32],
    m: usize,
) {
    matmuls(isa, team, scratch, x, &[*w], &mut [y], m)
}

/// Most weights one [`matmuls`] call runs as one job.
const MAX_WEIGHTS: usize = 4;

/// `ys[i] (m, n_i) = x (m, k) · W_iᵀ` for weights that read the same input (a layer's q, k
/// and v projections; gate and up). Decoding, all of them run as one job of the team, their
/// rows split into tasks together: one dispatch instead of one per weight. Prefilling, each
/// runs as [`matmul`] does.
pub fn matmuls(
    isa: Isa,
    team: &Team,
    scratch: &BlockScratch,
    x: &[f32],
    ws: &[BlockWeight<'_>],
    ys: &mut [&mut [f32]],
    m: usize,
) {
    debug_assert_eq!(ws.len(), ys.len());
    if m > GEMV_ROWS {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            debug_assert!(m > 0 && x.len() == m * w.k && y.len() == m * w.n);
            fn run<B: Block>(
                isa: Isa,
                team: &Team,
                scratch: &BlockScratch,
                x: &[f32],
                w: &BlockWeight<'_>,
                y: &mut [f32],
                m: usize,
            ) {
                let blocks: &[B] =
                    bytemuck::try_cast_slice(w.bytes).expect("whole blocks of alignment 1");
                let out = Out(y.as_mut_ptr());
                let rows = BlockRows {
                    w: blocks,
                    per_row: w.k / B::LEN,
                };
                prefill_on_team(isa, team, scratch, x, &rows, w.n, w.k, out, m);
            }
            with_block!(w.dtype, run, isa, team, scratch, x, w, y, m);
        }
        return;
    }
    for (ws, ys) in ws.chunks(MAX_WEIGHTS).zip(ys.chunks_mut(MAX_WEIGHTS)) {
        let mut counts = [0usize; MAX_WEIGHTS];
        let mut outs = [Out(std::ptr::null_mut()); MAX_WEIGHTS];
        for (i, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
            debug_assert!(x.len() == m * w.k && y.len() == m * w.n);
            counts[i] = w.n;
            outs[i] = Out(y.as_mut_ptr());
        }
        let counts = &counts[..ws.len()];
        team.run_parts(counts, team.decode_runs(counts), &|i, rows| {
            gemv(isa, &ws[i], x, rows, outs[i], m)
        });
    }
}

/// Rows `rows` of `w` for `m` (at most [`GEMV_ROWS`]) activation rows, into `y`.
fn gemv(isa: Isa, w: &BlockWeight<'_>, x: &[f32], rows: std::ops::Range<usize>, y: Out, m: usize) {
    fn run<B: Block>(
        isa: Isa,
        x: &[f32],
        w: &BlockWeight<'_>,
        rows: std::ops::Range<usize>,
        y: Out,
        m: usize,
    ) {
        let blocks: &[B] = bytemuck::try_cast_slice(w.bytes).expect("whole blocks of alignment 1");
        let g = Gemv {
            x,
            blocks,
            k: w.k,
            n: w.n,
            rows,
            y,
        };
        match m {
            1 => dispatch16(isa, GemvRows::<B, 1>(g)),
            2 => dispatch16(isa, GemvRows::<B, 2>(g)),
            _ => dispatch16(isa, GemvRows::<B, 3>(g)),
        }
    }
    with_block!(w.dtype, run, isa, x, w, rows, y, m)
}

/// The decode path's work for one task: weight rows `rows`.
struct Gemv<'a, B> {
    x: &'a [f32],
    blocks: &'a [B],
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    y: Out,
}

/// [`Gemv`] with `M` activation rows.
struct GemvRows<'a, B, const M: usize>(Gemv<'a, B>);

impl<B: Block, const M: usize> Kernel16 for GemvRows<'_, B, M> {
    type Output = ();

    /// One weight row at a time, its blocks in order: the weight streams through memory in
    /// one sequential run (four rows side by side measured half the speed: rows of a few
    /// hundred bytes are too short for the prefetcher to follow four at once). Sub-blocks
    /// alternate between two accumulator sets, to keep two FMA chains per half in flight.
    #[inline(always)]
    fn run<V: V16>(self) {
        let Gemv {
            x,
            blocks,
            k,
            n,
            rows,
            y,
        } = self.0;
        let per_row = k / B::LEN;
        let subs = B::LEN / 32;
        let units = per_row * subs;
        for j in rows {
            let row = &blocks[j * per_row..][..per_row];
            let mut acc = [[V::zero(); 4]; M];
            let mut u = 0;
            while u + 2 <= units {
                gemv_step::<B, V, M>(row, x, k, u, 0, &mut acc);
                gemv_step::<B, V, M>(row, x, k, u + 1, 1, &mut acc);
                u += 2;
            }
            if u < units {
                gemv_step::<B, V, M>(row, x, k, u, 0, &mut acc);
            }
            for (i, a) in acc.iter().enumerate() {
                let sum = a[0].add(a[2]).add(a[1].add(a[3]));
                // SAFETY: element (i, j) of y; row j is this task's.
                unsafe { *y.get().add(i * n + j) = sum.reduce_add() };
            }
        }
    }
}

/// Sub-block `u` of a weight row into accumulator set `set` of each activation row. A
/// function, not a closure: closures around vector code compile outside the level's target
/// features.
#[inline(always)]
fn gemv_step<B: Block, V: V16, const M: usize>(
    row: &[B],
    x: &[f32],
    k: usize,
    u: usize,
    set: usize,
    acc: &mut [[V; 4]; M],
) {
    let subs = B::LEN / 32;
    let (b, s) = (u / subs, u % subs);
    let [w0, w1] = row[b].load32::<V>(s);
    let at = b * B::LEN + 32 * s;
    for (i, a) in acc.iter_mut().enumerate() {
        // SAFETY: row i of x holds k values; at + 32 <= k.
        let (x0, x1) = unsafe {
            let p = x.as_ptr().add(i * k + at);
            (V::load(p), V::load(p.add(16)))
        };
        a[2 * set] = x0.fma(w0, a[2 * set]);
        a[2 * set + 1] = x1.fma(w1, a[2 * set + 1]);
    }
}

/// Where the prefill path's weight panels come from: rows of blocks ([`BlockRows`]), or a
/// repacked weight (`simd::qgroup`).
pub(super) trait Panels: Sync {
    /// Decodes weight rows `j0 .. j0 + cols` (`cols <= nr`), values `pc .. pc + kc`, into
    /// `panel` in the microkernel's layout (`panel[p][j]`, row stride `nr`), rows past
    /// `cols` zero, each value exactly as [`Block::dequantize`] gives it.
    #[allow(clippy::too_many_arguments)]
    fn decode_panel<W: V16>(
        &self,
        j0: usize,
        cols: usize,
        nr: usize,
        pc: usize,
        kc: usize,
        panel: &mut [f32],
    );
}

/// Rows of blocks as the file stores them, `per_row` blocks a row.
pub(super) struct BlockRows<'a, B> {
    pub w: &'a [B],
    pub per_row: usize,
}

impl<B: Block> Panels for BlockRows<'_, B> {
    /// Sixteen rows at a time: each 32-value sub-block of the 16 rows decoded, transposed in
    /// two 16 × 16 tiles, and stored as 32 rows of the panel.
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
        let group = 16.min(nr);
        for g in (0..nr).step_by(group) {
            for p in (pc..pc + kc).step_by(32) {
                let (b, s) = (p / B::LEN, (p % B::LEN) / 32);
                let mut lo = [W::zero(); 16];
                let mut hi = [W::zero(); 16];
                for r in 0..group {
                    if g + r < cols {
                        [lo[r], hi[r]] = self.w[(j0 + g + r) * self.per_row + b].load32::<W>(s);
                    }
                }
                W::transpose16(&mut lo);
                W::transpose16(&mut hi);
                let at = |c: usize| (p - pc + c) * nr + g;
                for c in 0..16 {
                    store_group(lo[c], &mut panel[at(c)..at(c) + group]);
                    store_group(hi[c], &mut panel[at(16 + c)..at(16 + c) + group]);
                }
            }
        }
    }
}

/// The prefill path for rows `r0..r1` of `x` and panels `p0..p1` of `w (n, k)` at `isa`'s
/// level, into the same rows and the panels' columns of `y`.
///
/// # Safety
/// `y` points to `m * n` values (`m >= r1`) of which no other task writes these rows of these
/// panels' columns.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn prefill<P: Panels>(
    isa: Isa,
    x: &[f32],
    w: &P,
    n: usize,
    k: usize,
    y: *mut f32,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    xbuf: &mut Vec<f32>,
    panel: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512<P: Panels>(
        x: &[f32],
        w: &P,
        n: usize,
        k: usize,
        y: *mut f32,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        xbuf: &mut Vec<f32>,
        panel: &mut Vec<f32>,
    ) {
        unsafe {
            body::<P, super::vec::Avx512, super::vec::Avx512, 6, 4>(
                x, w, n, k, y, r0, r1, p0, p1, xbuf, panel,
            )
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2<P: Panels>(
        x: &[f32],
        w: &P,
        n: usize,
        k: usize,
        y: *mut f32,
        r0: usize,
        r1: usize,
        p0: usize,
        p1: usize,
        xbuf: &mut Vec<f32>,
        panel: &mut Vec<f32>,
    ) {
        unsafe {
            body::<P, super::v16::Pair<super::vec::Avx2>, super::vec::Avx2, 6, 2>(
                x, w, n, k, y, r0, r1, p0, p1, xbuf, panel,
            )
        }
    }
    // SAFETY: an `Isa` exists only for a level this CPU runs; pointers per the contract.
    unsafe {
        match isa.level() {
            #[cfg(target_arch = "x86_64")]
            Level::Amx | Level::Avx512 => avx512::<P>(x, w, n, k, y, r0, r1, p0, p1, xbuf, panel),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => avx2::<P>(x, w, n, k, y, r0, r1, p0, p1, xbuf, panel),
            _ => body::<P, super::v16::Pair<super::vec::Portable>, super::vec::Portable, 4, 1>(
                x, w, n, k, y, r0, r1, p0, p1, xbuf, panel,
            ),
        }
    }
}

/// Rows per task from which a prefill splits by rows rather than by panels. Split by panels,
/// a weight of few panels leaves a thread idle (three 64-row panels of a 192-row `attn_k`
/// over two threads: two and one); split by rows, every task decodes every panel for its
/// own rows, which costs one panel decode per `ROW_SPLIT`-odd rows of multiply-adds.
pub(super) const ROW_SPLIT: usize = 48;

/// Tasks of a prefill of `m` rows over `panels` panels with at most `max` tasks.
pub(super) fn prefill_tasks(m: usize, panels: usize, max: usize) -> usize {
    if m >= ROW_SPLIT * max {
        max
    } else {
        max.min(panels)
    }
}

/// The rows `r0..r1` and panels `p0..p1` of task `t` of `tasks` ([`prefill_tasks`]). Row cuts
/// fall on multiples of 12, which every level's `MR` divides. No output element's arithmetic
/// depends on the split.
pub(super) fn prefill_part(
    m: usize,
    panels: usize,
    tasks: usize,
    t: usize,
) -> (usize, usize, usize, usize) {
    if m >= ROW_SPLIT * tasks {
        let cut = |t: usize| {
            if t == tasks {
                m
            } else {
                (m * t / tasks) / 12 * 12
            }
        };
        (cut(t), cut(t + 1), 0, panels)
    } else {
        (0, m, panels * t / tasks, panels * (t + 1) / tasks)
    }
}

/// `y (m, n) = x (m, k) · Wᵀ` for the panels `w` decodes, as one job of `team`: each task
/// takes its part ([`prefill_part`]) with its own scratch slot.
#[allow(clippy::too_many_arguments)]
pub(super) fn prefill_on_team<P: Panels + Sync>(
    isa: Isa,
    team: &Team,
    scratch: &BlockScratch,
    x: &[f32],
    w: &P,
    n: usize,
    k: usize,
    y: Out,
    m: usize,
) {
    let panels = n.div_ceil(panel_width(isa));
    let tasks = prefill_tasks(m, panels, team.threads().min(scratch.slots.len()));
    team.run(tasks, &|t| {
        let (r0, r1, p0, p1) = prefill_part(m, panels, tasks, t);
        let mut slot = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
        let (xbuf, panel) = &mut *slot;
        // SAFETY: task `t` writes only rows r0..r1 of panels p0..p1's columns of `y`, which
        // holds m * n values (the callers' contract).
        unsafe { prefill(isa, x, w, n, k, y.get(), r0, r1, p0, p1, xbuf, panel) };
    });
}

/// The panel width of `isa`'s prefill microkernel.
pub(super) fn panel_width(isa: Isa) -> usize {
    tile(isa.level()).0
}

/// The prefill loop nest: depth blocks; `x` packed for the block; per panel, the panel
/// decoded, then the microkernel over every row block of `x`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn body<P: Panels, W: V16, V: F32Vec, const MR: usize, const NV: usize>(
    x: &[f32],
    w: &P,
    n: usize,
    k: usize,
    y: *mut f32,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    xbuf: &mut Vec<f32>,
    panel: &mut Vec<f32>,
) {
    let nr = NV * V::LANES;
    let m = r1 - r0;
    let m_padded = m.div_ceil(MR) * MR;
    xbuf.resize(xbuf.len().max(m_padded * KC), 0.0);
    panel.resize(panel.len().max(KC * nr), 0.0);
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        pack_x::<MR>(x, k, r0, m, pc, kc, xbuf);
        for pj in p0..p1 {
            let j0 = pj * nr;
            let cols = nr.min(n - j0);
            w.decode_panel::<W>(j0, cols, nr, pc, kc, panel);
            for ir in (0..m).step_by(MR) {
                let rows = MR.min(m - ir);
                // SAFETY: the packed micro-panel holds kc * MR values, the panel kc * nr;
                // the tile (r0 + ir.., j0..) of rows × cols lies inside y, in this task's part.
                unsafe {
                    let a = xbuf.as_ptr().add(ir * kc);
                    let c = y.add((r0 + ir) * n + j0);
                    microkernel::<V, MR, NV>(kc, a, panel.as_ptr(), c, n, pc > 0, rows, cols);
                }
            }
        }
    }
}

/// Stores the first `out.len()` (16, or 8 on the portable level's narrower panels) lanes.
#[inline(always)]
pub(super) fn store_group<W: V16>(v: W, out: &mut [f32]) {
    if out.len() == 16 {
        // SAFETY: 16 values.
        unsafe { v.store(out.as_mut_ptr()) };
    } else {
        let mut all = [0.0f32; 16];
        // SAFETY: 16 values.
        unsafe { v.store(all.as_mut_ptr()) };
        out.copy_from_slice(&all[..out.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use crate::simd::testing::multiplies_as_dequantized;

    fn weight(dtype: DType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        quant::sample_blocks(dtype, n * k, seed).expect("whole blocks")
    }

    #[test]
    fn every_format_multiplies_as_its_dequantized_weight_on_every_level_and_team_size() {
        let (n, k) = (70, 512 + 256);
        for dtype in DType::ALL {
            let bytes = weight(dtype, n, k, 7);
            let mut wf = vec![0.0f32; n * k];
            quant::dequantize(dtype, &bytes, &mut wf);
            let w = BlockWeight::new(dtype, n, k, &bytes).unwrap();
            multiplies_as_dequantized(&dtype.to_string(), &wf, n, k, |isa, team, t, x, y, m| {
                matmul(isa, team, &BlockScratch::new(t), x, &w, y, m)
            });
        }
    }
}
