//! The conformance suite: checks any [`Backend`] against the scalar kernels run in f64.
//!
//! Call [`assert_conforms`] from a test (or [`check`] for a `Result`): for every op it draws
//! random cases with proptest (shapes including 1, primes and sizes that are no multiple of
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
    Arithmetic, AttentionParams, Backend, DType, Op, RopeLayout, RopeParams, SoftmaxParams,
    WeightView,
};
use chord_kernels::{quant, scalar};

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
    match op {
        Op::Matmul => {
            run(backend, op, cfg, matmul_cases(cfg.max_matmul_work), |c| {
                matmul_case(backend, c)
            })?;
            run(backend, op, cfg, qmatmul_cases(cfg.max_matmul_work), |c| {
                qmatmul_case(backend, c)
            })
        }
        Op::RmsNorm => run(backend, op, cfg, rmsnorm_cases(), |c| {
            rmsnorm_case(backend, c)
        }),
        Op::Rope => run(backend, op, cfg, rope_cases(), |c| rope_case(backend, c)),
        Op::Softmax => run(backend, op, cfg, softmax_cases(), |c| {
            softmax_case(backend, c)
        }),
        Op::SwiGlu => run(backend, op, cfg, gate_cases(), |c| {
            let f = |a: &[f32], b: &[f32], y: &mut [f32]| backend.swiglu(a, b, y);
            gate_case(c, f, scalar::swiglu, tolerance::swiglu)
        }),
        Op::GeGlu => run(backend, op, cfg, gate_cases(), |c| {
            let f = |a: &[f32], b: &[f32], y: &mut [f32]| backend.geglu(a, b, y);
            gate_case(c, f, scalar::geglu, tolerance::geglu)
        }),
        Op::Add => run(backend, op, cfg, add_cases(), |c| add_case(backend, c)),
        Op::Embedding => run(backend, op, cfg, embedding_cases(), |c| {
            embedding_case(backend, c)
        }),
        Op::Attention => run(backend, op, cfg, attention_cases(), |c| {
            attention_case(backend, c)
        }),
    }
}

/// Tolerances against the f64 oracle, per op. `U = 2^-24` is the unit roundoff of f32 and
/// `gamma(n) = n U / (1 - n U)` bounds the relative error of `n` chained roundings
/// (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1). Every bound holds for
/// any summation order, so it is the same for every backend; none is tuned to pass.
pub mod tolerance {
    /// Unit roundoff of f32.
    pub const U: f64 = f32::EPSILON as f64 / 2.0;

    /// `n U / (1 - n U)`.
    pub fn gamma(n: usize) -> f64 {
        let nu = n as f64 * U;
        nu / (1.0 - nu)
    }

    /// Matmul output with `k` terms and `abs_dot = Σ_p |x_p w_p|`: any order of summing `k`
    /// rounded (or fused) products is within `gamma(k) * abs_dot`; two more roundings cover
    /// the blocked kernels' final add of a partial sum into the output.
    pub fn matmul(k: usize, abs_dot: f64) -> f64 {
        gamma(k + 2) * abs_dot
    }

    /// Matmul output on a quantized weight computed in f32 ([`Arithmetic::F32`]), with
    /// `abs_parts = Σ_p |x_p| (|scaled_p| + |offset_p|)` over the two parts of each weight
    /// value ([`chord_kernels::quant::dequantize_parts`]): a kernel may sum a block's parts
    /// separately (`d Σ q x + m Σ x`), and the oracle's weight is the rounded sum of the
    /// parts. Summing `k` products, one rounding of each part's product and of the
    /// dequantized value, and the two of [`matmul`]: `gamma(k + 4)`.
    ///
    /// [`Arithmetic::F32`]: crate::backend::Arithmetic::F32
    pub fn qmatmul_f32(k: usize, abs_parts: f64) -> f64 {
        gamma(k + 4) * abs_parts
    }

    /// Matmul output with 8-bit activations ([`Arithmetic::Int8`], as ggml's `Q8_0`/`Q8_1`):
    /// each activation is replaced by `d q` with `d = amax / 127` of its block of 32 and
    /// `q = round(x / d)`, off by at most `delta_p = amax / 254`, plus the rounding of
    /// `x / d` (`4 U |x_p|`, with margin). The integer sums are exact; the f32 sums of the
    /// scaled block sums add [`qmatmul_f32`]'s bound on the rounded activations.
    /// `abs_parts_delta = Σ_p (|scaled_p| + |offset_p|) delta_p` and `abs_parts_x =
    /// Σ_p (|x_p| + delta_p)(|scaled_p| + |offset_p|)`.
    ///
    /// [`Arithmetic::Int8`]: crate::backend::Arithmetic::Int8
    pub fn qmatmul_int8(k: usize, abs_parts_delta: f64, abs_parts_x: f64) -> f64 {
        abs_parts_delta + qmatmul_f32(k, abs_parts_x)
    }

    /// RMSNorm output `y` of a row of `dim`: the sum of squares is within `gamma(dim)`
    /// (relative: every term is positive), the square root halves it, and the division by
    /// `dim`, the `+ eps`, the square root, the reciprocal and two products add one
    /// rounding each (8 with margin for second-order terms).
    pub fn rmsnorm(dim: usize, y: f64) -> f64 {
        (gamma(dim) / 2.0 + 8.0 * U) * y.abs()
    }

    /// RoPE output of a pair `(a, b)` turned by `angle` radians with base `theta`.
    ///
    /// An f32 kernel computes the angle `pos * theta^(-2i/d)` with a relative error of about
    /// `(ln theta + 4) U` (the rounded exponent is amplified by `ln theta` through the power),
    /// so outputs move by `angle * (ln theta + 6) U` times `|a| + |b|`; sine, cosine and the
    /// rotation add `6 U`. At large positions this is large by nature: the f32 angle itself
    /// is only known to `angle * U`.
    pub fn rope(a: f64, b: f64, angle: f64, theta: f64) -> f64 {
        (a.abs() + b.abs()) * U * (angle.abs() * (theta.ln() + 6.0) + 6.0)
    }

    /// Softmax entry `p` whose scaled logit is `s`, in a row with maximum `m`: scaling,
    /// taking the maximum and subtracting round `s`, `m` and `s - m` by `U` each (relative),
    /// which `exp` turns into a relative error of `expm1(U (|s| + |m| + |s - m|))`, plus 4 U for
    /// `exp` itself (the SIMD polynomial is within 2 ulp).
    pub fn softmax_term(s: f64, m: f64) -> f64 {
        (U * (s.abs() + m.abs() + (s - m).abs())).exp_m1() + 4.0 * U
    }

    /// Softmax output `p` given its term's relative error `term` (see [`softmax_term`]) and
    /// the row's weighted mean term error `row` (`Σ e_j term_j / Σ e_j`): the sum of `n`
    /// terms adds `gamma(n)`, the reciprocal and the product 3 U. Below 1e-37 an f32 kernel may
    /// flush to zero.
    pub fn softmax(p: f64, term: f64, row: f64, n: usize) -> f64 {
        p * (term + row + gamma(n) + 3.0 * U) + 1e-37
    }

    /// SwiGLU output `y = a b / (1 + exp(-a))`: `exp` (2 ulp), the add, the division and the
    /// product, with margin: 10 U relative. When `exp(-a)` overflows f32 (a < -88.7) a kernel
    /// returns about 0 for a true value below `|a b| 1e-38`.
    pub fn swiglu(a: f64, b: f64, y: f64) -> f64 {
        10.0 * U * y.abs() + (a * b).abs() * 1e-37 + 1e-37
    }

    /// GEGLU output `y = a b σ(z)`, `z = c (a + k a³)` (see
    /// [`crate::backend::Backend::geglu`]): SwiGLU's 10 U, plus the error of `z` itself (its
    /// four roundings on terms of at most `z_abs = c (|a| + k |a|³)`, with margin 6 U `z_abs`),
    /// which moves `σ(z)` by a relative `(1 - σ(z)) δz`: nearly nothing where the gate is
    /// open (large positive `a`), all of `δz` where it is shut.
    pub fn geglu(a: f64, b: f64, y: f64) -> f64 {
        use crate::backend::{GELU_2_SQRT_2_OVER_PI as C, GELU_COEF_A as K};
        let z_abs = C * (a.abs() + K * a.abs().powi(3));
        let shut = 1.0 / (1.0 + (C * (a + K * a.powi(3))).exp()); // 1 - σ(z)
        (10.0 + 6.0 * z_abs * shut) * U * y.abs() + (a * b).abs() * 1e-37 + 1e-37
    }

    /// Residual add: one rounding of the exact sum.
    pub fn add(y: f64) -> f64 {
        U * y.abs()
    }

    /// Attention output `Σ_t p_t v_t` of a row and head over `t_len` positions, given
    /// `max_score_err`, the largest error bound of a scaled score (`gamma(head_dim + 2)`
    /// times `Σ |q k|`, times the scale, plus one rounding of the scaled value), and
    /// `abs_pv = Σ_t p_t |v_t|`. Moving every score by at most `e` moves each probability by a
    /// relative `expm1(2e)`; the softmax adds its own roundings (the worst term error of
    /// [`softmax_term`] over the row, `max_term`, and `gamma(t_len)`), and the weighted sum
    /// `gamma(t_len + 2)`. Below 1e-30, underflow.
    pub fn attention(max_score_err: f64, max_term: f64, t_len: usize, abs_pv: f64) -> f64 {
        let rel_p = (2.0 * max_score_err).exp_m1() + 2.0 * max_term + gamma(t_len) + 3.0 * U;
        (rel_p + gamma(t_len + 2)) * abs_pv + 1e-30
    }
}

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

/// Values of a case: uniform in `[-mag, mag]` from the case's own seed (SplitMix64).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, mag: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * mag).collect()
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Compares `got` with `want` element by element; on failure reports the element with the
/// largest error-to-tolerance ratio.
fn compare(
    name: &str,
    got: &[f32],
    want: &[f64],
    tol: impl Fn(usize) -> f64,
    index: impl Fn(usize) -> String,
) -> Result<(), TestCaseError> {
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let t = tol(i);
        let err = (g as f64 - w).abs();
        let ratio = if err <= t {
            continue;
        } else if t > 0.0 {
            err / t
        } else {
            f64::INFINITY
        };
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        if worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(TestCaseError::fail(format!(
            "worst element {name}{} = {:e}, expected {:e} (error {:e}, tolerance {:e})",
            index(i),
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            tol(i)
        ))),
    }
}

fn op_error(e: crate::Error) -> TestCaseError {
    TestCaseError::fail(format!("returned an error on valid input: {e}"))
}

fn run<B, S, F>(backend: &B, op: Op, cfg: &Config, strategy: S, test: F) -> Result<(), Failure>
where
    B: Backend,
    S: Strategy,
    S::Value: fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let config = RunnerConfig {
        cases: cfg.cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..RunnerConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
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

#[derive(Clone, Debug)]
struct MatmulCase {
    m: usize,
    n: usize,
    k: usize,
    mag_x: f32,
    mag_w: f32,
    seed: u64,
}

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
            MatmulCase {
                m,
                n,
                k,
                mag_x,
                mag_w,
                seed,
            }
        },
    )
}

fn matmul_case<B: Backend>(backend: &B, c: MatmulCase) -> Result<(), TestCaseError> {
    let MatmulCase { m, n, k, .. } = c;
    let mut vals = Values(c.seed);
    let x = vals.vec(m * k, c.mag_x);
    let w = vals.vec(n * k, c.mag_w);
    let prepared = backend
        .prepare(WeightView::f32(&w, n, k).map_err(op_error)?)
        .map_err(op_error)?;
    let mut y = vec![f32::NAN; m * n];
    backend.matmul(&x, &prepared, &mut y, m).map_err(op_error)?;

    let (xd, wd) = (widen(&x), widen(&w));
    let mut want = vec![0.0f64; m * n];
    scalar::matmul(&xd, &wd, &mut want, m, n, k);
    let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
    let mut abs_dot = vec![0.0f64; m * n];
    scalar::matmul(&abs(&xd), &abs(&wd), &mut abs_dot, m, n, k);
    compare(
        "y",
        &y,
        &want,
        |i| tolerance::matmul(k, abs_dot[i]),
        |i| format!("[{}, {}]", i / n, i % n),
    )
}

// ---------------------------------------------------------------------------------------
// Matmul on quantized weights.

#[derive(Clone, Debug)]
struct QMatmulCase {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    mag_x: f32,
    seed: u64,
}

fn qmatmul_cases(max_work: usize) -> impl Strategy<Value = QMatmulCase> {
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
            QMatmulCase {
                dtype,
                m,
                n,
                k,
                mag_x,
                seed,
            }
        },
    )
}

fn qmatmul_case<B: Backend>(backend: &B, c: QMatmulCase) -> Result<(), TestCaseError> {
    let QMatmulCase { dtype, m, n, k, .. } = c;
    let x = Values(c.seed).vec(m * k, c.mag_x);
    let bytes = quant::sample_blocks(dtype, n * k, c.seed).expect("whole blocks");
    let prepared = backend
        .prepare(WeightView::new(dtype, n, k, &bytes).map_err(op_error)?)
        .map_err(op_error)?;
    let mut y = vec![f32::NAN; m * n];
    backend.matmul(&x, &prepared, &mut y, m).map_err(op_error)?;

    // The oracle: the dequantized weight in f64.
    let mut w = vec![0.0f32; n * k];
    quant::dequantize(dtype, &bytes, &mut w);
    let (mut scaled, mut offset) = (vec![0.0f32; n * k], vec![0.0f32; n * k]);
    quant::dequantize_parts(dtype, &bytes, &mut scaled, &mut offset);
    let parts: Vec<f64> = scaled
        .iter()
        .zip(&offset)
        .map(|(s, o)| s.abs() as f64 + o.abs() as f64)
        .collect();
    let xd = widen(&x);
    let mut want = vec![0.0f64; m * n];
    scalar::matmul(&xd, &widen(&w), &mut want, m, n, k);
    let abs_x: Vec<f64> = xd.iter().map(|v| v.abs()).collect();
    let int8 = backend.arithmetic(&prepared) == Arithmetic::Int8;
    let mut tol = vec![0.0f64; m * n];
    if int8 {
        // Each activation's worst 8-bit rounding: half a step of its block of 32.
        let delta: Vec<f64> = xd
            .chunks(k)
            .flat_map(|row| {
                row.iter().enumerate().map(move |(p, v)| {
                    let b = &row[p / 32 * 32..((p / 32 + 1) * 32).min(k)];
                    let amax = b.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                    amax / 254.0 + 4.0 * tolerance::U * v.abs()
                })
            })
            .collect();
        let x_plus: Vec<f64> = abs_x.iter().zip(&delta).map(|(a, d)| a + d).collect();
        let (mut by_delta, mut by_x) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
        scalar::matmul(&delta, &parts, &mut by_delta, m, n, k);
        scalar::matmul(&x_plus, &parts, &mut by_x, m, n, k);
        for (i, t) in tol.iter_mut().enumerate() {
            *t = tolerance::qmatmul_int8(k, by_delta[i], by_x[i]);
        }
    } else {
        let mut abs_parts = vec![0.0f64; m * n];
        scalar::matmul(&abs_x, &parts, &mut abs_parts, m, n, k);
        for (t, a) in tol.iter_mut().zip(&abs_parts) {
            *t = tolerance::qmatmul_f32(k, *a);
        }
    }
    compare(
        &format!(
            "y ({dtype}, {})",
            if int8 { "8-bit activations" } else { "f32" }
        ),
        &y,
        &want,
        |i| tol[i],
        |i| format!("[{}, {}]", i / n, i % n),
    )
}

// ---------------------------------------------------------------------------------------
// RMSNorm.

#[derive(Clone, Debug)]
struct RmsNormCase {
    rows: usize,
    dim: usize,
    eps: f32,
    mag: f32,
    seed: u64,
}

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

fn rmsnorm_case<B: Backend>(backend: &B, c: RmsNormCase) -> Result<(), TestCaseError> {
    let mut vals = Values(c.seed);
    let x = vals.vec(c.rows * c.dim, c.mag);
    let g = vals.vec(c.dim, 2.0);
    let mut y = vec![f32::NAN; x.len()];
    backend.rmsnorm(&x, &g, &mut y, c.eps).map_err(op_error)?;
    let mut want = vec![0.0f64; x.len()];
    scalar::rmsnorm(&widen(&x), &widen(&g), &mut want, c.dim, c.eps as f64);
    let d = c.dim;
    compare(
        "y",
        &y,
        &want,
        |i| tolerance::rmsnorm(d, want[i]),
        |i| format!("[{}, {}]", i / d, i % d),
    )
}

// ---------------------------------------------------------------------------------------
// RoPE.

#[derive(Clone, Debug)]
struct RopeCase {
    rows: usize,
    heads: usize,
    head_dim: usize,
    pos: usize,
    theta: f32,
    layout: RopeLayout,
    mag: f32,
    seed: u64,
}

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

fn rope_case<B: Backend>(backend: &B, c: RopeCase) -> Result<(), TestCaseError> {
    let mut vals = Values(c.seed);
    let (d, row_len) = (c.head_dim, c.heads * c.head_dim);
    let x = vals.vec(c.rows * row_len, c.mag);
    let p = RopeParams {
        head_dim: d,
        theta: c.theta,
        layout: c.layout,
    };
    let mut y = x.clone();
    backend.rope(&mut y, c.rows, c.pos, &p).map_err(op_error)?;
    let mut want = widen(&x);
    scalar::rope(&mut want, c.rows, c.pos, &p);
    // Element i of a head belongs to pair `pair(i)` (whose frequency index it is) and has
    // partner `partner(i)`.
    let half = d / 2;
    type IndexMap = fn(usize, usize) -> usize;
    let (pair, partner): (IndexMap, IndexMap) = match c.layout {
        RopeLayout::Interleaved => (|i, _| i / 2, |i, _| i ^ 1),
        RopeLayout::Neox => (|i, h| i % h, |i, h| if i < h { i + h } else { i - h }),
    };
    let tol = |i: usize| {
        let (row, j) = (i / row_len, i % d);
        let base = i - j;
        let freq = (c.theta as f64).powf(-((2 * pair(j, half)) as f64) / d as f64);
        let angle = (c.pos + row) as f64 * freq;
        tolerance::rope(
            x[i] as f64,
            x[base + partner(j, half)] as f64,
            angle,
            c.theta as f64,
        )
    };
    compare("x", &y, &want, tol, |i| {
        format!(
            "[row {}, head {}, {}]",
            i / row_len,
            (i % row_len) / d,
            i % d
        )
    })
}

// ---------------------------------------------------------------------------------------
// Softmax.

#[derive(Clone, Debug)]
struct SoftmaxCase {
    rows: usize,
    cols: usize,
    scale: f32,
    causal: Option<usize>,
    mag: f32,
    neg_inf_every: usize,
    seed: u64,
}

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

fn softmax_case<B: Backend>(backend: &B, c: SoftmaxCase) -> Result<(), TestCaseError> {
    let mut vals = Values(c.seed);
    let mut x = vals.vec(c.rows * c.cols, c.mag);
    if c.neg_inf_every > 0 {
        x.iter_mut()
            .step_by(c.neg_inf_every)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    let p = SoftmaxParams {
        scale: c.scale,
        causal: c.causal,
    };
    let mut y = x.clone();
    backend.softmax(&mut y, c.cols, &p).map_err(op_error)?;
    let mut want = widen(&x);
    scalar::softmax(&mut want, c.cols, &p);

    // Per-entry tolerances from the oracle's own quantities (see `tolerance::softmax`).
    let mut tol = vec![0.0f64; x.len()];
    for (r, (xr, tr)) in x.chunks(c.cols).zip(tol.chunks_mut(c.cols)).enumerate() {
        let visible = p.visible(r, c.cols);
        let s: Vec<f64> = xr[..visible]
            .iter()
            .map(|&v| v as f64 * c.scale as f64)
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue; // the whole row must be exactly 0
        }
        let terms: Vec<f64> = s
            .iter()
            .map(|&sj| {
                if sj == f64::NEG_INFINITY {
                    0.0
                } else {
                    tolerance::softmax_term(sj, m)
                }
            })
            .collect();
        let e: Vec<f64> = s.iter().map(|&sj| (sj - m).exp()).collect();
        let row = e.iter().zip(&terms).map(|(e, t)| e * t).sum::<f64>() / e.iter().sum::<f64>();
        let base = r * c.cols;
        for j in 0..visible {
            if s[j] != f64::NEG_INFINITY {
                tr[j] = tolerance::softmax(want[base + j], terms[j], row, visible);
            }
        }
    }
    let cols = c.cols;
    compare(
        "p",
        &y,
        &want,
        |i| tol[i],
        |i| format!("[{}, {}]", i / cols, i % cols),
    )
}

// ---------------------------------------------------------------------------------------
// SwiGLU, add, embedding.

#[derive(Clone, Debug)]
struct EltCase {
    len: usize,
    mag_a: f32,
    mag_b: f32,
    seed: u64,
}

fn gate_cases() -> impl Strategy<Value = EltCase> {
    let mag = select(vec![1e-3f32, 1.0, 10.0, 100.0, 1e4]);
    (dim(), 1usize..=3, mag.clone(), mag, any::<u64>()).prop_map(|(d, r, mag_a, mag_b, seed)| {
        EltCase {
            len: d * r,
            mag_a,
            mag_b,
            seed,
        }
    })
}

/// A gate op (`swiglu`, `geglu`) against its f64 oracle and tolerance.
fn gate_case(
    c: EltCase,
    run: impl Fn(&[f32], &[f32], &mut [f32]) -> Result<(), crate::Error>,
    oracle: fn(&[f64], &[f64], &mut [f64]),
    tol: fn(f64, f64, f64) -> f64,
) -> Result<(), TestCaseError> {
    let mut vals = Values(c.seed);
    let a = vals.vec(c.len, c.mag_a);
    let b = vals.vec(c.len, c.mag_b);
    let mut y = vec![f32::NAN; c.len];
    run(&a, &b, &mut y).map_err(op_error)?;
    let mut want = vec![0.0f64; c.len];
    oracle(&widen(&a), &widen(&b), &mut want);
    compare(
        "y",
        &y,
        &want,
        |i| tol(a[i] as f64, b[i] as f64, want[i]),
        |i| format!("[{i}]"),
    )
}

fn add_cases() -> impl Strategy<Value = EltCase> {
    let mag = select(vec![1e-3f32, 1.0, 1e5, 1e30]);
    (dim(), 1usize..=3, mag.clone(), mag, any::<u64>()).prop_map(|(d, r, mag_a, mag_b, seed)| {
        EltCase {
            len: d * r,
            mag_a,
            mag_b,
            seed,
        }
    })
}

fn add_case<B: Backend>(backend: &B, c: EltCase) -> Result<(), TestCaseError> {
    let mut vals = Values(c.seed);
    let y0 = vals.vec(c.len, c.mag_a);
    let x = vals.vec(c.len, c.mag_b);
    let mut y = y0.clone();
    backend.add(&mut y, &x).map_err(op_error)?;
    let want: Vec<f64> = y0
        .iter()
        .zip(&x)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    compare(
        "y",
        &y,
        &want,
        |i| tolerance::add(want[i]),
        |i| format!("[{i}]"),
    )
}

#[derive(Clone, Debug)]
struct EmbeddingCase {
    vocab: usize,
    dim: usize,
    token: usize,
    seed: u64,
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

fn embedding_case<B: Backend>(backend: &B, c: EmbeddingCase) -> Result<(), TestCaseError> {
    let table = Values(c.seed).vec(c.vocab * c.dim, 1.0);
    let prepared = backend
        .prepare(WeightView::f32(&table, c.vocab, c.dim).map_err(op_error)?)
        .map_err(op_error)?;
    let mut y = vec![f32::NAN; c.dim];
    backend
        .embedding(&prepared, c.token, &mut y)
        .map_err(op_error)?;
    let want = widen(&table[c.token * c.dim..][..c.dim]);
    compare("y", &y, &want, |_| 0.0, |i| format!("[{i}]"))
}

// ---------------------------------------------------------------------------------------
// Attention.

#[derive(Clone, Debug)]
struct AttentionCase {
    m: usize,
    pos: usize,
    n_kv_heads: usize,
    group: usize,
    head_dim: usize,
    mag_qk: f32,
    mag_v: f32,
    /// Times `1 / sqrt(head_dim)`.
    scale_factor: f32,
    window: Option<usize>,
    seed: u64,
}

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

fn attention_case<B: Backend>(backend: &B, c: AttentionCase) -> Result<(), TestCaseError> {
    let (hd, kvh, heads) = (c.head_dim, c.n_kv_heads, c.n_kv_heads * c.group);
    let t_max = c.pos + c.m;
    let mut vals = Values(c.seed);
    let q = vals.vec(c.m * heads * hd, c.mag_qk);
    let k = vals.vec(t_max * kvh * hd, c.mag_qk);
    let v = vals.vec(t_max * kvh * hd, c.mag_v);
    let p = AttentionParams {
        m: c.m,
        pos: c.pos,
        n_heads: heads,
        n_kv_heads: kvh,
        head_dim: hd,
        scale: c.scale_factor * AttentionParams::standard_scale(hd),
        window: c.window,
    };
    let mut out = vec![f32::NAN; q.len()];
    let mut scores = vec![0.0f32; t_max];
    backend
        .attention(&q, &k, &v, &mut out, &mut scores, &p)
        .map_err(op_error)?;

    // The oracle in f64, and each element's tolerance from the same quantities.
    let scale = p.scale as f64;
    let (mut want, mut tol) = (vec![0.0f64; out.len()], vec![0.0f64; out.len()]);
    let kv_dim = kvh * hd;
    for i in 0..c.m {
        // The positions this query sees, by llama.cpp's rule (`t` is masked when
        // `p - t >= window`), not by the code under test: `lo .. lo + t_len`.
        let q_pos = c.pos + i;
        let lo = (0..=q_pos)
            .find(|&t| c.window.is_none_or(|w| q_pos - t < w))
            .expect("a query sees itself");
        let t_len = c.pos + i + 1 - lo;
        for h in 0..heads {
            let qh = &q[(i * heads + h) * hd..][..hd];
            let off = (h / c.group) * hd;
            let row =
                |t: usize, x: &[f32]| -> Vec<f64> { widen(&x[(lo + t) * kv_dim + off..][..hd]) };
            let s: Vec<f64> = (0..t_len)
                .map(|t| {
                    row(t, &k)
                        .iter()
                        .zip(qh)
                        .map(|(a, &b)| a * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let abs_s: Vec<f64> = (0..t_len)
                .map(|t| {
                    row(t, &k)
                        .iter()
                        .zip(qh)
                        .map(|(a, &b)| (a * b as f64).abs())
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mut pr = s.clone();
            scalar::softmax(&mut pr, t_len, &SoftmaxParams::PLAIN);
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let max_err = abs_s
                .iter()
                .zip(&s)
                .map(|(a, v)| tolerance::gamma(hd + 2) * a + tolerance::U * v.abs())
                .fold(0.0, f64::max);
            let max_term = s
                .iter()
                .map(|&v| tolerance::softmax_term(v, m))
                .fold(0.0, f64::max);
            for j in 0..hd {
                let (mut acc, mut abs_pv) = (0.0f64, 0.0f64);
                for t in 0..t_len {
                    let vt = v[(lo + t) * kv_dim + off + j] as f64;
                    acc += pr[t] * vt;
                    abs_pv += pr[t] * vt.abs();
                }
                let at = (i * heads + h) * hd + j;
                want[at] = acc;
                tol[at] = tolerance::attention(max_err, max_term, t_len, abs_pv);
            }
        }
    }
    let (heads_, hd_) = (heads, hd);
    compare(
        "out",
        &out,
        &want,
        |i| tol[i],
        |i| {
            format!(
                "[row {}, head {}, {}]",
                i / (heads_ * hd_),
                (i / hd_) % heads_,
                i % hd_
            )
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
