//! A llama-family transformer, written once for any [`Backend`].
//!
//! The forward pass reads as the architecture does: embed; per layer RMSNorm, Q/K/V
//! projections, RoPE, causal grouped-query attention over the KV cache, output projection,
//! residual, RMSNorm, gated feed-forward, residual; final RMSNorm; classifier. The
//! switches of [`Config`] add what other families change (Gemma 3: scaled embeddings, q/k
//! norms, post-norms, GEGLU, sliding windows). A prompt runs in batches of up to
//! `max_batch` rows (one matmul per weight per batch), then one token at a time. Every
//! buffer lives in [`State`], allocated once.

mod config;
pub mod observe;

pub use config::{Config, GateActivation};

use crate::backend::{AttentionParams, Backend, RopeParams};
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

/// Which logits a batch computes.
#[derive(Clone, Copy)]
enum Logits {
    None,
    /// The last row's, into `State::logits`.
    Last,
    /// Every row's, into `State::all_logits` from row `first` of the whole call.
    Rows(usize),
}

/// One transformer block's weights. `attn = n_heads * head_dim`, `kv = n_kv_heads * head_dim`.
struct Layer<W> {
    attn_norm: Vec<f32>, // (dim,)
    wq: W,               // (attn, dim)
    wk: W,               // (kv, dim)
    wv: W,               // (kv, dim)
    /// Biases of q, k and v, `(attn,)`, `(kv,)`, `(kv,)`, when [`Config::qkv_bias`].
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head norms of q and k, `(head_dim,)` each, when [`Config::qk_norm`].
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: W, // (dim, attn)
    /// Norms of the attention and feed-forward outputs, `(dim,)`, when [`Config::post_norms`].
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    ffn_norm: Vec<f32>, // (dim,)
    w_gate: W,          // (ffn, dim)
    w_up: W,            // (ffn, dim)
    w_down: W,          // (dim, ffn)
}

/// A model prepared for backend `B`, borrowing from the file where `B` keeps weights as
/// stored.
pub struct Model<'f, B: Backend + 'f> {
    /// The architecture, read at load. A researcher may change the run-time switches
    /// (window, local layers, RoPE bases and layout, scales, activation, soft cap, norm
    /// epsilon) between passes; the ones that decide which tensors were loaded (`qk_norm`,
    /// `qkv_bias`, `post_norms`) and the sizes are fixed at load and must not change.
    pub config: Config,
    backend: B,
    embed: B::Weight<'f>, // (vocab, dim)
    layers: Vec<Layer<B::Weight<'f>>>,
    output_norm: Vec<f32>,         // (dim,)
    output: Option<B::Weight<'f>>, // (vocab, dim); None: tied to `embed`
}

/// Every activation buffer of a forward pass, and the KV cache: allocated once.
/// `attn = n_heads * head_dim`, `kv = n_kv_heads * head_dim`.
pub struct State {
    max_batch: usize,
    max_seq: usize,
    x: Vec<f32>,           // (max_batch, dim) residual stream
    xb: Vec<f32>,          // (max_batch, dim) normed input
    xb2: Vec<f32>,         // (max_batch, dim) projection output
    q: Vec<f32>,           // (max_batch, attn)
    k: Vec<f32>,           // (max_batch, kv)
    v: Vec<f32>,           // (max_batch, kv)
    att: Vec<f32>,         // (max_batch, attn) attention output; scratch of the q/k norms
    gate: Vec<f32>,        // (max_batch, ffn)
    up: Vec<f32>,          // (max_batch, ffn)
    hidden: Vec<f32>,      // (max_batch, ffn)
    scores: Vec<f32>,      // (max_seq,)
    key_cache: Vec<f32>,   // (n_layers, max_seq, kv)
    value_cache: Vec<f32>, // (n_layers, max_seq, kv)
    logits: Vec<f32>,      // (vocab,)
    all_logits: Vec<f32>,  // (tokens of the last forward_all, vocab), grown on first use
    /// Positions filled in the KV cache.
    pub pos: usize,
}

impl State {
    /// Buffers for `config`, a context of `max_seq` tokens and prompt batches of `max_batch`.
    pub fn new(config: &Config, max_seq: usize, max_batch: usize) -> State {
        let (d, a, kv, f) = (
            config.dim,
            config.attn_dim(),
            config.kv_dim(),
            config.ffn_dim,
        );
        let b = max_batch.max(1);
        let cache = config.n_layers * max_seq * kv;
        State {
            max_batch: b,
            max_seq,
            x: vec![0.0; b * d],
            xb: vec![0.0; b * d],
            xb2: vec![0.0; b * d],
            q: vec![0.0; b * a],
            k: vec![0.0; b * kv],
            v: vec![0.0; b * kv],
            att: vec![0.0; b * a],
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
        let (d, a, kv, f) = (
            config.dim,
            config.attn_dim(),
            config.kv_dim(),
            config.ffn_dim,
        );
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
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let view = file.weight(name)?;
            if view.dims() != (1, len) {
                return Err(GgufError::Tensor {
                    name: name.into(),
                    problem: format!("is {:?}, expected a vector of {len}", view.dims()),
                }
                .into());
            }
            Ok(view.to_f32().into_owned())
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let hd = config.head_dim;
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm"), d)?,
                wq: weight(&n("attn_q"), a, d)?,
                wk: weight(&n("attn_k"), kv, d)?,
                wv: weight(&n("attn_v"), kv, d)?,
                qkv_bias: match config.qkv_bias {
                    true => {
                        let bias = |s: &str, len| vector(&format!("blk.{l}.{s}.bias"), len);
                        Some([bias("attn_q", a)?, bias("attn_k", kv)?, bias("attn_v", kv)?])
                    }
                    false => None,
                },
                qk_norm: match config.qk_norm {
                    true => Some((
                        vector(&n("attn_q_norm"), hd)?,
                        vector(&n("attn_k_norm"), hd)?,
                    )),
                    false => None,
                },
                wo: weight(&n("attn_output"), d, a)?,
                post_norms: match config.post_norms {
                    true => Some((
                        vector(&n("post_attention_norm"), d)?,
                        vector(&n("post_ffw_norm"), d)?,
                    )),
                    false => None,
                },
                ffn_norm: vector(&n("ffn_norm"), d)?,
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
        let output_norm = vector("output_norm.weight", d)?;
        backend.prepared();
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
        let (m, d, a, kv, f) = (tokens.len(), c.dim, c.attn_dim(), c.kv_dim(), c.ffn_dim);
        let pos = s.pos;
        let (x, xb, xb2) = (&mut s.x[..m * d], &mut s.xb[..m * d], &mut s.xb2[..m * d]);
        let (q, k, v) = (&mut s.q[..m * a], &mut s.k[..m * kv], &mut s.v[..m * kv]);
        let att = &mut s.att[..m * a];
        let (gate, up, hidden) = (
            &mut s.gate[..m * f],
            &mut s.up[..m * f],
            &mut s.hidden[..m * f],
        );

        // Embed.
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            b.embedding(&self.embed, t as usize, row)?;
        }
        if c.embed_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= c.embed_scale);
        }
        at(obs, Point::Embedding, None, pos, d, x);
        let layer_cache = s.max_seq * kv;
        for (l, w) in self.layers.iter().enumerate() {
            let ly = Some(l);
            let (window, theta) = c.layer_attention(l);
            let rope = RopeParams {
                head_dim: c.head_dim,
                theta,
                layout: c.rope_layout,
            };
            // Attention: norm, project, (norm heads), rotate, cache, attend, project back,
            // (norm), residual.
            b.rmsnorm(x, &w.attn_norm, xb, c.norm_eps)?;
            at(obs, Point::AttnNorm, ly, pos, d, xb);
            b.matmuls(xb, &[&w.wq, &w.wk, &w.wv], &mut [q, k, v], m)?;
            if let Some(biases) = &w.qkv_bias {
                for (y, bias) in [&mut *q, &mut *k, &mut *v].into_iter().zip(biases) {
                    for row in y.chunks_exact_mut(bias.len()) {
                        b.add(row, bias)?;
                    }
                }
            }
            at(obs, Point::Q, ly, pos, a, q);
            at(obs, Point::K, ly, pos, kv, k);
            at(obs, Point::V, ly, pos, kv, v);
            if let Some((q_norm, k_norm)) = &w.qk_norm {
                // Every head a row of head_dim; `att` is free until attention writes it.
                b.rmsnorm(q, q_norm, att, c.norm_eps)?;
                q.copy_from_slice(att);
                let kn = &mut att[..m * kv];
                b.rmsnorm(k, k_norm, kn, c.norm_eps)?;
                k.copy_from_slice(kn);
                at(obs, Point::QNorm, ly, pos, a, q);
                at(obs, Point::KNorm, ly, pos, kv, k);
            }
            b.rope(q, m, pos, &rope)?;
            b.rope(k, m, pos, &rope)?;
            at(obs, Point::QRope, ly, pos, a, q);
            at(obs, Point::KRope, ly, pos, kv, k);
            let kc = &mut s.key_cache[l * layer_cache..][..layer_cache];
            let vc = &mut s.value_cache[l * layer_cache..][..layer_cache];
            kc[pos * kv..(pos + m) * kv].copy_from_slice(k);
            vc[pos * kv..(pos + m) * kv].copy_from_slice(v);
            let params = AttentionParams {
                m,
                pos,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: c.attn_scale,
                window,
            };
            b.attention(
                q,
                &kc[..(pos + m) * kv],
                &vc[..(pos + m) * kv],
                att,
                &mut s.scores,
                &params,
            )?;
            at(obs, Point::Attn, ly, pos, a, att);
            b.matmul(att, &w.wo, xb2, m)?;
            at(obs, Point::AttnOut, ly, pos, d, xb2);
            match &w.post_norms {
                Some((attn_post, _)) => {
                    b.rmsnorm(xb2, attn_post, xb, c.norm_eps)?;
                    at(obs, Point::AttnPostNorm, ly, pos, d, xb);
                    b.add(x, xb)?;
                }
                None => b.add(x, xb2)?,
            }
            at(obs, Point::ResidAttn, ly, pos, d, x);
            // Feed-forward: norm, gate and up, gated activation, down, (norm), residual.
            b.rmsnorm(x, &w.ffn_norm, xb, c.norm_eps)?;
            at(obs, Point::FfnNorm, ly, pos, d, xb);
            b.matmuls(xb, &[&w.w_gate, &w.w_up], &mut [gate, up], m)?;
            at(obs, Point::Gate, ly, pos, f, gate);
            at(obs, Point::Up, ly, pos, f, up);
            match c.activation {
                GateActivation::Silu => b.swiglu(gate, up, hidden)?,
                GateActivation::Gelu => b.geglu(gate, up, hidden)?,
            }
            at(obs, Point::Act, ly, pos, f, hidden);
            b.matmul(hidden, &w.w_down, xb2, m)?;
            at(obs, Point::FfnOut, ly, pos, d, xb2);
            match &w.post_norms {
                Some((_, ffn_post)) => {
                    b.rmsnorm(xb2, ffn_post, xb, c.norm_eps)?;
                    at(obs, Point::FfnPostNorm, ly, pos, d, xb);
                    b.add(x, xb)?;
                }
                None => b.add(x, xb2)?,
            }
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
                soft_cap(&mut s.logits, c.final_logit_softcap);
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
                soft_cap(out, c.final_logit_softcap);
                at(obs, Point::Logits, None, pos, c.vocab, out);
            }
        }
        Ok(())
    }
}

/// `c tanh(v / c)` on every logit, when the model caps them.
fn soft_cap(logits: &mut [f32], cap: Option<f32>) {
    if let Some(c) = cap {
        logits.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
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
