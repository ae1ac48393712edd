//! Per-row and per-element SIMD kernels: RMSNorm, RoPE, softmax, SwiGLU, add.
//!
//! Each body walks its rows in full vectors and finishes a row's tail through a padded
//! register (`load_partial`/`store_partial`), so every element takes the same arithmetic.

use super::stamp;
use super::vec::{F32Vec, exp, load_partial, store_partial};
use crate::team::Team;
use crate::{RopeLayout, RopeParams, SoftmaxParams};

stamp! {
    /// RMSNorm of rows, as [`crate::scalar::rmsnorm`]: `x`, `y` `(rows, dim)`, `weight (dim,)`.
    /// The sum of squares runs in four vector accumulators, combined in a fixed order.
    pub fn rmsnorm(x: &[f32], weight: &[f32], y: &mut [f32], dim: usize, eps: f32) = rmsnorm_body;
}

#[inline(always)]
fn rmsnorm_body<V: F32Vec>(x: &[f32], weight: &[f32], y: &mut [f32], dim: usize, eps: f32) {
    debug_assert!(x.len() == y.len() && weight.len() == dim && x.len().is_multiple_of(dim));
    let l = V::LANES;
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let mut acc = [V::zero(); 4];
        let mut blocks = xr.chunks_exact(4 * l);
        for b in &mut blocks {
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: `b` holds 4 * LANES values.
                let v = unsafe { V::load(b.as_ptr().add(u * l)) };
                *a = v.fma(v, *a);
            }
        }
        let mut rest = blocks.remainder().chunks(l);
        let mut a0 = acc[0];
        for c in &mut rest {
            let v: V = load_partial(c, 0.0);
            a0 = v.fma(v, a0);
        }
        let sum = a0.add(acc[1]).add(acc[2].add(acc[3])).reduce_add();
        let inv_rms = V::splat(1.0 / (sum / dim as f32 + eps).sqrt());
        let mut outs = yr.chunks_exact_mut(l);
        let mut ins = xr.chunks_exact(l).zip(weight.chunks_exact(l));
        for (o, (xv, wv)) in (&mut outs).zip(&mut ins) {
            // SAFETY: each chunk holds exactly LANES values.
            unsafe {
                V::load(xv.as_ptr())
                    .mul(inv_rms)
                    .mul(V::load(wv.as_ptr()))
                    .store(o.as_mut_ptr())
            };
        }
        let tail = outs.into_remainder();
        if !tail.is_empty() {
            let start = dim - tail.len();
            let v: V = load_partial(&xr[start..], 0.0);
            let g: V = load_partial(&weight[start..], 0.0);
            store_partial(v.mul(inv_rms).mul(g), tail);
        }
    }
}

stamp! {
    /// Softmax over rows of `cols`, in place, as [`crate::scalar::softmax`].
    pub fn softmax(x: &mut [f32], cols: usize, p: &SoftmaxParams) = softmax_body;
}

#[inline(always)]
fn softmax_body<V: F32Vec>(x: &mut [f32], cols: usize, p: &SoftmaxParams) {
    debug_assert!(cols > 0 && x.len().is_multiple_of(cols));
    for (r, row) in x.chunks_exact_mut(cols).enumerate() {
        let (visible, masked) = row.split_at_mut(p.visible(r, cols));
        masked.fill(0.0);
        let (max, sum) = exp_shifted_body::<V>(visible, p.scale);
        if max != f32::NEG_INFINITY {
            // Pass 3: normalise (a sum of 0 or NaN, from an infinite or NaN score, makes
            // the row NaN, as the scalar softmax does).
            scale_in_place(visible, V::splat(1.0 / sum));
        }
    }
}

stamp! {
    /// The unnormalised softmax of one row, in place: `x_t <- exp(scale x_t - max)`, with
    /// `max = max_t scale x_t`; returns `(max, Σ_t x_t)`, the sum in lane-parallel partial
    /// sums. A row of no values, or whose scaled values are all -inf, becomes zeros and
    /// returns `(-inf, 0)`. Softmax's first two passes: [`softmax`] divides by the sum;
    /// attention over spans of positions (`simd::attention`) rescales each span's by
    /// `exp(max - the row's max)` instead.
    pub fn exp_shifted(x: &mut [f32], scale: f32) -> (f32, f32) = exp_shifted_body;
}

#[inline(always)]
fn exp_shifted_body<V: F32Vec>(visible: &mut [f32], scale: f32) -> (f32, f32) {
    let l = V::LANES;
    let scale = V::splat(scale);
    // Pass 1: scale in place, running maximum.
    let mut vmax = V::splat(f32::NEG_INFINITY);
    let mut chunks = visible.chunks_exact_mut(l);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly LANES values.
        unsafe {
            let v = V::load(c.as_ptr()).mul(scale);
            v.store(c.as_mut_ptr());
            vmax = vmax.max(v);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let v = load_partial::<V>(tail, f32::NEG_INFINITY).mul(scale);
        store_partial(v, tail);
        vmax = vmax.max(v);
    }
    let max = vmax.reduce_max();
    if max == f32::NEG_INFINITY {
        visible.fill(0.0);
        return (max, 0.0);
    }
    // Pass 2: exponentiate, sum.
    let vm = V::splat(max);
    let mut vsum = V::zero();
    let mut chunks = visible.chunks_exact_mut(l);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly LANES values.
        unsafe {
            let e = exp(V::load(c.as_ptr()).sub(vm));
            e.store(c.as_mut_ptr());
            vsum = vsum.add(e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        // Missing lanes are -inf, so they exponentiate to 0 and add nothing.
        let e = exp(load_partial::<V>(tail, f32::NEG_INFINITY).sub(vm));
        store_partial(e, tail);
        vsum = vsum.add(e);
    }
    (max, vsum.reduce_add())
}

#[inline(always)]
fn scale_in_place<V: F32Vec>(x: &mut [f32], s: V) {
    let mut chunks = x.chunks_exact_mut(V::LANES);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly LANES values.
        unsafe { V::load(c.as_ptr()).mul(s).store(c.as_mut_ptr()) };
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        store_partial(load_partial::<V>(tail, 0.0).mul(s), tail);
    }
}

/// Largest `head_dim` whose cos/sin tables the SIMD RoPE keeps on the stack; larger heads
/// take the scalar kernel.
pub const ROPE_MAX_HEAD_DIM: usize = 1024;

stamp! {
    /// Rotary embedding, in place, as [`crate::scalar::rope`]: `x (rows, n_heads * head_dim)`,
    /// row `r` at position `pos + r`.
    ///
    /// The angles are computed once per row (not per head) in f64 and rounded, then every
    /// head is rotated in vectors: `y = x * cos + swap(x) * (∓sin)`.
    pub fn rope(x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) = rope_body;
}

#[inline(always)]
fn rope_body<V: F32Vec>(x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) {
    let d = p.head_dim;
    debug_assert!(d.is_multiple_of(2) && rows > 0 && x.len().is_multiple_of(rows * d));
    if d > ROPE_MAX_HEAD_DIM {
        return crate::scalar::rope(x, rows, pos, p);
    }
    let row_len = x.len() / rows;
    // Per row: `cos[j]` and `sin[j]` (sin signed for the lane's role) for every lane j of a head.
    let mut cos = [0.0f32; ROPE_MAX_HEAD_DIM];
    let mut sin = [0.0f32; ROPE_MAX_HEAD_DIM];
    let mut freqs = [0.0f64; ROPE_MAX_HEAD_DIM / 2];
    rope_freqs(p, &mut freqs[..d / 2]);
    for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
        rope_angles(pos + r, p, &freqs[..d / 2], &mut cos[..d], &mut sin[..d]);
        rotate_row::<V>(row, &cos[..d], &sin[..d], p.layout);
    }
}

/// `freqs[i] = theta^(-2i / head_dim)` for every pair `i`, in f64.
fn rope_freqs(p: &RopeParams, freqs: &mut [f64]) {
    for (i, f) in freqs.iter_mut().enumerate() {
        *f = (p.theta as f64).powf(-((2 * i) as f64) / p.head_dim as f64);
    }
}

/// `cos[j]`, `sin[j]` of every lane `j` of a head at `position` (sin signed for the lane's
/// role): angle `position · freqs[i]` for pair `i` ([`rope_freqs`]), in f64, rounded once.
fn rope_angles(position: usize, p: &RopeParams, freqs: &[f64], cos: &mut [f32], sin: &mut [f32]) {
    let d = p.head_dim;
    let half = d / 2;
    for (i, &freq) in freqs.iter().enumerate().take(half) {
        let (s, c) = (position as f64 * freq).sin_cos();
        let (ia, ib) = match p.layout {
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            RopeLayout::Neox => (i, i + half),
        };
        (cos[ia], cos[ib]) = (c as f32, c as f32);
        (sin[ia], sin[ib]) = (-s as f32, s as f32);
    }
}

/// Rotates every head of one row with the lanes' `cos` and `sin`.
#[inline(always)]
fn rotate_row<V: F32Vec>(row: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    for head in row.chunks_exact_mut(cos.len()) {
        match layout {
            RopeLayout::Interleaved => rotate_interleaved::<V>(head, cos, sin),
            RopeLayout::Neox => rotate_neox::<V>(head, cos, sin),
        }
    }
}

/// The angles' `cos` and `sin` for runs of positions, kept between [`rope_rows`] calls.
///
/// A forward pass rotates the queries and the keys of every layer at the same positions:
/// with the table those angles (`head_dim / 2` calls of `powf` and `sin_cos` per position)
/// are computed once per pass instead of twice per layer, and the values are the ones
/// [`rope`] computes, bit for bit. It keeps the last [`ROPE_RUNS`] runs, so that a model
/// whose layers take turns between two frequency bases (Gemma 3: 10000 for its sliding-window
/// layers, 1000000 for the global ones) computes each once per pass too: with one run, the
/// recomputation at every change of base was 3-4% of Gemma 3 270M's prefill.
#[derive(Debug, Default)]
pub struct RopeTable {
    /// The runs, the most recently used last.
    runs: Vec<RopeRun>,
}

/// Runs of angles a [`RopeTable`] keeps.
pub const ROPE_RUNS: usize = 4;

/// One run of a [`RopeTable`]: the angles of positions `pos..pos + rows` for one set of
/// rotation parameters.
#[derive(Debug)]
pub struct RopeRun {
    /// `(theta bits, head_dim, layout, pos, rows)`.
    key: (u32, usize, RopeLayout, usize, usize),
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The run of rows `pos..pos + rows` for `p`, computed unless the table holds it (the
    /// least recently used run makes room, its buffers reused). Memory: `2 · rows ·
    /// head_dim` values a run, up to [`ROPE_RUNS`] runs of the longest calls kept.
    /// The angles are computed on `team`'s threads.
    pub fn prepare(&mut self, team: &Team, rows: usize, pos: usize, p: &RopeParams) -> &RopeRun {
        let key = (p.theta.to_bits(), p.head_dim, p.layout, pos, rows);
        let run = match self.runs.iter().position(|r| r.key == key) {
            Some(i) => self.runs.remove(i),
            None => {
                let mut run = if self.runs.len() == ROPE_RUNS {
                    self.runs.remove(0)
                } else {
                    RopeRun {
                        key,
                        cos: Vec::new(),
                        sin: Vec::new(),
                    }
                };
                run.compute(team, key, p);
                run
            }
        };
        self.runs.push(run);
        self.runs.last().expect("just pushed")
    }
}

impl RopeRun {
    /// Fills the run for `key` (`p`'s, at its positions), rows split over `team`.
    fn compute(
        &mut self,
        team: &Team,
        key: (u32, usize, RopeLayout, usize, usize),
        p: &RopeParams,
    ) {
        /// Positions per task at least (a position is `head_dim / 2` calls of `sin_cos`).
        const ROWS_PER_TASK: usize = 16;
        let (d, pos, rows) = (p.head_dim, key.3, key.4);
        self.cos.clear();
        self.cos.resize(rows * d, 0.0);
        self.sin.clear();
        self.sin.resize(rows * d, 0.0);
        let mut freqs = vec![0.0f64; d / 2];
        rope_freqs(p, &mut freqs);
        let tasks = (rows / ROWS_PER_TASK).clamp(1, team.threads());
        let per_task = rows.div_ceil(tasks).max(1); // no rows: no parts, nothing to run
        let parts: Vec<_> = self
            .cos
            .chunks_mut(per_task * d)
            .zip(self.sin.chunks_mut(per_task * d))
            .map(std::sync::Mutex::new)
            .collect();
        team.run(parts.len(), &|t| {
            let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
            let (cos, sin) = &mut *part;
            for (r, (c, s)) in cos
                .chunks_exact_mut(d)
                .zip(sin.chunks_exact_mut(d))
                .enumerate()
            {
                rope_angles(pos + t * per_task + r, p, &freqs, c, s);
            }
        });
        self.key = key;
    }

    /// `(cos, sin)` of rows `r` (counted from the run's first position), `head_dim` values
    /// each.
    pub fn rows(&self, r: std::ops::Range<usize>, head_dim: usize) -> (&[f32], &[f32]) {
        (
            &self.cos[r.start * head_dim..r.end * head_dim],
            &self.sin[r.start * head_dim..r.end * head_dim],
        )
    }
}

stamp! {
    /// Rotary embedding, in place, with the angles of a [`RopeTable`]: `x (rows,
    /// n_heads * head_dim)`, `cos`, `sin (rows, head_dim)` from [`RopeRun::rows`].
    /// Bitwise the result of [`rope`] at the table's positions, for heads of up to
    /// [`ROPE_MAX_HEAD_DIM`] values ([`rope`] gives wider ones to the scalar kernel).
    pub fn rope_rows(x: &mut [f32], cos: &[f32], sin: &[f32], p: &RopeParams) = rope_rows_body;
}

#[inline(always)]
fn rope_rows_body<V: F32Vec>(x: &mut [f32], cos: &[f32], sin: &[f32], p: &RopeParams) {
    let d = p.head_dim;
    let rows = cos.len() / d;
    assert!(cos.len() == sin.len() && rows > 0 && x.len().is_multiple_of(rows * d));
    let row_len = x.len() / rows;
    for ((row, c), s) in x
        .chunks_exact_mut(row_len)
        .zip(cos.chunks_exact(d))
        .zip(sin.chunks_exact(d))
    {
        rotate_row::<V>(row, c, s, p.layout);
    }
}

/// `head[j] = head[j] * cos[j] + head[j ^ 1] * sin[j]` (adjacent pairs).
#[inline(always)]
fn rotate_interleaved<V: F32Vec>(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let l = V::LANES;
    let mut j = 0;
    while j + l <= head.len() {
        // SAFETY: `j + LANES <= len` for all three slices (same length).
        unsafe {
            let v = V::load(head.as_ptr().add(j));
            let y = v
                .mul(V::load(cos.as_ptr().add(j)))
                .add(v.swap_pairs().mul(V::load(sin.as_ptr().add(j))));
            y.store(head.as_mut_ptr().add(j));
        }
        j += l;
    }
    if j < head.len() {
        // The tail is a whole number of pairs: LANES and the head size are both even.
        let v: V = load_partial(&head[j..], 0.0);
        let y = v
            .mul(load_partial(&cos[j..], 0.0))
            .add(v.swap_pairs().mul(load_partial(&sin[j..], 0.0)));
        store_partial(y, &mut head[j..]);
    }
}

/// `lo[i], hi[i] = lo[i] cos - hi[i] sin, lo[i] sin + hi[i] cos` (split halves).
#[inline(always)]
fn rotate_neox<V: F32Vec>(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (lo, hi) = head.split_at_mut(half);
    let (c, s_lo, s_hi) = (&cos[..half], &sin[..half], &sin[half..]);
    let l = V::LANES;
    let mut i = 0;
    // Whole vectors by plain loads: the partial loads go through a buffer on the stack, and
    // taking every vector that way held Gemma 3's rotation (head_dim 256) to about 6 GB/s.
    while i + l <= half {
        // SAFETY: `i + LANES <= half`, the length of all five slices.
        unsafe {
            let a = V::load(lo.as_ptr().add(i));
            let b = V::load(hi.as_ptr().add(i));
            let cv = V::load(c.as_ptr().add(i));
            let y_lo = a.mul(cv).add(b.mul(V::load(s_lo.as_ptr().add(i))));
            let y_hi = b.mul(cv).add(a.mul(V::load(s_hi.as_ptr().add(i))));
            y_lo.store(lo.as_mut_ptr().add(i));
            y_hi.store(hi.as_mut_ptr().add(i));
        }
        i += l;
    }
    if i < half {
        let a: V = load_partial(&lo[i..], 0.0);
        let b: V = load_partial(&hi[i..], 0.0);
        let cv: V = load_partial(&c[i..], 0.0);
        let y_lo = a.mul(cv).add(b.mul(load_partial(&s_lo[i..], 0.0)));
        let y_hi = b.mul(cv).add(a.mul(load_partial(&s_hi[i..], 0.0)));
        store_partial(y_lo, &mut lo[i..]);
        store_partial(y_hi, &mut hi[i..]);
    }
}

stamp! {
    /// SwiGLU gate, as [`crate::scalar::swiglu`]: `y[i] = a[i] / (1 + exp(-a[i])) * b[i]`.
    pub fn swiglu(a: &[f32], b: &[f32], y: &mut [f32]) = swiglu_body;
}

stamp! {
    /// GELU gate (tanh approximation), as [`crate::scalar::geglu`]:
    /// `y[i] = a[i] / (1 + exp(-z)) * b[i]`, `z = 2 sqrt(2/π) (a + 0.044715 a³)`.
    pub fn geglu(a: &[f32], b: &[f32], y: &mut [f32]) = geglu_body;
}

/// A gated activation `y = f(g, u)`, one vector at a time. A trait, not a closure or a
/// function value: the call must be inlined into the `#[target_feature]` wrapper, or every
/// intrinsic becomes a call (measured 40x slower).
trait Gate {
    fn apply<V: F32Vec>(g: V, u: V) -> V;
}

/// `g / (1 + exp(-z)) * u`: the sigmoid gate both GLUs share.
#[inline(always)]
fn sigmoid_gate<V: F32Vec>(g: V, z: V, u: V) -> V {
    g.div(V::splat(1.0).add(exp(V::zero().sub(z)))).mul(u)
}

/// SiLU gate: `z = g`.
struct Silu;

impl Gate for Silu {
    #[inline(always)]
    fn apply<V: F32Vec>(g: V, u: V) -> V {
        sigmoid_gate(g, g, u)
    }
}

/// GELU gate (tanh approximation): `z = 2 sqrt(2/π) (g + 0.044715 g³)`.
struct Gelu;

impl Gate for Gelu {
    #[inline(always)]
    fn apply<V: F32Vec>(g: V, u: V) -> V {
        let c = V::splat(crate::scalar::GELU_2_SQRT_2_OVER_PI as f32);
        let k = V::splat(crate::scalar::GELU_COEF_A as f32);
        let z = c.mul(g.add(k.mul(g).mul(g).mul(g)));
        sigmoid_gate(g, z, u)
    }
}

#[inline(always)]
fn swiglu_body<V: F32Vec>(a: &[f32], b: &[f32], y: &mut [f32]) {
    gate_body::<V, Silu>(a, b, y);
}

#[inline(always)]
fn geglu_body<V: F32Vec>(a: &[f32], b: &[f32], y: &mut [f32]) {
    gate_body::<V, Gelu>(a, b, y);
}

/// `y = G(a, b)` a vector at a time, the tail through partial loads.
#[inline(always)]
fn gate_body<V: F32Vec, G: Gate>(a: &[f32], b: &[f32], y: &mut [f32]) {
    debug_assert!(a.len() == b.len() && a.len() == y.len());
    let l = V::LANES;
    let mut outs = y.chunks_exact_mut(l);
    for ((o, g), u) in (&mut outs).zip(a.chunks_exact(l)).zip(b.chunks_exact(l)) {
        // SAFETY: each chunk holds exactly LANES values.
        unsafe { G::apply(V::load(g.as_ptr()), V::load(u.as_ptr())).store(o.as_mut_ptr()) };
    }
    let tail = outs.into_remainder();
    if !tail.is_empty() {
        let s = a.len() - tail.len();
        store_partial(
            G::apply::<V>(load_partial(&a[s..], 0.0), load_partial(&b[s..], 0.0)),
            tail,
        );
    }
}

stamp! {
    /// Residual add, in place: `y[i] += x[i]`.
    pub fn add(y: &mut [f32], x: &[f32]) = add_body;
}

#[inline(always)]
fn add_body<V: F32Vec>(y: &mut [f32], x: &[f32]) {
    debug_assert!(y.len() == x.len());
    let l = V::LANES;
    let mut outs = y.chunks_exact_mut(l);
    for (o, v) in (&mut outs).zip(x.chunks_exact(l)) {
        // SAFETY: each chunk holds exactly LANES values.
        unsafe {
            V::load(o.as_ptr())
                .add(V::load(v.as_ptr()))
                .store(o.as_mut_ptr())
        };
    }
    let tail = outs.into_remainder();
    if !tail.is_empty() {
        let s = x.len() - tail.len();
        store_partial(
            load_partial::<V>(tail, 0.0).add(load_partial(&x[s..], 0.0)),
            tail,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Isa;

    /// Runs for two bases taken in turn stay in the table; the oldest of too many goes.
    #[test]
    fn the_table_keeps_its_last_runs() {
        let p = |theta| RopeParams {
            head_dim: 8,
            theta,
            layout: RopeLayout::Neox,
        };
        let (team, mut table) = (Team::new(1).unwrap(), RopeTable::default());
        for theta in [10_000.0, 1e6, 10_000.0, 1e6] {
            table.prepare(&team, 3, 5, &p(theta));
        }
        let thetas = |t: &RopeTable| {
            t.runs
                .iter()
                .map(|r| f32::from_bits(r.key.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(thetas(&table), [10_000.0, 1e6]);
        for theta in [1.0, 2.0, 3.0] {
            table.prepare(&team, 3, 5, &p(theta));
        }
        assert_eq!(thetas(&table), [1e6, 1.0, 2.0, 3.0]);
        // No rows: an empty run, no task.
        assert_eq!(
            table.prepare(&team, 0, 5, &p(4.0)).rows(0..0, 8),
            (&[][..], &[][..])
        );
    }

    /// The table path gives the bits of `rope` on every level, for both layouts, after a
    /// cached prefix, for any split of the rows (as the backend splits them over a team).
    #[test]
    fn rope_rows_from_the_table_is_bitwise_rope() {
        for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
            for (head_dim, heads, rows, pos) in [
                (64, 3, 7, 0),
                (128, 2, 5, 1000),
                (6, 1, 3, 9),
                (16, 2, 37, 11),
            ] {
                let p = RopeParams {
                    head_dim,
                    theta: 100_000.0,
                    layout,
                };
                let x: Vec<f32> = (0..rows * heads * head_dim)
                    .map(|i| ((i * 7919 % 1013) as f32 / 506.5) - 1.0)
                    .collect();
                let mut table = RopeTable::default();
                // Another base between: the table keeps both runs. With an odd row count the
                // team has two threads, and 37 rows split over them: the angles are the same.
                let team = Team::new(1 + rows % 2).unwrap();
                table.prepare(&team, rows, pos, &p);
                table.prepare(
                    &team,
                    rows,
                    pos,
                    &RopeParams {
                        theta: 10_000.0,
                        ..p
                    },
                );
                let table = table.prepare(&team, rows, pos, &p);
                for isa in Isa::available() {
                    let mut want = x.clone();
                    rope(isa, &mut want, rows, pos, &p);
                    for split in [rows, 1, 2] {
                        let mut got = x.clone();
                        let width = heads * head_dim;
                        for r0 in (0..rows).step_by(split) {
                            let r = r0..(r0 + split).min(rows);
                            let (cos, sin) = table.rows(r.clone(), head_dim);
                            rope_rows(isa, &mut got[r.start * width..r.end * width], cos, sin, &p);
                        }
                        assert!(
                            got.iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{layout:?} {head_dim} pos {pos} split {split} {:?}",
                            isa.level()
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod exp_tests {
    use super::super::vec::{F32Vec, exp};
    use crate::simd::{Isa, stamp};

    stamp! {
        /// `exp` over whole vectors of `x`, in place (a tail shorter than a vector is left).
        pub fn exp_in_place(x: &mut [f32]) = exp_in_place_body;
    }

    #[inline(always)]
    fn exp_in_place_body<V: F32Vec>(x: &mut [f32]) {
        for c in x.chunks_exact_mut(V::LANES) {
            // SAFETY: each chunk holds exactly LANES values.
            unsafe { exp(V::load(c.as_ptr())).store(c.as_mut_ptr()) };
        }
    }

    /// A NaN score makes its whole row NaN on every level, as in the scalar reference,
    /// wherever it sits (a vector's first or last lane, the tail); the other rows are
    /// untouched. (AVX-512 had turned it into a weight of 0 and AVX2 into about 2e38.)
    #[test]
    fn a_nan_score_makes_its_softmax_row_nan_on_every_level_as_the_scalar_reference() {
        let cols = 37;
        for at in [0, 5, 15, 16, 31, 32, 36] {
            let mut x: Vec<f32> = (0..2 * cols).map(|i| (i * 7 % 11) as f32 - 5.0).collect();
            x[at] = f32::NAN;
            let mut want = x.clone();
            crate::scalar::softmax(&mut want, cols, &super::SoftmaxParams::PLAIN);
            assert!(want[..cols].iter().all(|v| v.is_nan()));
            for isa in Isa::available() {
                let mut got = x.clone();
                super::softmax(isa, &mut got, cols, &super::SoftmaxParams::PLAIN);
                assert!(
                    got[..cols].iter().all(|v| v.is_nan()),
                    "{:?} NaN at {at}: {:?}",
                    isa.level(),
                    &got[..cols]
                );
                let sum: f32 = got[cols..].iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-6,
                    "{:?}: second row sums to {sum}",
                    isa.level()
                );
            }
        }
    }

    /// Units in the last place between `y` and the f64 `want` rounded to f32.
    fn ulps(y: f32, want: f64) -> u32 {
        (y.to_bits() as i64 - (want as f32).to_bits() as i64).unsigned_abs() as u32
    }

    /// Every level: within 2 ulp of the f64 `exp` from -87.3 to 88.3 and 6 from there to
    /// where f32 overflows; 0 below -87.3; +inf beyond f32's range and for +inf; NaN for NaN.
    #[test]
    fn exp_is_within_a_few_ulp_up_to_its_overflow_and_keeps_nan_on_every_level() {
        let mut xs: Vec<f32> = (0..=17_600).map(|i| -87.3 + i as f32 * 0.01).collect();
        xs.extend((0..1000).map(|i| 88.3 + i as f32 * 0.0005));
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            88.8,
            100.0,
            1e30,
            f32::MAX,
            -87.4,
            -100.0,
            -1e30,
            f32::MIN,
            0.0,
            -0.0,
        ];
        xs.extend(specials);
        xs.resize(xs.len().next_multiple_of(16), 1.0);
        for isa in Isa::available() {
            let mut ys = xs.clone();
            exp_in_place(isa, &mut ys);
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64).exp();
                let ok = if x.is_nan() {
                    y.is_nan()
                } else if x < -87.3 {
                    y == 0.0
                } else if want > f32::MAX as f64 {
                    y == f32::INFINITY
                } else {
                    // Past 88.3, r grows to ln 2, outside the polynomial's fitted range:
                    // 5 ulp measured at most, by 88.7225.
                    ulps(y, want) <= if x <= 88.3 { 2 } else { 6 }
                };
                assert!(ok, "{:?}: exp({x:e}) = {y:e}, want {want:e}", isa.level());
            }
        }
    }
}
