//! `chord bench kernels`: every op × backend × shape × thread count, timed, with each
//! figure set against the roof measured in the same run.
//!
//! Matmul with `m > 1` is compute-bound and reported in GFLOP/s against the FMA peak. Matmul
//! with `m = 1` (decode) streams its weights and is reported as GB/s of weights read against
//! the read bandwidth; its weights are cold: the row cycles through enough copies to exceed
//! any last-level cache, as a model's layers would. The per-row ops report
//! the bytes they read and write in GB/s against the same read roof (rows that fit in cache
//! can exceed 100%).
//!
//! The rows of one case (its backends, modes and thread counts) take turns, a slice of the
//! budget each in several rounds (see `time_in_turns`), so that rows compared with each
//! other, and a row's one- and two-thread figures, are timed through the same moments of a
//! shared machine; a cold decode row holds a gigabyte of weight copies, so those rows run
//! one after the other instead. The table lists each case's rows together.

use std::fmt;
use std::str::FromStr;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// Hands `with` one call of a case on a backend, after the case's setup: the [`Visit`] that
/// a row's timing runs in.
struct Runner<'a, B, F> {
    backend: &'a B,
    with: F,
}

impl<B: Backend, T, F: FnOnce(&mut dyn FnMut()) -> T> Visit for Runner<'_, B, F> {
    type Out = Result<T, crate::Error>;
    fn visit<C: OpCase>(self, case: &C) -> Self::Out {
        let inputs = case.inputs();
        let mut state = case.setup(self.backend, &inputs)?;
        // The weights as a loaded model's end up (on huge pages, for the SIMD backend).
        self.backend.prepared();
        self.backend.settle();
        // The first call fails on a shape the backend refuses; the later ones cannot.
        case.run(self.backend, &inputs, &mut state)?;
        Ok((self.with)(&mut || {
            case.run(self.backend, &inputs, &mut state)
                .expect("the same call succeeded once")
        }))
    }
}

/// Runs `with` on one call of `case` by `contender` (in `mode`, on `threads`), set up once.
fn with_call<T>(
    contender: Contender,
    mode: Option<Mode>,
    threads: usize,
    case: &Case,
    with: impl FnOnce(&mut dyn FnMut()) -> T,
) -> Result<T, crate::Error> {
    match contender {
        Contender::Chord(v) => {
            let mode = mode.unwrap_or(Mode::Exact);
            crate::with_variant!(v, threads, mode, b => case.visit(Runner { backend: &b, with }))
        }
        Contender::MatrixMultiply => match case {
            Case::Matmul(c) => Ok(with(&mut matrixmultiply_runner(c))),
            _ => unreachable!("matrixmultiply runs matmul rows only"),
        },
    }
}

/// One call of a row.
type Call<'a> = dyn FnMut() + 'a;

/// Sets up row `i` and hands one call of it to the sink, once: what [`time_in_turns`] times.
type WithRow<'a> =
    dyn Fn(usize, &mut dyn FnMut(&mut Call<'_>)) -> Result<(), crate::Error> + Sync + 'a;

/// Rounds in which the rows of one case take turns (see [`time_in_turns`]).
const ROUNDS: usize = 5;
/// Most timed calls of one turn: [`time`]'s 10,000 calls over the rounds.
const MAX_TURN_CALLS: usize = 10_000 / ROUNDS;

/// Whose turn it is among the rows of one case timed in turns, or that one of them panicked.
struct Turns {
    next: Mutex<Option<usize>>,
    changed: Condvar,
}

impl Turns {
    /// Waits for turn `t`; `false` if a row panicked and the turns have stopped.
    fn wait(&self, t: usize) -> bool {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match *next {
                Some(n) if n == t => return true,
                None => return false,
                Some(_) => next = self.changed.wait(next).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Ends the current turn (`stop`: ends every turn).
    fn pass(&self, stop: bool) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        *next = if stop { None } else { next.map(|n| n + 1) };
        self.changed.notify_all();
    }
}

/// Stops the turns if the row's thread unwinds, so that the others do not wait forever.
struct StopOnPanic<'a>(&'a Turns);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.pass(true);
        }
    }
}

/// Times `rows` rows of one case (row `i` set up and handed over by `with_row(i, ..)`)
/// taking turns, so that a noisy moment of a shared machine falls on every row alike rather
/// than on the one timed then: each row is set up on a thread of its own (one at a time),
/// then in each of [`ROUNDS`] rounds every row in turn makes one untimed call (its data back
/// in cache after the others ran, skipped for calls longer than a tenth of the slice) and
/// calls until `budget / ROUNDS` has passed (at least once, at most [`MAX_TURN_CALLS`]
/// times). Only one row runs at a time; the others wait on a condition variable and their
/// teams park. The median is over every round's calls.
fn time_in_turns(
    rows: usize,
    budget: Duration,
    with_row: &WithRow<'_>,
) -> Result<Vec<Timing>, crate::Error> {
    let slice = budget / ROUNDS as u32;
    let turns = Turns {
        next: Mutex::new(Some(0)),
        changed: Condvar::new(),
    };
    let turns = &turns;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .map(|i| {
                scope.spawn(move || {
                    let _guard = StopOnPanic(turns);
                    // Turns i (setup), then rows + i, 2 rows + i, ... (rounds).
                    let mut mine = (0..=ROUNDS).map(|r| r * rows + i);
                    if !turns.wait(mine.next().expect("a setup turn")) {
                        return Ok(Vec::new());
                    }
                    let mut samples = Vec::new();
                    let mut set_up = false;
                    let done = with_row(i, &mut |call| {
                        set_up = true;
                        turns.pass(false);
                        let mut last = Duration::ZERO;
                        for t in mine.by_ref() {
                            if !turns.wait(t) {
                                break;
                            }
                            if last < slice / 10 {
                                call();
                            }
                            let (start, mut turn_calls) = (Instant::now(), 0);
                            loop {
                                let t = Instant::now();
                                call();
                                last = t.elapsed();
                                samples.push(last.as_secs_f64());
                                turn_calls += 1;
                                if start.elapsed() >= slice || turn_calls == MAX_TURN_CALLS {
                                    break;
                                }
                            }
                            turns.pass(false);
                        }
                    });
                    if !set_up {
                        // The row failed to set up: pass its turns, so the others go on.
                        turns.pass(false);
                        for t in mine {
                            if turns.wait(t) {
                                turns.pass(false);
                            }
                        }
                    }
                    done.map(|()| samples)
                })
            })
            .collect();
        // A panicking row stopped the others' turns: its panic is the one to report.
        let joined: Vec<_> = handles
            .into_iter()
            .map(|h| h.join())
            .collect::<Result<_, _>>()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        joined
            .into_iter()
            .map(|timed: Result<Vec<f64>, crate::Error>| {
                let mut samples = timed?;
                samples.sort_by(f64::total_cmp);
                Ok(Timing {
                    median_s: samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN),
                    samples: samples.len(),
                })
            })
            .collect()
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
    for (label, case) in &cases {
        let (op, dtype) = (case.op(), case.dtype());
        // The rows of this case: (contender, mode, threads) of each.
        let mut entries = Vec::new();
        for &threads in &cfg.threads {
            for &contender in &cfg.contenders {
                // The scalar backend and the baseline run on one thread only.
                let single = matches!(
                    contender,
                    Contender::Chord(Variant::Scalar) | Contender::MatrixMultiply
                );
                if single && threads != 1 {
                    continue;
                }
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
                match contender {
                    Contender::Chord(Variant::Simd(_)) if dtype != DType::F32 => {
                        for &mode in &cfg.modes {
                            if mode == Mode::Exact || repackable(dtype) {
                                entries.push((contender, Some(mode), threads));
                            } else {
                                note(format!(
                                    "fast mode computes {dtype} as exact mode does: no fast row"
                                ));
                            }
                        }
                    }
                    _ => entries.push((contender, None, threads)),
                }
            }
        }
        // Rows whose weights stay in cache take turns; a cold decode row holds a
        // gigabyte of weight copies, so those rows run one after the other.
        let cold = matches!(case, Case::Matmul(c) if c.copies > 1);
        let timings = if cold || entries.len() < 2 {
            entries
                .iter()
                .map(|&(contender, mode, threads)| {
                    with_call(contender, mode, threads, case, |call| {
                        time(cfg.budget, 5, call)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            time_in_turns(entries.len(), cfg.budget, &|i, sink| {
                let (contender, mode, threads) = entries[i];
                with_call(contender, mode, threads, case, |call| sink(call))
            })?
        };
        for (&(contender, mode, threads), timing) in entries.iter().zip(timings) {
            let roof = roofs
                .iter()
                .find(|r| r.threads == threads)
                .expect("a roof per thread count");
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows a log of calls went through, one entry per run of calls by the same row.
    fn runs(log: &[usize]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for &i in log {
            if out.last() != Some(&i) {
                out.push(i);
            }
        }
        out
    }

    #[test]
    fn rows_of_a_case_take_turns_round_by_round() {
        let log = Mutex::new(Vec::new());
        let budget = Duration::from_millis(25);
        let timings = time_in_turns(3, budget, &|i, sink| {
            sink(&mut || {
                log.lock().unwrap().push(i);
                std::thread::sleep(Duration::from_micros(300));
            });
            Ok(())
        })
        .unwrap();
        // One run of calls per row and round, in row order, never two rows at once.
        let expected: Vec<usize> = (0..ROUNDS).flat_map(|_| 0..3).collect();
        assert_eq!(runs(&log.lock().unwrap()), expected);
        for t in &timings {
            // At least one call a round, each a sleep of 0.3 ms or more.
            assert!(t.samples >= ROUNDS, "{t:?}");
            assert!(t.median_s >= 300e-6, "{t:?}");
        }
    }

    #[test]
    fn a_turn_stops_at_its_call_limit() {
        // A budget of 50 s, calls of nothing: the limit ends each turn, not the clock.
        let timings = time_in_turns(2, Duration::from_secs(50), &|_, sink| {
            sink(&mut || {});
            Ok(())
        })
        .unwrap();
        for t in &timings {
            assert_eq!(t.samples, ROUNDS * MAX_TURN_CALLS, "{t:?}");
        }
    }

    #[test]
    fn a_row_that_panics_stops_the_turns_and_its_panic_is_raised() {
        let calls = Mutex::new(0usize);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            time_in_turns(3, Duration::from_millis(10), &|i, sink| {
                sink(&mut || {
                    let mut calls = calls.lock().unwrap();
                    *calls += 1;
                    if i == 1 && *calls > 3 {
                        drop(calls);
                        panic!("row 1 fails");
                    }
                });
                Ok(())
            })
        }));
        let panic = out.expect_err("row 1's panic reaches the caller");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"row 1 fails"));
    }

    #[test]
    fn a_row_that_fails_to_set_up_is_reported_and_the_others_still_run() {
        let calls = Mutex::new([0usize; 3]);
        let out = time_in_turns(3, Duration::from_millis(10), &|i, sink| {
            if i == 1 {
                return Err(crate::Error::Unavailable("row 1".into()));
            }
            sink(&mut || calls.lock().unwrap()[i] += 1);
            Ok(())
        });
        match out {
            Err(crate::Error::Unavailable(what)) => assert_eq!(what, "row 1"),
            other => panic!("expected row 1's error, got {other:?}"),
        }
        let calls = calls.lock().unwrap();
        assert!(calls[0] >= ROUNDS && calls[2] >= ROUNDS, "{calls:?}");
        assert_eq!(calls[1], 0);
    }
}
