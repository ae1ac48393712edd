//! Causal grouped-query attention over a KV cache, in vectors, split over a team.
//!
//! Shapes: `q (m, n_heads * head_dim)`, row `i` the query at position `pos + i`; the caches
//! `(≥ pos + m, n_kv_heads * head_dim)`, rows by position; query head `h` reads kv head
//! `h / (n_heads / n_kv_heads)`; `out (m, n_heads * head_dim)`. Each (query row, head) pair:
//! scores `q · k_t` for the `pos + i + 1` visible positions (16-lane dots), the softmax of
//! the scores times `1 / sqrt(head_dim)` ([`super::softmax`]), then `Σ_t p_t v_t`
//! accumulated in position order. The pairs are dealt round-robin to the team's tasks
//! (prefill rows grow longer down the prompt), each task keeping its own score buffer; a
//! pair's arithmetic does not depend on which task runs it, so results are bitwise
//! identical for any thread count.

use std::sync::Mutex;

use super::v16::{Kernel16, V16, dispatch16};
use super::{Isa, softmax};
use crate::SoftmaxParams;
use crate::team::Team;

/// The shape of an attention call (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query rows.
    pub m: usize,
    /// Position of the first query row.
    pub pos: usize,
    pub n_heads: usize,
    /// Divides `n_heads`.
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Per-task score buffers, owned by the caller (a backend holds one for its team).
#[derive(Debug)]
pub struct AttentionScratch {
    slots: Vec<Mutex<Vec<f32>>>,
}

impl AttentionScratch {
    /// Buffers for up to `tasks` concurrent tasks.
    pub fn new(tasks: usize) -> AttentionScratch {
        AttentionScratch {
            slots: (0..tasks.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }
}

/// The output shared by tasks that write disjoint heads.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each (row, head) pair's `head_dim` outputs are written by the one task that owns it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

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
    let pairs = p.m * p.n_heads;
    let tasks = team.threads().min(scratch.slots.len()).min(pairs).max(1);
    let o = Out(out.as_mut_ptr());
    team.run(tasks, &|t| {
        let mut scores = scratch.slots[t].lock().unwrap_or_else(|e| e.into_inner());
        let need = p.pos + p.m;
        if scores.len() < need {
            scores.resize(need, 0.0);
        }
        for pair in (t..pairs).step_by(tasks) {
            let (i, h) = (pair / p.n_heads, pair % p.n_heads);
            let t_len = p.pos + i + 1;
            let s = &mut scores[..t_len];
            let kv = p.n_kv_heads * p.head_dim;
            let kv_off = (h / (p.n_heads / p.n_kv_heads)) * p.head_dim;
            let qh = &q[(i * p.n_heads + h) * p.head_dim..][..p.head_dim];
            dispatch16(
                isa,
                Scores {
                    qh,
                    k: k_cache,
                    kv,
                    kv_off,
                    s,
                },
            );
            let scale = 1.0 / (p.head_dim as f32).sqrt();
            softmax(
                isa,
                s,
                t_len,
                &SoftmaxParams {
                    scale,
                    causal: None,
                },
            );
            // SAFETY: pair (i, h)'s outputs, written by this task only.
            let oh = unsafe {
                std::slice::from_raw_parts_mut(
                    o.get().add((i * p.n_heads + h) * p.head_dim),
                    p.head_dim,
                )
            };
            dispatch16(
                isa,
                Mix {
                    p: s,
                    v: v_cache,
                    kv,
                    kv_off,
                    out: oh,
                },
            );
        }
    });
}

/// `s[t] = q · k_t` for every cached position `t < s.len()`.
struct Scores<'a> {
    qh: &'a [f32],
    k: &'a [f32],
    kv: usize,
    kv_off: usize,
    s: &'a mut [f32],
}

impl Kernel16 for Scores<'_> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let hd = self.qh.len();
        let full = hd / 16 * 16;
        for (t, st) in self.s.iter_mut().enumerate() {
            let kt = &self.k[t * self.kv + self.kv_off..][..hd];
            let mut acc = V::zero();
            for c in (0..full).step_by(16) {
                // SAFETY: c + 16 <= hd values of each.
                let (a, b) = unsafe {
                    (
                        V::load(self.qh.as_ptr().add(c)),
                        V::load(kt.as_ptr().add(c)),
                    )
                };
                acc = a.fma(b, acc);
            }
            let mut sum = acc.reduce_add();
            for c in full..hd {
                sum += self.qh[c] * kt[c];
            }
            *st = sum;
        }
    }
}

/// `out = Σ_t p[t] v_t`, in position order.
struct Mix<'a> {
    p: &'a [f32],
    v: &'a [f32],
    kv: usize,
    kv_off: usize,
    out: &'a mut [f32],
}

impl Kernel16 for Mix<'_> {
    type Output = ();

    #[inline(always)]
    fn run<V: V16>(self) {
        let hd = self.out.len();
        let full = hd / 16 * 16;
        // Up to 256 values per head in registers (Gemma 3: 256).
        let mut acc = [V::zero(); 16];
        let chunks = full / 16;
        if chunks > acc.len() {
            return mix_wide(self);
        }
        self.out[full..].fill(0.0);
        for (t, &w) in self.p.iter().enumerate() {
            let vt = &self.v[t * self.kv + self.kv_off..][..hd];
            let wv = V::splat(w);
            for (c, a) in acc.iter_mut().enumerate().take(chunks) {
                // SAFETY: 16 values at 16c < full <= hd.
                *a = wv.fma(unsafe { V::load(vt.as_ptr().add(16 * c)) }, *a);
            }
            for c in full..hd {
                self.out[c] += w * vt[c];
            }
        }
        for (c, a) in acc.iter().enumerate().take(chunks) {
            // SAFETY: 16 values at 16c.
            unsafe { a.store(self.out.as_mut_ptr().add(16 * c)) };
        }
    }
}

/// [`Mix`] for heads wider than 256 values: through memory.
fn mix_wide(m: Mix<'_>) {
    m.out.fill(0.0);
    for (t, &w) in m.p.iter().enumerate() {
        let vt = &m.v[t * m.kv + m.kv_off..][..m.out.len()];
        for (o, &v) in m.out.iter_mut().zip(vt) {
            *o += w * v;
        }
    }
}
