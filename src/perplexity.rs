//! Perplexity of a text, computed as llama.cpp's `llama-perplexity` does: the text's tokens
//! in consecutive, non-overlapping chunks of `ctx`, each run from an empty cache, each
//! scored on its second half (every position predicting the next token).

use crate::backend::Backend;
use crate::model::{Model, ModelError, State};
use crate::tokenizer::Tokenizer;

/// The result: the perplexity and its standard error, as llama-perplexity prints them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// `ppl * sqrt(var(nll) / (n - 1))` over the scored tokens.
    pub stderr: f64,
    pub chunks: usize,
    pub ctx: usize,
    pub tokens_scored: usize,
}

/// `-log softmax(logits)[target]`, in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

/// Scores `text` in chunks of `ctx` tokens; `progress(chunk, of, ppl_so_far)` after each.
pub fn perplexity<B: Backend>(
    model: &Model<'_, B>,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
    progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity, ModelError> {
    perplexity_visiting(model, tokenizer, text, ctx, progress, |_, _| Ok(()))
}

/// [`perplexity`], calling `visit(logits, next)` for every scored position in order, with
/// the position's logits `(vocab,)` and the token that follows it.
pub fn perplexity_visiting<B: Backend>(
    model: &Model<'_, B>,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
    mut visit: impl FnMut(&[f32], u32) -> Result<(), ModelError>,
) -> Result<Perplexity, ModelError> {
    let chunks = chunks(tokenizer, text, ctx)?;
    let mut state = State::new(&model.config, ctx, ctx.min(512));
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for (c, chunk) in chunks.iter().enumerate() {
        score_chunk(model, &mut state, chunk, |logits, next| {
            visit(logits, next)?;
            let v = nll(logits, next);
            sum += v;
            sum_sq += v * v;
            count += 1;
            Ok(())
        })?;
        progress(c + 1, chunks.len(), (sum / count as f64).exp());
    }
    let mean = sum / count as f64;
    let var = (sum_sq / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    Ok(Perplexity {
        ppl,
        stderr: ppl * (var / (count - 1) as f64).sqrt(),
        chunks: chunks.len(),
        ctx,
        tokens_scored: count,
    })
}

/// The text's tokens in consecutive chunks of `ctx` (the tail that fills no chunk dropped),
/// each starting with BOS where the vocabulary adds one, as llama-perplexity does.
pub(crate) fn chunks(
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
) -> Result<Vec<Vec<u32>>, ModelError> {
    if ctx < 4 {
        return Err(ModelError::Input(format!(
            "a context of {ctx} tokens: a chunk needs at least 4"
        )));
    }
    let tokens = tokenizer.encode(text, false);
    if tokens.len() < ctx {
        return Err(ModelError::Input(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    Ok(tokens
        .chunks_exact(ctx)
        .map(|c| {
            let mut chunk = c.to_vec();
            if tokenizer.add_bos()
                && let Some(bos) = tokenizer.bos()
            {
                chunk[0] = bos;
            }
            chunk
        })
        .collect())
}

/// Runs `chunk` from an empty cache and calls `visit(logits, next)` for each position of its
/// second half that has a next token: the positions perplexity scores.
pub(crate) fn score_chunk<B: Backend>(
    model: &Model<'_, B>,
    state: &mut State,
    chunk: &[u32],
    mut visit: impl FnMut(&[f32], u32) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let (ctx, vocab) = (chunk.len(), model.config.vocab);
    state.reset();
    let logits = model.forward_all(state, chunk)?;
    for j in ctx / 2..ctx - 1 {
        visit(&logits[j * vocab..(j + 1) * vocab], chunk[j + 1])?;
    }
    Ok(())
}
