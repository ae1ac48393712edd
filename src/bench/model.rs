//! `chord bench model`: whole-model throughput as llama-bench measures it. `pp N`: a prompt
//! of `N` tokens in one batched pass from an empty cache; `tg N`: `N` tokens decoded one at
//! a time from an empty cache. Token ids are fixed and spread over the vocabulary.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::model::{Model, ModelError, State};

/// One measured row.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    /// `pp512`, `tg128`...
    pub test: String,
    pub backend: String,
    pub mode: String,
    pub threads: usize,
    /// Median tokens per second over the repetitions.
    pub tokens_per_second: f64,
    pub repetitions: usize,
}

/// Runs `pp` and `tg` tests of `model`, `reps` times each (after one warm-up), and returns
/// their medians.
pub fn run<B: Backend>(
    model: &Model<'_, B>,
    mode: &str,
    pp: usize,
    tg: usize,
    reps: usize,
) -> Result<Vec<ModelRow>, ModelError> {
    let vocab = model.config.vocab as u64;
    let tokens: Vec<u32> = (0..pp.max(tg) as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let mut state = State::new(&model.config, pp.max(tg).max(1), pp.clamp(1, 512));
    let mut rows = Vec::new();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let backend = model.backend();
    let row = |test: String, tps: f64| ModelRow {
        test,
        backend: backend.name(),
        mode: mode.to_string(),
        threads: backend.threads(),
        tokens_per_second: tps,
        repetitions: reps,
    };
    if pp > 0 {
        let mut speeds = Vec::new();
        for r in 0..=reps {
            state.reset();
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
            state.reset();
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
