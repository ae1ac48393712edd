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

use chord_kernels::simd::repackable;

use super::{Roof, Timing, time};
use crate::backend::{Backend, DType, Mode, Op, Support, Variant};
pub use crate::harness::ShapeSet;
pub use crate::harness::Unit;
use crate::harness::{Case, MatmulCase, OpCase, Visit, model_cases};

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

/// Times `run` on a case's state, after its setup: the [`Visit`] that times a row.
struct Timer<'a, B> {
    backend: &'a B,
    budget: Duration,
}

impl<B: Backend> Visit for Timer<'_, B> {
    type Out = Result<Timing, crate::Error>;
    fn visit<C: OpCase>(self, case: &C) -> Self::Out {
        let inputs = case.inputs();
        let mut state = case.setup(self.backend, &inputs)?;
        // The first call fails on a shape the backend refuses; the timed ones cannot.
        case.run(self.backend, &inputs, &mut state)?;
        Ok(time(self.budget, 5, || {
            case.run(self.backend, &inputs, &mut state)
                .expect("the same call succeeded once")
        }))
    }
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

/// Times [`matrixmultiply_matmul`] on an F32 matmul case, with the case's weight copies
/// (cold for decode) as chord's rows have them.
fn time_matrixmultiply(c: &MatmulCase, budget: Duration) -> Timing {
    time(budget, 5, matrixmultiply_runner(c))
}

/// One call of [`matrixmultiply_matmul`] on an F32 matmul case per call of the closure,
/// cycling through the case's weight copies (each in memory of its own, as chord's rows
/// have them): the baseline row of `chord bench kernels` and of the criterion benches.
pub fn matrixmultiply_runner(c: &MatmulCase) -> impl FnMut() {
    let (m, n, k) = (c.m, c.n, c.k);
    let (x, one) = c.f32_inputs();
    let ws: Vec<Vec<f32>> = vec![one; c.copies.max(1)];
    let mut y = vec![0.0f32; m * n];
    let mut i = 0;
    move || {
        matrixmultiply_matmul(&x, &ws[i % ws.len()], &mut y, m, n, k);
        i += 1;
    }
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
    let cases = model_cases(&cfg.ops, &cfg.shapes, &cfg.dtypes, &mut notes);
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
            for (label, case) in &cases {
                let (op, dtype) = (case.op(), case.dtype());
                let support = match contender {
                    Contender::Chord(v) => {
                        crate::with_variant!(v, 1, Mode::Exact, b => b.supports(op, dtype))
                    }
                    Contender::MatrixMultiply if op == Op::Matmul && dtype == DType::F32 => {
                        Support::Native
                    }
                    Contender::MatrixMultiply => continue,
                };
                if support != Support::Native {
                    note(format!(
                        "{contender}: supports({op}, {dtype}) = {support:?}: not timed (a weight dequantized when prepared runs as the F32 rows do)"
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
                            crate::with_variant!(v, threads, mode, b => {
                                let timer = Timer { backend: &b, budget: cfg.budget };
                                case.visit(timer)?
                            })
                        }
                        Contender::MatrixMultiply => match case {
                            Case::Matmul(c) => time_matrixmultiply(c, cfg.budget),
                            _ => continue,
                        },
                    };
                    // Fast mode's prefill is integer arithmetic, set against the 8-bit roof.
                    let (work, unit) = case.work();
                    let unit = match (unit, mode) {
                        (Unit::Gflops, Some(Mode::Fast)) => Unit::Gops,
                        (u, _) => u,
                    };
                    let rate = work / timing.median_s / 1e9;
                    let roof_rate = match unit {
                        Unit::Gflops => roof.fma_gflops,
                        Unit::Gbs => roof.read_gbs,
                        Unit::Gops => roof.int8_gops,
                    };
                    let row = Row {
                        op,
                        backend: contender.to_string(),
                        shape: format!("{label} {}", case.shape()),
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
    let unit = r.unit.name();
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
