//! KL divergence between two runs of a model over the same text, as llama.cpp's
//! `llama-perplexity --kl-divergence` reports it: for every position perplexity scores, the
//! divergence `KL(P ‖ Q) = Σ_v P(v) (log P(v) - log Q(v))` of the run under test `Q` from the
//! base run `P` (exact mode, or an F32 file), averaged over the positions, with its standard
//! error, percentiles, and how often both runs rank the same token first.
//!
//! A base run is stored row by row (`chord perplexity --kld-base FILE`): each position's
//! log-probabilities as 16-bit steps between the row's minimum and 0 (llama.cpp stores its
//! base the same way, in steps of `-min / 65535`, about 5e-4 for a vocabulary's range),
//! with the base's top token kept exactly.

use std::io::{Read, Write};

use crate::tokenizer::Tokenizer;

const MAGIC: &[u8; 8] = b"chordKLD";
const VERSION: u32 = 1;

/// An error reading or writing a stored base run.
#[derive(Debug, thiserror::Error)]
pub enum KldError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a chord KL-divergence base file (its first bytes are not \"chordKLD\")")]
    NotABase,
    #[error(
        "the base was made {what} {base}, this run has {this}: compare runs over the same text and vocabulary"
    )]
    Mismatch {
        what: &'static str,
        base: u64,
        this: u64,
    },
    #[error("the base file ends after {rows} positions, before the text does")]
    Truncated { rows: u64 },
}

/// One position's base distribution, quantized.
#[derive(Clone, Debug, Default)]
pub struct BaseRow {
    /// The smallest log-probability of the row.
    pub min: f32,
    /// `-min / 65535`: log-probability `i` is `min + q[i] * step`.
    pub step: f32,
    /// The base's most likely token (exact: not read back from the steps).
    pub top: u32,
    pub q: Vec<u16>,
}

impl BaseRow {
    /// The row of `logits`.
    pub fn of(logits: &[f32]) -> BaseRow {
        let logp = log_softmax(logits);
        let min = logp.iter().copied().fold(0.0f64, f64::min) as f32;
        let step = if min < 0.0 { -min / 65535.0 } else { 1.0 };
        let q = logp
            .iter()
            .map(|&l| (((l - min as f64) / step as f64).round()).clamp(0.0, 65535.0) as u16)
            .collect();
        BaseRow {
            min,
            step,
            top: argmax(logits),
            q,
        }
    }

    /// The stored log-probability of token `i`.
    pub fn logp(&self, i: usize) -> f64 {
        self.min as f64 + self.q[i] as f64 * self.step as f64
    }
}

/// Argmax, the lower id on ties.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)`, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// The statistics of a comparison, as llama-perplexity prints them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KldStats {
    /// Positions compared.
    pub positions: usize,
    pub mean: f64,
    /// Standard error of the mean: `sd / sqrt(n - 1)`.
    pub stderr: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Fraction of positions where both runs rank the same token first.
    pub same_top: f64,
    /// `sqrt(p (1 - p) / (n - 1))`.
    pub same_top_stderr: f64,
}

/// Accumulates per-position divergences.
#[derive(Clone, Debug, Default)]
pub struct KldAccumulator {
    kld: Vec<f64>,
    same_top: usize,
}

impl KldAccumulator {
    /// Adds one position: the base row and this run's logits.
    pub fn add(&mut self, base: &BaseRow, logits: &[f32]) {
        let logq = log_softmax(logits);
        let kld: f64 = (0..logits.len())
            .map(|i| {
                let lp = base.logp(i);
                lp.exp() * (lp - logq[i])
            })
            .sum();
        self.kld.push(kld);
        self.same_top += (argmax(logits) == base.top) as usize;
    }

    /// The statistics so far.
    pub fn stats(&self) -> KldStats {
        let n = self.kld.len();
        let mean = self.kld.iter().sum::<f64>() / n.max(1) as f64;
        let var = self.kld.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / n.max(1) as f64;
        let mut sorted = self.kld.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            sorted
                .get(((n as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let same = self.same_top as f64 / n.max(1) as f64;
        let dof = (n.max(2) - 1) as f64;
        KldStats {
            positions: n,
            mean,
            stderr: (var / dof).sqrt(),
            median: pct(0.5),
            p99: pct(0.99),
            max: sorted.last().copied().unwrap_or(0.0),
            same_top: same,
            same_top_stderr: (same * (1.0 - same) / dof).sqrt(),
        }
    }
}

/// Writes a base run: a header (vocabulary, chunk length, a hash of the text's tokens),
/// then one [`BaseRow`] per scored position.
pub struct BaseWriter<W: Write> {
    w: W,
}

impl<W: Write> BaseWriter<W> {
    pub fn new(mut w: W, vocab: usize, ctx: usize, tokens_hash: u64) -> Result<Self, KldError> {
        w.write_all(MAGIC)?;
        for v in [VERSION as u64, vocab as u64, ctx as u64, tokens_hash] {
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(BaseWriter { w })
    }

    pub fn push(&mut self, row: &BaseRow) -> Result<(), KldError> {
        self.w.write_all(&row.min.to_le_bytes())?;
        self.w.write_all(&row.step.to_le_bytes())?;
        self.w.write_all(&row.top.to_le_bytes())?;
        self.w.write_all(bytemuck::cast_slice(&row.q))?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<W, KldError> {
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Reads a base run back, checking it was made over the same tokens and vocabulary.
pub struct BaseReader<R: Read> {
    r: R,
    vocab: usize,
    rows: u64,
}

impl<R: Read> BaseReader<R> {
    pub fn new(mut r: R, vocab: usize, ctx: usize, tokens_hash: u64) -> Result<Self, KldError> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| KldError::NotABase)?;
        if &magic != MAGIC {
            return Err(KldError::NotABase);
        }
        let mut field = || -> Result<u64, KldError> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).map_err(|_| KldError::NotABase)?;
            Ok(u64::from_le_bytes(b))
        };
        let (version, v, c, h) = (field()?, field()?, field()?, field()?);
        for (what, base, this) in [
            ("with file version", version, VERSION as u64),
            ("over a vocabulary of", v, vocab as u64),
            ("with chunks of", c, ctx as u64),
            ("over tokens hashing to", h, tokens_hash),
        ] {
            if base != this {
                return Err(KldError::Mismatch { what, base, this });
            }
        }
        Ok(BaseReader { r, vocab, rows: 0 })
    }

    /// The next row, into `row`.
    pub fn next(&mut self, row: &mut BaseRow) -> Result<(), KldError> {
        let truncated = |rows| move |_| KldError::Truncated { rows };
        let mut b4 = [0u8; 4];
        self.r.read_exact(&mut b4).map_err(truncated(self.rows))?;
        row.min = f32::from_le_bytes(b4);
        self.r.read_exact(&mut b4).map_err(truncated(self.rows))?;
        row.step = f32::from_le_bytes(b4);
        self.r.read_exact(&mut b4).map_err(truncated(self.rows))?;
        row.top = u32::from_le_bytes(b4);
        row.q.resize(self.vocab, 0);
        self.r
            .read_exact(bytemuck::cast_slice_mut(&mut row.q))
            .map_err(truncated(self.rows))?;
        self.rows += 1;
        Ok(())
    }
}

/// A stable hash of the tokens a run scores (FNV-1a over their little-endian bytes), so a
/// comparison refuses a base made over another text or tokenizer.
pub fn tokens_hash(tokenizer: &Tokenizer, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in tokenizer.encode(text, false) {
        for b in id.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
