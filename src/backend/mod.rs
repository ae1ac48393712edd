//! The [`Backend`] trait and the built-in CPU backends.
//!
//! A backend owns its thread pool, scratch space and kernel variant; every op is a method
//! on `&self` that reads caller-owned f32 slices and writes into caller-owned, preallocated
//! ones. Weights arrive as GGUF stores them ([`WeightView`]) and are turned once into the
//! backend's own prepared type ([`Backend::Weight`]).
//!
//! Every built-in op validates its shapes with the functions of [`check`] before calling a
//! kernel, and returns [`Error::Shape`] naming the op and the shapes on a mismatch. A backend
//! written outside this crate should call them too; the conformance suite checks that it does.

mod blocked;
pub mod check;
pub mod mixed;
mod scalar;
mod simd;
mod variant;
mod weight;

pub use blocked::BlockedBackend;
pub use chord_kernels::scalar::{GELU_2_SQRT_2_OVER_PI, GELU_COEF_A};
pub use chord_kernels::{RopeLayout, RopeParams, SoftmaxParams};
pub use mixed::{ActivationOps, Mixed};
pub use scalar::ScalarBackend;
pub use simd::{Mode, SimdBackend, SimdWeight};
pub use variant::{BackendSpec, Variant};
pub use weight::{DType, F32Weight, WeightView};

/// An error from a backend op or from building a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Slice lengths or dimensions that do not fit together.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A parameter outside its domain (an odd head size, a non-positive scale...).
    #[error("{op}: invalid parameter: {detail}")]
    Param { op: &'static str, detail: String },
    /// A weight format this backend cannot compute on.
    #[error("{backend}: {op} does not support {dtype:?} weights")]
    Unsupported {
        backend: String,
        op: Op,
        dtype: DType,
    },
    /// A backend that cannot be built here (a SIMD level this CPU lacks, no thread pool).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

/// The ops of the [`Backend`] trait, for [`Backend::supports`] and for labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Matmul,
    RmsNorm,
    Rope,
    Softmax,
    SwiGlu,
    GeGlu,
    Add,
    Embedding,
    /// The attention composite (its default body, or a backend's own).
    Attention,
}

impl Op {
    /// Every op, in the order benchmark tables list them.
    pub const ALL: [Op; 9] = [
        Op::Matmul,
        Op::RmsNorm,
        Op::Rope,
        Op::Softmax,
        Op::SwiGlu,
        Op::GeGlu,
        Op::Add,
        Op::Embedding,
        Op::Attention,
    ];

    /// Lower-case name as the CLI takes and prints it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul",
            Op::RmsNorm => "rmsnorm",
            Op::Rope => "rope",
            Op::Softmax => "softmax",
            Op::SwiGlu => "swiglu",
            Op::GeGlu => "geglu",
            Op::Add => "add",
            Op::Embedding => "embedding",
            Op::Attention => "attention",
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Op::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
                format!("unknown op '{s}': expected one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// How a backend runs an op on weights of a dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// A kernel computes on this format directly.
    Native,
    /// The weights are dequantized to f32 when prepared, then computed on in f32.
    Dequantized,
    /// The backend cannot run this op on this format.
    No,
}

/// The arithmetic a prepared weight's matmul runs in: what its speed is set against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// f32 multiply-adds (the FMA roof).
    F32,
    /// 8-bit integer dot products on quantized activations (the 8-bit roof).
    Int8,
}

/// A compute backend: the ops a llama-family block needs, on host f32 activations.
///
/// Conventions shared by every method:
/// - matrices are row-major; `x (m, k)` means `m` rows of `k` contiguous values;
/// - outputs are caller-owned and preallocated; ops never allocate per call;
/// - shapes are validated on entry (see [`check`]) and a mismatch is an [`Error::Shape`].
///
/// A backend implements its [`name`](Backend::name), how it [`prepare`](Backend::prepare)s
/// weights, and the core ops: [`matmul`](Backend::matmul), [`rmsnorm`](Backend::rmsnorm),
/// [`rope`](Backend::rope), [`softmax`](Backend::softmax), [`swiglu`](Backend::swiglu),
/// [`geglu`](Backend::geglu), [`add`](Backend::add) and [`embedding`](Backend::embedding). Everything else has a default:
/// [`threads`](Backend::threads) (one), [`supports`](Backend::supports) and
/// [`weight_dims`](Backend::weight_dims) (read from the prepared weight's type, see
/// [`PreparedWeight`]), and the composites [`matmuls`](Backend::matmuls) and
/// [`attention`](Backend::attention), built from the core, that a backend overrides only where
/// its own version pays. A backend that wraps another forwards only what it changes.
pub trait Backend: Send + Sync {
    /// A weight matrix prepared for this backend's kernels: borrowed from the file where the
    /// layout allows, repacked or dequantized where the kernels need it.
    type Weight<'w>: PreparedWeight + Send + Sync
    where
        Self: 'w;

    /// The name of the backend and the kernel variant it runs, e.g. `simd-avx512`.
    fn name(&self) -> String;

    /// Threads the backend's ops may use. The default is one.
    fn threads(&self) -> usize {
        1
    }

    /// Whether `op` runs natively on `dtype` weights, after dequantization, or not at all.
    /// The default answers for the weight type ([`PreparedWeight::support`]).
    fn supports<'a>(&'a self, _op: Op, dtype: DType) -> Support {
        <Self::Weight<'a> as PreparedWeight>::support(dtype)
    }

    /// Prepares a weight `(rows, cols)` for [`matmul`](Backend::matmul) and
    /// [`embedding`](Backend::embedding).
    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<Self::Weight<'w>, Error>;

    /// `(rows, cols)` of a prepared weight: `(n, k)` of a matmul, `(vocab, dim)` of a table.
    /// The default asks the weight ([`PreparedWeight::dims`]).
    fn weight_dims(&self, w: &Self::Weight<'_>) -> (usize, usize) {
        w.dims()
    }

    /// Whether a prepared weight still reads the bytes of the view it was prepared from.
    /// When it does not (it was repacked or dequantized into memory of its own), the caller
    /// may release those bytes: a model drops the file's pages behind them, so the process
    /// holds each weight once. The default, `true`, never lets a caller release them.
    fn borrows_view(&self, _w: &Self::Weight<'_>) -> bool {
        true
    }

    /// Called once every weight of a model is prepared ([`Model::load`](crate::model::Model::load)
    /// calls it): a backend may finish preparing them in the background, as long as the
    /// weights stay usable meanwhile. The SIMD backend moves them onto huge pages there
    /// (see `chord_kernels::arena`). The default does nothing.
    fn prepared(&self) {}

    /// Waits for the work [`prepared`](Backend::prepared) started, so that what follows
    /// runs on the weights as they will stay (benchmarks call it before timing). The
    /// default does nothing.
    fn settle(&self) {}

    /// The arithmetic [`matmul`](Backend::matmul) runs on this weight in (for profiles and
    /// benchmarks). The default is f32.
    fn arithmetic(&self, _w: &Self::Weight<'_>) -> Arithmetic {
        Arithmetic::F32
    }

    /// `y (m, n) = x (m, k) · Wᵀ`, `W (n, k)`.
    fn matmul(&self, x: &[f32], w: &Self::Weight<'_>, y: &mut [f32], m: usize)
    -> Result<(), Error>;

    /// `ys[i] (m, n_i) = x (m, k) · W_iᵀ` for several weights that read the same input (a
    /// layer's q, k and v projections; gate and up). A backend may prepare `x` once for all
    /// of them (quantize it, pack it) and run them as one parallel job. The default body calls
    /// [`matmul`](Backend::matmul) for each.
    fn matmuls(
        &self,
        x: &[f32],
        ws: &[&Self::Weight<'_>],
        ys: &mut [&mut [f32]],
        m: usize,
    ) -> Result<(), Error> {
        if ws.len() != ys.len() {
            return Err(Error::Shape {
                op: "matmuls",
                detail: format!("{} weights but {} outputs", ws.len(), ys.len()),
            });
        }
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            self.matmul(x, w, y, m)?;
        }
        Ok(())
    }

    /// RMSNorm of each row of `x (rows, dim)` into `y (rows, dim)`, `weight (dim,)`:
    /// `y = x / sqrt(mean(x²) + eps) * weight`.
    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error>;

    /// Rotary embedding in place of `x (rows, n_heads * head_dim)`, row `r` at position `pos + r`.
    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error>;

    /// Softmax in place of each row of `cols` values of `x`, scaled and masked as `p` says.
    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error>;

    /// `y = silu(a) * b`, elementwise (Shazeer 2020, "GLU Variants Improve Transformer").
    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error>;

    /// `y = gelu(a) * b`, elementwise, GELU in its tanh approximation (GEGLU, Shazeer 2020;
    /// Gemma's feed-forward): the formula and its reference are at
    /// [`chord_kernels::scalar::geglu`].
    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error>;

    /// `y += x`, elementwise (the residual connection).
    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error>;

    /// Copies row `token` of the table `(vocab, dim)` into `y (dim,)` as f32.
    fn embedding(&self, table: &Self::Weight<'_>, token: usize, y: &mut [f32])
    -> Result<(), Error>;

    /// Causal grouped-query attention of `m` query rows over a KV cache.
    ///
    /// `q (m, n_heads * head_dim)`: row `i` is the query at position `p.pos + i`.
    /// `k_cache`, `v_cache`: `(≥ p.pos + m, n_kv_heads * head_dim)`, rows by position, holding
    /// the keys and values of positions `0 .. p.pos + m`. Query head `h` reads kv head
    /// `h / (n_heads / n_kv_heads)`. `out (m, n_heads * head_dim)` receives
    /// `softmax(p.scale · q·kᵀ) · v` per row and head over the positions the query sees (all
    /// up to its own, or the last `p.window` of them); `scores (p.pos + m,)` is scratch.
    ///
    /// The default body uses [`softmax`](Backend::softmax) and plain dot products.
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error> {
        default_attention(self, q, k_cache, v_cache, out, scores, p)
    }
}

/// What a backend's prepared weight type tells about itself.
pub trait PreparedWeight {
    /// `(rows, cols)`: `(n, k)` of a matmul, `(vocab, dim)` of a table.
    fn dims(&self) -> (usize, usize);

    /// How a weight of `dtype`, prepared as this type, is computed on.
    fn support(dtype: DType) -> Support
    where
        Self: Sized;
}

/// [`Backend::attention`]'s default body, on `b`'s [`softmax`](Backend::softmax) and plain
/// dot products: for a backend that overrides `attention` and still wants the composite
/// (a wrapper that changes softmax, a mixed backend).
pub fn default_attention<B: Backend + ?Sized>(
    b: &B,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    scores: &mut [f32],
    p: &AttentionParams,
) -> Result<(), Error> {
    check::attention(
        q.len(),
        k_cache.len(),
        v_cache.len(),
        out.len(),
        scores.len(),
        p,
    )?;
    let (hd, kv_dim) = (p.head_dim, p.n_kv_heads * p.head_dim);
    let group = p.n_heads / p.n_kv_heads;
    for i in 0..p.m {
        let t_len = p.pos + i + 1;
        let lo = p.first_visible(p.pos + i);
        for h in 0..p.n_heads {
            let qh = &q[(i * p.n_heads + h) * hd..][..hd];
            let kv_off = (h / group) * hd;
            let s = &mut scores[..t_len - lo];
            for (t, sc) in (lo..).zip(s.iter_mut()) {
                *sc = dot(qh, &k_cache[t * kv_dim + kv_off..][..hd]);
            }
            b.softmax(
                s,
                t_len - lo,
                &SoftmaxParams {
                    scale: p.scale,
                    causal: None,
                },
            )?;
            let o = &mut out[(i * p.n_heads + h) * hd..][..hd];
            o.fill(0.0);
            for (t, &w) in (lo..).zip(s.iter()) {
                for (oj, &vj) in o.iter_mut().zip(&v_cache[t * kv_dim + kv_off..][..hd]) {
                    *oj += w * vj;
                }
            }
        }
    }
    Ok(())
}

/// The shape of an [`Backend::attention`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Query rows.
    pub m: usize,
    /// Position of the first query row; the cache holds positions `0 .. pos + m`.
    pub pos: usize,
    pub n_heads: usize,
    /// Divides `n_heads`.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The factor on `q · k` before the softmax: `1 / sqrt(head_dim)` in most models
    /// (Vaswani et al. 2017), [`AttentionParams::standard_scale`].
    pub scale: f32,
    /// Sliding-window attention (Beltagy et al. 2020; Gemma's local layers): the query at
    /// position `p` sees positions `p + 1 - window ..= p` only, as llama.cpp's
    /// `LLAMA_SWA_TYPE_STANDARD` masks `t` when `p - t >= window`. `None`: all of `0 ..= p`.
    pub window: Option<usize>,
}

impl AttentionParams {
    /// `1 / sqrt(head_dim)`.
    pub fn standard_scale(head_dim: usize) -> f32 {
        1.0 / (head_dim as f32).sqrt()
    }

    /// The first position the query at position `p` sees.
    pub fn first_visible(&self, p: usize) -> usize {
        chord_kernels::first_visible(p, self.window)
    }
}

/// Dot product in eight lane-parallel partial sums (which the compiler vectorises), combined
/// in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Builds the rayon pool a backend owns.
pub(crate) fn thread_pool(threads: usize) -> Result<rayon::ThreadPool, Error> {
    if threads == 0 {
        return Err(Error::Unavailable(
            "a backend needs at least one thread".into(),
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("chord-{i}"))
        .build()
        .map_err(|e| Error::Unavailable(format!("cannot start {threads} threads: {e}")))
}
