//! Probes of the machine's roofs, run by `chord bench` in the same process as the kernels
//! they judge: peak fused multiply-add throughput and streaming read bandwidth.

use super::stamp;
use super::vec::F32Vec;

/// Independent FMA chains: enough to cover the FMA latency (4-5 cycles) times the FMA
/// issue width (2 per cycle) on current x86 cores.
const CHAINS: usize = 16;

/// Floating-point operations one [`fma_probe`] call performs per iteration (2 per FMA lane).
pub fn fma_probe_flops_per_iter(isa: super::Isa) -> usize {
    let lanes = match isa.level() {
        super::Level::Amx | super::Level::Avx512 => 16,
        _ => 8,
    };
    CHAINS * lanes * 2
}

stamp! {
    /// Runs `iters` rounds of [`CHAINS`] independent vector FMAs and writes a value that
    /// depends on all of them to `out[0]` (so nothing is optimised away).
    pub fn fma_probe(iters: usize, out: &mut [f32]) = fma_body;
}

#[inline(always)]
fn fma_body<V: F32Vec>(iters: usize, out: &mut [f32]) {
    let mut acc = [V::splat(1.0); CHAINS];
    let a = V::splat(0.999_999);
    let b = V::splat(1e-7);
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = c.fma(a, b);
        }
    }
    let mut s = V::zero();
    for c in acc {
        s = s.add(c);
    }
    out[0] = s.reduce_add();
}

stamp! {
    /// Sums `x` front to back with 8 vector accumulators (a pure streaming read) into
    /// `out[0]`. One sequential stream per thread: on Zen 4, splitting a thread's part into
    /// four far-apart streams measured half the bandwidth.
    pub fn sum_probe(x: &[f32], out: &mut [f32]) = sum_body;
}

#[inline(always)]
fn sum_body<V: F32Vec>(x: &[f32], out: &mut [f32]) {
    let l = V::LANES;
    let mut acc = [V::zero(); 8];
    let mut chunks = x.chunks_exact(8 * l);
    for c in &mut chunks {
        for (u, a) in acc.iter_mut().enumerate() {
            // SAFETY: the chunk holds 8 * LANES values.
            *a = a.add(unsafe { V::load(c.as_ptr().add(u * l)) });
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a.reduce_add();
    }
    out[0] = s;
}

stamp! {
    /// Sums `x` as a matrix-vector kernel reads a weight: `rows` rows of `span` values side by
    /// side (one stream per row, read in lockstep), then the next `rows` rows, into `out[0]`.
    /// A tail shorter than `rows × span` is read as one stream.
    pub fn rows_probe(x: &[f32], rows: usize, span: usize, out: &mut [f32]) = rows_body;
}

#[inline(always)]
fn rows_body<V: F32Vec>(x: &[f32], rows: usize, span: usize, out: &mut [f32]) {
    let l = V::LANES;
    assert!(
        rows >= 1 && span.is_multiple_of(2 * l),
        "rows_probe: {rows} rows of {span}"
    );
    let mut acc = [V::zero(); 2];
    let group = rows * span;
    let mut groups = x.chunks_exact(group);
    for g in &mut groups {
        for p in (0..span).step_by(2 * l) {
            for r in 0..rows {
                // SAFETY: `r * span + p + 2 l <= rows * span = g.len()`.
                unsafe {
                    let at = g.as_ptr().add(r * span + p);
                    acc[0] = acc[0].add(V::load(at));
                    acc[1] = acc[1].add(V::load(at.add(l)));
                }
            }
        }
    }
    let mut s = [0.0f32];
    sum_body::<V>(groups.remainder(), &mut s);
    out[0] = s[0] + acc[0].add(acc[1]).reduce_add();
}

/// How far ahead [`prefetch_probe`] asks for lines: 2 KiB, 32 lines.
pub const PREFETCH_AHEAD: usize = 2048;

stamp! {
    /// [`sum_probe`] with a software prefetch of the line [`PREFETCH_AHEAD`] bytes ahead of
    /// each 64-byte line it reads, into `out[0]`. Off x86-64 there is no prefetch: it reads
    /// as [`sum_probe`] does.
    pub fn prefetch_probe(x: &[f32], out: &mut [f32]) = prefetch_body;
}

#[inline(always)]
fn prefetch_body<V: F32Vec>(x: &[f32], out: &mut [f32]) {
    let l = V::LANES;
    let mut acc = [V::zero(); 8];
    let mut chunks = x.chunks_exact(8 * l);
    let end = x.as_ptr_range().end as usize;
    for c in &mut chunks {
        let base = c.as_ptr();
        // One prefetch per 64-byte line of the chunk (8 vectors of LANES f32 values).
        for line in (0..8 * l * 4).step_by(64) {
            let ahead = base as usize + line + PREFETCH_AHEAD;
            if ahead < end {
                prefetch(ahead as *const u8);
            }
        }
        for (u, a) in acc.iter_mut().enumerate() {
            // SAFETY: the chunk holds 8 * LANES values.
            *a = a.add(unsafe { V::load(base.add(u * l)) });
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a.reduce_add();
    }
    out[0] = s;
}

/// A hint to fetch the line at `p` into all cache levels; nothing where the target has no
/// such instruction.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally: any address is allowed, and
    // SSE (the instruction's requirement) is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Isa;

    /// Every read probe sums what it reads: the same total as a plain sum, on every level,
    /// tails included.
    #[test]
    fn read_probes_read_every_value() {
        let x: Vec<f32> = (0..100_003).map(|i| (i % 7) as f32).collect();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        for isa in Isa::available() {
            let mut out = [0.0f32];
            sum_probe(isa, &x, &mut out);
            assert_eq!(out[0] as f64, want, "sum {:?}", isa.level());
            prefetch_probe(isa, &x, &mut out);
            assert_eq!(out[0] as f64, want, "prefetch {:?}", isa.level());
            for (rows, span) in [(1, 32), (8, 2048), (3, 64)] {
                rows_probe(isa, &x, rows, span, &mut out);
                assert_eq!(out[0] as f64, want, "rows {rows}x{span} {:?}", isa.level());
            }
        }
    }
}
