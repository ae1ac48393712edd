//! Turning logits into the next token: [`GenerationConfig`] and the sampler chain.
//!
//! The chain, in llama.cpp's default order: penalties (repetition over the last
//! `repeat_last_n` tokens, frequency, presence) on the raw logits; then top-k, top-p and
//! min-p, each on the probabilities of what the step before kept; then temperature; then one
//! draw from a ChaCha20 stream seeded by `seed`. Temperature 0 is greedy decoding (argmax,
//! the lower id on ties) and skips the filters. Candidates are ordered by logit, ties by the
//! lower id, so every filter's choice among equals is stated and reproducible.
//!
//! Numeric extremes: every finite, positive temperature and every penalty the config accepts
//! gives a valid draw. Penalties are computed in f64 and saturate at ±`f32::MAX`; a logit of
//! `-inf` (a masked token) stays `-inf` and is never drawn while any other token can be; a NaN
//! logit counts as masked. Probabilities are computed in f64 relative to the largest logit,
//! with the temperature applied inside the exponent, so a tiny temperature makes every token
//! below the maximum weigh exactly 0 (greedy) instead of overflowing to NaN. Logits that are
//! all equal (or all `-inf`) give a uniform distribution.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// How to pick each next token, and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// 0 is greedy; higher flattens the distribution. At least 0.
    pub temperature: f32,
    /// Keep the `k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`; in (0, 1].
    pub top_p: f32,
    /// Keep tokens at least `min_p` times as likely as the most likely one; in [0, 1].
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens by this; 1 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtract this times a recent token's count from its logit.
    pub frequency_penalty: f32,
    /// Subtract this from the logit of every recent token.
    pub presence_penalty: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding: temperature 0, no penalties.
    pub fn greedy() -> Self {
        GenerationConfig {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    /// Checks every field's domain; the error names the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} = {v}: must be finite"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repeat_penalty", self.repeat_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            return Err(format!(
                "temperature = {}: must be at least 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p = {}: must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p = {}: must be in [0, 1]", self.min_p));
        }
        if self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat_penalty = {}: must be positive (1 is off)",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// A token with its logit (and, once normalised, its probability).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
    pub p: f32,
}

/// Applies the penalties of `cfg` for the `recent` tokens to `logits`, in place.
pub fn apply_penalties(logits: &mut [f32], recent: &[u32], cfg: &GenerationConfig) {
    let window = &recent[recent.len().saturating_sub(cfg.repeat_last_n)..];
    if window.is_empty() {
        return;
    }
    let mut counts: Vec<(u32, u32)> = Vec::new();
    for &t in window {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t, 1)),
        }
    }
    for (t, c) in counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if l.is_nan() || *l == f32::NEG_INFINITY {
            continue; // masked stays masked
        }
        // In f64, then saturated: a tiny repeat penalty or a huge frequency penalty must not
        // turn a logit into ±inf or NaN.
        let mut v = *l as f64;
        if cfg.repeat_penalty != 1.0 {
            v = if v > 0.0 {
                v / cfg.repeat_penalty as f64
            } else {
                v * cfg.repeat_penalty as f64
            };
        }
        v -= c as f64 * cfg.frequency_penalty as f64 + cfg.presence_penalty as f64;
        *l = v.clamp(-f32::MAX as f64, f32::MAX as f64) as f32;
    }
}

/// Candidates sorted by logit, highest first, ties by the lower id. A NaN logit becomes `-inf`.
pub fn sorted_candidates(logits: &[f32]) -> Vec<Candidate> {
    top_candidates(logits, 0)
}

/// The first `k` of [`sorted_candidates`] (all of them for `k = 0`), found without sorting
/// the rest: a selection, then a sort of the `k`. Sampling the default model (49152 logits,
/// top-k 40) spent about 13% of a decoded token's time sorting them all.
pub fn top_candidates(logits: &[f32], k: usize) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| Candidate {
            id: i as u32,
            logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
            p: 0.0,
        })
        .collect();
    // A total order (no two candidates share an id), so the selection keeps exactly the
    // full sort's first `k`.
    let order = |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id));
    if k > 0 && k < c.len() {
        c.select_nth_unstable_by(k - 1, order);
        c.truncate(k);
    }
    c.sort_unstable_by(order);
    c
}

/// Sets `p` to the softmax of the candidates' logits.
pub fn softmax(c: &mut [Candidate]) {
    softmax_with_temperature(c, 1.0);
}

/// Sets `p` to the softmax of the candidates' logits divided by `temperature` (finite, > 0):
/// `p_i = exp((l_i - l_max) / T) / sum_j exp((l_j - l_max) / T)`, in f64. The division
/// happens on the difference from the maximum, so no weight overflows for any `T`: a tiny
/// `T` leaves weight only on the maximum. When the maximum is not finite (`+inf` cannot
/// arise from the penalties, which saturate; every logit `-inf` can), the candidates equal to
/// it share the mass.
pub fn softmax_with_temperature(c: &mut [Candidate], temperature: f32) {
    let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
    let t = temperature as f64;
    let weight = |l: f32| -> f64 {
        if !max.is_finite() {
            (l == max) as u8 as f64
        } else {
            ((l as f64 - max as f64) / t).exp()
        }
    };
    let sum: f64 = c.iter().map(|x| weight(x.logit)).sum();
    for x in c.iter_mut() {
        x.p = (weight(x.logit) / sum) as f32;
    }
}

/// Keeps the `k` first candidates (sorted: the `k` largest, ties to the lower id); 0 keeps all.
pub fn top_k(c: &mut Vec<Candidate>, k: usize) {
    if k > 0 {
        c.truncate(k);
    }
}

/// Keeps the smallest prefix of the sorted candidates whose probability reaches `p` (at
/// least one).
pub fn top_p(c: &mut Vec<Candidate>, p: f32) {
    softmax(c);
    let mut mass = 0.0f64;
    let mut keep = c.len();
    for (i, x) in c.iter().enumerate() {
        mass += x.p as f64;
        if mass >= p as f64 {
            keep = i + 1;
            break;
        }
    }
    c.truncate(keep.max(1));
}

/// Keeps the candidates whose probability is at least `min_p` times the largest (at least one).
pub fn min_p(c: &mut Vec<Candidate>, min_p: f32) {
    softmax(c);
    let threshold = c.first().map_or(0.0, |x| x.p) * min_p;
    let keep = c.iter().take_while(|x| x.p >= threshold).count();
    c.truncate(keep.max(1));
}

/// The sampler chain with its random stream.
pub struct Sampler {
    cfg: GenerationConfig,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// A sampler for `cfg` (validated), its stream seeded by `cfg.seed`.
    pub fn new(cfg: GenerationConfig) -> Result<Sampler, String> {
        cfg.validate()?;
        let rng = ChaCha20Rng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// The configuration.
    pub fn config(&self) -> &GenerationConfig {
        &self.cfg
    }

    /// A uniform draw in [0, 1) with 53 bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from `logits` (modified in place by the penalties) after the
    /// `recent` tokens.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        apply_penalties(logits, recent, &self.cfg);
        if self.cfg.temperature == 0.0 {
            return crate::generate::argmax(logits);
        }
        let mut c = top_candidates(logits, self.cfg.top_k);
        if self.cfg.top_p < 1.0 {
            top_p(&mut c, self.cfg.top_p);
        }
        if self.cfg.min_p > 0.0 {
            min_p(&mut c, self.cfg.min_p);
        }
        softmax_with_temperature(&mut c, self.cfg.temperature);
        draw(&c, self.uniform())
    }
}

/// The candidate at cumulative probability `u` (in [0, 1)) of the candidates' total mass.
/// Candidates of probability 0 are never chosen: if rounding leaves the running sum short of
/// the target, the last candidate with a positive probability is. `c` must not be empty.
pub fn draw(c: &[Candidate], u: f64) -> u32 {
    let total: f64 = c.iter().map(|x| x.p as f64).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last = None;
    for x in c.iter().filter(|x| x.p > 0.0) {
        acc += x.p as f64;
        if target < acc {
            return x.id;
        }
        last = Some(x.id);
    }
    // Only reached through rounding (or with no positive probability at all, which the
    // softmax above never produces).
    last.or(c.first().map(|x| x.id))
        .expect("draw from an empty candidate list")
}
