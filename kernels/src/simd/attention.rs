//! Causal grouped-query attention over a KV cache, in vectors, split over a team.
//!
//! Shapes: `q (m, n_heads * head_dim)`, row `i` the query at position `pos + i`; the caches
//! `(≥ pos + m, n_kv_heads * head_dim)`, rows by position; query head `h` reads kv head
//! `h / (n_heads / n_kv_heads)`; `out (m, n_heads * head_dim)`. Each (query row, head) pair:
//! scores `q · k_t` for the visible positions (all `pos + i + 1` of them, or the last
//! `window` with a sliding window), the softmax of the scores times the shape's `scale`
//! ([`super::softmax`]), then `Σ_t p_t v_t`.
//!
//! Decode (fewer than `TILED_MIN_ROWS` query rows), and prompts whose heads the tiled path
//! below does not take: the pairs are taken in runs of query heads that share a row and a
//! kv head, so that a run reads each key and value from memory once for all its heads. A
//! decode cuts the pairs into one contiguous part per task (a kv head's heads may be split
//! between two tasks); a prompt deals whole runs round-robin, as its rows grow longer. Each
//! task keeps its own score buffer. A run:
//! - scores sixteen positions at a time, each head of the run in turn while those keys sit
//!   in L1: sixteen 16-lane dot products side by side, summed together at the end
//!   (`V16::reduce16`) rather than by sixteen horizontal sums;
//! - values in steps of `MIX_STEP` positions, up to `MIX_HEADS` heads side by side: each
//!   position's values loaded once for them all, each output value one chain of FMAs in
//!   position order.
//!
//! Heads of no whole number of 16-value chunks take one position and one chain at a time.
//! A pair's arithmetic does not depend on the run or task it lands in, so results are
//! bitwise identical for any thread count. On an Intel Xeon (family 6 model 207), one call
//! at position 511 of the default model's shape (9 heads of 64 over 3 kv heads), cache in
//! L2: 60 µs on one thread with a head per pair, 35 µs in runs.
//!
//! Decode deep into the cache (a first row that sees `SPANS_MIN` positions or more, heads
//! of whole 16-value chunks) splits the positions instead, as flash-decoding does (Dao et
//! al. 2023): each row's visible positions are cut into an even number of spans of about
//! `SPAN`, cut on multiples of 16 and so each within 16 of an equal share, from its first
//! visible one, and a (span, kv head) unit runs its query heads as a run does, but over its
//! span only and keeping its softmax unnormalised: scores scaled, less their maximum
//! `max_c`, exponentiated (`exp_shifted`), their sum `l_c` and `Σ_t p_t v_t` kept for each
//! head. The tasks take the units in contiguous parts, spans before kv heads, so the two threads
//! read different halves of the caches rather than each a kv head's strided rows (and a
//! kv head cut between them twice). Each head then adds its spans in order: `Σ_c w_c
//! sums_c / Σ_c w_c l_c` with `w_c = exp(max_c - max)`, the softmax's sums regrouped by span
//! and rescaled. The units and their order do not depend on the team, so the results are
//! bitwise identical for any thread count here too. Measured on the Xeon above, 2 threads,
//! 30 layers' caches (out of L2): position 2100, 210-340 µs a call on the runs, 180-240 on
//! spans; position 1024, 69-120 µs against 66-78 (before the value sums took four heads at
//! once); positions 300 and 450, on an even number of spans of about equal length,
//! 15-16 and 21-23 µs against 17-18 and 25-27 on the runs.
//!
//! Prefill (`m >= TILED_MIN_ROWS` query rows, `head_dim` a multiple of 16 up to 256) takes a tiled
//! path instead, one kv head at a time: the team first packs that head's keys transposed,
//! in chunks of 16 positions (`kt[chunk][d][16]`, zero past the cache), then deals units of
//! `QB` query vectors (the rows' query heads that read this kv head, row-major) to its
//! tasks. A unit computes its scores as a small GEMM, 16 positions per vector and no
//! horizontal sums (`QB` broadcasts of `q[d]` against `NC` key vectors per `d`, summed in
//! `d` order), takes each query's softmax over its own visible positions, zeroes the rest,
//! and sums `Σ_t p_t v_t` in position order for its `QB` queries at once, sharing each
//! loaded value vector. The scores' summation order differs from the runs' path's; a
//! query's result still does not depend on the unit or task it lands in, as long as the
//! cached values are finite (a query's sum adds `0 · v_t` for the positions before its
//! window and up to the longest query of its unit: an infinite `v_t` there would make it
//! NaN). With a window, a unit scores and sums only from the step of 64 positions holding
//! its first query's first visible one: work `O(T · window)`, not `O(T²)` (the keys are still
//! packed whole, `O(T · head_dim)` per kv head).

use std::sync::Mutex;

use super::Out;
use super::elementwise::exp_shifted;
use super::v16::{Kernel16, V16, dispatch16};
use super::{Isa, softmax};
use crate::SoftmaxParams;
use crate::team::{Team, for_each_part};

/// The shape of an attention call (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    /// Query rows.
    pub m: usize,
    /// Position of the first query row.
    pub pos: usize,
    pub n_heads: usize,
    /// Divides `n_heads`.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The factor on `q · k` before the softmax, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding-window attention: the query at position `p` sees the `window` positions
    /// `p + 1 - window ..= p` (llama.cpp's `LLAMA_SWA_TYPE_STANDARD`: masked when
    /// `p - t >= window`). `None`: every position up to `p`.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// The first position the query at position `p` sees.
    pub fn first_visible(&self, p: usize) -> usize {
        crate::first_visible(p, self.window)
    }
}

/// Per-task score buffers, owned by the caller (a backend holds one for its team).
#[derive(Debug)]
pub struct AttentionScratch {
    slots: Vec<Mutex<Vec<f32>>>,
    /// The tiled path's transposed keys of one kv head, shared by the team.
    kt: Mutex<Vec<f32>>,
    /// The spans path's partial results, shared by the team: each span's sums of values,
    /// then each span's maximum and sum of its scores.
    partials: Mutex<Vec<f32>>,
}

impl AttentionScratch {
    /// Buffers for up to `tasks` concurrent tasks.
    pub fn new(tasks: usize) -> AttentionScratch {
        AttentionScratch {
            slots: (0..tasks.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            kt: Mutex::new(Vec::new()),
            partials: Mutex::new(Vec::new()),
        }
    }
}

/// Query rows from which [`attention`] takes the tiled path: below, packing the keys costs
/// more than it saves.
const TILED_MIN_ROWS: usize = 4;
/// Query vectors per unit of the tiled path.
const QB: usize = 4;
/// Chunks of 16 positions per step of the tiled scores: `QB * NC` accumulators.
const NC: usize = 4;
/// Output vectors (of 16 values) per step of the tiled sum: `QB * MW` accumulators.
const MW: usize = 4;

/// Attention of `q` over the caches into `out` (see the module docs for the shapes).
#[allow(clippy::too_many_arguments)] // the op's tensors, side by side
pub fn attention(
    isa: Isa,
    team: &Team,
    scratch: &AttentionScratch,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    p: &AttentionShape,
) {
    let kv = p.n_kv_heads * p.head_dim;
    assert!(
        p.n_kv_heads > 0
            && p.n_heads.is_multiple_of(p.n_kv_heads)
            && q.len() == p.m * p.n_heads * p.head_dim
            && out.len() == q.len()
            && k_cache.len() >= (p.pos + p.m) * kv
            && v_cache.len() >= (p.pos + p.m) * kv,
        "attention: tensors do not match {p:?}"
    );
    if p.m >= TILED_MIN_ROWS && p.head_dim.is_multiple_of(16) && p.head_dim <= 256 {
        return tiled(isa, team, scratch, q, k_cache, v_cache, out, p);
    }
    let (hd, group) = (p.head_dim, p.n_heads / p.n_kv_heads);
    if hd == 0 || p.n_heads == 0 {
        return;
    }
    if p.m < TILED_MIN_ROWS && hd.is_multiple_of(16) && visible(p, 0) >= SPANS_MIN {
        return spans(isa, team, scratch, q, k_cache, v_cache, out, p);
    }
    let o = Out(out.as_mut_ptr());
    let softmax_params = SoftmaxParams {
        scale: p.scale,
        causal: None,
    };
    // Query heads h .. h + heads of row i, which share kv head h / group.
    let run = |scores: &mut Vec<f32>, i: usize, h: usize, heads: usize| {
        let at = (i * p.n_heads + h) * hd;
        // SAFETY: pairs (i, h .. h + heads)'s outputs, written by this task only.
        let out = unsafe { std::slice::from_raw_parts_mut(o.get().add(at), heads * hd) };
        let (lo, n) = (p.first_visible(p.pos + i), visible(p, i));
        if n == 0 {
            // A window of no positions: no values to sum.
            out.fill(0.0);
            return;
        }
        let stretch = Stretch {
            k: &k_cache[lo * kv..],
            v: &v_cache[lo * kv..],
            kv,
            kv_off: (h / group) * hd,
            hd,
            n,
        };
        run_heads(
            isa,
            scores,
            &q[at..][..heads * hd],
            stretch,
            out,
            |_, row| softmax(isa, row, n, &softmax_params),
        );
    };
    if p.m < TILED_MIN_ROWS {
        // Decode: each task a contiguous part of the (row, head) pairs, in runs that share
        // a row and a kv head (a kv head's query heads may be cut between two tasks).
        let pairs = p.m * p.n_heads;
        let tasks = team.threads().min(scratch.slots.len()).min(pairs).max(1);
        team.run(tasks, &|t| {
            let mut scores = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
            for_each_part(&[pairs], tasks, t, |_, part| {
                let mut a = part.start;
                while a < part.end {
                    let (i, h) = (a / p.n_heads, a % p.n_heads);
                    let heads = (part.end - a).min((h / group + 1) * group - h);
                    run(&mut scores, i, h, heads);
                    a += heads;
                }
            });
        });
    } else {
        // Prompt rows (heads the tiled path does not take): whole runs dealt round-robin,
        // as rows grow longer down the prompt.
        let units = p.m * p.n_kv_heads;
        let tasks = team.threads().min(scratch.slots.len()).min(units).max(1);
        team.run(tasks, &|t| {
            let mut scores = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
            for u in (t..units).step_by(tasks) {
                let (i, g) = (u / p.n_kv_heads, u % p.n_kv_heads);
                run(&mut scores, i, g * group, group);
            }
        });
    }
}

/// Positions visible to query row `i` of a call.
fn visible(p: &AttentionShape, i: usize) -> usize {
    p.pos + i + 1 - p.first_visible(p.pos + i)
}

/// Decode calls whose first row sees at least this many positions take the spans path.
const SPANS_MIN: usize = 256;
/// Positions per span, about: a row's spans are as many as spans of this length need,
/// made even.
const SPAN: usize = 256;

/// Where span `c` of a row that sees `visible` positions starts, counted from its first
/// visible one; `c == span_count(visible)` gives `visible`. An even number of spans of
/// about [`SPAN`] positions, each starting on a multiple of 16 (a span's scores take their
/// positions in sixteens), so each within 16 of an equal share: equal spans make equal
/// units, and an even count splits evenly between two threads. The cuts depend on the row
/// only (a count from the team would make the sums depend on it).
fn span_start(visible: usize, c: usize) -> usize {
    let spans = span_count(visible);
    if c >= spans {
        visible
    } else {
        (c * visible / spans) / 16 * 16
    }
}

/// The number of spans of a row that sees `visible` positions (see [`span_start`]).
fn span_count(visible: usize) -> usize {
    visible.div_ceil(SPAN).next_multiple_of(2).max(2)
}

/// The spans path (see the module docs): a unit is one span of one row's visible positions
/// and one kv head; units go to the tasks in contiguous parts, rows outermost, then spans,
/// so that a task reads one stretch of a row's caches, every kv head of each position in
/// it (a call of two or three rows hands whole rows to the tasks). Then each head's spans
/// are combined on the calling thread, in span order.
#[allow(clippy::too_many_arguments)] // the op's tensors, side by side
fn spans(
    isa: Isa,
    team: &Team,
    scratch: &AttentionScratch,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    p: &AttentionShape,
) {
    let (hd, kv) = (p.head_dim, p.n_kv_heads * p.head_dim);
    let group = p.n_heads / p.n_kv_heads;
    // Row i's units are first[i] .. first[i + 1]; its unit first[i] + u is span
    // u / n_kv_heads of its visible positions and kv head u % n_kv_heads. A unit's `group`
    // heads' sums of values sit at unit * group * hd in the partials, their maxima and
    // sums of scores (two values a head) at 2 * unit * group past all the sums.
    let spans_of = |i: usize| span_count(visible(p, i));
    let mut first = vec![0];
    for i in 0..p.m {
        first.push(first[i] + spans_of(i) * p.n_kv_heads);
    }
    let units = first[p.m];
    let mut partials = scratch.partials.lock().unwrap_or_else(|e| e.into_inner());
    let sums_len = units * group * hd;
    partials.clear();
    partials.resize(sums_len + 2 * units * group, 0.0);
    let part = Out(partials.as_mut_ptr());
    let tasks = team.threads().min(scratch.slots.len()).min(units).max(1);
    team.run(tasks, &|t| {
        let mut scores = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
        for_each_part(&[units], tasks, t, |_, range| {
            for unit in range {
                let i = first.partition_point(|&f| f <= unit) - 1;
                let (c, g) = (
                    (unit - first[i]) / p.n_kv_heads,
                    (unit - first[i]) % p.n_kv_heads,
                );
                let (from, to) = (
                    span_start(visible(p, i), c),
                    span_start(visible(p, i), c + 1),
                );
                let (lo, len) = (p.first_visible(p.pos + i) + from, to - from);
                // SAFETY: this unit's slots of the partials, written by this task only.
                let (sums, stats) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(
                            part.get().add(unit * group * hd),
                            group * hd,
                        ),
                        std::slice::from_raw_parts_mut(
                            part.get().add(sums_len + 2 * unit * group),
                            2 * group,
                        ),
                    )
                };
                let stretch = Stretch {
                    k: &k_cache[lo * kv..],
                    v: &v_cache[lo * kv..],
                    kv,
                    kv_off: g * hd,
                    hd,
                    n: len,
                };
                let at = (i * p.n_heads + g * group) * hd;
                run_heads(
                    isa,
                    &mut scores,
                    &q[at..][..group * hd],
                    stretch,
                    sums,
                    |r, row| {
                        let (max, sum) = exp_shifted(isa, row, p.scale);
                        stats[2 * r..][..2].copy_from_slice(&[max, sum]);
                    },
                );
            }
        });
    });
    // A head's spans c, in order: out = Σ_c w_c sums_c / Σ_c w_c sum_c, where
    // w_c = exp(max_c - max) rescales span c's exponentials to the row's maximum.
    let (sums, stats) = partials.split_at(sums_len);
    for i in 0..p.m {
        for h in 0..p.n_heads {
            let (g, r) = (h / group, h % group);
            let unit = |c: usize| first[i] + c * p.n_kv_heads + g;
            let span_sums = |c: usize| &sums[(unit(c) * group + r) * hd..][..hd];
            let stat = |c: usize| &stats[2 * (unit(c) * group + r)..][..2];
            let n_spans = spans_of(i);
            let max = (0..n_spans)
                .map(|c| stat(c)[0])
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[(i * p.n_heads + h) * hd..][..hd];
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let mut total = 0.0f32;
            for c in 0..n_spans {
                let w = (stat(c)[0] - max).exp();
                total += w * stat(c)[1];
                dispatch16(
                    isa,
                    Axpy {
                        a: w,
                        x: span_sums(c),
                        y: &mut *o,
                    },
                );
            }
            let inv = 1.0 / total;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// `n` positions of one kv head: its keys and values, rows of `kv` values from the first
/// position's, the head's `hd` at `kv_off` in each.
struct Stretch<'a> {
    k: &'a [f32],
    v: &'a [f32],
    kv: usize,
    kv_off: usize,
    hd: usize,
    n: usize,
}

/// A run of query heads `q (heads, hd)` that read one kv head, over a stretch of its
/// positions: their scores into `scores` (grown as needed), `weigh(r, row)` on head `r`'s
/// row of them (a softmax, or the spans' unnormalised one), then `out (heads, hd) =
/// Σ_t p_t v_t`.
fn run_heads(
    isa: Isa,
    scores: &mut Vec<f32>,
    q: &[f32],
    Stretch {
        k,
        v,
        kv,
        kv_off,
        hd,
        n,
    }: Stretch<'_>,
    out: &mut [f32],
    mut weigh: impl FnMut(usize, &mut [f32]),
) {
    let heads = q.len() / hd;
    if scores.len() < heads * n {
        scores.resize(heads * n, 0.0);
    }
    let s = &mut scores[..heads * n];
    dispatch16(
        isa,
        Scores {
            q,
            hd,
            k,
            kv,
            kv_off,
            s,
        },
    );
    for (r, row) in s.chunks_exact_mut(n).enumerate() {
        weigh(r, row);
    }
    let p = &scores[..heads * n];
    dispatch16(
        isa,
        Mix {
            p,
            hd,
            v,
            kv,
            kv_off,
            out,
        },
    );
}

/// `y += a x`, in vectors of 16 (`y.len()` a multiple of 16).
struct Axpy<'a> {
    a: f32,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl Kernel16 for Axpy<'_> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let a = V::splat(self.a);
        for (x, y) in self.x.chunks_exact(16).zip(self.y.chunks_exact_mut(16)) {
            // SAFETY: 16 values each.
            unsafe {
                a.fma(V::load(x.as_ptr()), V::load(y.as_ptr()))
                    .store(y.as_mut_ptr())
            };
        }
    }
}

/// Positions per step of [`Mix`]: where a run's heads and values take more than one block
/// of [`MIX_HEADS`] heads by 64 values, the blocks read a step's values while they sit in
/// L1 (8 KiB of them for a head of 64 values).
const MIX_STEP: usize = 32;

/// The scores of a run of query heads that read one kv head: `s[r * n + t] = q_r · k_t` for
/// each query head `r` (`q (heads, hd)`, `s (heads, n)`) and cached position `t < n`.
struct Scores<'a> {
    q: &'a [f32],
    hd: usize,
    k: &'a [f32],
    kv: usize,
    kv_off: usize,
    s: &'a mut [f32],
}

impl Kernel16 for Scores<'_> {
    type Output = ();

    /// Sixteen positions at a time where `hd` is a multiple of 16, every query head of the
    /// run in turn while those sixteen keys sit in L1: sixteen dot products, each over the
    /// head's chunks of 16 values, then summed together ([`V16::reduce16`]). A whole step
    /// addresses its keys from the first by the row stride ([`scores_step`]); a last,
    /// partial one repeats its last position through a table of row pointers. Else one
    /// position at a time, with a horizontal sum each.
    #[inline(always)]
    fn run<V: V16>(self) {
        let hd = self.hd;
        let heads = self.q.len() / hd;
        let n = self.s.len() / heads;
        let row = |t: usize| self.k[t * self.kv + self.kv_off..][..hd].as_ptr();
        // The whole steps reach their keys by the stride from the first, unchecked: the last
        // position's key must be in the cache.
        assert!(
            n == 0 || self.k.len() >= (n - 1) * self.kv + self.kv_off + hd,
            "attention scores: {n} positions past the cache"
        );
        if !hd.is_multiple_of(16) {
            for (qr, sr) in self.q.chunks_exact(hd).zip(self.s.chunks_exact_mut(n)) {
                scores_one_by_one::<V>(qr, sr, row);
            }
            return;
        }
        for t0 in (0..n).step_by(16) {
            let live = 16.min(n - t0);
            if live == 16 {
                let step = (self.q, &mut *self.s, n, t0, row(t0), self.kv);
                match hd / 16 {
                    1 => scores_step::<V, 1>(step),
                    2 => scores_step::<V, 2>(step),
                    3 => scores_step::<V, 3>(step),
                    4 => scores_step::<V, 4>(step),
                    5 => scores_step::<V, 5>(step),
                    6 => scores_step::<V, 6>(step),
                    7 => scores_step::<V, 7>(step),
                    8 => scores_step::<V, 8>(step),
                    _ => scores_step_wide::<V>(step),
                }
                continue;
            }
            // Past the last position, the step repeats it and drops the result.
            let rows: [*const f32; 16] = std::array::from_fn(|j| row(t0 + j.min(live - 1)));
            for (qr, sr) in self.q.chunks_exact(hd).zip(self.s.chunks_exact_mut(n)) {
                let mut acc = [V::zero(); 16];
                for c in (0..hd).step_by(16) {
                    // SAFETY: c + 16 <= hd values of the query and of each row.
                    let qc = unsafe { V::load(qr.as_ptr().add(c)) };
                    for (a, r) in acc.iter_mut().zip(&rows) {
                        *a = qc.fma(unsafe { V::load(r.add(c)) }, *a);
                    }
                }
                let mut tail = [0.0f32; 16];
                // SAFETY: 16 values.
                unsafe { V::reduce16(acc).store(tail.as_mut_ptr()) };
                sr[t0..].copy_from_slice(&tail[..live]);
            }
        }
    }
}

/// One whole step of [`Scores`] (sixteen positions from `t0`, the first at `k0`, one every
/// `stride` values) for each query head of `q` (`C` chunks of 16 values each): the head's
/// query in registers, each position's dot product in one chain over the chunks (as many
/// chains in flight as positions), then the sixteen summed together.
#[inline(always)]
fn scores_step<V: V16, const C: usize>(
    (q, s, n, t0, k0, stride): (&[f32], &mut [f32], usize, usize, *const f32, usize),
) {
    for (qr, sr) in q.chunks_exact(16 * C).zip(s.chunks_exact_mut(n)) {
        let mut qv = [V::zero(); C];
        for (c, v) in qv.iter_mut().enumerate() {
            // SAFETY: 16 C values in the head's query.
            *v = unsafe { V::load(qr.as_ptr().add(16 * c)) };
        }
        let mut acc = [V::zero(); 16];
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: positions t0 + j < n, 16 C values each.
            let r = unsafe { k0.add(j * stride) };
            for (c, v) in qv.iter().enumerate() {
                *a = v.fma(unsafe { V::load(r.add(16 * c)) }, *a);
            }
        }
        // SAFETY: t0 + 16 <= n.
        unsafe { V::reduce16(acc).store(sr.as_mut_ptr().add(t0)) };
    }
}

/// [`scores_step`] for heads of more than eight chunks: the query's chunks loaded as used.
#[inline(always)]
fn scores_step_wide<V: V16>(
    (q, s, n, t0, k0, stride): (&[f32], &mut [f32], usize, usize, *const f32, usize),
) {
    let hd = q.len() / (s.len() / n);
    for (qr, sr) in q.chunks_exact(hd).zip(s.chunks_exact_mut(n)) {
        let mut acc = [V::zero(); 16];
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: positions t0 + j < n, hd values each, and hd values of the query.
            let r = unsafe { k0.add(j * stride) };
            for c in (0..hd).step_by(16) {
                *a = unsafe { V::load(qr.as_ptr().add(c)).fma(V::load(r.add(c)), *a) };
            }
        }
        // SAFETY: t0 + 16 <= n.
        unsafe { V::reduce16(acc).store(sr.as_mut_ptr().add(t0)) };
    }
}

/// One query head's scores one position at a time, with a horizontal sum each (any
/// `head_dim`); `row(t)` points at position `t`'s key.
#[inline(always)]
fn scores_one_by_one<V: V16>(qh: &[f32], s: &mut [f32], row: impl Fn(usize) -> *const f32) {
    let hd = qh.len();
    let full = hd / 16 * 16;
    for (t, st) in s.iter_mut().enumerate() {
        // SAFETY: row(t) points at hd values.
        let kt = unsafe { std::slice::from_raw_parts(row(t), hd) };
        let mut acc = V::zero();
        for c in (0..full).step_by(16) {
            // SAFETY: c + 16 <= hd values of each.
            let (a, b) = unsafe { (V::load(qh.as_ptr().add(c)), V::load(kt.as_ptr().add(c))) };
            acc = a.fma(b, acc);
        }
        let mut sum = acc.reduce_add();
        for c in full..hd {
            sum += qh[c] * kt[c];
        }
        *st = sum;
    }
}

/// The outputs of a run of query heads that read one kv head: `out[r] = Σ_t p[r * n + t]
/// v_t` (`p (heads, n)`, `out (heads, hd)`).
struct Mix<'a> {
    p: &'a [f32],
    hd: usize,
    v: &'a [f32],
    kv: usize,
    kv_off: usize,
    out: &'a mut [f32],
}

impl Kernel16 for Mix<'_> {
    type Output = ();

    /// Where `hd` is a multiple of 16: steps of [`MIX_STEP`] positions; in each, blocks of
    /// up to [`MIX_HEADS`] query heads by up to four chunks of 16 values, each block
    /// loading a position's values once for all its heads ([`mix_heads`]), while the
    /// step's values sit in L1. Else each head in turn. Either way a head's output value
    /// is one chain of FMAs in position order (the heads' sums side by side hide the FMA
    /// latency), through memory from 17 whole chunks (272 values) on where `hd` is not a
    /// multiple of 16.
    #[inline(always)]
    fn run<V: V16>(mut self) {
        let hd = self.hd;
        let heads = self.out.len() / hd;
        let n = self.p.len() / heads;
        if !hd.is_multiple_of(16) {
            for (pr, out) in self.p.chunks_exact(n).zip(self.out.chunks_exact_mut(hd)) {
                mix_one_chain::<V>(pr, self.v, self.kv, self.kv_off, out);
            }
            return;
        }
        self.out.fill(0.0);
        for t0 in (0..n).step_by(MIX_STEP) {
            let steps = t0..n.min(t0 + MIX_STEP);
            for r0 in (0..heads).step_by(MIX_HEADS) {
                for c0 in (0..hd).step_by(64) {
                    let block = (r0, steps.clone(), c0);
                    macro_rules! arms {
                        ($($h:literal, $w:literal);*) => {
                            match ((heads - r0).min(MIX_HEADS), ((hd - c0) / 16).min(4)) {
                                $(($h, $w) => mix_heads::<V, $h, $w>(&mut self, block),)*
                                _ => unreachable!("at most MIX_HEADS heads and four chunks"),
                            }
                        };
                    }
                    arms!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4;
                          3, 1; 3, 2; 3, 3; 3, 4; 4, 1; 4, 2; 4, 3; 4, 4);
                }
            }
        }
    }
}

/// Query heads [`Mix`] sums side by side.
const MIX_HEADS: usize = 4;

/// Adds heads `r0 .. r0 + H`'s sums over positions `ts` to their output values `c0 .. c0 +
/// 16 W`: each position's `W` value vectors loaded once for the `H` heads, one chain per
/// head and vector in position order, carried from step to step through the output.
#[inline(always)]
fn mix_heads<V: V16, const H: usize, const W: usize>(
    m: &mut Mix<'_>,
    (r0, ts, c0): (usize, std::ops::Range<usize>, usize),
) {
    let hd = m.hd;
    let n = m.p.len() / (m.out.len() / hd);
    debug_assert!((r0 + H) * hd <= m.out.len() && c0 + 16 * W <= hd && ts.end <= n);
    let out = m.out.as_mut_ptr();
    let mut acc = [[V::zero(); W]; H];
    for (h, a) in acc.iter_mut().enumerate() {
        for (c, a) in a.iter_mut().enumerate() {
            // SAFETY: head r0 + h's values c0 + 16c .. + 16 of the output.
            *a = unsafe { V::load(out.add((r0 + h) * hd + c0 + 16 * c)) };
        }
    }
    let p = &m.p[r0 * n..];
    let v = &m.v[m.kv_off + c0..];
    for t in ts {
        let row = v[t * m.kv..][..16 * W].as_ptr();
        let mut vals = [V::zero(); W];
        for (c, x) in vals.iter_mut().enumerate() {
            // SAFETY: 16 W values of the row.
            *x = unsafe { V::load(row.add(16 * c)) };
        }
        for (h, a) in acc.iter_mut().enumerate() {
            let w = V::splat(p[h * n + t]);
            for (a, x) in a.iter_mut().zip(&vals) {
                *a = w.fma(*x, *a);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (c, a) in a.iter().enumerate() {
            // SAFETY: as above.
            unsafe { a.store(out.add((r0 + h) * hd + c0 + 16 * c)) };
        }
    }
}

/// One head's `out = Σ_t p[t] v_t` in one chain, in position order (any `head_dim`): in
/// registers up to 256 values, through memory above.
#[inline(always)]
fn mix_one_chain<V: V16>(p: &[f32], v: &[f32], kv: usize, kv_off: usize, out: &mut [f32]) {
    let hd = out.len();
    let full = hd / 16 * 16;
    let mut acc = [V::zero(); 16];
    let chunks = full / 16;
    if chunks > acc.len() {
        out.fill(0.0);
        for (t, &w) in p.iter().enumerate() {
            let vt = &v[t * kv + kv_off..][..hd];
            for (o, &x) in out.iter_mut().zip(vt) {
                *o += w * x;
            }
        }
        return;
    }
    out[full..].fill(0.0);
    for (t, &w) in p.iter().enumerate() {
        let vt = &v[t * kv + kv_off..][..hd];
        let wv = V::splat(w);
        for (c, a) in acc.iter_mut().enumerate().take(chunks) {
            // SAFETY: 16 values at 16c < full <= hd.
            *a = wv.fma(unsafe { V::load(vt.as_ptr().add(16 * c)) }, *a);
        }
        for c in full..hd {
            out[c] += w * vt[c];
        }
    }
    for (c, a) in acc.iter().enumerate().take(chunks) {
        // SAFETY: 16 values at 16c.
        unsafe { a.store(out.as_mut_ptr().add(16 * c)) };
    }
}

/// The tiled path (see the module docs).
#[allow(clippy::too_many_arguments)] // the op's tensors, side by side
fn tiled(
    isa: Isa,
    team: &Team,
    scratch: &AttentionScratch,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    p: &AttentionShape,
) {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let kv = p.n_kv_heads * hd;
    let t_all = p.pos + p.m;
    // Positions padded to whole steps of NC chunks, so that every step reads real memory.
    let t_pad = t_all.div_ceil(16 * NC) * 16 * NC;
    let chunks = t_pad / 16;
    let mut kt = scratch.kt.lock().unwrap_or_else(|e| e.into_inner());
    kt.clear();
    kt.resize(t_pad * hd, 0.0);
    let kt_ptr = Out(kt.as_mut_ptr());
    let queries = p.m * group;
    let units = queries.div_ceil(QB);
    let o = Out(out.as_mut_ptr());
    for g in 0..p.n_kv_heads {
        let kv_off = g * hd;
        let tasks = team.threads().min(chunks).max(1);
        team.run(tasks, &|t| {
            for c in (t..chunks).step_by(tasks) {
                // SAFETY: chunk c's hd * 16 values, written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(kt_ptr.get().add(c * hd * 16), hd * 16)
                };
                dispatch16(
                    isa,
                    PackKeys {
                        k: k_cache,
                        t0: 16 * c,
                        t_all,
                        kv,
                        kv_off,
                        dst,
                    },
                );
            }
        });
        // SAFETY: the packing job has returned; the units only read.
        let kt_all = unsafe { std::slice::from_raw_parts(kt_ptr.get(), t_pad * hd) };
        let tasks = team.threads().min(scratch.slots.len()).min(units).max(1);
        team.run(tasks, &|t| {
            let mut s = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
            if s.len() < QB * t_pad {
                s.resize(QB * t_pad, 0.0);
            }
            for u in (t..units).step_by(tasks) {
                // Query vector j of this kv head: row j / group, head g * group + j % group;
                // past the last, the unit repeats its last query and drops the result.
                let first = u * QB;
                let real = QB.min(queries - first);
                let idx: [usize; QB] = std::array::from_fn(|i| first + i.min(real - 1));
                let row = |j: usize| j / group;
                let head = |j: usize| g * group + j % group;
                let at = |j: usize| (row(j) * p.n_heads + head(j)) * hd;
                let lens: [usize; QB] = std::array::from_fn(|i| p.pos + row(idx[i]) + 1);
                let len_max = lens[QB - 1];
                let steps = len_max.div_ceil(16 * NC);
                // With a window, the steps before the first query's window are skipped (the
                // unit's queries are in position order, so the first sees the least).
                let first_step = p.first_visible(lens[0] - 1) / (16 * NC);
                dispatch16(
                    isa,
                    TileScores {
                        kt: kt_all,
                        hd,
                        q: std::array::from_fn(|i| &q[at(idx[i])..][..hd]),
                        first_step,
                        steps,
                        s: &mut s[..QB * t_pad],
                        stride: t_pad,
                    },
                );
                for (i, &len) in lens.iter().enumerate() {
                    // A window leaves positions before `lo` out: weight 0 in the sum.
                    let lo = p.first_visible(len - 1);
                    let si = &mut s[i * t_pad..][..steps * 16 * NC];
                    softmax(
                        isa,
                        &mut si[lo..len],
                        len - lo,
                        &SoftmaxParams {
                            scale: p.scale,
                            causal: None,
                        },
                    );
                    si[first_step * 16 * NC..lo].fill(0.0);
                    si[len..len_max].fill(0.0);
                }
                let mut acc = [0.0f32; QB * 256];
                let accs = &mut acc[..QB * hd];
                let mut col = 0;
                while col < hd {
                    let w = MW.min((hd - col) / 16);
                    let mix = TileMix {
                        p: &s[..QB * t_pad],
                        stride: t_pad,
                        first: first_step * 16 * NC,
                        len: len_max,
                        v: v_cache,
                        kv,
                        v_off: kv_off + col,
                        hd,
                        col,
                        out: &mut *accs,
                    };
                    match w {
                        4 => dispatch16(isa, TileMixW::<4>(mix)),
                        3 => dispatch16(isa, TileMixW::<3>(mix)),
                        2 => dispatch16(isa, TileMixW::<2>(mix)),
                        _ => dispatch16(isa, TileMixW::<1>(mix)),
                    }
                    col += 16 * w;
                }
                for (i, &j) in idx.iter().enumerate().take(real) {
                    // SAFETY: query j's outputs, written by this unit only.
                    let oj = unsafe { std::slice::from_raw_parts_mut(o.get().add(at(j)), hd) };
                    oj.copy_from_slice(&accs[i * hd..][..hd]);
                }
            }
        });
    }
}

/// Keys at positions `t0..t0 + 16` of one kv head, transposed: `dst[d * 16 + j] =
/// k[t0 + j][d]`, zero for positions at or past `t_all`.
struct PackKeys<'a> {
    k: &'a [f32],
    t0: usize,
    t_all: usize,
    kv: usize,
    kv_off: usize,
    dst: &'a mut [f32],
}

impl Kernel16 for PackKeys<'_> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let hd = self.dst.len() / 16;
        for d0 in (0..hd).step_by(16) {
            let mut rows: [V; 16] = std::array::from_fn(|j| {
                let t = self.t0 + j;
                if t < self.t_all {
                    // SAFETY: 16 values of row t at d0 + 16 <= hd.
                    unsafe { V::load(self.k.as_ptr().add(t * self.kv + self.kv_off + d0)) }
                } else {
                    V::zero()
                }
            });
            V::transpose16(&mut rows);
            for (dd, r) in rows.iter().enumerate() {
                // SAFETY: 16 values at (d0 + dd) * 16 < hd * 16.
                unsafe { r.store(self.dst.as_mut_ptr().add((d0 + dd) * 16)) };
            }
        }
    }
}

/// `s[i][t] = q_i · k_t` for `QB` queries and the positions of steps `first_step .. steps`
/// of `NC` chunks (earlier positions are outside every query's window).
struct TileScores<'a> {
    kt: &'a [f32],
    hd: usize,
    q: [&'a [f32]; QB],
    first_step: usize,
    steps: usize,
    s: &'a mut [f32],
    stride: usize,
}

impl Kernel16 for TileScores<'_> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let hd = self.hd;
        assert!(self.kt.len() >= self.steps * NC * 16 * hd);
        assert!(self.s.len() >= (QB - 1) * self.stride + self.steps * NC * 16);
        assert!(self.q.iter().all(|q| q.len() == hd));
        for step in self.first_step..self.steps {
            let mut acc = [[V::zero(); NC]; QB];
            let base = self.kt[step * NC * 16 * hd..].as_ptr();
            for d in 0..hd {
                // SAFETY: chunk c of this step holds hd * 16 values (asserted above).
                let b: [V; NC] =
                    std::array::from_fn(|c| unsafe { V::load(base.add((c * hd + d) * 16)) });
                for i in 0..QB {
                    // SAFETY: d < hd = q[i].len().
                    let a = V::splat(unsafe { *self.q[i].get_unchecked(d) });
                    for c in 0..NC {
                        acc[i][c] = a.fma(b[c], acc[i][c]);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    // SAFETY: inside s (asserted above).
                    unsafe {
                        v.store(
                            self.s
                                .as_mut_ptr()
                                .add(i * self.stride + (step * NC + c) * 16),
                        )
                    };
                }
            }
        }
    }
}

/// `out[i][col..col + 16 W] = Σ_{t < len} p[i][t] v_t[col..]` for `QB` queries, in position
/// order.
struct TileMix<'a> {
    p: &'a [f32],
    stride: usize,
    /// Positions `first .. len` (every query's weight is 0 outside them).
    first: usize,
    len: usize,
    v: &'a [f32],
    kv: usize,
    /// Offset of this column slice in a cache row.
    v_off: usize,
    hd: usize,
    col: usize,
    out: &'a mut [f32],
}

/// [`TileMix`] over `W` vectors of 16 output values.
struct TileMixW<'a, const W: usize>(TileMix<'a>);

impl<const W: usize> Kernel16 for TileMixW<'_, W> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let m = self.0;
        assert!(m.p.len() >= (QB - 1) * m.stride + m.len);
        assert!(m.len == 0 || m.v.len() >= (m.len - 1) * m.kv + m.v_off + 16 * W);
        assert!(m.out.len() >= QB * m.hd && m.col + 16 * W <= m.hd);
        let mut acc = [[V::zero(); W]; QB];
        for t in m.first..m.len {
            // SAFETY: row t's 16 W values at v_off (asserted above).
            let vt: [V; W] = std::array::from_fn(|c| unsafe {
                V::load(m.v.as_ptr().add(t * m.kv + m.v_off + 16 * c))
            });
            for i in 0..QB {
                // SAFETY: t < len <= stride (asserted above).
                let w = V::splat(unsafe { *m.p.get_unchecked(i * m.stride + t) });
                for c in 0..W {
                    acc[i][c] = w.fma(vt[c], acc[i][c]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: inside out (asserted above).
                unsafe { v.store(m.out.as_mut_ptr().add(i * m.hd + m.col + 16 * c)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths (tiled prefill from 4 rows, runs of query heads below) against an f64 oracle, and the
    /// same bits for every thread count, on every level: head sizes giving output slices of
    /// every width (64: 4; 80: 4 + 1; 48: 3; 112: 4 + 3; 16: 1), GQA groups 1 to 3, query
    /// counts leaving a partial last unit, prompts after a cached prefix, sliding windows
    /// shorter and longer than the visible positions, a scale other than `1/sqrt(head_dim)`.
    #[test]
    fn spans_are_an_even_number_cut_on_sixteens_each_within_sixteen_of_an_equal_share() {
        for visible in (SPANS_MIN..5000).chain([8192, 32768, 131_072]) {
            let n = span_count(visible);
            assert!(
                n.is_multiple_of(2) && n >= visible.div_ceil(SPAN),
                "{visible}"
            );
            let lens: Vec<usize> = (0..n)
                .map(|c| span_start(visible, c + 1) - span_start(visible, c))
                .collect();
            assert_eq!(span_start(visible, 0), 0);
            assert!((1..n).all(|c| span_start(visible, c).is_multiple_of(16)));
            let share = visible as f64 / n as f64;
            assert!(
                lens.iter().all(|&l| (l as f64 - share).abs() < 16.0),
                "{visible}: {lens:?}"
            );
            assert_eq!(lens.iter().sum::<usize>(), visible);
        }
    }

    #[test]
    fn attention_matches_f64_and_is_bitwise_identical_for_any_thread_count() {
        for (m, pos, n_kv_heads, group, hd, window) in [
            (4, 0, 1, 1, 64, None),
            (7, 5, 2, 3, 64, None),
            (33, 70, 1, 3, 80, None),
            (18, 0, 3, 2, 16, None),
            (9, 3, 2, 2, 48, None),
            (5, 17, 1, 2, 112, None),
            (33, 70, 1, 3, 80, Some(20)),
            (40, 300, 1, 2, 64, Some(50)),
            (20, 130, 2, 1, 32, Some(64)),
            (9, 3, 2, 2, 256, Some(5)),
            (6, 0, 1, 4, 64, Some(1)),
            (7, 5, 2, 3, 64, Some(500)),
            (1, 40, 1, 2, 64, Some(8)),
            (2, 9, 2, 1, 48, Some(3)),
            (3, 30, 1, 1, 256, None),
            // Decode over longer caches: several steps of 16 and of MIX_STEP positions with
            // partial last ones, runs of query heads cut between tasks, a head of 80.
            (1, 100, 3, 3, 64, None),
            (1, 70, 2, 4, 80, None),
            (2, 47, 3, 2, 128, None),
            (1, 15, 1, 5, 256, None),
            (1, 200, 2, 3, 64, Some(90)),
            (1, 0, 1, 1, 64, None),
            // A slice of two chunks (96 = 64 + 32), and a window of no positions.
            (1, 50, 1, 3, 96, None),
            (2, 9, 1, 2, 64, Some(0)),
            // Heads of no whole number of 16-value chunks: one position, one chain at a
            // time (in registers up to 16 whole chunks, through memory from 17), in decode
            // and in prompts dealt round-robin.
            (5, 10, 1, 3, 40, None),
            (1, 33, 2, 2, 72, None),
            (1, 20, 1, 2, 264, Some(7)),
            (6, 12, 2, 2, 280, None),
            // Decode over SPANS_MIN or more positions: an even number of spans, a last one
            // shorter and of no whole sixteen, rows of one call, a window, heads of 80; a
            // first row one short of the spans path, and a head of no whole chunks, stay
            // on the runs.
            (1, 255, 3, 3, 64, None),
            (1, 511, 3, 3, 64, None),
            (2, 511, 1, 2, 64, None),
            (1, 3840, 1, 2, 64, None),
            (1, 700, 2, 2, 64, None),
            (3, 1000, 1, 4, 128, None),
            (1, 1500, 2, 3, 64, Some(600)),
            (2, 520, 1, 2, 80, None),
            (2, 510, 1, 2, 64, None),
            (2, 254, 1, 2, 64, None),
            // Whole steps of heads of 2, 3 and 7 chunks.
            (1, 70, 1, 3, 32, None),
            (1, 40, 2, 2, 48, None),
            (1, 100, 1, 2, 112, None),
            (1, 600, 1, 2, 72, None),
        ] {
            let n_heads = n_kv_heads * group;
            let (t_all, kv) = (pos + m, n_kv_heads * hd);
            let val = |i: usize, s: usize| ((i * s % 1013) as f32 / 506.5) - 1.0;
            let q: Vec<f32> = (0..m * n_heads * hd).map(|i| val(i, 7919)).collect();
            let k: Vec<f32> = (0..t_all * kv).map(|i| val(i, 104_729)).collect();
            let v: Vec<f32> = (0..t_all * kv).map(|i| val(i, 1_299_709)).collect();
            let p = AttentionShape {
                m,
                pos,
                n_heads,
                n_kv_heads,
                head_dim: hd,
                scale: 0.7 / (hd as f32).sqrt(),
                window,
            };
            let scale = p.scale as f64;
            let mut want = vec![0.0f64; q.len()];
            for i in 0..m {
                for h in 0..n_heads {
                    let off = (h / group) * hd;
                    let qh = &q[(i * n_heads + h) * hd..][..hd];
                    let len = pos + i + 1;
                    let lo = window.map_or(0, |w| len.saturating_sub(w));
                    let s: Vec<f64> = (lo..len)
                        .map(|t| {
                            let kt = &k[t * kv + off..][..hd];
                            qh.iter()
                                .zip(kt)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        want[(i * n_heads + h) * hd + d] = (lo..len)
                            .map(|t| e[t - lo] / z * v[t * kv + off + d] as f64)
                            .sum();
                    }
                }
            }
            for isa in Isa::available() {
                let mut first: Option<Vec<f32>> = None;
                for threads in [1, 2, 3] {
                    let team = Team::new(threads).unwrap();
                    let scratch = AttentionScratch::new(threads);
                    let mut out = vec![f32::NAN; q.len()];
                    attention(isa, &team, &scratch, &q, &k, &v, &mut out, &p);
                    for (e, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-6,
                            "{p:?} {:?} t{threads} out[{e}] = {g}, want {w}",
                            isa.level()
                        );
                    }
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert!(
                            f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{p:?} {:?}: thread counts differ",
                            isa.level()
                        ),
                    }
                }
            }
        }
    }
}
