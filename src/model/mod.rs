//! A llama-family transformer, written once for any [`Backend`].
//!
//! The forward pass reads as the architecture does: embed; per layer RMSNorm, Q/K/V
//! projections, RoPE, causal grouped-query attention over the KV cache, output projection,
//! residual, RMSNorm, SwiGLU feed-forward, residual; final RMSNorm; classifier. A prompt runs
//! in batches of up to `max_batch` rows (one matmul per weight per batch), then one token at
//! a time. Every buffer lives in [`State`], allocated once.

pub mod observe;

use crate::backend::{AttentionParams, Backend, RopeLayout, RopeParams};
use crate::gguf::{GgufError, GgufFile};
use observe::{Activation, NoObserver, Observer, Point};

/// An error building or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Backend(#[from] crate::Error),
    /// The file describes a model chord cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A request the model cannot serve (a token outside the vocabulary, a full context).
    #[error("{0}")]
    Input(String),
}

/// Hyper-parameters, all read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `general.architecture`.
    pub arch: String,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    /// The context length the model was trained for.
    pub ctx_len: usize,
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    pub norm_eps: f32,
}

impl Config {
    /// Reads the hyper-parameters of a llama-family model.
    pub fn from_gguf(file: &GgufFile) -> Result<Config, ModelError> {
        let g = file.gguf();
        let arch = g.str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "architecture '{arch}' (chord runs llama)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let dim = g.usize(&key("embedding_length"))?;
        let n_heads = g.usize(&key("attention.head_count"))?;
        let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(_) => g.usize(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        let embed = g
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::Tensor {
                name: "token_embd.weight".into(),
                problem: "missing".into(),
            })?;
        let vocab = match g.get(&key("vocab_size")) {
            Some(_) => g.usize(&key("vocab_size"))?,
            None => embed.rows(),
        };
        let c = Config {
            dim,
            n_layers: g.usize(&key("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim: dim.checked_div(n_heads).unwrap_or(0),
            ffn_dim: g.usize(&key("feed_forward_length"))?,
            vocab,
            ctx_len: g.usize(&key("context_length"))?,
            rope_theta: match g.get(&key("rope.freq_base")) {
                Some(_) => g.f32(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            // GGUF llama weights are permuted at conversion for adjacent-pair rotation.
            rope_layout: RopeLayout::Interleaved,
            norm_eps: g.f32(&key("attention.layer_norm_rms_epsilon"))?,
            arch,
        };
        let bad = |what: String| Err(ModelError::Unsupported(what));
        if c.dim == 0 || c.n_layers == 0 || c.n_heads == 0 || c.ffn_dim == 0 || c.vocab == 0 {
            return bad(format!("zero-sized hyper-parameters: {c:?}"));
        }
        if !c.dim.is_multiple_of(c.n_heads)
            || !c.head_dim.is_multiple_of(2)
            || c.n_kv_heads == 0
            || !c.n_heads.is_multiple_of(c.n_kv_heads)
        {
            return bad(format!(
                "{} heads of {} over {} kv heads in dim {}",
                c.n_heads, c.head_dim, c.n_kv_heads, c.dim
            ));
        }
        if embed.rows() != c.vocab || embed.cols() != c.dim {
            return bad(format!(
                "token_embd.weight is {} × {}, expected vocab × dim = {} × {}",
                embed.rows(),
                embed.cols(),
                c.vocab,
                c.dim
            ));
        }
        Ok(c)
    }

    /// `n_kv_heads * head_dim`: the width of a key or value row.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Which logits a batch computes.
#[derive(Clone, Copy)]
enum Logits {
    None,
    /// The last row's, into `State::logits`.
    Last,
    /// Every row's, into `State::all_logits` from row `first` of the whole call.
    Rows(usize),
}

/// One transformer block's weights.
struct Layer<W> {
    attn_norm: Vec<f32>, // (dim,)
    wq: W,               // (dim, dim)
    wk: W,               // (kv_dim, dim)
    wv: W,               // (kv_dim, dim)
    wo: W,               // (dim, dim)
    ffn_norm: Vec<f32>,  // (dim,)
    w_gate: W,           // (ffn, dim)
    w_up: W,             // (ffn, dim)
    w_down: W,           // (dim, ffn)
}

/// A llama-family model prepared for backend `B`, borrowing from the file where `B` keeps
/// weights as stored.
pub struct Model<'f, B: Backend + 'f> {
    pub config: Config,
    backend: B,
    embed: B::Weight<'f>, // (vocab, dim)
    layers: Vec<Layer<B::Weight<'f>>>,
    output_norm: Vec<f32>,         // (dim,)
    output: Option<B::Weight<'f>>, // (vocab, dim); None: tied to `embed`
}

/// Every activation buffer of a forward pass, and the KV cache: allocated once.
pub struct State {
    max_batch: usize,
    max_seq: usize,
    x: Vec<f32>,           // (max_batch, dim) residual stream
    xb: Vec<f32>,          // (max_batch, dim) normed input / attention output
    xb2: Vec<f32>,         // (max_batch, dim) projection output
    q: Vec<f32>,           // (max_batch, dim)
    k: Vec<f32>,           // (max_batch, kv_dim)
    v: Vec<f32>,           // (max_batch, kv_dim)
    gate: Vec<f32>,        // (max_batch, ffn)
    up: Vec<f32>,          // (max_batch, ffn)
    hidden: Vec<f32>,      // (max_batch, ffn)
    scores: Vec<f32>,      // (max_seq,)
    key_cache: Vec<f32>,   // (n_layers, max_seq, kv_dim)
    value_cache: Vec<f32>, // (n_layers, max_seq, kv_dim)
    logits: Vec<f32>,      // (vocab,)
    all_logits: Vec<f32>,  // (tokens of the last forward_all, vocab), grown on first use
    /// Positions filled in the KV cache.
    pub pos: usize,
}

impl State {
    /// Buffers for `config`, a context of `max_seq` tokens and prompt batches of `max_batch`.
    pub fn new(config: &Config, max_seq: usize, max_batch: usize) -> State {
        let (d, kv, f) = (config.dim, config.kv_dim(), config.ffn_dim);
        let b = max_batch.max(1);
        let cache = config.n_layers * max_seq * kv;
        State {
            max_batch: b,
            max_seq,
            x: vec![0.0; b * d],
            xb: vec![0.0; b * d],
            xb2: vec![0.0; b * d],
            q: vec![0.0; b * d],
            k: vec![0.0; b * kv],
            v: vec![0.0; b * kv],
            gate: vec![0.0; b * f],
            up: vec![0.0; b * f],
            hidden: vec![0.0; b * f],
            scores: vec![0.0; max_seq],
            key_cache: vec![0.0; cache],
            value_cache: vec![0.0; cache],
            logits: vec![0.0; config.vocab],
            all_logits: Vec::new(),
            pos: 0,
        }
    }

    /// The context this state holds, in tokens.
    pub fn max_seq(&self) -> usize {
        self.max_seq
    }

    /// Forgets the cached positions (a new conversation).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

impl<'f, B: Backend + 'f> Model<'f, B> {
    /// Prepares every weight of `file` for `backend`.
    pub fn load(file: &'f GgufFile, backend: B) -> Result<Model<'f, B>, ModelError> {
        let config = Config::from_gguf(file)?;
        let (d, kv, f) = (config.dim, config.kv_dim(), config.ffn_dim);
        let weight = |name: &str, rows: usize, cols: usize| -> Result<B::Weight<'f>, ModelError> {
            let view = file.weight(name)?;
            if view.dims() != (rows, cols) {
                return Err(GgufError::Tensor {
                    name: name.into(),
                    problem: format!("is {:?}, expected {rows} × {cols}", view.dims()),
                }
                .into());
            }
            let bytes = view.bytes();
            let w = backend.prepare(view)?;
            if !backend.borrows_view(&w) {
                // The backend holds its own copy: the file's pages need not stay resident.
                file.release(bytes);
            }
            Ok(w)
        };
        let norm = |name: &str| -> Result<Vec<f32>, ModelError> {
            let view = file.weight(name)?;
            if view.dims() != (1, d) {
                return Err(GgufError::Tensor {
                    name: name.into(),
                    problem: format!("is {:?}, expected a vector of {d}", view.dims()),
                }
                .into());
            }
            Ok(view.to_f32().into_owned())
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: norm(&n("attn_norm"))?,
                wq: weight(&n("attn_q"), d, d)?,
                wk: weight(&n("attn_k"), kv, d)?,
                wv: weight(&n("attn_v"), kv, d)?,
                wo: weight(&n("attn_output"), d, d)?,
                ffn_norm: norm(&n("ffn_norm"))?,
                w_gate: weight(&n("ffn_gate"), f, d)?,
                w_up: weight(&n("ffn_up"), f, d)?,
                w_down: weight(&n("ffn_down"), d, f)?,
            });
        }
        let embed = weight("token_embd.weight", config.vocab, d)?;
        let output = match file.gguf().tensor("output.weight") {
            Some(_) => Some(weight("output.weight", config.vocab, d)?),
            None => None,
        };
        let output_norm = norm("output_norm.weight")?;
        Ok(Model {
            config,
            backend,
            embed,
            layers,
            output_norm,
            output,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Runs `tokens` at the next positions of `state` and returns the logits of the last one
    /// `(vocab,)`. A prompt runs in batches of `state`'s `max_batch`.
    pub fn forward<'s>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
    ) -> Result<&'s [f32], ModelError> {
        self.forward_observed(state, tokens, &mut NoObserver)
    }

    /// Runs `tokens` like [`forward`](Model::forward) and returns the logits of every one,
    /// `(tokens.len(), vocab)` (for scoring text, as perplexity does).
    pub fn forward_all<'s>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
    ) -> Result<&'s [f32], ModelError> {
        self.forward_all_observed(state, tokens, &mut NoObserver)
    }

    /// [`forward`](Model::forward), calling `observer` at every point of the pass (see
    /// [`observe`]).
    pub fn forward_observed<'s, O: Observer + ?Sized>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
        observer: &mut O,
    ) -> Result<&'s [f32], ModelError> {
        self.run(state, tokens, false, observer)?;
        Ok(&state.logits)
    }

    /// [`forward_all`](Model::forward_all), calling `observer` at every point of the pass.
    pub fn forward_all_observed<'s, O: Observer + ?Sized>(
        &self,
        state: &'s mut State,
        tokens: &[u32],
        observer: &mut O,
    ) -> Result<&'s [f32], ModelError> {
        let n = tokens.len() * self.config.vocab;
        if state.all_logits.len() < n {
            state.all_logits.resize(n, 0.0);
        }
        self.run(state, tokens, true, observer)?;
        Ok(&state.all_logits[..n])
    }

    fn run<O: Observer + ?Sized>(
        &self,
        state: &mut State,
        tokens: &[u32],
        all: bool,
        obs: &mut O,
    ) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("forward: no tokens".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(ModelError::Input(format!(
                "token {t} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        if state.pos + tokens.len() > state.max_seq {
            return Err(ModelError::Input(format!(
                "context full: {} cached + {} new tokens exceed the {}-token context",
                state.pos,
                tokens.len(),
                state.max_seq
            )));
        }
        let n_chunks = tokens.len().div_ceil(state.max_batch);
        for (i, chunk) in tokens.chunks(state.max_batch).enumerate() {
            let logits = match (all, i + 1 == n_chunks) {
                (true, _) => Logits::Rows(i * state.max_batch),
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            self.run_batch(state, chunk, logits, obs)?;
        }
        Ok(())
    }

    /// One batch of `m` tokens at positions `state.pos ..`, computing the logits `want` asks for.
    fn run_batch<O: Observer + ?Sized>(
        &self,
        s: &mut State,
        tokens: &[u32],
        want: Logits,
        obs: &mut O,
    ) -> Result<(), ModelError> {
        let b = &self.backend;
        let c = &self.config;
        let (m, d, kv, f) = (tokens.len(), c.dim, c.kv_dim(), c.ffn_dim);
        let pos = s.pos;
        let rope = RopeParams {
            head_dim: c.head_dim,
            theta: c.rope_theta,
            layout: c.rope_layout,
        };
        let attn = AttentionParams {
            m,
            pos,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        let (x, xb, xb2) = (&mut s.x[..m * d], &mut s.xb[..m * d], &mut s.xb2[..m * d]);
        let (q, k, v) = (&mut s.q[..m * d], &mut s.k[..m * kv], &mut s.v[..m * kv]);
        let (gate, up, hidden) = (
            &mut s.gate[..m * f],
            &mut s.up[..m * f],
            &mut s.hidden[..m * f],
        );

        // Embed.
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            b.embedding(&self.embed, t as usize, row)?;
        }
        at(obs, Point::Embedding, None, pos, d, x);
        let layer_cache = s.max_seq * kv;
        for (l, w) in self.layers.iter().enumerate() {
            let ly = Some(l);
            // Attention: norm, project, rotate, cache, attend, project back, residual.
            b.rmsnorm(x, &w.attn_norm, xb, c.norm_eps)?;
            at(obs, Point::AttnNorm, ly, pos, d, xb);
            b.matmuls(xb, &[&w.wq, &w.wk, &w.wv], &mut [q, k, v], m)?;
            at(obs, Point::Q, ly, pos, d, q);
            at(obs, Point::K, ly, pos, kv, k);
            at(obs, Point::V, ly, pos, kv, v);
            b.rope(q, m, pos, &rope)?;
            b.rope(k, m, pos, &rope)?;
            at(obs, Point::QRope, ly, pos, d, q);
            at(obs, Point::KRope, ly, pos, kv, k);
            let kc = &mut s.key_cache[l * layer_cache..][..layer_cache];
            let vc = &mut s.value_cache[l * layer_cache..][..layer_cache];
            kc[pos * kv..(pos + m) * kv].copy_from_slice(k);
            vc[pos * kv..(pos + m) * kv].copy_from_slice(v);
            b.attention(
                q,
                &kc[..(pos + m) * kv],
                &vc[..(pos + m) * kv],
                xb,
                &mut s.scores,
                &attn,
            )?;
            at(obs, Point::Attn, ly, pos, d, xb);
            b.matmul(xb, &w.wo, xb2, m)?;
            at(obs, Point::AttnOut, ly, pos, d, xb2);
            b.add(x, xb2)?;
            at(obs, Point::ResidAttn, ly, pos, d, x);
            // Feed-forward: norm, gate and up, SwiGLU, down, residual.
            b.rmsnorm(x, &w.ffn_norm, xb, c.norm_eps)?;
            at(obs, Point::FfnNorm, ly, pos, d, xb);
            b.matmuls(xb, &[&w.w_gate, &w.w_up], &mut [gate, up], m)?;
            at(obs, Point::Gate, ly, pos, f, gate);
            at(obs, Point::Up, ly, pos, f, up);
            b.swiglu(gate, up, hidden)?;
            at(obs, Point::Act, ly, pos, f, hidden);
            b.matmul(hidden, &w.w_down, xb2, m)?;
            at(obs, Point::FfnOut, ly, pos, d, xb2);
            b.add(x, xb2)?;
            at(obs, Point::ResidFfn, ly, pos, d, x);
        }
        s.pos += m;
        // Final norm and classifier, for the rows asked for.
        let classifier = self.output.as_ref().unwrap_or(&self.embed);
        match want {
            Logits::None => {}
            Logits::Last => {
                let normed = &mut xb[..d];
                b.rmsnorm(&x[(m - 1) * d..], &self.output_norm, normed, c.norm_eps)?;
                at(obs, Point::FinalNorm, None, pos + m - 1, d, normed);
                b.matmul(normed, classifier, &mut s.logits, 1)?;
                at(
                    obs,
                    Point::Logits,
                    None,
                    pos + m - 1,
                    c.vocab,
                    &mut s.logits,
                );
            }
            Logits::Rows(first) => {
                b.rmsnorm(x, &self.output_norm, xb, c.norm_eps)?;
                at(obs, Point::FinalNorm, None, pos, d, xb);
                let out = &mut s.all_logits[first * c.vocab..(first + m) * c.vocab];
                b.matmul(xb, classifier, out, m)?;
                at(obs, Point::Logits, None, pos, c.vocab, out);
            }
        }
        Ok(())
    }
}

/// Hands the activation `data (rows, cols)` of rows at positions `pos ..` to `obs`.
#[inline(always)]
fn at<O: Observer + ?Sized>(
    obs: &mut O,
    point: Point,
    layer: Option<usize>,
    pos: usize,
    cols: usize,
    data: &mut [f32],
) {
    let rows = data.len() / cols;
    obs.observe(Activation {
        point,
        layer,
        positions: pos..pos + rows,
        rows,
        cols,
        data,
    });
}
