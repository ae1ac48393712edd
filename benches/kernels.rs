//! Criterion benchmarks over the cases of [`chord::harness`]: every op at the shapes of
//! SmolLM2-135M and TinyLlama-1.1B (plus square F32 matmuls), matmul on F32 and Q4_1
//! weights (exact and fast mode on the SIMD backend), on every backend variant, on 1 thread
//! and on every core, with the `matrixmultiply` crate as a baseline row of the F32 matmul
//! groups. The cases are the ones `chord bench kernels` times and the conformance suite checks
//! (at random shapes).
//!
//! `cargo bench --bench kernels -- matmul/` runs one op's groups. Decode matmuls (`m = 1`)
//! cycle through 1 GiB of weight copies so that they read from memory, not from cache. The
//! scalar backend runs only cases under 2 GFLOP (a larger one takes seconds per call). For the
//! same measurements set against the machine's roofs, run `chord bench kernels`.

use std::hint::black_box;
use std::time::Duration;

use chord::backend::{Backend, DType, Mode, Op, Support, Variant};
use chord::bench::kernels::Unit;
use chord::harness::{Case, OpCase, ShapeSet, Visit, model_cases};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};

const SCALAR_MAX_FLOP: f64 = 2e9;

fn thread_counts(variant: Variant) -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if variant == Variant::Scalar || all == 1 {
        vec![1]
    } else {
        vec![1, all]
    }
}

/// Benchmarks one case on one backend as `id` in the group.
struct Bench<'a, 'g, B> {
    group: &'a mut BenchmarkGroup<'g, WallTime>,
    id: &'a str,
    backend: &'a B,
}

impl<B: Backend> Visit for Bench<'_, '_, B> {
    type Out = Result<(), chord::Error>;
    fn visit<C: OpCase>(self, case: &C) -> Self::Out {
        let inputs = case.inputs();
        let mut state = case.setup(self.backend, &inputs)?;
        // The weights as a loaded model's end up (on huge pages, for the SIMD backend).
        self.backend.prepared();
        self.backend.settle();
        case.run(self.backend, &inputs, &mut state)?;
        self.group.bench_function(self.id, |b| {
            b.iter(|| {
                case.run(self.backend, black_box(&inputs), &mut state)
                    .expect("the same call succeeded once")
            })
        });
        Ok(())
    }
}

fn bench_cases(c: &mut Criterion) {
    let mut notes = Vec::new();
    let cases = model_cases(
        &Op::ALL,
        &ShapeSet::ALL,
        &[DType::F32, DType::Q4_1],
        &mut notes,
    );
    for (label, case) in &cases {
        let (op, dtype) = (case.op(), case.dtype());
        let name = format!("{op}/{label} {dtype} {}", case.shape()).replace(' ', "_");
        let mut g = c.benchmark_group(name);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        let (work, unit) = case.work();
        g.throughput(match unit {
            Unit::Gbs => Throughput::Bytes(work as u64),
            Unit::Gflops | Unit::Gops => Throughput::Elements(work as u64),
        });
        for variant in Variant::available() {
            if variant == Variant::Scalar && unit != Unit::Gbs && work > SCALAR_MAX_FLOP {
                continue;
            }
            let modes = match variant {
                Variant::Simd(_) if dtype != DType::F32 => vec![Mode::Exact, Mode::Fast],
                _ => vec![Mode::Exact],
            };
            for t in thread_counts(variant) {
                for &mode in &modes {
                    let id = match modes.len() {
                        1 => format!("{variant}/t{t}"),
                        _ => format!("{variant}-{}/t{t}", mode.name()),
                    };
                    let mut run = || -> Result<(), chord::Error> {
                        chord::with_variant!(variant, t, mode, b => {
                            // A weight the backend dequantizes when prepared runs as F32 does.
                            if b.supports(op, dtype) == Support::Native {
                                case.visit(Bench { group: &mut g, id: &id, backend: &b })?;
                            }
                        });
                        Ok(())
                    };
                    run().unwrap();
                }
            }
        }
        // Baseline: matrixmultiply::sgemm on one thread, W read through strides as k × n.
        if let Case::Matmul(mm) = case
            && dtype == DType::F32
        {
            let mut run = chord::bench::kernels::matrixmultiply_runner(mm);
            g.bench_function("matrixmultiply/t1", |b| b.iter(&mut run));
        }
        g.finish();
    }
}

criterion_group!(benches, bench_cases);
criterion_main!(benches);
