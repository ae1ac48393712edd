//! Cache-blocked kernels in plain Rust, parallel with rayon.
//!
//! No intrinsics: inner loops run over fixed-size lane arrays that the compiler turns into
//! vector code for whatever target it builds for (SSE2 on the baseline x86-64 target).
//! Work is split over a pool the caller owns. Each output element is computed by one task
//! in a fixed order, so results do not depend on the thread count.

use rayon::ThreadPool;
use rayon::prelude::*;

use crate::{RopeParams, SoftmaxParams, scalar};

/// Lanes of the partial sums the compiler vectorises (one SSE register), for dot products.
const L: usize = 4;
/// Columns of a packed weight panel: two SSE registers of outputs per row of `x`.
const NR: usize = 8;
/// Rows of `x` in one register tile: `MR × NR` accumulators (8 SSE registers).
const MR: usize = 4;
/// Depth of a cache block: a packed panel (`KB × NR` f32, 8 KiB) stays in L1 while the
/// tile's rows of `x` stream past.
const KB: usize = 256;
/// Rows of `W` per cache block: `NB × KB` f32 = 64 KiB packed, inside L2.
const NB: usize = 64;
/// Below this many output values an op runs on the calling thread: rayon's hand-off
/// would cost more than it saves.
const PAR_MIN: usize = 1 << 14;

/// `y (m, n) = x (m, k) · W (n, k)ᵀ`, as [`scalar::matmul`].
///
/// `m = 1`: rows of `W` are split over the pool, each dotted with `x`. `m > 1`: blocks of
/// rows of `x` are split over the pool; inside a block, `NB × KB` blocks of `W` are packed
/// into panels and reused across the block's rows through `MR × NR` register tiles.
pub fn matmul(
    pool: &ThreadPool,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    debug_assert!(
        m > 0 && n > 0 && k > 0 && x.len() == m * k && w.len() == n * k && y.len() == m * n
    );
    let threads = pool.current_num_threads();
    if m == 1 {
        let chunk = n.div_ceil(threads * 4).max(NR);
        let run = |(c, ys): (usize, &mut [f32])| {
            for (j, out) in ys.iter_mut().enumerate() {
                *out = dot(x, &w[(c * chunk + j) * k..][..k]);
            }
        };
        if threads == 1 || n * k < PAR_MIN * 16 {
            y.chunks_mut(chunk).enumerate().for_each(run);
        } else {
            pool.install(|| y.par_chunks_mut(chunk).enumerate().for_each(run));
        }
        return;
    }
    let mb = m.div_ceil(threads * 4).clamp(MR, 64).next_multiple_of(MR);
    let block = |(b, ys): (usize, &mut [f32])| {
        let i0 = b * mb;
        let rows = ys.len() / n;
        row_block(&x[i0 * k..(i0 + rows) * k], w, ys, rows, n, k);
    };
    if threads == 1 {
        y.chunks_mut(mb * n).enumerate().for_each(block);
    } else {
        pool.install(|| y.par_chunks_mut(mb * n).enumerate().for_each(block));
    }
}

thread_local! {
    /// Packed weight panels of the calling task, grown to the largest block and reused: no
    /// allocation per call once warm.
    static PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y (rows, n) = x (rows, k) · Wᵀ` for one block of rows, tiled for the caches.
///
/// For each `NB × KB` block of `W`, its rows are packed into panels of `NR` (transposed:
/// `panel[p][c] = W[j + c][p]`, zero past `n`), then `MR × NR` register tiles of `y`
/// accumulate `x[i][p] · panel[p][..]`: a broadcast times a contiguous row, the form the
/// compiler's vectoriser maps onto registers.
fn row_block(x: &[f32], w: &[f32], y: &mut [f32], rows: usize, n: usize, k: usize) {
    y.fill(0.0);
    PANELS.with_borrow_mut(|panels| {
        panels.resize(NB * KB, 0.0);
        for j0 in (0..n).step_by(NB) {
            let nb = NB.min(n - j0);
            for p0 in (0..k).step_by(KB) {
                let kb = KB.min(k - p0);
                // Pack W[j0 .. j0 + nb][p0 .. p0 + kb] into panels of NR columns.
                for (c0, panel) in (0..nb).step_by(NR).zip(panels.chunks_exact_mut(KB * NR)) {
                    for c in 0..NR {
                        let row = (c0 + c < nb).then(|| &w[(j0 + c0 + c) * k + p0..][..kb]);
                        for p in 0..kb {
                            panel[p * NR + c] = row.map_or(0.0, |r| r[p]);
                        }
                    }
                }
                // Register tiles over the block.
                for (c0, panel) in (0..nb).step_by(NR).zip(panels.chunks_exact(KB * NR)) {
                    let cols = NR.min(nb - c0);
                    let mut i = 0;
                    while i + MR <= rows {
                        tile::<MR>(x, panel, y, i, j0 + c0, cols, p0, kb, n, k);
                        i += MR;
                    }
                    for i in i..rows {
                        tile::<1>(x, panel, y, i, j0 + c0, cols, p0, kb, n, k);
                    }
                }
            }
        }
    });
}

/// Adds `x[i .. i + NI][p0 .. p0 + kb] · panel` into `y[i ..][j .. j + cols]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const NI: usize>(
    x: &[f32],
    panel: &[f32],
    y: &mut [f32],
    i: usize,
    j: usize,
    cols: usize,
    p0: usize,
    kb: usize,
    n: usize,
    k: usize,
) {
    let xs: [&[f32]; NI] = std::array::from_fn(|a| &x[(i + a) * k + p0..][..kb]);
    let mut acc = [[0.0f32; NR]; NI];
    for (p, wrow) in panel.chunks_exact(NR).take(kb).enumerate() {
        for a in 0..NI {
            let xa = xs[a][p];
            for c in 0..NR {
                acc[a][c] += xa * wrow[c];
            }
        }
    }
    for a in 0..NI {
        let out = &mut y[(i + a) * n + j..][..cols];
        for (o, v) in out.iter_mut().zip(&acc[a]) {
            *o += v;
        }
    }
}

/// Dot product in `4 × L` lane-parallel partial sums, combined in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0.0f32; L]; 4];
    let mut ca = a.chunks_exact(4 * L);
    let mut cb = b.chunks_exact(4 * L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for (u, slot) in acc.iter_mut().enumerate() {
            for l in 0..L {
                slot[l] += x[u * L + l] * y[u * L + l];
            }
        }
    }
    let mut s = 0.0;
    for l in 0..L {
        s += (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// Runs `f` over matching rows of `x` and `y`, in parallel when there is enough work.
fn rows_par<F>(pool: &ThreadPool, x: &[f32], y: &mut [f32], row: usize, f: F)
where
    F: Fn(&[f32], &mut [f32]) + Sync,
{
    if y.len() < PAR_MIN || pool.current_num_threads() == 1 {
        x.chunks_exact(row)
            .zip(y.chunks_exact_mut(row))
            .for_each(|(a, b)| f(a, b));
    } else {
        pool.install(|| {
            x.par_chunks_exact(row)
                .zip(y.par_chunks_exact_mut(row))
                .for_each(|(a, b)| f(a, b))
        });
    }
}

/// Runs `f` over rows of `x` in place, in parallel when there is enough work.
fn rows_par_mut<F>(pool: &ThreadPool, x: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if x.len() < PAR_MIN || pool.current_num_threads() == 1 {
        x.chunks_exact_mut(row)
            .enumerate()
            .for_each(|(r, v)| f(r, v));
    } else {
        pool.install(|| {
            x.par_chunks_exact_mut(row)
                .enumerate()
                .for_each(|(r, v)| f(r, v))
        });
    }
}

/// RMSNorm of rows, as [`scalar::rmsnorm`]; the sum of squares in lane-parallel partial sums.
pub fn rmsnorm(pool: &ThreadPool, x: &[f32], weight: &[f32], y: &mut [f32], dim: usize, eps: f32) {
    debug_assert!(x.len() == y.len() && weight.len() == dim && x.len().is_multiple_of(dim));
    rows_par(pool, x, y, dim, |xr, yr| {
        let inv_rms = 1.0 / (dot(xr, xr) / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(weight) {
            *o = v * inv_rms * g;
        }
    });
}

/// Rotary embedding, in place, as [`scalar::rope`], rows split over the pool. The angles of
/// a row are computed once and shared by its heads.
pub fn rope(pool: &ThreadPool, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) {
    let d = p.head_dim;
    debug_assert!(d.is_multiple_of(2) && rows > 0 && x.len().is_multiple_of(rows * d));
    let row_len = x.len() / rows;
    rows_par_mut(pool, x, row_len, |r, row| {
        let position = (pos + r) as f32;
        for i in 0..d / 2 {
            let freq = p.theta.powf(-((2 * i) as f32) / d as f32);
            let (sin, cos) = (position * freq).sin_cos();
            for head in row.chunks_exact_mut(d) {
                let (ia, ib) = match p.layout {
                    crate::RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    crate::RopeLayout::Neox => (i, i + d / 2),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos - b * sin;
                head[ib] = a * sin + b * cos;
            }
        }
    });
}

/// Softmax over rows, in place, as [`scalar::softmax`], rows split over the pool.
pub fn softmax(pool: &ThreadPool, x: &mut [f32], cols: usize, p: &SoftmaxParams) {
    debug_assert!(cols > 0 && x.len().is_multiple_of(cols));
    let p0 = *p;
    rows_par_mut(pool, x, cols, |r, row| {
        // One row at a time through the reference, with the row's own mask offset.
        let visible = p0.visible(r, cols);
        let row_params = SoftmaxParams {
            scale: p0.scale,
            causal: Some(visible - 1),
        };
        scalar::softmax(row, cols, &row_params);
    });
}

/// SwiGLU gate, as [`scalar::swiglu`], split over the pool.
pub fn swiglu(pool: &ThreadPool, a: &[f32], b: &[f32], y: &mut [f32]) {
    gate(pool, a, b, y, scalar::swiglu);
}

/// GELU gate, as [`scalar::geglu`], split over the pool.
pub fn geglu(pool: &ThreadPool, a: &[f32], b: &[f32], y: &mut [f32]) {
    gate(pool, a, b, y, scalar::geglu);
}

/// An elementwise gate `f(a, b) -> y` in chunks of `PAR_MIN` over the pool.
fn gate(pool: &ThreadPool, a: &[f32], b: &[f32], y: &mut [f32], f: fn(&[f32], &[f32], &mut [f32])) {
    debug_assert!(a.len() == b.len() && a.len() == y.len());
    if y.len() < 2 * PAR_MIN || pool.current_num_threads() == 1 {
        f(a, b, y);
    } else {
        pool.install(|| {
            y.par_chunks_mut(PAR_MIN)
                .zip(a.par_chunks(PAR_MIN).zip(b.par_chunks(PAR_MIN)))
                .for_each(|(o, (g, u))| f(g, u, o))
        });
    }
}

/// Residual add, in place, split over the pool.
pub fn add(pool: &ThreadPool, y: &mut [f32], x: &[f32]) {
    debug_assert!(y.len() == x.len());
    if y.len() < 2 * PAR_MIN || pool.current_num_threads() == 1 {
        scalar::add(y, x);
    } else {
        pool.install(|| {
            y.par_chunks_mut(PAR_MIN)
                .zip(x.par_chunks(PAR_MIN))
                .for_each(|(o, v)| scalar::add(o, v))
        });
    }
}
