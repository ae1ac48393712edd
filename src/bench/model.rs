//! `chord bench model`: whole-model throughput as llama-bench measures it. `pp N`: a prompt
//! of `N` tokens in one batched pass; `tg N`: `N` tokens decoded one at a time. Both start
//! from an empty cache, or at depth `D` (llama-bench's `-d`, a test named `tg128 @ d2048`):
//! after `D` cached positions, filled once by an untimed prompt and kept for every
//! repetition. Token ids are fixed and spread over the vocabulary (see [`super::Workload`]).

use std::time::Instant;

use serde::Serialize;

use super::Workload;
use crate::backend::Backend;
use crate::model::{Model, ModelError};

/// One measured row.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    /// `pp512`, `tg128`, `tg128 @ d2048`...
    pub test: String,
    /// Positions in the KV cache before each test (llama-bench's `n_depth`).
    pub depth: usize,
    pub backend: String,
    pub mode: String,
    pub threads: usize,
    /// Median tokens per second over the repetitions.
    pub tokens_per_second: f64,
    pub repetitions: usize,
}

/// Runs `pp` and `tg` tests of `model` at `depth` cached positions, `reps` times each
/// (after one warm-up), and returns their medians.
pub fn run<B: Backend>(
    model: &Model<'_, B>,
    mode: &str,
    pp: usize,
    tg: usize,
    depth: usize,
    reps: usize,
) -> Result<Vec<ModelRow>, ModelError> {
    let Workload { tokens, mut state } = Workload::new(model, pp, tg, depth)?;
    let mut rows = Vec::new();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let backend = model.backend();
    let row = |test: String, tps: f64| ModelRow {
        test: super::test_name(&test, depth),
        depth,
        backend: backend.name(),
        mode: mode.to_string(),
        threads: backend.threads(),
        tokens_per_second: tps,
        repetitions: reps,
    };
    if pp > 0 {
        let mut speeds = Vec::new();
        for r in 0..=reps {
            state.pos = depth;
            let t = Instant::now();
            model.forward(&mut state, &tokens[..pp])?;
            if r > 0 {
                speeds.push(pp as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push(row(format!("pp{pp}"), median(speeds)));
    }
    if tg > 0 {
        let mut speeds = Vec::new();
        for r in 0..=reps {
            state.pos = depth;
            let t = Instant::now();
            for &tok in &tokens[..tg] {
                model.forward(&mut state, &[tok])?;
            }
            if r > 0 {
                speeds.push(tg as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push(row(format!("tg{tg}"), median(speeds)));
    }
    Ok(rows)
}
