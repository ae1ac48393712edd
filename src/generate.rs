//! The generation loop: prefill the prompt in one batched pass, then decode one token at a
//! time, streaming text on UTF-8 boundaries to a callback that can stop it.
//!
//! Each next token comes from a [`Sampler`]: greedy at temperature 0, otherwise the seeded
//! sampler chain of [`crate::sample`].

use std::time::Instant;

use crate::backend::Backend;
use crate::model::{Model, ModelError, State};
use crate::sample::Sampler;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// What a generation produced, with its timings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// The generated text (end tokens not rendered).
    pub text: String,
    /// Seconds spent on the prompt (one batched pass).
    pub prompt_seconds: f64,
    /// Seconds spent decoding the generated tokens after the first.
    pub generation_seconds: f64,
    /// Why generation stopped: `length`, `end_token` or `stopped` (by the callback).
    pub stop_reason: &'static str,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_ids.len() as f64 / self.prompt_seconds.max(f64::MIN_POSITIVE)
    }

    /// Generated tokens per second, over the tokens decoded one at a time.
    pub fn generation_tokens_per_second(&self) -> f64 {
        self.generated_ids.len().saturating_sub(1) as f64
            / self.generation_seconds.max(f64::MIN_POSITIVE)
    }
}

/// Argmax over logits, the lower id on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The prompt, already tokenized; it runs after whatever `state` holds.
    pub prompt_ids: &'a [u32],
    /// Tokens to generate at most.
    pub max_new: usize,
    /// Keep going past the model's end tokens.
    pub ignore_eos: bool,
}

/// Generates up to `req.max_new` tokens after `req.prompt_ids`, each picked by `sampler`,
/// calling `on_token(id, text)` for each; the text is what became complete with this token
/// (possibly empty). Returning `false` stops generation. End tokens stop it unless
/// `req.ignore_eos`.
pub fn generate<B: Backend>(
    model: &Model<'_, B>,
    state: &mut State,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    req: Request<'_>,
    mut on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    let Request {
        prompt_ids,
        max_new,
        ignore_eos,
    } = req;
    // The logits the sampler may modify (penalties), and every token so far: allocated once.
    let mut logits = vec![0.0f32; model.config.vocab];
    let mut history: Vec<u32> = prompt_ids.to_vec();
    history.reserve(max_new);
    let t0 = Instant::now();
    logits.copy_from_slice(model.forward(state, prompt_ids)?);
    let mut next = sampler.sample(&mut logits, &history);
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut decoder = IncrementalDecoder::new(tokenizer, false);
    let mut generated = Vec::new();
    let mut text = String::new();
    let mut stop_reason = "length";
    while generated.len() < max_new {
        generated.push(next);
        if !ignore_eos && tokenizer.end_tokens.contains(&next) {
            stop_reason = "end_token";
            break;
        }
        let piece = decoder
            .push(next)
            .map_err(|e| ModelError::Input(e.to_string()))?;
        text.push_str(&piece);
        if !on_token(next, &piece) {
            stop_reason = "stopped";
            break;
        }
        if generated.len() == max_new {
            break;
        }
        history.push(next);
        logits.copy_from_slice(model.forward(state, &[next])?);
        next = sampler.sample(&mut logits, &history);
    }
    let rest = decoder.finish();
    text.push_str(&rest);
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        generated_ids: generated,
        text,
        prompt_seconds,
        generation_seconds: t1.elapsed().as_secs_f64(),
        stop_reason,
    })
}
