//! The architecture a GGUF file describes: its sizes and the parts of the block graph that
//! differ between families, read from `general.architecture` and that architecture's keys.
//!
//! Families and where each rule comes from (llama.cpp's `src/models/*.cpp` graphs and
//! `load_arch_hparams`, which read the same keys):
//!
//! | family | `general.architecture` | differs from llama by |
//! |---|---|---|
//! | llama (SmolLM, TinyLlama, Mistral 7B) | `llama` | (the base graph) |
//! | Qwen2 | `qwen2` | NeoX RoPE; q, k and v biases (`attn_{q,k,v}.bias`) where the file has them |
//! | Qwen3 | `qwen3` | NeoX RoPE; per-head q/k norms; head size `attention.key_length` |
//! | Gemma 3 (270M; the 1B untried) | `gemma3` | see [`Config::from_gguf`]'s Gemma 3 notes |
//!
//! Mistral 7B's GGUF files say `llama` (its converter writes the llama graph), so they run as
//! llama. Qwen2 and Qwen3 are checked on synthetic files against llama.cpp
//! (tests/families.rs), Gemma 3 on the real 270M model (tests/gemma3.rs). Refused, with a
//! message: other architectures, RoPE scaling (so Gemma 3 4B, 12B and 27B, which scale
//! their global layers linearly), partial rotary, value heads unlike key heads, biases on
//! the output, attention-output or feed-forward projections.

use crate::backend::RopeLayout;
use crate::gguf::{Array, GgufError, GgufFile, Value};

use super::ModelError;

/// The feed-forward gate's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateActivation {
    /// SwiGLU: `silu(gate) * up` (llama).
    Silu,
    /// GEGLU: `gelu(gate) * up`, GELU in its tanh approximation (Gemma).
    Gelu,
}

/// Hyper-parameters and graph switches, all read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `general.architecture`.
    pub arch: String,
    /// Width of the residual stream.
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Size of one query/key/value head: `attention.key_length` where the file gives it
    /// (Gemma 3: 256, so that `n_heads * head_dim` is not `dim`), else `dim / n_heads`.
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    /// The context length the model was trained for.
    pub ctx_len: usize,
    /// RoPE base of the global (full-attention) layers: `rope.freq_base`, default 10,000.
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    pub norm_eps: f32,
    /// The factor on the token embeddings: 1, or `sqrt(dim)` (Gemma).
    pub embed_scale: f32,
    /// The factor on `q · k` before the softmax.
    pub attn_scale: f32,
    pub activation: GateActivation,
    /// RMSNorm of each query and key head before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Biases added to the q, k and v projections (`attn_q.bias`...; Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of the attention and feed-forward outputs before each residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Sliding-window attention: the window, in positions, of the local layers.
    pub window: Option<usize>,
    /// Per layer: whether it is local (windowed, with [`Config::rope_theta_local`]).
    pub local_layers: Vec<bool>,
    /// RoPE base of the local layers.
    pub rope_theta_local: f32,
    /// `c tanh(logits / c)` on the logits (Gemma 2's soft cap; Gemma 3 files may carry it).
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    /// Reads the architecture of `file`.
    ///
    /// Gemma 3 (`gemma3`), as llama.cpp's `llama_model_gemma3` builds it:
    /// - embeddings times `sqrt(dim)` (`ggml_scale(inpL, sqrtf(n_embd))`);
    /// - RoPE in the NeoX layout (`LLAMA_ROPE_TYPE_NEOX`);
    /// - per-head RMSNorm of q and k before RoPE; RMSNorm after attention and after the
    ///   feed-forward, before each residual add (the norm weights already hold Gemma's
    ///   `1 + w`: the converter adds the one);
    /// - GEGLU (`LLM_FFN_GELU`, `LLM_FFN_PAR`);
    /// - `attention.sliding_window` positions of window on the local layers; layer `l` is
    ///   local unless `l % n == n - 1`, `n` = `attention.sliding_window_pattern` or 6 (an
    ///   array of booleans there gives each layer's flag instead); no window key, no local
    ///   layers;
    /// - RoPE base `rope.freq_base_swa` (default 10,000) on local layers, `rope.freq_base`
    ///   on global ones;
    /// - attention scale `1 / sqrt(key_length)`, except for the 62-layer (27B) model:
    ///   `1 / sqrt(dim / n_heads)` (llama.cpp, after gemma_pytorch's `query_pre_attn_scalar`);
    /// - `final_logit_softcapping` if the file has it; the output tied to the embeddings
    ///   when there is no `output.weight`.
    pub fn from_gguf(file: &GgufFile) -> Result<Config, ModelError> {
        let g = file.gguf();
        let arch = g.str("general.architecture")?.to_string();
        if !["llama", "qwen2", "qwen3", "gemma3"].contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture '{arch}' (chord runs llama, qwen2, qwen3 and gemma3)"
            )));
        }
        let gemma3 = arch == "gemma3";
        let qwen3 = arch == "qwen3";
        let neox = arch != "llama";
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>, GgufError> {
            g.get(&key(k)).map(|_| g.usize(&key(k))).transpose()
        };
        let opt_f32 = |k: &str| -> Result<Option<f32>, GgufError> {
            g.get(&key(k)).map(|_| g.f32(&key(k))).transpose()
        };
        let dim = g.usize(&key("embedding_length"))?;
        let n_layers = g.usize(&key("block_count"))?;
        // Before anything is sized by it: a block count the file's tensors cannot hold.
        if n_layers == 0
            || g.tensor(&format!("blk.{}.attn_norm.weight", n_layers - 1))
                .is_none()
        {
            return Err(ModelError::Unsupported(format!(
                "block_count {n_layers}, but the file has no blk.{}.attn_norm.weight",
                n_layers.saturating_sub(1)
            )));
        }
        let n_heads = g.usize(&key("attention.head_count"))?;
        let n_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match opt_usize("attention.key_length")? {
            Some(k) => k,
            None => dim.checked_div(n_heads).unwrap_or(0),
        };
        if let Some(v) = opt_usize("attention.value_length")?
            && v != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "value heads of {v} beside key heads of {head_dim} (chord needs them equal)"
            )));
        }
        if let Some(Value::String(kind)) = g.get(&key("rope.scaling.type"))
            && kind != "none"
        {
            // Gemma 3 4B/12B/27B: linear scaling of the global layers, not implemented.
            return Err(ModelError::Unsupported(format!("RoPE scaling '{kind}'")));
        }
        if let Some(r) = opt_usize("rope.dimension_count")?
            && r != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "RoPE on {r} of each head's {head_dim} values (partial rotary)"
            )));
        }
        for t in [
            "blk.0.attn_output.bias",
            "blk.0.ffn_gate.bias",
            "blk.0.ffn_up.bias",
            "blk.0.ffn_down.bias",
        ] {
            if g.tensor(t).is_some() {
                return Err(ModelError::Unsupported(format!("a bias tensor {t}")));
            }
        }
        let embed = g
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::Tensor {
                name: "token_embd.weight".into(),
                problem: "missing".into(),
            })?;
        let vocab = opt_usize("vocab_size")?.unwrap_or(embed.rows());
        if g.tensor("output.bias").is_some() {
            return Err(ModelError::Unsupported(
                "a bias on the output projection (output.bias)".into(),
            ));
        }
        let window = if gemma3 {
            opt_usize("attention.sliding_window")?.filter(|&w| w > 0)
        } else {
            None
        };
        let local_layers = match (window, g.get(&key("attention.sliding_window_pattern"))) {
            (None, _) => vec![false; n_layers],
            (Some(_), Some(Value::Array(Array::Bool(flags)))) => {
                if flags.len() != n_layers {
                    return Err(ModelError::Unsupported(format!(
                        "attention.sliding_window_pattern has {} flags for {n_layers} layers",
                        flags.len()
                    )));
                }
                flags.clone()
            }
            (Some(_), _) => {
                let n = opt_usize("attention.sliding_window_pattern")?.unwrap_or(6);
                (0..n_layers).map(|l| n == 0 || l % n < n - 1).collect()
            }
        };
        let c = Config {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: g.usize(&key("feed_forward_length"))?,
            vocab,
            ctx_len: g.usize(&key("context_length"))?,
            rope_theta: opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
            // GGUF llama weights are permuted at conversion for adjacent-pair rotation;
            // Qwen's and Gemma's are not (llama.cpp: LLAMA_ROPE_TYPE_NEOX).
            rope_layout: if neox {
                RopeLayout::Neox
            } else {
                RopeLayout::Interleaved
            },
            norm_eps: g.f32(&key("attention.layer_norm_rms_epsilon"))?,
            embed_scale: if gemma3 { (dim as f32).sqrt() } else { 1.0 },
            attn_scale: if gemma3 && n_layers == 62 {
                1.0 / ((dim / n_heads.max(1)) as f32).sqrt()
            } else {
                crate::backend::AttentionParams::standard_scale(head_dim)
            },
            activation: if gemma3 {
                GateActivation::Gelu
            } else {
                GateActivation::Silu
            },
            qk_norm: gemma3 || qwen3,
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            post_norms: gemma3,
            window,
            local_layers,
            rope_theta_local: if gemma3 {
                opt_f32("rope.freq_base_swa")?.unwrap_or(10_000.0)
            } else {
                10_000.0
            },
            final_logit_softcap: opt_f32("final_logit_softcapping")?.filter(|&c| c > 0.0),
            arch,
        };
        c.validate(embed.rows(), embed.cols())?;
        Ok(c)
    }

    fn validate(&self, embed_rows: usize, embed_cols: usize) -> Result<(), ModelError> {
        let c = self;
        let bad = |what: String| Err(ModelError::Unsupported(what));
        if c.dim == 0 || c.n_layers == 0 || c.n_heads == 0 || c.ffn_dim == 0 || c.vocab == 0 {
            return bad(format!("zero-sized hyper-parameters: {c:?}"));
        }
        if c.head_dim == 0
            || !c.head_dim.is_multiple_of(2)
            || c.n_kv_heads == 0
            || !c.n_heads.is_multiple_of(c.n_kv_heads)
            || c.q_dim().is_none()
        {
            return bad(format!(
                "{} heads of {} over {} kv heads in dim {}",
                c.n_heads, c.head_dim, c.n_kv_heads, c.dim
            ));
        }
        if embed_rows != c.vocab || embed_cols != c.dim {
            return bad(format!(
                "token_embd.weight is {embed_rows} × {embed_cols}, expected vocab × dim = {} × {}",
                c.vocab, c.dim
            ));
        }
        let finite_pos = |v: f32| v.is_finite() && v > 0.0;
        if !(c.rope_theta.is_finite()
            && c.rope_theta > 1.0
            && c.rope_theta_local.is_finite()
            && c.rope_theta_local > 1.0
            && c.norm_eps.is_finite()
            && c.norm_eps >= 0.0
            && finite_pos(c.attn_scale)
            && c.final_logit_softcap.is_none_or(finite_pos))
        {
            return bad(format!(
                "RoPE bases {} / {}, norm epsilon {}, attention scale {}, logit cap {:?}: \
                 expected bases above 1 and finite positive values",
                c.rope_theta, c.rope_theta_local, c.norm_eps, c.attn_scale, c.final_logit_softcap
            ));
        }
        Ok(())
    }

    /// `n_heads * head_dim`: the width of a query row (`None` on overflow).
    fn q_dim(&self) -> Option<usize> {
        self.n_heads.checked_mul(self.head_dim)
    }

    /// `n_heads * head_dim`: the width of a query row and of the attention output.
    pub fn attn_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// `n_kv_heads * head_dim`: the width of a key or value row.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Layer `l`'s attention window (`None`: global) and RoPE base.
    pub fn layer_attention(&self, l: usize) -> (Option<usize>, f32) {
        if self.local_layers.get(l).copied().unwrap_or(false) {
            (self.window, self.rope_theta_local)
        } else {
            (None, self.rope_theta)
        }
    }
}
