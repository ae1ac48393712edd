//! `chord bench kernels`: every op × backend × shape × thread count, timed, with each
//! figure set against the roof measured in the same run.
//!
//! Matmul with `m > 1` is compute-bound and reported in GFLOP/s against the FMA peak. Matmul
//! with `m = 1` (decode) streams its weights and is reported as GB/s of weights read against
//! the read bandwidth; its weights are cold: the row cycles through enough copies to exceed
//! any last-level cache, as a model's layers would. The per-row ops report
//! the bytes they read and write in GB/s against the same read roof (rows that fit in cache
//! can exceed 100%).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use chord_kernels::quant;
use chord_kernels::simd::repackable;

use super::{Roof, Timing, time};
use crate::backend::{
    Backend, DType, Mode, Op, RopeLayout, RopeParams, SoftmaxParams, Support, Variant, WeightView,
};

/// Weight bytes a cold decode row cycles through: as much as the read roof streams. The
/// guest reports a 32 MiB L3, but the host's may be several times larger (3D V-cache parts
/// hold 96 MiB per CCD): 256 MiB of copies measured 30% above the roof here, 1 GiB does not.
const COLD_BYTES: usize = 1 << 30;

/// Something `chord bench kernels` can time: a built-in backend variant, or the
/// `matrixmultiply` crate as the matmul baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// A chord backend and its kernel variant.
    Chord(Variant),
    /// `matrixmultiply::sgemm` on one thread (matmul only).
    MatrixMultiply,
}

impl Contender {
    /// Every variant this CPU runs, then the baseline.
    pub fn all() -> Vec<Contender> {
        Variant::available()
            .into_iter()
            .map(Contender::Chord)
            .chain([Contender::MatrixMultiply])
            .collect()
    }
}

impl fmt::Display for Contender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contender::Chord(v) => v.fmt(f),
            Contender::MatrixMultiply => f.write_str("matrixmultiply"),
        }
    }
}

impl FromStr for Contender {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "matrixmultiply" {
            return Ok(Contender::MatrixMultiply);
        }
        let v: Variant = s
            .parse()
            .map_err(|e: String| format!("{e}, or matrixmultiply"))?;
        if !v.is_supported() {
            return Err(format!("this CPU does not run the {v} kernels"));
        }
        Ok(Contender::Chord(v))
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

    fn name(self) -> &'static str {
        match self {
            ShapeSet::SmolLm => "smollm",
            ShapeSet::TinyLlama => "tinyllama",
            ShapeSet::Square => "square",
        }
    }

    /// `(dim, ffn, heads, head_dim, vocab)` of a model set.
    fn model(self) -> Option<(usize, usize, usize, usize, usize)> {
        match self {
            ShapeSet::SmolLm => Some((576, 1536, 9, 64, 49152)),
            ShapeSet::TinyLlama => Some((2048, 5632, 32, 64, 32000)),
            ShapeSet::Square => None,
        }
    }
}

impl FromStr for ShapeSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ShapeSet::ALL
            .into_iter()
            .find(|set| set.name() == s)
            .ok_or_else(|| format!("unknown shape set '{s}': expected smollm, tinyllama or square"))
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub ops: Vec<Op>,
    pub contenders: Vec<Contender>,
    pub shapes: Vec<ShapeSet>,
    pub threads: Vec<usize>,
    /// Weight formats of the model-shape matmul rows (the square ones are F32 only).
    pub dtypes: Vec<DType>,
    /// Modes of the SIMD backend's quantized matmul rows.
    pub modes: Vec<Mode>,
    /// Time spent timing one row (after a warm-up call).
    pub budget: Duration,
}

/// The unit of a row's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// One measured row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: Op,
    pub backend: String,
    pub shape: String,
    /// The weight format of a matmul row (`F32` for the other ops).
    pub dtype: String,
    /// The SIMD backend's mode on quantized weights, where it matters.
    pub mode: Option<&'static str>,
    pub threads: usize,
    #[serde(flatten)]
    pub timing: Timing,
    /// GFLOP/s or GB/s, as `unit` says.
    pub rate: f64,
    pub unit: Unit,
    /// `rate` as a percentage of the roof of its unit at this thread count.
    pub roof_pct: f64,
}

impl Serialize for Op {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One timed case before the backend runs it.
struct Case {
    op: Op,
    shape: String,
    /// FLOP (Gflops rows) or bytes (Gbs rows) per call.
    work: f64,
    unit: Unit,
    kind: Kind,
}

enum Kind {
    Matmul {
        m: usize,
        n: usize,
        k: usize,
        dtype: DType,
    },
    RmsNorm {
        rows: usize,
        dim: usize,
    },
    Rope {
        rows: usize,
        heads: usize,
        head_dim: usize,
    },
    Softmax {
        rows: usize,
        cols: usize,
    },
    /// SwiGLU, or GEGLU when `gelu`.
    Gate {
        gelu: bool,
        len: usize,
    },
    Add {
        len: usize,
    },
}

fn cases(ops: &[Op], sets: &[ShapeSet], dtypes: &[DType], notes: &mut Vec<String>) -> Vec<Case> {
    let mut out = Vec::new();
    let has = |op| ops.contains(&op);
    for &set in sets {
        let name = set.name();
        if has(Op::Matmul) {
            let mut mm = |label: &str, m: usize, n: usize, k: usize, dtype: DType| {
                // Decode rows: the weight's bytes read; prefill rows: 2mnk operations (the
                // unit of a fast-mode row is set when it runs).
                let (work, unit) = if m == 1 {
                    (
                        dtype.bytes_for(n * k).expect("whole blocks") as f64,
                        Unit::Gbs,
                    )
                } else {
                    ((2 * m * n * k) as f64, Unit::Gflops)
                };
                let shape = [name, label, &format!("m={m} n={n} k={k}")]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" ");
                out.push(Case {
                    op: Op::Matmul,
                    shape,
                    work,
                    unit,
                    kind: Kind::Matmul { m, n, k, dtype },
                });
            };
            match set.model() {
                Some((dim, ffn, _, _, vocab)) => {
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
        let Some((dim, ffn, heads, head_dim, _)) = set.model() else {
            continue;
        };
        for rows in [1, 512] {
            let f = |bytes: usize| (bytes * 4) as f64;
            if has(Op::RmsNorm) {
                let kind = Kind::RmsNorm { rows, dim };
                out.push(Case {
                    op: Op::RmsNorm,
                    shape: format!("{name} rows={rows} dim={dim}"),
                    work: f(2 * rows * dim + dim),
                    unit: Unit::Gbs,
                    kind,
                });
            }
            if has(Op::Rope) {
                let kind = Kind::Rope {
                    rows,
                    heads,
                    head_dim,
                };
                let shape = format!("{name} rows={rows} heads={heads}x{head_dim}");
                out.push(Case {
                    op: Op::Rope,
                    shape,
                    work: f(2 * rows * heads * head_dim),
                    unit: Unit::Gbs,
                    kind,
                });
            }
            for (op, gelu) in [(Op::SwiGlu, false), (Op::GeGlu, true)] {
                if has(op) {
                    let len = rows * ffn;
                    out.push(Case {
                        op,
                        shape: format!("{name} rows={rows} ffn={ffn}"),
                        work: f(3 * len),
                        unit: Unit::Gbs,
                        kind: Kind::Gate { gelu, len },
                    });
                }
            }
            if has(Op::Add) {
                let len = rows * dim;
                out.push(Case {
                    op: Op::Add,
                    shape: format!("{name} rows={rows} dim={dim}"),
                    work: f(3 * len),
                    unit: Unit::Gbs,
                    kind: Kind::Add { len },
                });
            }
        }
        if has(Op::Softmax) {
            // One row of `dim` scores, and decode attention: every head over a context of `dim`.
            for rows in [1, heads] {
                let kind = Kind::Softmax { rows, cols: dim };
                out.push(Case {
                    op: Op::Softmax,
                    shape: format!("{name} rows={rows} cols={dim}"),
                    work: (2 * rows * dim * 4) as f64,
                    unit: Unit::Gbs,
                    kind,
                });
            }
        }
    }
    out
}

/// Deterministic values in `[-1, 1)`.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i.wrapping_mul(2_654_435_761).wrapping_add(seed * 40_503)) % 65_521) as f32 / 32_760.5
                - 1.0
        })
        .collect()
}

/// Copies of a weight of `bytes` needed to keep a decode row cold.
fn cold_copies(bytes: usize) -> usize {
    COLD_BYTES.div_ceil(bytes).max(1)
}

fn time_case<B: Backend>(b: &B, case: &Case, budget: Duration) -> Result<Timing, crate::Error> {
    const MIN: usize = 5;
    Ok(match case.kind {
        Kind::Matmul { m, n, k, dtype } => {
            let bytes = dtype.bytes_for(n * k).expect("whole blocks");
            let copies = if m == 1 { cold_copies(bytes) } else { 1 };
            let raw: Vec<Vec<u8>> = if dtype == DType::F32 {
                (0..copies)
                    .map(|c| bytemuck::cast_slice(&values(n * k, c)).to_vec())
                    .collect()
            } else {
                // Formats chord has no quantizer for too; copies of one sample are as cold.
                let one = quant::sample_blocks(dtype, n * k, 1).expect("whole blocks");
                vec![one; copies]
            };
            let ws = raw
                .iter()
                .map(|w| b.prepare(WeightView::new(dtype, n, k, w)?))
                .collect::<Result<Vec<_>, _>>()?;
            let x = values(m * k, 99);
            let mut y = vec![0.0; m * n];
            let mut i = 0;
            time(budget, MIN, || {
                b.matmul(&x, &ws[i % copies], &mut y, m)
                    .expect("shapes checked");
                i += 1;
            })
        }
        Kind::RmsNorm { rows, dim } => {
            let (x, g, mut y) = (values(rows * dim, 1), values(dim, 2), vec![0.0; rows * dim]);
            time(budget, MIN, || {
                b.rmsnorm(&x, &g, &mut y, 1e-5).expect("shapes checked")
            })
        }
        Kind::Rope {
            rows,
            heads,
            head_dim,
        } => {
            let mut x = values(rows * heads * head_dim, 3);
            let p = RopeParams {
                head_dim,
                theta: 10_000.0,
                layout: RopeLayout::Interleaved,
            };
            time(budget, MIN, || {
                b.rope(&mut x, rows, 100, &p).expect("shapes checked")
            })
        }
        Kind::Softmax { rows, cols } => {
            let mut x = values(rows * cols, 4);
            let p = SoftmaxParams {
                scale: 0.125,
                causal: None,
            };
            time(budget, MIN, || {
                b.softmax(&mut x, cols, &p).expect("shapes checked")
            })
        }
        Kind::Gate { gelu, len } => {
            let (a, g, mut y) = (values(len, 5), values(len, 6), vec![0.0; len]);
            time(budget, MIN, || {
                match gelu {
                    false => b.swiglu(&a, &g, &mut y),
                    true => b.geglu(&a, &g, &mut y),
                }
                .expect("shapes checked")
            })
        }
        Kind::Add { len } => {
            let (x, mut y) = (values(len, 7), values(len, 8));
            time(budget, MIN, || b.add(&mut y, &x).expect("shapes checked"))
        }
    })
}

/// `y (m, n) = x (m, k) · W (n, k)ᵀ` with `matrixmultiply::sgemm` on one thread: the
/// baseline of the matmul rows, reading `W` through strides as a column-major `k × n`.
pub fn matrixmultiply_matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(
        x.len() == m * k && w.len() == n * k && y.len() == m * n,
        "matrixmultiply_matmul: shapes"
    );
    // SAFETY: x is m × k (row stride k), W is read as k × n with row stride 1 and column
    // stride k (it is n rows of k), y is m × n (row stride n); the lengths were checked.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Times [`matrixmultiply_matmul`] on a matmul case, cold copies for decode as for chord's
/// own rows.
fn time_matrixmultiply(m: usize, n: usize, k: usize, budget: Duration) -> Timing {
    let copies = if m == 1 { cold_copies(n * k * 4) } else { 1 };
    let ws: Vec<Vec<f32>> = (0..copies).map(|c| values(n * k, c)).collect();
    let x = values(m * k, 99);
    let mut y = vec![0.0f32; m * n];
    let mut i = 0;
    time(budget, 5, || {
        matrixmultiply_matmul(&x, &ws[i % copies], &mut y, m, n, k);
        i += 1;
    })
}

/// Runs the table. `roofs` must hold a roof for every thread count in `cfg.threads`;
/// `on_row` sees each row as it is measured (for progress output). Returns the rows and
/// notes on the rows not run (a backend that dequantizes a format at load runs it as F32).
pub fn run(
    cfg: &Config,
    roofs: &[Roof],
    mut on_row: impl FnMut(&Row),
) -> Result<(Vec<Row>, Vec<String>), crate::Error> {
    let mut notes: Vec<String> = Vec::new();
    let cases = cases(&cfg.ops, &cfg.shapes, &cfg.dtypes, &mut notes);
    let mut rows = Vec::new();
    let mut note = |s: String| {
        if !notes.contains(&s) {
            notes.push(s);
        }
    };
    for &threads in &cfg.threads {
        let roof = roofs
            .iter()
            .find(|r| r.threads == threads)
            .expect("a roof per thread count");
        for &contender in &cfg.contenders {
            // The scalar backend and the baseline run on one thread only.
            let single = matches!(
                contender,
                Contender::Chord(Variant::Scalar) | Contender::MatrixMultiply
            );
            if single && threads != 1 {
                continue;
            }
            for case in &cases {
                let dtype = match case.kind {
                    Kind::Matmul { dtype, .. } => dtype,
                    _ => DType::F32,
                };
                let support = match contender {
                    Contender::Chord(v) => {
                        crate::with_variant!(v, 1, Mode::Exact, b => b.supports(case.op, dtype))
                    }
                    Contender::MatrixMultiply if dtype == DType::F32 => Support::Native,
                    Contender::MatrixMultiply => continue,
                };
                if support != Support::Native {
                    note(format!(
                        "{contender}: supports(matmul, {dtype}) = {support:?}: not timed (a weight dequantized when prepared runs as the F32 rows do)"
                    ));
                    continue;
                }
                // The modes that change this row: quantized matmuls on the SIMD backend.
                let modes: Vec<Option<Mode>> = match contender {
                    Contender::Chord(Variant::Simd(_)) if dtype != DType::F32 => cfg
                        .modes
                        .iter()
                        .filter(|&&mode| {
                            let differs = mode == Mode::Exact || repackable(dtype);
                            if !differs {
                                note(format!(
                                    "fast mode computes {dtype} as exact mode does: no fast row"
                                ));
                            }
                            differs
                        })
                        .map(|&mode| Some(mode))
                        .collect(),
                    _ => vec![None],
                };
                for mode in modes {
                    let timing = match contender {
                        Contender::Chord(v) => {
                            let mode = mode.unwrap_or(Mode::Exact);
                            crate::with_variant!(v, threads, mode, b => time_case(&b, case, cfg.budget)?)
                        }
                        Contender::MatrixMultiply => match case.kind {
                            Kind::Matmul { m, n, k, .. } => {
                                time_matrixmultiply(m, n, k, cfg.budget)
                            }
                            _ => continue,
                        },
                    };
                    // Fast mode's prefill is integer arithmetic, set against the 8-bit roof.
                    let unit = match (case.unit, mode) {
                        (Unit::Gflops, Some(Mode::Fast)) => Unit::Gops,
                        (u, _) => u,
                    };
                    let rate = case.work / timing.median_s / 1e9;
                    let roof_rate = match unit {
                        Unit::Gflops => roof.fma_gflops,
                        Unit::Gbs => roof.read_gbs,
                        Unit::Gops => roof.int8_gops,
                    };
                    let row = Row {
                        op: case.op,
                        backend: contender.to_string(),
                        shape: case.shape.clone(),
                        dtype: dtype.name().to_string(),
                        mode: mode.map(Mode::name),
                        threads,
                        timing,
                        rate,
                        unit,
                        roof_pct: 100.0 * rate / roof_rate,
                    };
                    on_row(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok((rows, notes))
}

/// Formats a duration in seconds with a readable unit.
pub fn fmt_seconds(s: f64) -> String {
    match s {
        s if s >= 1.0 => format!("{s:.2} s"),
        s if s >= 1e-3 => format!("{:.2} ms", s * 1e3),
        s => format!("{:.2} µs", s * 1e6),
    }
}

/// The header line of the table.
pub fn header() -> String {
    format!(
        "{:<9} {:<15} {:<5} {:<5} {:<34} {:>3} {:>10} {:>7} {:>16} {:>7}",
        "op", "backend", "dtype", "mode", "shape", "thr", "median", "samples", "rate", "% roof"
    )
}

/// One line of the table.
pub fn format_row(r: &Row) -> String {
    let unit = match r.unit {
        Unit::Gflops => "GFLOP/s",
        Unit::Gbs => "GB/s",
        Unit::Gops => "GOP/s",
    };
    format!(
        "{:<9} {:<15} {:<5} {:<5} {:<34} {:>3} {:>10} {:>7} {:>16} {:>6.1}%",
        r.op.name(),
        r.backend,
        r.dtype,
        r.mode.unwrap_or("-"),
        r.shape,
        r.threads,
        fmt_seconds(r.timing.median_s),
        r.timing.samples,
        format!("{:.1} {unit}", r.rate),
        r.roof_pct
    )
}
