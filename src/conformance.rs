//! The conformance suite: checks any [`Backend`] against the scalar kernels run in f64.
//!
//! Call [`assert_conforms`] from a test (or [`check`] for a `Result`): for every op it draws
//! random cases of [`crate::harness`]'s types with proptest (shapes including 1, primes and sizes that are no multiple of
//! any tile or lane width; values from 1e-3 up to large magnitudes; positions, scales, masks
//! and `-inf` entries), runs the backend, and compares every output element with the f64
//! oracle under the op's tolerance from [`tolerance`]. Matmul runs on f32 weights and on
//! every quantized format ([`DType::ALL`]), its bound chosen by the arithmetic the backend
//! reports for the weight ([`Backend::arithmetic`]): f32 sums, or 8-bit activations. It
//! also checks that shape mismatches come back as errors, not panics. A failure names the
//! op, the backend, the (shrunk) case and the worst element.
//!
//! ```no_run
//! # use chord::{ScalarBackend, conformance};
//! conformance::assert_conforms(&ScalarBackend::new());
//! ```
//!
//! Runs are reproducible: the case generator is seeded deterministically (ChaCha), and the
//! values of a case come from the case's own seed.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestError, TestRng, TestRunner};

use crate::backend::{
    AttentionParams, Backend, DType, Op, RopeLayout, RopeParams, SoftmaxParams, WeightView,
};
use crate::harness::{
    self, AddCase, AttentionCase, EmbeddingCase, GateCase, MatmulCase, OpCase, RmsNormCase,
    RopeCase, SoftmaxCase,
};

/// How hard to test.
#[derive(Clone, Debug)]
pub struct Config {
    /// Random cases per op.
    pub cases: u32,
    /// Largest `m * n * k` of a matmul case (the f64 oracle's cost).
    pub max_matmul_work: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cases: 64,
            max_matmul_work: 6_000_000,
        }
    }
}

/// The first op a backend got wrong, with the smallest failing case proptest found.
#[derive(Debug)]
pub struct Failure {
    /// The backend's [`Backend::name`].
    pub backend: String,
    /// The op that failed.
    pub op: Op,
    /// The case: shapes, parameters and the seed of its values.
    pub case: String,
    /// What went wrong: the worst element against its tolerance, an error, or a panic.
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {}: {}\n  case: {}",
            self.op, self.backend, self.detail, self.case
        )
    }
}

impl std::error::Error for Failure {}

/// Runs every op's checks with the default [`Config`] and panics with the failure's message.
pub fn assert_conforms<B: Backend>(backend: &B) {
    if let Err(f) = check(backend, &Config::default()) {
        panic!("conformance failure: {f}");
    }
}

/// Runs every op's checks; the first failing op is returned.
pub fn check<B: Backend>(backend: &B, cfg: &Config) -> Result<(), Failure> {
    check_shape_errors(backend)?;
    for op in Op::ALL {
        check_op(backend, op, cfg)?;
    }
    Ok(())
}

/// Runs the random cases of one op.
pub fn check_op<B: Backend>(backend: &B, op: Op, cfg: &Config) -> Result<(), Failure> {
    let max = cfg.max_matmul_work;
    match op {
        Op::Matmul => {
            run(backend, op, cfg, matmul_cases(max))?;
            run(backend, op, cfg, qmatmul_cases(max))
        }
        Op::RmsNorm => run(backend, op, cfg, rmsnorm_cases()),
        Op::Rope => run(backend, op, cfg, rope_cases()),
        Op::Softmax => run(backend, op, cfg, softmax_cases()),
        Op::SwiGlu => run(backend, op, cfg, gate_cases(false)),
        Op::GeGlu => run(backend, op, cfg, gate_cases(true)),
        Op::Add => run(backend, op, cfg, add_cases()),
        Op::Embedding => run(backend, op, cfg, embedding_cases()),
        Op::Attention => run(backend, op, cfg, attention_cases()),
    }
}

/// The tolerances against the f64 oracle, per op (they live with the cases, in
/// [`crate::harness`]).
pub use crate::harness::tolerance;

// ---------------------------------------------------------------------------------------
// Case generation.

/// Sizes that catch tiling and lane bugs: 1, primes, powers of two and their neighbours,
/// and the blocking constants' neighbours; plus anything up to 600.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => select(vec![1usize, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 191, 192, 193, 577]),
        1 => 1usize..=600,
    ]
}

/// Draws `cfg.cases` cases from `strategy` and checks each ([`harness::verify`]); the first
/// failure, shrunk, is returned.
fn run<B, S>(backend: &B, op: Op, cfg: &Config, strategy: S) -> Result<(), Failure>
where
    B: Backend,
    S: Strategy,
    S::Value: OpCase,
{
    let config = RunnerConfig {
        cases: cfg.cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..RunnerConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let test = |case: S::Value| harness::verify(backend, &case).map_err(TestCaseError::fail);
    match runner.run(&strategy, test) {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, case)) => Err(Failure {
            backend: backend.name(),
            op,
            case: format!("{case:?}"),
            detail: reason.to_string(),
        }),
        Err(TestError::Abort(reason)) => Err(Failure {
            backend: backend.name(),
            op,
            case: String::new(),
            detail: format!("aborted: {reason}"),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Matmul.

fn matmul_cases(max_work: usize) -> impl Strategy<Value = MatmulCase> {
    let m = prop_oneof![
        2 => Just(1usize),
        3 => select(vec![2usize, 3, 5, 6, 7, 11, 12, 13, 17, 24, 25, 63, 120, 121, 130]),
        1 => 1usize..=200,
    ];
    let mag = select(vec![1e-3f32, 1.0, 1e3, 1e5]);
    (m, dim(), dim(), mag.clone(), mag, any::<u64>()).prop_map(
        move |(m, n, k, mag_x, mag_w, seed)| {
            let m = m.min((max_work / (n * k)).max(1));
            let dtype = DType::F32;
            MatmulCase {
                dtype,
                m,
                n,
                k,
                mag_x,
                mag_w,
                seed,
                copies: 1,
            }
        },
    )
}

// ---------------------------------------------------------------------------------------
// Matmul on quantized weights.

fn qmatmul_cases(max_work: usize) -> impl Strategy<Value = MatmulCase> {
    let m = prop_oneof![
        2 => Just(1usize),
        3 => select(vec![2usize, 3, 4, 5, 7, 13, 17, 63, 120]),
        1 => 1usize..=130,
    ];
    let mag = select(vec![1e-3f32, 1.0, 1e3]);
    let dtype = select(
        DType::ALL
            .into_iter()
            .filter(|&d| d != DType::F32)
            .collect::<Vec<_>>(),
    );
    (dtype, m, dim(), 1usize..=24, mag, any::<u64>()).prop_map(
        move |(dtype, m, n, blocks, mag_x, seed)| {
            // Rows of whole blocks: 32 values (256 for the K-quants; any count for the
            // float formats, drawn as 32 × blocks plus an odd tail).
            let k = match dtype.block_len() {
                1 => 32 * blocks + (seed % 3) as usize,
                32 => 32 * blocks,
                len => len * blocks.div_ceil(6),
            };
            let m = m.min((max_work / (n * k)).max(1));
            MatmulCase {
                dtype,
                m,
                n,
                k,
                mag_x,
                mag_w: 1.0,
                seed,
                copies: 1,
            }
        },
    )
}

// ---------------------------------------------------------------------------------------
// RMSNorm.

fn rmsnorm_cases() -> impl Strategy<Value = RmsNormCase> {
    (
        1usize..=5,
        dim(),
        select(vec![1e-5f32, 1e-6, 0.0]),
        select(vec![1e-3f32, 1.0, 1e3, 1e5, 1e15]),
        any::<u64>(),
    )
        .prop_map(|(rows, dim, eps, mag, seed)| RmsNormCase {
            rows,
            dim,
            eps,
            mag,
            seed,
        })
}

// ---------------------------------------------------------------------------------------
// RoPE.

fn rope_cases() -> impl Strategy<Value = RopeCase> {
    let head_dim = prop_oneof![
        3 => select(vec![2usize, 4, 6, 8, 14, 16, 18, 30, 32, 34, 62, 64, 66, 80, 96, 128, 130, 256]),
        1 => (1usize..=160).prop_map(|h| 2 * h),
    ];
    let pos = prop_oneof![
        select(vec![0usize, 1, 7, 100, 511, 4095, 65535]),
        0usize..=200_000
    ];
    let theta = select(vec![10_000.0f32, 100_000.0, 500_000.0, 1_000_000.0]);
    let layout = select(vec![RopeLayout::Interleaved, RopeLayout::Neox]);
    let mag = select(vec![1e-3f32, 1.0, 1e3, 1e5]);
    (
        1usize..=4,
        1usize..=9,
        head_dim,
        pos,
        theta,
        layout,
        mag,
        any::<u64>(),
    )
        .prop_map(
            |(rows, heads, head_dim, pos, theta, layout, mag, seed)| RopeCase {
                rows,
                heads,
                head_dim,
                pos,
                theta,
                layout,
                mag,
                seed,
            },
        )
}

// ---------------------------------------------------------------------------------------
// Softmax.

fn softmax_cases() -> impl Strategy<Value = SoftmaxCase> {
    let scale = select(vec![1.0f32, 0.125, 0.088_388_35, 2.0]);
    let mag = select(vec![1e-3f32, 1.0, 10.0, 1e3, 1e5]);
    // 0: no -inf; 1: every entry -inf; k: every k-th entry.
    let neg_inf = select(vec![0usize, 0, 0, 1, 2, 7]);
    (
        1usize..=9,
        dim(),
        scale,
        proptest::option::of(0usize..700),
        mag,
        neg_inf,
        any::<u64>(),
    )
        .prop_map(
            |(rows, cols, scale, causal, mag, neg_inf_every, seed)| SoftmaxCase {
                rows,
                cols,
                scale,
                causal,
                mag,
                neg_inf_every,
                seed,
            },
        )
}

// ---------------------------------------------------------------------------------------
// SwiGLU, add, embedding.

fn gate_cases(geglu: bool) -> impl Strategy<Value = GateCase> {
    let mag = select(vec![1e-3f32, 1.0, 10.0, 100.0, 1e4]);
    (dim(), 1usize..=3, mag.clone(), mag, any::<u64>()).prop_map(
        move |(d, r, mag_a, mag_b, seed)| GateCase {
            geglu,
            len: d * r,
            mag_a,
            mag_b,
            seed,
        },
    )
}

fn add_cases() -> impl Strategy<Value = AddCase> {
    let mag = select(vec![1e-3f32, 1.0, 1e5, 1e30]);
    (dim(), 1usize..=3, mag.clone(), mag, any::<u64>()).prop_map(|(d, r, mag_a, mag_b, seed)| {
        AddCase {
            len: d * r,
            mag_a,
            mag_b,
            seed,
        }
    })
}

fn embedding_cases() -> impl Strategy<Value = EmbeddingCase> {
    (
        1usize..=300,
        dim(),
        any::<prop::sample::Index>(),
        any::<u64>(),
    )
        .prop_map(|(vocab, dim, t, seed)| EmbeddingCase {
            vocab,
            dim,
            token: t.index(vocab),
            seed,
        })
}

// ---------------------------------------------------------------------------------------
// Attention.

fn attention_cases() -> impl Strategy<Value = AttentionCase> {
    let pos = prop_oneof![select(vec![0usize, 1, 7, 63, 200]), 0usize..300];
    let head_dim = select(vec![1usize, 2, 3, 8, 16, 17, 32, 64, 65, 80, 128]);
    // Query rows: decode and short prompts (one per (row, head) pair), and prompts long
    // enough for a tiled prefill path (units of several rows and heads, a partial last one).
    let m = prop_oneof![3 => 1usize..=5, 1 => select(vec![6usize, 17, 33])];
    (
        m,
        pos,
        1usize..=3,
        1usize..=3,
        head_dim,
        select(vec![0.1f32, 1.0, 4.0]),
        select(vec![1.0f32, 1e3]),
        (
            select(vec![1.0f32, 1.0, 0.5]),
            prop_oneof![2 => Just(None), 1 => (1usize..=70).prop_map(Some)],
        ),
        any::<u64>(),
    )
        .prop_map(
            |(m, pos, n_kv_heads, group, head_dim, mag_qk, mag_v, (scale_factor, window), seed)| {
                AttentionCase {
                    m,
                    pos,
                    n_kv_heads,
                    group,
                    head_dim,
                    mag_qk,
                    mag_v,
                    scale_factor,
                    window,
                    seed,
                }
            },
        )
}

/// Attention of `m` rows at `pos`, 2 heads over 1 kv head of 4, the standard scale.
fn attention_params(m: usize, pos: usize, window: Option<usize>) -> AttentionParams {
    AttentionParams {
        m,
        pos,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        scale: AttentionParams::standard_scale(4),
        window,
    }
}

// ---------------------------------------------------------------------------------------
// Shape errors.

/// Calls every op with mismatched shapes or invalid parameters and requires an `Err` (a
/// panic or an `Ok` fails).
pub fn check_shape_errors<B: Backend>(backend: &B) -> Result<(), Failure> {
    let w_vals = vec![0.5f32; 4 * 6];
    let fail = |op: Op, case: &str, detail: String| Failure {
        backend: backend.name(),
        op,
        case: case.into(),
        detail,
    };
    let w = backend
        .prepare(
            WeightView::f32(&w_vals, 4, 6)
                .map_err(|e| fail(Op::Matmul, "W 4 × 6", e.to_string()))?,
        )
        .map_err(|e| fail(Op::Matmul, "prepare W 4 × 6", e.to_string()))?;
    let rope = |d| RopeParams {
        head_dim: d,
        theta: 10_000.0,
        layout: RopeLayout::Interleaved,
    };
    let v = |n: usize| vec![1.0f32; n];
    #[allow(clippy::type_complexity)]
    let cases: Vec<(Op, &str, Box<dyn Fn() -> Result<(), crate::Error> + '_>)> = vec![
        (
            Op::Matmul,
            "x 2 × 5 (k should be 6), W 4 × 6, m 2",
            Box::new(|| backend.matmul(&v(10), &w, &mut v(8), 2)),
        ),
        (
            Op::Matmul,
            "x 2 × 6, W 4 × 6, y of 7 (should be 8)",
            Box::new(|| backend.matmul(&v(12), &w, &mut v(7), 2)),
        ),
        (
            Op::Matmul,
            "m = 0",
            Box::new(|| backend.matmul(&[], &w, &mut [], 0)),
        ),
        (
            Op::RmsNorm,
            "x of 10, weight of 4",
            Box::new(|| backend.rmsnorm(&v(10), &v(4), &mut v(10), 1e-5)),
        ),
        (
            Op::RmsNorm,
            "x of 8, y of 4",
            Box::new(|| backend.rmsnorm(&v(8), &v(4), &mut v(4), 1e-5)),
        ),
        (
            Op::Rope,
            "odd head_dim 3",
            Box::new(|| backend.rope(&mut v(6), 1, 0, &rope(3))),
        ),
        (
            Op::Rope,
            "x of 10, 1 row of heads of 4",
            Box::new(|| backend.rope(&mut v(10), 1, 0, &rope(4))),
        ),
        (
            Op::Softmax,
            "x of 10, cols 4",
            Box::new(|| backend.softmax(&mut v(10), 4, &SoftmaxParams::PLAIN)),
        ),
        (
            Op::Softmax,
            "scale 0",
            Box::new(|| {
                backend.softmax(
                    &mut v(4),
                    4,
                    &SoftmaxParams {
                        scale: 0.0,
                        causal: None,
                    },
                )
            }),
        ),
        (
            Op::SwiGlu,
            "a of 5, b of 4",
            Box::new(|| backend.swiglu(&v(5), &v(4), &mut v(5))),
        ),
        (
            Op::GeGlu,
            "a of 5, b of 4",
            Box::new(|| backend.geglu(&v(5), &v(4), &mut v(5))),
        ),
        (
            Op::Add,
            "y of 5, x of 4",
            Box::new(|| backend.add(&mut v(5), &v(4))),
        ),
        (
            Op::Embedding,
            "token 4 of a 4-row table",
            Box::new(|| backend.embedding(&w, 4, &mut v(6))),
        ),
        (
            Op::Embedding,
            "y of 5, rows of 6",
            Box::new(|| backend.embedding(&w, 0, &mut v(5))),
        ),
        (
            Op::Attention,
            "q of 7 for 1 row of 2 heads × 4",
            Box::new(|| {
                let p = attention_params(1, 0, None);
                backend.attention(&v(7), &v(4), &v(4), &mut v(8), &mut v(1), &p)
            }),
        ),
        (
            Op::Attention,
            "a window of 0 positions",
            Box::new(|| {
                let p = attention_params(1, 0, Some(0));
                backend.attention(&v(8), &v(4), &v(4), &mut v(8), &mut v(1), &p)
            }),
        ),
        (
            Op::Attention,
            "caches of 4 values for 2 positions of 4",
            Box::new(|| {
                let p = attention_params(1, 1, None);
                backend.attention(&v(8), &v(4), &v(4), &mut v(8), &mut v(2), &p)
            }),
        ),
    ];
    for (op, case, call) in &cases {
        match catch_unwind(AssertUnwindSafe(call)) {
            Ok(Err(_)) => {}
            Ok(Ok(())) => {
                return Err(fail(
                    *op,
                    case,
                    "accepted invalid input instead of returning an error".into(),
                ));
            }
            Err(_) => {
                return Err(fail(
                    *op,
                    case,
                    "panicked on invalid input instead of returning an error".into(),
                ));
            }
        }
    }
    Ok(())
}
