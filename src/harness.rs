//! One table of op cases for the three consumers that run ops outside a model: the
//! conformance suite (`chord::conformance`, with the `conformance` feature), `chord bench
//! kernels` ([`crate::bench::kernels`]) and the criterion benches (`benches/kernels.rs`), in
//! the manner of ggml's `test-backend-ops`.
//!
//! A case ([`OpCase`]) is one op at one shape, with its parameters and the seed of its
//! values. It knows how to:
//! - make its inputs and prepare its weights on a backend ([`OpCase::setup`]);
//! - run the op ([`OpCase::run`]: the part that is timed);
//! - compare the output with the scalar kernels run in f64, under the op's [`tolerance`]
//!   ([`OpCase::check`]);
//! - count its work in FLOP or bytes ([`OpCase::work`]).
//!
//! The conformance suite draws cases at random (proptest) and checks them. The benchmarks
//! take the fixed cases of real model shapes ([`model_cases`]) and time them. Quantized
//! matmul and attention are cases like the others: checked and timed. Adding an op means the
//! trait method and its kernels, then here: one case type (with its [`Case`] variant and
//! `each_case!` arm) and its rows in [`model_cases`]; the conformance suite adds a strategy
//! that draws it.

use std::fmt;

use chord_kernels::{quant, scalar};

use crate::backend::{
    Arithmetic, AttentionParams, Backend, DType, Error, Op, RopeLayout, RopeParams, SoftmaxParams,
    WeightView,
};

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
// The case trait and the table.

/// The unit of a case's work and of a timed row's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Unit {
    /// Floating-point operations per second, against the FMA peak.
    #[serde(rename = "GFLOP/s")]
    Gflops,
    /// Bytes per second, against the streaming read bandwidth.
    #[serde(rename = "GB/s")]
    Gbs,
    /// Integer operations per second (2 per 8-bit multiply-add), against the 8-bit dot
    /// product peak.
    #[serde(rename = "GOP/s")]
    Gops,
}

impl Unit {
    /// `GFLOP/s`, `GB/s` or `GOP/s`, as the JSON output spells it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Gflops => "GFLOP/s",
            Unit::Gbs => "GB/s",
            Unit::Gops => "GOP/s",
        }
    }
}

/// One op at one shape: inputs from a seed, the op on a backend, the f64 oracle and its
/// tolerance, the work done per call.
pub trait OpCase: fmt::Debug {
    /// What the case owns: its input values and weight bytes, made from its seed.
    type Inputs;

    /// What a call works on: weights prepared by a backend (which may borrow the inputs'
    /// bytes, as a model's weights borrow the file), and the outputs.
    type State<'a, B: Backend + 'a>;

    /// The op the case runs.
    fn op(&self) -> Op;

    /// The weight format (matmul); F32 for the other ops.
    fn dtype(&self) -> DType {
        DType::F32
    }

    /// The shape, for tables: `m=1 n=1536 k=576`.
    fn shape(&self) -> String;

    /// Work per call and its unit: FLOP for compute-bound cases (GFLOP/s against the FMA
    /// peak), bytes read and written for the others (GB/s against the read roof).
    fn work(&self) -> (f64, Unit);

    /// Makes the inputs from the case's seed.
    fn inputs(&self) -> Self::Inputs;

    /// Prepares the weights on `backend` and makes the outputs.
    fn setup<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a Self::Inputs,
    ) -> Result<Self::State<'a, B>, Error>;

    /// Runs the op once. Ops that work in place (RoPE, softmax, add) work on the state's
    /// output again at each call; [`check`](OpCase::check) needs exactly one call.
    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a Self::Inputs,
        state: &mut Self::State<'a, B>,
    ) -> Result<(), Error>;

    /// Compares the output of the one call [`run`](OpCase::run) made with the f64 oracle,
    /// element by element, under the op's [`tolerance`]. On failure, the worst element.
    fn check<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a Self::Inputs,
        state: &Self::State<'a, B>,
    ) -> Result<(), String>;
}

/// Runs `case` once on `backend` and checks it: what the conformance suite does per case.
pub fn verify<B: Backend, C: OpCase>(backend: &B, case: &C) -> Result<(), String> {
    let on_valid = |e: Error| format!("returned an error on valid input: {e}");
    let inputs = case.inputs();
    let mut state = case.setup(backend, &inputs).map_err(on_valid)?;
    case.run(backend, &inputs, &mut state).map_err(on_valid)?;
    case.check(backend, &inputs, &state)
}

/// A case of any op: the table's element.
#[derive(Clone, Debug)]
pub enum Case {
    Matmul(MatmulCase),
    RmsNorm(RmsNormCase),
    Rope(RopeCase),
    Softmax(SoftmaxCase),
    Gate(GateCase),
    Add(AddCase),
    Embedding(EmbeddingCase),
    Attention(AttentionCase),
}

/// Code generic over the case type, run on a [`Case`] through [`Case::visit`] (a closure
/// cannot be generic).
pub trait Visit {
    type Out;
    fn visit<C: OpCase>(self, case: &C) -> Self::Out;
}

/// `$e` with `$c` bound to the case inside `$case`, whatever its type.
macro_rules! each_case {
    ($case:expr, $c:ident => $e:expr) => {
        match $case {
            Case::Matmul($c) => $e,
            Case::RmsNorm($c) => $e,
            Case::Rope($c) => $e,
            Case::Softmax($c) => $e,
            Case::Gate($c) => $e,
            Case::Add($c) => $e,
            Case::Embedding($c) => $e,
            Case::Attention($c) => $e,
        }
    };
}

impl Case {
    /// Runs `v` on the case inside.
    pub fn visit<V: Visit>(&self, v: V) -> V::Out {
        each_case!(self, c => v.visit(c))
    }

    /// The case's op.
    pub fn op(&self) -> Op {
        each_case!(self, c => c.op())
    }

    /// The case's weight format.
    pub fn dtype(&self) -> DType {
        each_case!(self, c => c.dtype())
    }

    /// The case's shape text.
    pub fn shape(&self) -> String {
        each_case!(self, c => c.shape())
    }

    /// The case's work per call and its unit.
    pub fn work(&self) -> (f64, Unit) {
        each_case!(self, c => c.work())
    }
}

/// Shapes of real models, and square matmuls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeSet {
    /// SmolLM2-135M: dim 576, ffn 1536, 9 heads of 64, 3 kv heads, vocab 49152.
    SmolLm,
    /// TinyLlama-1.1B: dim 2048, ffn 5632, 32 heads of 64, 4 kv heads, vocab 32000.
    TinyLlama,
    /// Square matmuls, 1024³ and 2048³.
    Square,
}

impl ShapeSet {
    /// Every set.
    pub const ALL: [ShapeSet; 3] = [ShapeSet::SmolLm, ShapeSet::TinyLlama, ShapeSet::Square];

    /// `smollm`, `tinyllama`, `square`.
    pub fn name(self) -> &'static str {
        match self {
            ShapeSet::SmolLm => "smollm",
            ShapeSet::TinyLlama => "tinyllama",
            ShapeSet::Square => "square",
        }
    }

    /// `(dim, ffn, heads, kv_heads, head_dim, vocab)` of a model set.
    fn model(self) -> Option<(usize, usize, usize, usize, usize, usize)> {
        match self {
            ShapeSet::SmolLm => Some((576, 1536, 9, 3, 64, 49152)),
            ShapeSet::TinyLlama => Some((2048, 5632, 32, 4, 64, 32000)),
            ShapeSet::Square => None,
        }
    }
}

impl std::str::FromStr for ShapeSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ShapeSet::ALL
            .into_iter()
            .find(|set| set.name() == s)
            .ok_or_else(|| format!("unknown shape set '{s}': expected smollm, tinyllama or square"))
    }
}

/// Weight bytes a cold decode case cycles through: as much as the read roof streams, so that
/// a decode matmul reads its weights from memory as a model's layers would. The guest reports
/// a 32 MiB L3, but the host's may be several times larger (3D V-cache parts hold 96 MiB per
/// CCD): 256 MiB of copies measured 30% above the roof here, 1 GiB does not.
pub const COLD_BYTES: usize = 1 << 30;

/// The fixed cases of the benchmarks: for each model set, its matmuls (`ffn_up` and
/// `ffn_down` at `m` = 1 and 512, the classifier at `m` = 1) in every format of `dtypes`
/// whose blocks divide its rows (the others are named in `notes`), its per-row ops at 1 and
/// 512 rows, softmax over `dim` scores for one row and for every head, attention for one
/// decoded token and for a 512-token prompt (each over 512 positions); square F32 matmuls
/// for [`ShapeSet::Square`]. Each case is labelled with its set and role
/// (`smollm ffn_up`). Decode matmuls cycle through [`COLD_BYTES`] of weight copies.
pub fn model_cases(
    ops: &[Op],
    sets: &[ShapeSet],
    dtypes: &[DType],
    notes: &mut Vec<String>,
) -> Vec<(String, Case)> {
    let mut out = Vec::new();
    let has = |op| ops.contains(&op);
    for &set in sets {
        let name = set.name();
        let label = |role: &str| {
            if role.is_empty() {
                name.to_string()
            } else {
                format!("{name} {role}")
            }
        };
        if has(Op::Matmul) {
            let mut mm = |role: &str, m: usize, n: usize, k: usize, dtype: DType| {
                let bytes = dtype.bytes_for(n * k).expect("whole blocks");
                let copies = if m == 1 {
                    COLD_BYTES.div_ceil(bytes).max(1)
                } else {
                    1
                };
                let case = MatmulCase {
                    dtype,
                    m,
                    n,
                    k,
                    mag_x: 1.0,
                    mag_w: 1.0,
                    seed: 1,
                    copies,
                };
                out.push((label(role), Case::Matmul(case)));
            };
            match set.model() {
                Some((dim, ffn, _, _, _, vocab)) => {
                    for &dtype in dtypes {
                        // A weight's rows hold whole blocks (256 values for the K-quants).
                        if !dim.is_multiple_of(dtype.block_len())
                            || !ffn.is_multiple_of(dtype.block_len())
                        {
                            notes.push(format!(
                                "{dtype}: {name}'s rows ({dim}, {ffn}) are not whole {}-value blocks: no rows",
                                dtype.block_len()
                            ));
                            continue;
                        }
                        for m in [1, 512] {
                            mm("ffn_up", m, ffn, dim, dtype);
                            mm("ffn_down", m, dim, ffn, dtype);
                        }
                        mm("output", 1, vocab, dim, dtype);
                    }
                }
                None => {
                    for s in [1024, 2048] {
                        mm("", s, s, s, DType::F32);
                    }
                }
            }
        }
        let Some((dim, ffn, heads, kv_heads, head_dim, vocab)) = set.model() else {
            continue;
        };
        for rows in [1, 512] {
            if has(Op::RmsNorm) {
                let case = RmsNormCase {
                    rows,
                    dim,
                    eps: 1e-5,
                    mag: 1.0,
                    seed: 1,
                };
                out.push((label(""), Case::RmsNorm(case)));
            }
            if has(Op::Rope) {
                let case = RopeCase {
                    rows,
                    heads,
                    head_dim,
                    pos: 100,
                    theta: 10_000.0,
                    layout: RopeLayout::Interleaved,
                    mag: 1.0,
                    seed: 3,
                };
                out.push((label(""), Case::Rope(case)));
            }
            for (op, geglu) in [(Op::SwiGlu, false), (Op::GeGlu, true)] {
                if has(op) {
                    let case = GateCase {
                        geglu,
                        len: rows * ffn,
                        mag_a: 1.0,
                        mag_b: 1.0,
                        seed: 5,
                    };
                    out.push((label(&format!("rows={rows} ffn")), Case::Gate(case)));
                }
            }
            if has(Op::Add) {
                let case = AddCase {
                    len: rows * dim,
                    mag_a: 1.0,
                    mag_b: 1.0,
                    seed: 7,
                };
                out.push((label(&format!("rows={rows} dim")), Case::Add(case)));
            }
        }
        if has(Op::Softmax) {
            // One row of `dim` scores, and decode attention: every head over a context of `dim`.
            for rows in [1, heads] {
                let case = SoftmaxCase {
                    rows,
                    cols: dim,
                    scale: 0.125,
                    causal: None,
                    mag: 1.0,
                    neg_inf_every: 0,
                    seed: 4,
                };
                out.push((label(""), Case::Softmax(case)));
            }
        }
        if has(Op::Embedding) {
            let case = EmbeddingCase {
                vocab,
                dim,
                token: vocab / 2,
                seed: 9,
            };
            out.push((label(""), Case::Embedding(case)));
        }
        if has(Op::Attention) {
            // A token decoded after 511, and a 512-token prompt.
            for (m, pos) in [(1, 511), (512, 0)] {
                let case = AttentionCase {
                    m,
                    pos,
                    n_kv_heads: kv_heads,
                    group: heads / kv_heads,
                    head_dim,
                    mag_qk: 1.0,
                    mag_v: 1.0,
                    scale_factor: 1.0,
                    window: None,
                    seed: 11,
                };
                out.push((label(""), Case::Attention(case)));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Values and comparison.

/// Values of a case: uniform in `[-mag, mag]` from the case's own seed (SplitMix64).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = crate::synth::mix(self.0);
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
) -> Result<(), String> {
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
        Some((i, _)) => Err(format!(
            "worst element {name}{} = {:e}, expected {:e} (error {:e}, tolerance {:e})",
            index(i),
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            tol(i)
        )),
    }
}

/// Checks that an in-place op ran exactly once before a check.
fn once(runs: usize) -> Result<(), String> {
    match runs {
        1 => Ok(()),
        n => Err(format!(
            "checked after {n} calls: a check needs exactly one"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Matmul.

/// `y (m, n) = x (m, k) · W (n, k)ᵀ` on a weight in `dtype`: F32 values of magnitude
/// `mag_w`, or blocks of the format sampled from the seed (every field, scales included,
/// drawn as the format allows). `copies` prepared copies of the weight are cycled through by
/// successive calls (1 to check; enough to keep a decode case cold when timing).
#[derive(Clone, Debug)]
pub struct MatmulCase {
    pub dtype: DType,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub mag_x: f32,
    pub mag_w: f32,
    pub seed: u64,
    pub copies: usize,
}

/// A matmul case's activations and weight bytes.
pub struct MatmulInputs {
    x: Vec<f32>,
    /// The weight's bytes in its format, once per copy: a backend may borrow them (as it
    /// borrows a mapped file), so each copy has memory of its own.
    raws: Vec<Words>,
}

/// Bytes kept in 4-byte words, so that an F32 weight is aligned as a mapped file's tensors
/// are (a backend borrows an aligned F32 weight and copies a misaligned one).
#[derive(Clone)]
struct Words {
    words: Vec<u32>,
    len: usize,
}

impl Words {
    fn new(bytes: &[u8]) -> Words {
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Words {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
}

/// A matmul case's prepared weight copies and output.
pub struct MatmulState<W> {
    weights: Vec<W>,
    y: Vec<f32>,
    calls: usize,
}

impl MatmulCase {
    /// The activations and the F32 weight's values of an F32 case (for a baseline outside
    /// chord's backends).
    pub fn f32_inputs(&self) -> (Vec<f32>, Vec<f32>) {
        let mut vals = Values(self.seed);
        let x = vals.vec(self.m * self.k, self.mag_x);
        (x, vals.vec(self.n * self.k, self.mag_w))
    }
}

impl OpCase for MatmulCase {
    type Inputs = MatmulInputs;
    type State<'a, B: Backend + 'a> = MatmulState<B::Weight<'a>>;

    fn op(&self) -> Op {
        Op::Matmul
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn shape(&self) -> String {
        format!("m={} n={} k={}", self.m, self.n, self.k)
    }

    fn work(&self) -> (f64, Unit) {
        // Decode reads its weight; prefill does 2mnk operations.
        if self.m == 1 {
            let bytes = self.dtype.bytes_for(self.n * self.k).unwrap_or(0);
            (bytes as f64, Unit::Gbs)
        } else {
            ((2 * self.m * self.n * self.k) as f64, Unit::Gflops)
        }
    }

    fn inputs(&self) -> MatmulInputs {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut vals = Values(self.seed);
        let x = vals.vec(m * k, self.mag_x);
        // Whole blocks: a case of another size panics here, before any backend runs.
        let raw = if self.dtype == DType::F32 {
            bytemuck::cast_slice(&vals.vec(n * k, self.mag_w)).to_vec()
        } else {
            quant::sample_blocks(self.dtype, n * k, self.seed).expect("rows of whole blocks")
        };
        MatmulInputs {
            x,
            raws: vec![Words::new(&raw); self.copies.max(1)],
        }
    }

    fn setup<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a MatmulInputs,
    ) -> Result<Self::State<'a, B>, Error> {
        let weights = inputs
            .raws
            .iter()
            .map(|raw| {
                let view = WeightView::new(self.dtype, self.n, self.k, raw.bytes())?;
                backend.prepare(view)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MatmulState {
            weights,
            y: vec![f32::NAN; self.m * self.n],
            calls: 0,
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a MatmulInputs,
        s: &mut Self::State<'a, B>,
    ) -> Result<(), Error> {
        let w = &s.weights[s.calls % s.weights.len()];
        s.calls += 1;
        backend.matmul(&inputs.x, w, &mut s.y, self.m)
    }

    fn check<'a, B: Backend>(
        &self,
        backend: &'a B,
        inputs: &'a MatmulInputs,
        s: &Self::State<'a, B>,
    ) -> Result<(), String> {
        let (m, n, k) = (self.m, self.n, self.k);
        let xd = widen(&inputs.x);
        let abs_x: Vec<f64> = xd.iter().map(|v| v.abs()).collect();
        let index = |i: usize| format!("[{}, {}]", i / n, i % n);
        if self.dtype == DType::F32 {
            let wd = widen(bytemuck::cast_slice::<u8, f32>(inputs.raws[0].bytes()));
            let mut want = vec![0.0f64; m * n];
            scalar::matmul(&xd, &wd, &mut want, m, n, k);
            let abs_w: Vec<f64> = wd.iter().map(|a| a.abs()).collect();
            let mut abs_dot = vec![0.0f64; m * n];
            scalar::matmul(&abs_x, &abs_w, &mut abs_dot, m, n, k);
            return compare(
                "y",
                &s.y,
                &want,
                |i| tolerance::matmul(k, abs_dot[i]),
                index,
            );
        }
        // The oracle: the dequantized weight in f64.
        let mut w = vec![0.0f32; n * k];
        quant::dequantize(self.dtype, inputs.raws[0].bytes(), &mut w);
        let (mut scaled, mut offset) = (vec![0.0f32; n * k], vec![0.0f32; n * k]);
        quant::dequantize_parts(self.dtype, inputs.raws[0].bytes(), &mut scaled, &mut offset);
        let parts: Vec<f64> = scaled
            .iter()
            .zip(&offset)
            .map(|(s, o)| s.abs() as f64 + o.abs() as f64)
            .collect();
        let mut want = vec![0.0f64; m * n];
        scalar::matmul(&xd, &widen(&w), &mut want, m, n, k);
        let int8 = backend.arithmetic(&s.weights[0]) == Arithmetic::Int8;
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
        let arithmetic = if int8 { "8-bit activations" } else { "f32" };
        compare(
            &format!("y ({}, {arithmetic})", self.dtype),
            &s.y,
            &want,
            |i| tol[i],
            index,
        )
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm.

/// RMSNorm of `rows` rows of `dim`, with a weight of magnitude 2.
#[derive(Clone, Debug)]
pub struct RmsNormCase {
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
    pub mag: f32,
    pub seed: u64,
}

/// An RMSNorm case's input and weight.
pub struct RmsNormInputs {
    x: Vec<f32>,
    g: Vec<f32>,
}

impl OpCase for RmsNormCase {
    type Inputs = RmsNormInputs;
    type State<'a, B: Backend + 'a> = Vec<f32>;

    fn op(&self) -> Op {
        Op::RmsNorm
    }

    fn shape(&self) -> String {
        format!("rows={} dim={}", self.rows, self.dim)
    }

    fn work(&self) -> (f64, Unit) {
        (
            (4 * (2 * self.rows * self.dim + self.dim)) as f64,
            Unit::Gbs,
        )
    }

    fn inputs(&self) -> RmsNormInputs {
        let mut vals = Values(self.seed);
        let x = vals.vec(self.rows * self.dim, self.mag);
        RmsNormInputs {
            x,
            g: vals.vec(self.dim, 2.0),
        }
    }

    fn setup<'a, B: Backend>(&self, _: &'a B, i: &'a RmsNormInputs) -> Result<Vec<f32>, Error> {
        Ok(vec![f32::NAN; i.x.len()])
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        i: &'a RmsNormInputs,
        y: &mut Vec<f32>,
    ) -> Result<(), Error> {
        backend.rmsnorm(&i.x, &i.g, y, self.eps)
    }

    fn check<'a, B: Backend>(
        &self,
        _: &'a B,
        i: &'a RmsNormInputs,
        y: &Vec<f32>,
    ) -> Result<(), String> {
        let mut want = vec![0.0f64; i.x.len()];
        scalar::rmsnorm(
            &widen(&i.x),
            &widen(&i.g),
            &mut want,
            self.dim,
            self.eps as f64,
        );
        let d = self.dim;
        compare(
            "y",
            y,
            &want,
            |i| tolerance::rmsnorm(d, want[i]),
            |i| format!("[{}, {}]", i / d, i % d),
        )
    }
}

// ---------------------------------------------------------------------------------------
// RoPE.

/// RoPE of `rows` rows of `heads` heads of `head_dim` at positions `pos..pos + rows`.
#[derive(Clone, Debug)]
pub struct RopeCase {
    pub rows: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub pos: usize,
    pub theta: f32,
    pub layout: RopeLayout,
    pub mag: f32,
    pub seed: u64,
}

/// The output of an op, and the calls made so far (an op in place works on its own output
/// again at each call).
pub struct Output {
    y: Vec<f32>,
    runs: usize,
}

impl RopeCase {
    fn params(&self) -> RopeParams {
        RopeParams {
            head_dim: self.head_dim,
            theta: self.theta,
            layout: self.layout,
        }
    }
}

impl OpCase for RopeCase {
    type Inputs = Vec<f32>;
    type State<'a, B: Backend + 'a> = Output;

    fn op(&self) -> Op {
        Op::Rope
    }

    fn shape(&self) -> String {
        format!("rows={} heads={}x{}", self.rows, self.heads, self.head_dim)
    }

    fn work(&self) -> (f64, Unit) {
        (
            (4 * 2 * self.rows * self.heads * self.head_dim) as f64,
            Unit::Gbs,
        )
    }

    fn inputs(&self) -> Vec<f32> {
        Values(self.seed).vec(self.rows * self.heads * self.head_dim, self.mag)
    }

    fn setup<'a, B: Backend>(&self, _: &'a B, x: &'a Vec<f32>) -> Result<Output, Error> {
        Ok(Output {
            y: x.clone(),
            runs: 0,
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        _: &'a Vec<f32>,
        s: &mut Output,
    ) -> Result<(), Error> {
        s.runs += 1;
        backend.rope(&mut s.y, self.rows, self.pos, &self.params())
    }

    fn check<'a, B: Backend>(&self, _: &'a B, x: &'a Vec<f32>, s: &Output) -> Result<(), String> {
        once(s.runs)?;
        let (d, row_len) = (self.head_dim, self.heads * self.head_dim);
        let mut want = widen(x);
        scalar::rope(&mut want, self.rows, self.pos, &self.params());
        // Element i of a head belongs to pair `pair(i)` (whose frequency index it is) and has
        // partner `partner(i)`.
        let half = d / 2;
        type IndexMap = fn(usize, usize) -> usize;
        let (pair, partner): (IndexMap, IndexMap) = match self.layout {
            RopeLayout::Interleaved => (|i, _| i / 2, |i, _| i ^ 1),
            RopeLayout::Neox => (|i, h| i % h, |i, h| if i < h { i + h } else { i - h }),
        };
        let tol = |i: usize| {
            let (row, j) = (i / row_len, i % d);
            let base = i - j;
            let freq = (self.theta as f64).powf(-((2 * pair(j, half)) as f64) / d as f64);
            let angle = (self.pos + row) as f64 * freq;
            tolerance::rope(
                x[i] as f64,
                x[base + partner(j, half)] as f64,
                angle,
                self.theta as f64,
            )
        };
        compare("x", &s.y, &want, tol, |i| {
            format!(
                "[row {}, head {}, {}]",
                i / row_len,
                (i % row_len) / d,
                i % d
            )
        })
    }
}

// ---------------------------------------------------------------------------------------
// Softmax.

/// Softmax of `rows` rows of `cols` scaled scores, causal or not, with every
/// `neg_inf_every`-th entry `-inf` (0: none).
#[derive(Clone, Debug)]
pub struct SoftmaxCase {
    pub rows: usize,
    pub cols: usize,
    pub scale: f32,
    pub causal: Option<usize>,
    pub mag: f32,
    pub neg_inf_every: usize,
    pub seed: u64,
}

impl SoftmaxCase {
    fn params(&self) -> SoftmaxParams {
        SoftmaxParams {
            scale: self.scale,
            causal: self.causal,
        }
    }
}

impl OpCase for SoftmaxCase {
    type Inputs = Vec<f32>;
    type State<'a, B: Backend + 'a> = Output;

    fn op(&self) -> Op {
        Op::Softmax
    }

    fn shape(&self) -> String {
        format!("rows={} cols={}", self.rows, self.cols)
    }

    fn work(&self) -> (f64, Unit) {
        ((2 * self.rows * self.cols * 4) as f64, Unit::Gbs)
    }

    fn inputs(&self) -> Vec<f32> {
        let mut x = Values(self.seed).vec(self.rows * self.cols, self.mag);
        if self.neg_inf_every > 0 {
            x.iter_mut()
                .step_by(self.neg_inf_every)
                .for_each(|v| *v = f32::NEG_INFINITY);
        }
        x
    }

    fn setup<'a, B: Backend>(&self, _: &'a B, x: &'a Vec<f32>) -> Result<Output, Error> {
        Ok(Output {
            y: x.clone(),
            runs: 0,
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        _: &'a Vec<f32>,
        s: &mut Output,
    ) -> Result<(), Error> {
        s.runs += 1;
        backend.softmax(&mut s.y, self.cols, &self.params())
    }

    fn check<'a, B: Backend>(&self, _: &'a B, x: &'a Vec<f32>, s: &Output) -> Result<(), String> {
        once(s.runs)?;
        let p = self.params();
        let cols = self.cols;
        let mut want = widen(x);
        scalar::softmax(&mut want, cols, &p);
        // Per-entry tolerances from the oracle's own quantities (see `tolerance::softmax`).
        let mut tol = vec![0.0f64; x.len()];
        for (r, (xr, tr)) in x.chunks(cols).zip(tol.chunks_mut(cols)).enumerate() {
            let visible = p.visible(r, cols);
            let sc: Vec<f64> = xr[..visible]
                .iter()
                .map(|&v| v as f64 * self.scale as f64)
                .collect();
            let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue; // the whole row must be exactly 0
            }
            let terms: Vec<f64> = sc
                .iter()
                .map(|&sj| {
                    if sj == f64::NEG_INFINITY {
                        0.0
                    } else {
                        tolerance::softmax_term(sj, m)
                    }
                })
                .collect();
            let e: Vec<f64> = sc.iter().map(|&sj| (sj - m).exp()).collect();
            let row = e.iter().zip(&terms).map(|(e, t)| e * t).sum::<f64>() / e.iter().sum::<f64>();
            let base = r * cols;
            for j in 0..visible {
                if sc[j] != f64::NEG_INFINITY {
                    tr[j] = tolerance::softmax(want[base + j], terms[j], row, visible);
                }
            }
        }
        compare(
            "p",
            &s.y,
            &want,
            |i| tol[i],
            |i| format!("[{}, {}]", i / cols, i % cols),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The gates (SwiGLU, GEGLU), add, embedding.

/// `y = act(a) b` over `len` values: SwiGLU, or GEGLU when `geglu`.
#[derive(Clone, Debug)]
pub struct GateCase {
    pub geglu: bool,
    pub len: usize,
    pub mag_a: f32,
    pub mag_b: f32,
    pub seed: u64,
}

/// Two inputs of the same length.
pub struct Pair {
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Pair {
    /// `len` values of magnitude `mag_a`, then `len` of `mag_b`, from `seed`.
    fn draw(seed: u64, len: usize, mag_a: f32, mag_b: f32) -> Pair {
        let mut vals = Values(seed);
        let a = vals.vec(len, mag_a);
        Pair {
            a,
            b: vals.vec(len, mag_b),
        }
    }
}

impl OpCase for GateCase {
    type Inputs = Pair;
    type State<'a, B: Backend + 'a> = Output;

    fn op(&self) -> Op {
        if self.geglu { Op::GeGlu } else { Op::SwiGlu }
    }

    fn shape(&self) -> String {
        format!("len={}", self.len)
    }

    fn work(&self) -> (f64, Unit) {
        ((3 * self.len * 4) as f64, Unit::Gbs)
    }

    fn inputs(&self) -> Pair {
        Pair::draw(self.seed, self.len, self.mag_a, self.mag_b)
    }

    fn setup<'a, B: Backend>(&self, _: &'a B, _: &'a Pair) -> Result<Output, Error> {
        Ok(Output {
            y: vec![f32::NAN; self.len],
            runs: 0,
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        p: &'a Pair,
        s: &mut Output,
    ) -> Result<(), Error> {
        s.runs += 1;
        match self.geglu {
            false => backend.swiglu(&p.a, &p.b, &mut s.y),
            true => backend.geglu(&p.a, &p.b, &mut s.y),
        }
    }

    fn check<'a, B: Backend>(&self, _: &'a B, p: &'a Pair, s: &Output) -> Result<(), String> {
        type Oracle = fn(&[f64], &[f64], &mut [f64]);
        let (oracle, tol): (Oracle, fn(f64, f64, f64) -> f64) = match self.geglu {
            false => (scalar::swiglu, tolerance::swiglu),
            true => (scalar::geglu, tolerance::geglu),
        };
        let mut want = vec![0.0f64; self.len];
        oracle(&widen(&p.a), &widen(&p.b), &mut want);
        compare(
            "y",
            &s.y,
            &want,
            |i| tol(p.a[i] as f64, p.b[i] as f64, want[i]),
            |i| format!("[{i}]"),
        )
    }
}

/// The residual add `y += x` over `len` values (`y` of magnitude `mag_a`, `x` of `mag_b`).
#[derive(Clone, Debug)]
pub struct AddCase {
    pub len: usize,
    pub mag_a: f32,
    pub mag_b: f32,
    pub seed: u64,
}

impl OpCase for AddCase {
    /// `a`: `y` before the call; `b`: `x`. The state's output is `y`, the sum, in place.
    type Inputs = Pair;
    type State<'a, B: Backend + 'a> = Output;

    fn op(&self) -> Op {
        Op::Add
    }

    fn shape(&self) -> String {
        format!("len={}", self.len)
    }

    fn work(&self) -> (f64, Unit) {
        ((3 * self.len * 4) as f64, Unit::Gbs)
    }

    fn inputs(&self) -> Pair {
        Pair::draw(self.seed, self.len, self.mag_a, self.mag_b)
    }

    fn setup<'a, B: Backend>(&self, _: &'a B, p: &'a Pair) -> Result<Output, Error> {
        Ok(Output {
            y: p.a.clone(),
            runs: 0,
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        p: &'a Pair,
        s: &mut Output,
    ) -> Result<(), Error> {
        s.runs += 1;
        backend.add(&mut s.y, &p.b)
    }

    fn check<'a, B: Backend>(&self, _: &'a B, p: &'a Pair, s: &Output) -> Result<(), String> {
        once(s.runs)?;
        let want: Vec<f64> =
            p.a.iter()
                .zip(&p.b)
                .map(|(&a, &b)| a as f64 + b as f64)
                .collect();
        compare(
            "y",
            &s.y,
            &want,
            |i| tolerance::add(want[i]),
            |i| format!("[{i}]"),
        )
    }
}

/// The row `token` of a `vocab × dim` F32 table.
#[derive(Clone, Debug)]
pub struct EmbeddingCase {
    pub vocab: usize,
    pub dim: usize,
    pub token: usize,
    pub seed: u64,
}

/// An embedding case's prepared table and output row.
pub struct EmbeddingState<W> {
    prepared: W,
    y: Vec<f32>,
}

impl OpCase for EmbeddingCase {
    type Inputs = Vec<f32>;
    type State<'a, B: Backend + 'a> = EmbeddingState<B::Weight<'a>>;

    fn op(&self) -> Op {
        Op::Embedding
    }

    fn shape(&self) -> String {
        format!("vocab={} dim={}", self.vocab, self.dim)
    }

    fn work(&self) -> (f64, Unit) {
        ((2 * self.dim * 4) as f64, Unit::Gbs)
    }

    fn inputs(&self) -> Vec<f32> {
        Values(self.seed).vec(self.vocab * self.dim, 1.0)
    }

    fn setup<'a, B: Backend>(
        &self,
        backend: &'a B,
        table: &'a Vec<f32>,
    ) -> Result<Self::State<'a, B>, Error> {
        let prepared = backend.prepare(WeightView::f32(table, self.vocab, self.dim)?)?;
        Ok(EmbeddingState {
            prepared,
            y: vec![f32::NAN; self.dim],
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        _: &'a Vec<f32>,
        s: &mut Self::State<'a, B>,
    ) -> Result<(), Error> {
        backend.embedding(&s.prepared, self.token, &mut s.y)
    }

    fn check<'a, B: Backend>(
        &self,
        _: &'a B,
        table: &'a Vec<f32>,
        s: &Self::State<'a, B>,
    ) -> Result<(), String> {
        let want = widen(&table[self.token * self.dim..][..self.dim]);
        compare("y", &s.y, &want, |_| 0.0, |i| format!("[{i}]"))
    }
}

// ---------------------------------------------------------------------------------------
// Attention.

/// Attention of `m` query rows at positions `pos..pos + m` over the cache `0..pos + m`:
/// `n_kv_heads × group` query heads of `head_dim`, the scale `scale_factor / sqrt(head_dim)`,
/// an optional sliding window.
#[derive(Clone, Debug)]
pub struct AttentionCase {
    pub m: usize,
    pub pos: usize,
    pub n_kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub mag_qk: f32,
    pub mag_v: f32,
    /// Times `1 / sqrt(head_dim)`.
    pub scale_factor: f32,
    pub window: Option<usize>,
    pub seed: u64,
}

/// An attention case's queries and cache.
pub struct AttentionInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// An attention case's output and score scratch.
pub struct AttentionState {
    out: Vec<f32>,
    scores: Vec<f32>,
}

impl AttentionCase {
    fn params(&self) -> AttentionParams {
        AttentionParams {
            m: self.m,
            pos: self.pos,
            n_heads: self.n_kv_heads * self.group,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: self.scale_factor * AttentionParams::standard_scale(self.head_dim),
            window: self.window,
        }
    }

    /// The first position query row `i` sees, by llama.cpp's rule (`t` is masked when
    /// `p - t >= window`), not by the code under test.
    fn first_visible(&self, i: usize) -> usize {
        let q_pos = self.pos + i;
        (0..=q_pos)
            .find(|&t| self.window.is_none_or(|w| q_pos - t < w))
            .expect("a query sees itself")
    }
}

impl OpCase for AttentionCase {
    type Inputs = AttentionInputs;
    type State<'a, B: Backend + 'a> = AttentionState;

    fn op(&self) -> Op {
        Op::Attention
    }

    fn shape(&self) -> String {
        let heads = self.n_kv_heads * self.group;
        format!(
            "m={} pos={} heads={heads}x{} kv={}",
            self.m, self.pos, self.head_dim, self.n_kv_heads
        )
    }

    fn work(&self) -> (f64, Unit) {
        let heads = self.n_kv_heads * self.group;
        let seen: usize = (0..self.m)
            .map(|i| self.pos + i + 1 - self.first_visible(i))
            .sum();
        if self.m == 1 {
            // Decode reads its keys and values.
            let kv = 2 * seen * self.n_kv_heads * self.head_dim * 4;
            (kv as f64, Unit::Gbs)
        } else {
            // q·k and p·v: 2 operations per pair each.
            ((4 * heads * self.head_dim * seen) as f64, Unit::Gflops)
        }
    }

    fn inputs(&self) -> AttentionInputs {
        let (hd, kvh) = (self.head_dim, self.n_kv_heads);
        let heads = kvh * self.group;
        let t_max = self.pos + self.m;
        let mut vals = Values(self.seed);
        let q = vals.vec(self.m * heads * hd, self.mag_qk);
        let k = vals.vec(t_max * kvh * hd, self.mag_qk);
        let v = vals.vec(t_max * kvh * hd, self.mag_v);
        AttentionInputs { q, k, v }
    }

    fn setup<'a, B: Backend>(
        &self,
        _: &'a B,
        i: &'a AttentionInputs,
    ) -> Result<AttentionState, Error> {
        Ok(AttentionState {
            out: vec![f32::NAN; i.q.len()],
            scores: vec![0.0f32; self.pos + self.m],
        })
    }

    fn run<'a, B: Backend>(
        &self,
        backend: &'a B,
        i: &'a AttentionInputs,
        s: &mut AttentionState,
    ) -> Result<(), Error> {
        backend.attention(&i.q, &i.k, &i.v, &mut s.out, &mut s.scores, &self.params())
    }

    fn check<'a, B: Backend>(
        &self,
        _: &'a B,
        i: &'a AttentionInputs,
        st: &AttentionState,
    ) -> Result<(), String> {
        let p = self.params();
        let (hd, kvh, heads) = (self.head_dim, self.n_kv_heads, p.n_heads);
        let (q, k, v) = (&i.q, &i.k, &i.v);
        // The oracle in f64, and each element's tolerance from the same quantities.
        let scale = p.scale as f64;
        let (mut want, mut tol) = (vec![0.0f64; st.out.len()], vec![0.0f64; st.out.len()]);
        let kv_dim = kvh * hd;
        for i in 0..self.m {
            let lo = self.first_visible(i);
            let t_len = self.pos + i + 1 - lo;
            for h in 0..heads {
                let qh = &q[(i * heads + h) * hd..][..hd];
                let off = (h / self.group) * hd;
                let row = |t: usize, x: &[f32]| -> Vec<f64> {
                    widen(&x[(lo + t) * kv_dim + off..][..hd])
                };
                let s: Vec<f64> = (0..t_len)
                    .map(|t| {
                        row(t, k)
                            .iter()
                            .zip(qh)
                            .map(|(a, &b)| a * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let abs_s: Vec<f64> = (0..t_len)
                    .map(|t| {
                        row(t, k)
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
        compare(
            "out",
            &st.out,
            &want,
            |i| tol[i],
            |i| {
                format!(
                    "[row {}, head {}, {}]",
                    i / (heads * hd),
                    (i / hd) % heads,
                    i % hd
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScalarBackend;

    /// Every fixed case of the smallest set passes its own check on the scalar backend, and
    /// an output moved by more than its tolerance fails it.
    #[test]
    fn the_table_checks_itself_and_catches_a_wrong_output() {
        let mut notes = Vec::new();
        let cases = model_cases(&Op::ALL, &[ShapeSet::SmolLm], &[DType::Q4_1], &mut notes);
        assert!(notes.is_empty(), "{notes:?}");
        let ops: std::collections::HashSet<Op> = cases.iter().map(|(_, c)| c.op()).collect();
        assert_eq!(ops.len(), Op::ALL.len(), "every op has cases");
        let b = ScalarBackend::new();
        for (label, case) in &cases {
            // The large matmuls and prompt attention take the f64 oracle seconds: check the
            // cheap ones here (the conformance suite draws every op at random shapes).
            let (work, _) = case.work();
            if matches!(case, Case::Matmul(c) if c.m > 1) || work > 5e7 {
                continue;
            }
            let mut c = case.clone();
            if let Case::Matmul(mm) = &mut c {
                mm.copies = 1;
            }
            struct Verify<'a>(&'a ScalarBackend);
            impl Visit for Verify<'_> {
                type Out = Result<(), String>;
                fn visit<C: OpCase>(self, c: &C) -> Result<(), String> {
                    verify(self.0, c)
                }
            }
            c.visit(Verify(&b))
                .unwrap_or_else(|e| panic!("{label} {}: {e}", c.shape()));
        }
        // One wrong element is caught.
        let case = RmsNormCase {
            rows: 2,
            dim: 33,
            eps: 1e-5,
            mag: 1.0,
            seed: 3,
        };
        let inputs = case.inputs();
        let mut y = case.setup(&b, &inputs).unwrap();
        case.run(&b, &inputs, &mut y).unwrap();
        case.check(&b, &inputs, &y).unwrap();
        y[40] *= 1.0 + 1e-5;
        let e = case.check(&b, &inputs, &y).unwrap_err();
        assert!(e.contains("y[1, 7]"), "{e}");
    }
}
