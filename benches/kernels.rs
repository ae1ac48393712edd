//! Criterion benchmarks: every op × backend variant × shape of SmolLM2-135M and
//! TinyLlama-1.1B (plus square matmuls), on 1 thread and on every core, with the
//! `matrixmultiply` crate as a baseline row of the matmul group.
//!
//! `cargo bench --bench kernels -- matmul/` runs one group. Decode matmuls (`m = 1`) cycle
//! through 1 GiB of weight copies so that they read from memory, not from cache. The scalar
//! backend runs only cases under 2 GFLOP (a larger one takes seconds per call).
//! For the same measurements set against the machine's roofs, run `chord bench kernels`.

use std::hint::black_box;
use std::time::Duration;

use chord::backend::{Backend, RopeLayout, RopeParams, SoftmaxParams, Variant, WeightView};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};

/// `(label, dim, ffn, heads, head_dim, vocab)`.
const MODELS: [(&str, usize, usize, usize, usize, usize); 2] = [
    ("smollm", 576, 1536, 9, 64, 49152),
    ("tinyllama", 2048, 5632, 32, 64, 32000),
];
const COLD_BYTES: usize = 1 << 30;
const SCALAR_MAX_FLOP: usize = 2_000_000_000;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2_654_435_761 + seed * 40_503) % 65_521) as f32 / 32_760.5 - 1.0)
        .collect()
}

/// `(label, m, n, k)` of every matmul case.
fn matmul_shapes() -> Vec<(String, usize, usize, usize)> {
    let mut out = Vec::new();
    for (name, dim, ffn, _, _, vocab) in MODELS {
        for m in [1, 512] {
            out.push((format!("{name}_ffn_up_m{m}"), m, ffn, dim));
            out.push((format!("{name}_ffn_down_m{m}"), m, dim, ffn));
        }
        out.push((format!("{name}_output_m1"), 1, vocab, dim));
    }
    for s in [1024, 2048] {
        out.push((format!("square_{s}"), s, s, s));
    }
    out
}

fn thread_counts() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all > 1 { vec![1, all] } else { vec![1] }
}

/// Calls `f` with each backend variant this CPU runs, at each thread count.
fn for_each_backend(mut f: impl FnMut(&str, &dyn Fn(&mut dyn FnMut(&dyn BenchBackend)))) {
    for variant in Variant::available() {
        let threads = if variant == Variant::Scalar {
            vec![1]
        } else {
            thread_counts()
        };
        for t in threads {
            let id = format!("{variant}/t{t}");
            f(&id, &|run: &mut dyn FnMut(&dyn BenchBackend)| {
                let mut built = || -> Result<(), chord::Error> {
                    chord::with_variant!(variant, t, chord::backend::Mode::Exact, b => run(&b));
                    Ok(())
                };
                built().unwrap()
            });
        }
    }
}

/// The object-safe face of a backend that the benchmark loops need: one method per kind of
/// case, generic over the backend behind it.
trait BenchBackend {
    fn matmul_case(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        m: usize,
        n: usize,
        k: usize,
    );
    fn per_row(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        op: &str,
        id: &str,
        model: (usize, usize, usize, usize),
        rows: usize,
    );
}

impl<B: Backend> BenchBackend for B {
    fn matmul_case(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        m: usize,
        n: usize,
        k: usize,
    ) {
        let copies = if m == 1 {
            COLD_BYTES.div_ceil(n * k * 4)
        } else {
            1
        };
        let raw: Vec<Vec<f32>> = (0..copies).map(|c| values(n * k, c)).collect();
        let ws: Vec<_> = raw
            .iter()
            .map(|w| self.prepare(WeightView::f32(w, n, k).unwrap()).unwrap())
            .collect();
        let x = values(m * k, 99);
        let mut y = vec![0.0; m * n];
        let mut i = 0;
        g.bench_function(id, |b| {
            b.iter(|| {
                self.matmul(black_box(&x), &ws[i % copies], &mut y, m)
                    .unwrap();
                i += 1;
            })
        });
    }

    fn per_row(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        op: &str,
        id: &str,
        model: (usize, usize, usize, usize),
        rows: usize,
    ) {
        let (dim, ffn, heads, head_dim) = model;
        match op {
            "rmsnorm" => {
                let (x, w, mut y) = (values(rows * dim, 1), values(dim, 2), vec![0.0; rows * dim]);
                g.bench_function(id, |b| {
                    b.iter(|| self.rmsnorm(black_box(&x), &w, &mut y, 1e-5).unwrap())
                });
            }
            "rope" => {
                let mut x = values(rows * heads * head_dim, 3);
                let p = RopeParams {
                    head_dim,
                    theta: 10_000.0,
                    layout: RopeLayout::Interleaved,
                };
                g.bench_function(id, |b| {
                    b.iter(|| self.rope(black_box(&mut x), rows, 100, &p).unwrap())
                });
            }
            "softmax" => {
                // Decode attention: `rows` heads over a context of `dim`.
                let mut x = values(rows * dim, 4);
                let p = SoftmaxParams {
                    scale: 0.125,
                    causal: None,
                };
                g.bench_function(id, |b| {
                    b.iter(|| self.softmax(black_box(&mut x), dim, &p).unwrap())
                });
            }
            "swiglu" | "geglu" => {
                let (a, u, mut y) = (
                    values(rows * ffn, 5),
                    values(rows * ffn, 6),
                    vec![0.0; rows * ffn],
                );
                g.bench_function(id, |b| {
                    b.iter(|| match op {
                        "swiglu" => self.swiglu(black_box(&a), &u, &mut y).unwrap(),
                        _ => self.geglu(black_box(&a), &u, &mut y).unwrap(),
                    })
                });
            }
            "add" => {
                let (x, mut y) = (values(rows * dim, 7), values(rows * dim, 8));
                g.bench_function(id, |b| b.iter(|| self.add(black_box(&mut y), &x).unwrap()));
            }
            _ => unreachable!("unknown op {op}"),
        }
    }
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
}

fn bench_matmul(c: &mut Criterion) {
    for (label, m, n, k) in matmul_shapes() {
        let mut g = c.benchmark_group(format!("matmul/{label}"));
        configure(&mut g);
        g.throughput(if m == 1 {
            Throughput::Bytes((n * k * 4) as u64)
        } else {
            Throughput::Elements((2 * m * n * k) as u64)
        });
        for_each_backend(|id, with| {
            if id.starts_with("scalar") && 2 * m * n * k > SCALAR_MAX_FLOP {
                return;
            }
            with(&mut |b| b.matmul_case(&mut g, id, m, n, k));
        });
        // Baseline: matrixmultiply::sgemm on one thread, W read through strides as k × n.
        let copies = if m == 1 {
            COLD_BYTES.div_ceil(n * k * 4)
        } else {
            1
        };
        let ws: Vec<Vec<f32>> = (0..copies).map(|c| values(n * k, c)).collect();
        let x = values(m * k, 99);
        let mut y = vec![0.0f32; m * n];
        let mut i = 0;
        g.bench_function("matrixmultiply/t1", |b| {
            b.iter(|| {
                chord::bench::kernels::matrixmultiply_matmul(
                    black_box(&x),
                    &ws[i % copies],
                    &mut y,
                    m,
                    n,
                    k,
                );
                i += 1;
            })
        });
        g.finish();
    }
}

fn bench_per_row(c: &mut Criterion) {
    for op in ["rmsnorm", "rope", "softmax", "swiglu", "geglu", "add"] {
        for (name, dim, ffn, heads, head_dim, _) in MODELS {
            let row_counts = if op == "softmax" {
                [1, heads]
            } else {
                [1, 512]
            };
            for rows in row_counts {
                let mut g = c.benchmark_group(format!("{op}/{name}_rows{rows}"));
                configure(&mut g);
                let len = match op {
                    "swiglu" | "geglu" => 3 * rows * ffn,
                    "rope" => 2 * rows * heads * head_dim,
                    "add" => 3 * rows * dim,
                    _ => 2 * rows * dim,
                };
                g.throughput(Throughput::Bytes((len * 4) as u64));
                for_each_backend(|id, with| {
                    with(&mut |b| b.per_row(&mut g, op, id, (dim, ffn, heads, head_dim), rows))
                });
                g.finish();
            }
        }
    }
}

criterion_group!(benches, bench_matmul, bench_per_row);
criterion_main!(benches);
