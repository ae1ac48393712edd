//! The generation loop: prefill the prompt in one batched pass, then decode one token at a
//! time. One loop, two ways to consume it: [`Stream`], an iterator of [`Event`]s, and
//! [`generate`], which drives it and calls a callback that can stop it.
//!
//! Text is emitted only on UTF-8 boundaries. Text that could still be the start of a stop
//! sequence is held back until it cannot; a stop sequence itself is never emitted. The
//! model's end tokens (eos, and end-of-turn tokens such as `<|im_end|>`) end generation
//! unless `ignore_eos`. Each next token comes from a [`Sampler`]: greedy at temperature 0,
//! otherwise the seeded sampler chain of [`crate::sample`].

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
    /// The generated text as emitted (end tokens and stop sequences not included).
    pub text: String,
    /// Seconds spent on the prompt (one batched pass).
    pub prompt_seconds: f64,
    /// Seconds spent decoding the generated tokens after the first.
    pub generation_seconds: f64,
    /// Why generation stopped: `length`, `end_token`, `stop_sequence` or `stopped`.
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

/// Argmax over logits, the lower id on ties; a NaN logit never wins (0 if every logit is
/// NaN or `-inf`).
pub fn argmax(logits: &[f32]) -> u32 {
    let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            (best, best_value) = (i, v);
        }
    }
    best as u32
}

/// What to generate from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The prompt, already tokenized; it runs after whatever the state holds.
    pub prompt_ids: &'a [u32],
    /// Tokens to generate at most.
    pub max_new: usize,
    /// Keep going past the model's end tokens.
    pub ignore_eos: bool,
    /// Texts that end generation when produced; they are not emitted.
    pub stop: &'a [String],
}

impl Request<'_> {
    /// Checks what a request asks: an empty stop text would end generation at once.
    pub fn validate(&self) -> Result<(), ModelError> {
        match self.stop.iter().position(String::is_empty) {
            Some(i) => Err(ModelError::Input(format!(
                "stop text {} is empty: it would end generation before any text",
                i + 1
            ))),
            None => Ok(()),
        }
    }
}

/// One step of a generation.
#[derive(Clone, Debug)]
pub enum Event {
    /// A generated token and the text that became final with it (possibly empty: part of a
    /// character, or held back as a possible stop sequence).
    Token { id: u32, text: String },
    /// The end, with the summary.
    Done(Generation),
}

/// A generation in progress, as an iterator of [`Event`]s (the last one `Done`).
pub struct Stream<'s, 'm, B: Backend> {
    model: &'s Model<'m, B>,
    state: &'s mut State,
    sampler: &'s mut Sampler,
    decoder: IncrementalDecoder<'s>,
    end_tokens: &'s [u32],
    req: Request<'s>,
    /// The logits the sampler may modify (penalties) and every token so far: allocated once.
    logits: Vec<f32>,
    history: Vec<u32>,
    generated: Vec<u32>,
    /// Text decoded but not yet emitted: it may be the start of a stop sequence.
    held: String,
    text: String,
    /// The sampled token the next step emits; `None` before the prompt has run.
    next: Option<u32>,
    queue: std::collections::VecDeque<Event>,
    prompt_seconds: f64,
    started: Option<Instant>,
    finished: bool,
}

impl<'s, 'm, B: Backend> Stream<'s, 'm, B> {
    /// Starts a generation: nothing runs until the first call to `next`.
    pub fn new(
        model: &'s Model<'m, B>,
        state: &'s mut State,
        tokenizer: &'s Tokenizer,
        sampler: &'s mut Sampler,
        req: Request<'s>,
    ) -> Self {
        let mut history = req.prompt_ids.to_vec();
        history.reserve(req.max_new);
        Stream {
            model,
            state,
            sampler,
            decoder: IncrementalDecoder::new(tokenizer, false),
            end_tokens: tokenizer.eog(),
            req,
            logits: vec![0.0; model.config.vocab],
            history,
            generated: Vec::with_capacity(req.max_new),
            held: String::new(),
            text: String::new(),
            next: None,
            queue: std::collections::VecDeque::new(),
            prompt_seconds: 0.0,
            started: None,
            finished: false,
        }
    }

    /// Ends the generation now (the consumer stopped it) and returns the summary.
    pub fn stop(mut self) -> Generation {
        self.summary("stopped")
    }

    fn summary(&mut self, reason: &'static str) -> Generation {
        self.finished = true;
        Generation {
            prompt_ids: self.req.prompt_ids.to_vec(),
            generated_ids: std::mem::take(&mut self.generated),
            text: std::mem::take(&mut self.text),
            prompt_seconds: self.prompt_seconds,
            generation_seconds: self.started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            stop_reason: reason,
        }
    }

    /// Emits `out` for token `id`.
    fn emit(&mut self, id: u32, out: String) {
        self.text.push_str(&out);
        self.queue.push_back(Event::Token { id, text: out });
    }

    fn done(&mut self, reason: &'static str) {
        let g = self.summary(reason);
        self.queue.push_back(Event::Done(g));
    }

    /// The part of `held` that is certainly not the start of a stop sequence.
    fn release(&mut self) -> String {
        let keep = self
            .req
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(move |&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        self.held.drain(..self.held.len() - keep).collect()
    }

    /// Everything still held, and any incomplete character, at the end of the stream.
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held) + &self.decoder.finish()
    }

    /// Runs one token's worth of the loop, queueing its events.
    fn step(&mut self) -> Result<(), ModelError> {
        let next = match self.next {
            Some(t) => t,
            None => {
                self.req.validate()?;
                let t0 = Instant::now();
                self.logits
                    .copy_from_slice(self.model.forward(self.state, self.req.prompt_ids)?);
                self.prompt_seconds = t0.elapsed().as_secs_f64();
                self.started = Some(Instant::now());
                self.sampler.sample(&mut self.logits, &self.history)
            }
        };
        if self.generated.len() >= self.req.max_new {
            self.done("length");
            return Ok(());
        }
        self.generated.push(next);
        if !self.req.ignore_eos && self.end_tokens.contains(&next) {
            let out = self.flush();
            self.emit(next, out);
            self.done("end_token");
            return Ok(());
        }
        let piece = self
            .decoder
            .push(next)
            .map_err(|e| ModelError::Input(e.to_string()))?;
        self.held.push_str(&piece);
        let first_stop = self
            .req
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.held.truncate(at);
            let out = std::mem::take(&mut self.held);
            self.emit(next, out);
            self.done("stop_sequence");
            return Ok(());
        }
        let last = self.generated.len() == self.req.max_new;
        let out = if last { self.flush() } else { self.release() };
        self.emit(next, out);
        if last {
            self.done("length");
            return Ok(());
        }
        self.history.push(next);
        self.logits
            .copy_from_slice(self.model.forward(self.state, &[next])?);
        self.next = Some(self.sampler.sample(&mut self.logits, &self.history));
        Ok(())
    }
}

impl<B: Backend> Iterator for Stream<'_, '_, B> {
    type Item = Result<Event, ModelError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.queue.is_empty()
            && !self.finished
            && let Err(e) = self.step()
        {
            self.finished = true;
            return Some(Err(e));
        }
        self.queue.pop_front().map(Ok)
    }
}

/// Runs a generation to its end, calling `on_token(id, text)` for each token (the text that
/// became final with it, possibly empty); returning `false` stops it.
pub fn generate<B: Backend>(
    model: &Model<'_, B>,
    state: &mut State,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    req: Request<'_>,
    mut on_token: impl FnMut(u32, &str) -> bool,
) -> Result<Generation, ModelError> {
    let mut stream = Stream::new(model, state, tokenizer, sampler, req);
    while let Some(event) = stream.next() {
        match event? {
            Event::Token { id, text } => {
                if !on_token(id, &text) {
                    return Ok(stream.stop());
                }
            }
            Event::Done(g) => return Ok(g),
        }
    }
    unreachable!("a stream ends with Done")
}
