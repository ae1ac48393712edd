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
        super::Level::Avx512 => 16,
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
