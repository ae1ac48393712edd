//! Synthetic llama-family models: a valid GGUF of any shape, with seeded weights and a
//! byte-level tokenizer, that chord and llama.cpp both load and run. The file is written as a
//! stream, 16 MiB of f32 values at a time (about twice that held at once, with the encoded
//! copy), so a 7B model is written without holding it in memory.
//!
//! # The weights
//!
//! Each matrix row has its own stream of splitmix64 (Steele, Lea and Flood, "Fast splittable
//! pseudorandom number generators", 2014). Its state is seeded from the seed, the tensor's
//! name and the row. Values use only integer arithmetic and correctly rounded IEEE operations
//! (add, multiply, divide, square root), so a seed gives the same bytes on every machine and
//! at every thread count.
//!
//! - **Matrix rows** are near-Gaussian: each value is the sum of four uniforms (Irwin-Hall),
//!   and the row is then scaled so that its RMS is exactly `σ`:
//!   - `token_embd`: `σ = 1`, the RMS that an activation has after RMSNorm;
//!   - a projection reading `n` values: `σ = 1/√n` (fan-in initialisation, LeCun et al.,
//!     "Efficient BackProp", 1998). Each output then has unit variance for an input of unit
//!     RMS, so activations keep their scale through every layer. Here `n` is `dim` for
//!     `attn_q`, `attn_k`, `attn_v`, `ffn_gate` and `ffn_up`, `heads × head_dim` for
//!     `attn_output`, and `ffn` for `ffn_down`;
//!   - `output` (a matrix of its own, not tied to the embeddings): `σ = LOGIT_STD/√dim`,
//!     logits of standard deviation about [`LOGIT_STD`]. A tied classifier would favour the
//!     input token, and the text would repeat it.
//! - **Norm weights** are `1 + 0.25 g`, with `g` near-Gaussian of unit variance.
//!
//! # The tokenizer
//!
//! GPT-2 byte-level BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer `gpt-2`):
//! - id 0 is `<s>` (BOS, added to prompts) and id 1 is `</s>` (EOS), both control tokens;
//! - ids 2 to 257 are the 256 bytes in GPT-2's alphabet;
//! - the rest are merges of lowercase words, shortest first: a space or a letter followed by
//!   one letter (`Ġa`, `ab`, ...), then those followed by one more letter, and so on until the
//!   vocabulary is full.
//!
//! Any text therefore tokenizes, and every token decodes to text. Not every token is reached
//! by encoding: BPE applies the lower-ranked merge first, so in `bab` it merges `ab` and never
//! forms `ba`, the prefix of `bab`. A model can still generate such tokens, and llama.cpp
//! tokenizes the same way.

use std::io::{self, Write};

use rayon::prelude::*;

use crate::gguf::{Array, DType, TensorEntry, Value, Writer};

/// The standard deviation of the logits, about: large enough that the top two logits of a
/// greedy step are far apart next to rounding, small enough that sampling is not one-hot.
pub const LOGIT_STD: f64 = 8.0;

/// The smallest vocabulary: BOS, EOS and the 256 bytes.
pub const MIN_VOCAB: usize = 258;

/// A llama-family model's shape and hyper-parameters, as the GGUF's `llama.*` keys hold them.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// `embedding_length`: the width of the residual stream.
    pub dim: usize,
    /// `block_count`.
    pub layers: usize,
    /// `attention.head_count`: query heads, each `dim / heads` wide.
    pub heads: usize,
    /// `attention.head_count_kv`: key/value heads (grouped-query attention when fewer).
    pub kv_heads: usize,
    /// `feed_forward_length`: the SwiGLU hidden width.
    pub ffn: usize,
    /// Tokens in the vocabulary (and rows of the embedding and output matrices).
    pub vocab: usize,
    /// `context_length`: the longest sequence the model declares.
    pub ctx: usize,
    /// `rope.freq_base`.
    pub rope_base: f32,
    /// `attention.layer_norm_rms_epsilon`.
    pub eps: f32,
}

/// The shapes of published models, from their `config.json`.
pub const PRESETS: [(&str, Shape); 4] = [
    (
        "smollm2-135m",
        Shape {
            dim: 576,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            ffn: 1536,
            vocab: 49152,
            ctx: 8192,
            rope_base: 100_000.0,
            eps: 1e-5,
        },
    ),
    (
        "smollm2-1.7b",
        Shape {
            dim: 2048,
            layers: 24,
            heads: 32,
            kv_heads: 32,
            ffn: 8192,
            vocab: 49152,
            ctx: 8192,
            rope_base: 130_000.0,
            eps: 1e-5,
        },
    ),
    (
        "tinyllama-1.1b",
        Shape {
            dim: 2048,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            ffn: 5632,
            vocab: 32000,
            ctx: 2048,
            rope_base: 10_000.0,
            eps: 1e-5,
        },
    ),
    (
        "llama-7b",
        Shape {
            dim: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            ffn: 11008,
            vocab: 32000,
            ctx: 4096,
            rope_base: 10_000.0,
            eps: 1e-5,
        },
    ),
];

/// What is wrong with a requested model.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("shape: {0}")]
    Shape(String),
    #[error("chord does not write {0} (it writes f32, f16, q8_0, q4_0 and q4_1)")]
    DType(DType),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Shape {
    /// The preset called `name` (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Shape> {
        PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, s)| s.clone())
    }

    /// The width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// The number of weights in the file (`None` past `u64`).
    pub fn params(&self) -> Option<u64> {
        let (d, l, kv) = (self.dim as u64, self.layers as u64, self.kv_dim() as u64);
        let (f, v) = (self.ffn as u64, self.vocab as u64);
        let layer = (2 * d)
            .checked_add(d.checked_mul(d)?.checked_mul(2)?)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?
            .checked_add(d.checked_mul(f)?.checked_mul(3)?)?;
        v.checked_mul(d)?
            .checked_mul(2)?
            .checked_add(d)?
            .checked_add(l.checked_mul(layer)?)
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Checks that llama's graph can run this shape stored as `dtype`.
    pub fn check(&self, dtype: DType) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Shape(m));
        let sizes = [
            ("dim", self.dim),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv heads", self.kv_heads),
            ("ffn", self.ffn),
            ("ctx", self.ctx),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        // The GGUF keys hold 32-bit values.
        if let Some((name, v)) = sizes.iter().find(|(_, v)| u32::try_from(*v).is_err()) {
            return bad(format!("{name} {v} does not fit the file's 32-bit field"));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return bad(format!(
                "dim {} is not a multiple of heads {}",
                self.dim, self.heads
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads {} is not a multiple of kv heads {}",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "the head size {} is odd: RoPE rotates pairs",
                self.head_dim()
            ));
        }
        if self.vocab < MIN_VOCAB || self.vocab > u32::MAX as usize {
            return bad(format!(
                "vocab {} must be {MIN_VOCAB} (BOS, EOS and 256 bytes) to {}",
                self.vocab,
                u32::MAX
            ));
        }
        let block = dtype.block_len();
        for (name, v) in [("dim", self.dim), ("ffn", self.ffn)] {
            if !v.is_multiple_of(block) {
                return bad(format!(
                    "{name} {v} is not a multiple of {dtype}'s block of {block}"
                ));
            }
        }
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(format!("rope base {} must be above 1", self.rope_base));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps {} must be above 0", self.eps));
        }
        // 2^46 weights: a 256 TiB F32 file, far past any disk this runs on.
        if self.params().is_none_or(|p| p > (1u64 << 46)) {
            return bad(format!(
                "dim {}, {} layers, ffn {} and vocab {} make too many weights",
                self.dim, self.layers, self.ffn, self.vocab
            ));
        }
        Ok(())
    }
}

/// The vocabulary: tokens, their types (1 normal, 3 control) and the merges (see the module
/// docs).
fn vocabulary(vocab: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let alphabet = crate::tokenizer::byte_alphabet();
    let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let letters: Vec<char> = ('a'..='z').collect();
    let mut frontier: Vec<String> = std::iter::once(alphabet[b' ' as usize])
        .chain(letters.iter().copied())
        .map(String::from)
        .collect();
    let mut merges = Vec::new();
    'fill: loop {
        let mut next = Vec::with_capacity(frontier.len() * letters.len());
        for word in &frontier {
            for &c in &letters {
                if tokens.len() >= vocab {
                    break 'fill;
                }
                merges.push(format!("{word} {c}"));
                tokens.push(format!("{word}{c}"));
                next.push(format!("{word}{c}"));
            }
        }
        frontier = next;
    }
    tokens.truncate(vocab);
    let mut types = vec![1i32; tokens.len()];
    types[..2].fill(3);
    (tokens, types, merges)
}

/// The file's metadata.
fn metadata(shape: &Shape, dtype: DType, seed: u64) -> Writer {
    let mut w = Writer::new();
    let u32v = |n: usize| Value::U32(n as u32);
    let (tokens, types, merges) = vocabulary(shape.vocab);
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata(
            "general.name",
            Value::String(format!("chord synthetic (seed {seed})")),
        )
        .metadata(
            "general.file_type",
            Value::U32(crate::convert::file_type(dtype)),
        )
        .metadata("llama.vocab_size", u32v(shape.vocab))
        .metadata("llama.context_length", u32v(shape.ctx))
        .metadata("llama.embedding_length", u32v(shape.dim))
        .metadata("llama.block_count", u32v(shape.layers))
        .metadata("llama.feed_forward_length", u32v(shape.ffn))
        .metadata("llama.rope.dimension_count", u32v(shape.head_dim()))
        .metadata("llama.attention.head_count", u32v(shape.heads))
        .metadata("llama.attention.head_count_kv", u32v(shape.kv_heads))
        .metadata("llama.rope.freq_base", Value::F32(shape.rope_base))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(shape.eps),
        )
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("gpt-2".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(tokens.into())),
        )
        .metadata("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(merges.into())),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(0))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Rows of RMS exactly this.
    Rows(f64),
    /// `1 + 0.25 g`: a norm weight.
    Norm,
}

/// The tensor table, in the order llama.cpp's converter writes it, with each tensor's fill.
fn tensors(shape: &Shape, dtype: DType) -> Vec<(TensorEntry, Fill)> {
    let (d, q, kv, f) = (shape.dim, shape.dim, shape.kv_dim(), shape.ffn);
    let fan_in = |n: usize| Fill::Rows(1.0 / (n as f64).sqrt());
    // GGUF dims: contiguous (the row, what a projection reads) first.
    let matrix = |name: String, cols: usize, rows: usize, fill: Fill| {
        let entry = TensorEntry {
            name,
            dims: vec![cols, rows],
            dtype,
        };
        (entry, fill)
    };
    let norm = |name: String| {
        let entry = TensorEntry {
            name,
            dims: vec![d],
            dtype: DType::F32,
        };
        (entry, Fill::Norm)
    };
    let mut out = vec![matrix(
        "token_embd.weight".into(),
        d,
        shape.vocab,
        Fill::Rows(1.0),
    )];
    for l in 0..shape.layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        out.push(norm(n("attn_norm")));
        out.push(matrix(n("attn_q"), d, q, fan_in(d)));
        out.push(matrix(n("attn_k"), d, kv, fan_in(d)));
        out.push(matrix(n("attn_v"), d, kv, fan_in(d)));
        out.push(matrix(n("attn_output"), q, d, fan_in(q)));
        out.push(norm(n("ffn_norm")));
        out.push(matrix(n("ffn_gate"), d, f, fan_in(d)));
        out.push(matrix(n("ffn_up"), d, f, fan_in(d)));
        out.push(matrix(n("ffn_down"), f, d, fan_in(f)));
    }
    out.push(norm("output_norm.weight".into()));
    out.push(matrix(
        "output.weight".into(),
        d,
        shape.vocab,
        Fill::Rows(LOGIT_STD / (d as f64).sqrt()),
    ));
    out
}

/// splitmix64's output function.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One row's stream of near-Gaussian values of unit variance.
struct Stream(u64);

impl Stream {
    fn new(seed: u64, tensor: u64, row: u64) -> Stream {
        Stream(mix(mix(seed ^ mix(tensor)) ^ row))
    }

    /// Uniform on [-0.5, 0.5).
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (mix(self.0) >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Irwin-Hall: four uniforms summed (variance 1/3), times √3.
    fn gaussian(&mut self) -> f64 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        s * 3f64.sqrt()
    }
}

/// FNV-1a of a tensor's name: its rows' streams differ from every other tensor's.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fills `row` (row number `r` of the tensor hashed to `tensor`).
fn fill_row(seed: u64, tensor: u64, r: usize, fill: Fill, row: &mut [f32]) {
    let mut s = Stream::new(seed, tensor, r as u64);
    match fill {
        Fill::Norm => row
            .iter_mut()
            .for_each(|v| *v = (1.0 + 0.25 * s.gaussian()) as f32),
        Fill::Rows(sigma) => {
            let values: Vec<f64> = (0..row.len()).map(|_| s.gaussian()).collect();
            let rms = (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt();
            for (o, v) in row.iter_mut().zip(values) {
                *o = (v * sigma / rms) as f32;
            }
        }
    }
}

/// What [`write`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Weights in the file.
    pub params: u64,
    /// Tensors in the file.
    pub tensors: usize,
}

/// Writes a synthetic model of `shape` in `dtype` (matrices; norm weights stay F32) with
/// weights from `seed`, as a GGUF file, to `out`. Holds 16 MiB of f32 values and their
/// encoding at a time.
/// Uses rayon's pool to draw and quantize rows.
///
/// Errors: a shape llama's graph cannot run or `dtype` cannot hold ([`Shape::check`]), a
/// format chord does not write, and `out`'s own errors.
pub fn write(
    shape: &Shape,
    dtype: DType,
    seed: u64,
    out: &mut impl Write,
) -> Result<Written, SynthError> {
    if !crate::convert::TARGETS.contains(&dtype) {
        return Err(SynthError::DType(dtype));
    }
    shape.check(dtype)?;
    let plan = tensors(shape, dtype);
    let table: Vec<TensorEntry> = plan.iter().map(|(e, _)| e.clone()).collect();
    metadata(shape, dtype, seed).write_streamed(&table, out, |i, out| {
        let (entry, fill) = &plan[i];
        let cols = entry.dims[0];
        let rows = entry.dims.get(1).copied().unwrap_or(1);
        let hash = name_hash(&entry.name);
        let chunk_rows = ((4 << 20) / cols).clamp(1, rows);
        let mut values = Vec::new();
        for start in (0..rows).step_by(chunk_rows) {
            let n = chunk_rows.min(rows - start);
            values.resize(n * cols, 0.0f32);
            values
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(r, row)| fill_row(seed, hash, start + r, *fill, row));
            let bytes: Vec<Vec<u8>> = values
                .par_chunks(cols * 64)
                .map(|rows| {
                    chord_kernels::quant::quantize(entry.dtype, rows)
                        .expect("rows of whole blocks, checked by Shape::check")
                })
                .collect();
            for b in bytes {
                out.write_all(&b)?;
            }
        }
        Ok(())
    })?;
    Ok(Written {
        params: shape.params().expect("bounded by Shape::check"),
        tensors: table.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_whole_and_merges_make_its_tokens() {
        let (tokens, types, merges) = vocabulary(2000);
        assert_eq!(tokens.len(), 2000);
        assert_eq!(types.iter().filter(|&&t| t == 3).count(), 2);
        assert_eq!(merges.len(), 2000 - MIN_VOCAB);
        assert_eq!(tokens[2 + b'a' as usize], "a");
        assert_eq!(merges[0], "Ġ a");
        assert_eq!(tokens[MIN_VOCAB], "Ġa");
        let unique: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(unique.len(), tokens.len(), "a token twice");
        for (m, t) in merges.iter().zip(&tokens[MIN_VOCAB..]) {
            assert_eq!(m.replace(' ', ""), *t);
        }
        assert_eq!(vocabulary(MIN_VOCAB).2.len(), 0);
    }

    #[test]
    fn rows_have_the_rms_asked_for_and_depend_only_on_seed_name_and_row() {
        let mut a = vec![0.0f32; 512];
        let mut b = vec![0.0f32; 512];
        fill_row(1, name_hash("x"), 3, Fill::Rows(0.125), &mut a);
        let rms = (a.iter().map(|v| (v * v) as f64).sum::<f64>() / 512.0).sqrt();
        assert!((rms - 0.125).abs() < 1e-6, "rms {rms}");
        fill_row(1, name_hash("x"), 3, Fill::Rows(0.125), &mut b);
        assert_eq!(a, b);
        fill_row(1, name_hash("x"), 4, Fill::Rows(0.125), &mut b);
        assert_ne!(a, b);
        fill_row(2, name_hash("x"), 3, Fill::Rows(0.125), &mut b);
        assert_ne!(a, b);
        // Near-Gaussian: about 68% within one standard deviation, none past √12·σ.
        let within = a.iter().filter(|v| v.abs() < 0.125).count() as f64 / 512.0;
        assert!((0.6..0.76).contains(&within), "{within}");
    }

    #[test]
    fn shapes_llama_cannot_run_are_refused_by_name() {
        let good = Shape::preset("tinyllama-1.1b").unwrap();
        good.check(DType::Q4_0).unwrap();
        let cases = [
            (
                Shape {
                    heads: 30,
                    ..good.clone()
                },
                "multiple of heads",
            ),
            (
                Shape {
                    kv_heads: 5,
                    ..good.clone()
                },
                "kv heads",
            ),
            (
                Shape {
                    vocab: 100,
                    ..good.clone()
                },
                "vocab",
            ),
            (
                Shape {
                    ffn: 5630,
                    ..good.clone()
                },
                "ffn 5630",
            ),
            (
                Shape {
                    layers: 0,
                    ..good.clone()
                },
                "layers",
            ),
            (
                Shape {
                    rope_base: 0.5,
                    ..good.clone()
                },
                "rope",
            ),
            (
                Shape {
                    dim: 96,
                    ..good.clone()
                },
                "head size 3 is odd",
            ),
        ];
        for (shape, want) in cases {
            let e = shape.check(DType::Q4_0).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(good.params(), Some(1_100_048_384));
        let huge = [
            (
                Shape {
                    ctx: 1 << 32,
                    ..good.clone()
                },
                "ctx 4294967296 does not fit",
            ),
            (
                Shape {
                    dim: 1 << 32,
                    heads: 1,
                    kv_heads: 1,
                    ..good.clone()
                },
                "dim 4294967296",
            ),
            (
                Shape {
                    dim: 1 << 31,
                    heads: 1,
                    kv_heads: 1,
                    ..good.clone()
                },
                "too many weights",
            ),
        ];
        for (shape, want) in huge {
            let e = shape.check(DType::F32).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
