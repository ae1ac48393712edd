//! The measurements behind `chord bench`: the machine's roofs, a timer that reports
//! medians, the kernel table ([`kernels`]) and whole-model throughput ([`model`]).
//!
//! Every figure is measured in the same process and run as the figures it is compared with:
//! on a shared, noisy machine only ratios measured together mean anything.

pub mod kernels;
pub mod model;
pub mod profile;
#[cfg(feature = "svg")]
pub mod svg;

use std::time::{Duration, Instant};

use chord_kernels::simd::{self, Isa, Level, probe};
use rayon::prelude::*;
use serde::Serialize;

/// The processor's name (`model name` in /proc/cpuinfo), for titles; "unknown CPU" where
/// the system does not say.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The input of the whole-model measurements ([`model::run`], [`profile::run`]): fixed token
/// ids, spread over the vocabulary, and a state whose first `depth` positions are filled.
pub(crate) struct Workload {
    /// `max(pp, tg)` ids for the tests (the depth's ids were fed already).
    pub tokens: Vec<u32>,
    /// Room for `depth + max(pp, tg)` positions; `pos == depth`. A test starts by setting
    /// `pos` back to the depth: the positions after it are written again.
    pub state: crate::model::State,
}

impl Workload {
    /// Waits for the backend to settle its weights ([`Backend::settle`](crate::Backend::settle):
    /// a benchmark times them as they will stay), then fills `depth` positions of a new
    /// state with one untimed prompt (in batches of up to 512, as a prompt of `pp` runs).
    ///
    /// # Errors
    /// As [`check_depth`] with the model's context, or the model's error in the prompt.
    pub fn new<B: crate::Backend>(
        model: &crate::model::Model<'_, B>,
        pp: usize,
        tg: usize,
        depth: usize,
    ) -> Result<Workload, crate::model::ModelError> {
        check_depth(model.config.ctx_len, pp, tg, depth)?;
        model.backend().settle();
        let vocab = model.config.vocab as u64;
        let n = pp.max(tg);
        let mut tokens: Vec<u32> = (0..(depth + n) as u64)
            .map(|i| ((i * 7919 + 13) % vocab) as u32)
            .collect();
        let batch = pp.max(depth).clamp(1, 512);
        let mut state = crate::model::State::new(&model.config, (depth + n).max(1), batch);
        if depth > 0 {
            model.forward(&mut state, &tokens[..depth])?;
        }
        tokens.drain(..depth);
        Ok(Workload { tokens, state })
    }
}

/// Whether a context of `ctx` tokens holds tests of `pp` and `tg` tokens after `depth`
/// cached positions.
///
/// # Errors
/// [`ModelError::Input`](crate::model::ModelError::Input) naming the figures if `depth +
/// max(pp, tg)` exceeds `ctx`.
pub fn check_depth(
    ctx: usize,
    pp: usize,
    tg: usize,
    depth: usize,
) -> Result<(), crate::model::ModelError> {
    let n = pp.max(tg);
    if depth.checked_add(n).is_none_or(|total| total > ctx) {
        let test = match depth {
            0 => format!("a test of {n} tokens exceeds"),
            _ => format!("a test of {n} tokens after a depth of {depth} exceeds"),
        };
        return Err(crate::model::ModelError::Input(format!(
            "{test} the {ctx}-token context"
        )));
    }
    Ok(())
}

/// A test's name at `depth`, as llama-bench prints it: `tg128`, `tg128 @ d2048`.
pub fn test_name(test: &str, depth: usize) -> String {
    if depth == 0 {
        test.to_string()
    } else {
        format!("{test} @ d{depth}")
    }
}

/// The roofs at one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct Roof {
    /// Threads the probes ran on, one probe per thread.
    pub threads: usize,
    /// Peak f32 FMA throughput, GFLOP/s (2 FLOP per lane per FMA).
    pub fma_gflops: f64,
    /// The SIMD level of the FMA probe.
    pub fma_level: &'static str,
    /// Streaming read bandwidth (a sum over a buffer far larger than the caches), GB/s: the
    /// best of the [`READ_PROBES`].
    pub read_gbs: f64,
    /// The read probe that set `read_gbs` (one of [`READ_PROBES`]).
    pub read_probe: &'static str,
    /// Peak 8-bit dot product throughput of fast mode's kernel, GOP/s (2 per multiply-add).
    pub int8_gops: f64,
    /// The integer kernel of the 8-bit probe (`avx512-vnni`, `avx2-maddubs`, `portable`).
    pub int8_kernel: &'static str,
}

/// The read probes: each of two 1 GiB buffers read in each of three patterns, each thread
/// reading one contiguous part.
/// - Buffers: `heap` (4 KiB pages unless the OS backs every mapping with huge pages) and
///   `huge-pages`, from a [`chord_kernels::arena::Arena`], on huge pages where the OS gives
///   them, as the backends' prepared weights are (on 4 KiB pages like them under
///   `CHORD_HUGE_PAGES=0`: see [`chord_kernels::arena::huge_pages`]).
/// - Patterns: one sequential stream (`1-stream`); eight rows of 2048 values read side by
///   side, as a matrix-vector kernel reads a weight (`rows-8x2048`); one stream with a
///   software prefetch 2 KiB ahead (`prefetch`).
///
/// A single stream under-reads on some CPUs: on an Intel Xeon, f32 decode rows read 103-107%
/// of a one-stream roof. The roof is the best of all six.
pub const READ_PROBES: [&str; 6] = [
    "heap 1-stream",
    "heap rows-8x2048",
    "heap prefetch",
    "huge-pages 1-stream",
    "huge-pages rows-8x2048",
    "huge-pages prefetch",
];

/// The read patterns, in the order of [`READ_PROBES`] within a buffer.
#[derive(Clone, Copy)]
enum Pattern {
    OneStream,
    Rows,
    Prefetch,
}

/// `(buffer, pattern)` of each of the [`READ_PROBES`]: buffer 0 the heap, 1 huge pages.
const PROBE_PLAN: [(usize, Pattern); 6] = [
    (0, Pattern::OneStream),
    (0, Pattern::Rows),
    (0, Pattern::Prefetch),
    (1, Pattern::OneStream),
    (1, Pattern::Rows),
    (1, Pattern::Prefetch),
];

/// Measures the roofs at each thread count: the best of five FMA probe runs and the best of
/// six reads with each of the [`READ_PROBES`], split over the threads. A roof is a
/// ceiling, so the quietest moment of a shared machine and the best probe set it.
pub fn measure_roofs(thread_counts: &[usize]) -> Vec<Roof> {
    let isa = Isa::best();
    let heap = vec![1.0f32; (1 << 30) / 4];
    let arena = chord_kernels::arena::Arena::new();
    let mut huge = arena.alloc(1 << 30);
    bytemuck::cast_slice_mut::<u8, f32>(&mut huge).fill(1.0);
    let bufs: [&[f32]; 2] = [&heap, bytemuck::cast_slice(&huge)];
    thread_counts
        .iter()
        .map(|&threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("roof probe thread pool");
            let iters = 20_000_000;
            let flops = (probe::fma_probe_flops_per_iter(isa) * iters * threads) as f64;
            let fma_gflops = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    pool.install(|| {
                        (0..threads).into_par_iter().for_each(|_| {
                            let mut out = [0.0f32];
                            probe::fma_probe(isa, iters, &mut out);
                            std::hint::black_box(out);
                        })
                    });
                    flops / t.elapsed().as_secs_f64() / 1e9
                })
                .fold(0.0, f64::max);
            let int8_iters = 20_000_000;
            let int8_ops = (simd::int8_probe_ops_per_iter(isa) * int8_iters * threads) as f64;
            let int8_gops = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    pool.install(|| {
                        (0..threads).into_par_iter().for_each(|_| {
                            std::hint::black_box(simd::int8_probe(isa, int8_iters));
                        })
                    });
                    int8_ops / t.elapsed().as_secs_f64() / 1e9
                })
                .fold(0.0, f64::max);
            let read = |buf: &[f32], pattern: Pattern| {
                let chunk = buf.len().div_ceil(threads);
                let t = Instant::now();
                let read = |c: &[f32]| {
                    let mut out = [0.0f32];
                    match pattern {
                        Pattern::OneStream => probe::sum_probe(isa, c, &mut out),
                        Pattern::Rows => probe::rows_probe(isa, c, 8, 2048, &mut out),
                        Pattern::Prefetch => probe::prefetch_probe(isa, c, &mut out),
                    }
                    std::hint::black_box(out);
                };
                if threads == 1 {
                    read(buf);
                } else {
                    pool.install(|| buf.par_chunks(chunk).for_each(read));
                }
                (buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            // The probes take turns, so that a noisy moment does not favour one.
            let mut best = [0.0f64; READ_PROBES.len()];
            for _ in 0..6 {
                for (b, &(buf, pattern)) in best.iter_mut().zip(&PROBE_PLAN) {
                    *b = b.max(read(bufs[buf], pattern));
                }
            }
            let p = (0..best.len())
                .max_by(|&a, &b| best[a].total_cmp(&best[b]))
                .expect("probes");
            let (read_gbs, read_probe) = (best[p], READ_PROBES[p]);
            Roof {
                threads,
                fma_gflops,
                // The AMX level's f32 kernels are its AVX-512 ones (the tiles are int8).
                fma_level: match isa.level() {
                    Level::Amx => Level::Avx512.name(),
                    l => l.name(),
                },
                read_gbs,
                read_probe,
                int8_gops,
                int8_kernel: simd::int_kernel_name(isa),
            }
        })
        .collect()
}

/// The timing of one benchmark row.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    /// Median seconds per call.
    pub median_s: f64,
    /// Timed calls behind the median.
    pub samples: usize,
}

/// Times `f`: one warm-up call, then timed calls until `budget` has passed and at least
/// `min_samples` were taken. A call slower than the whole budget is timed once, and that
/// warm-up call is the sample (say so: `samples` is 1).
pub fn time(budget: Duration, min_samples: usize, mut f: impl FnMut()) -> Timing {
    let t = Instant::now();
    f();
    let first = t.elapsed();
    if first > budget {
        return Timing {
            median_s: first.as_secs_f64(),
            samples: 1,
        };
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < min_samples || (start.elapsed() < budget && samples.len() < 10_000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Timing {
        median_s: samples[samples.len() / 2],
        samples: samples.len(),
    }
}
