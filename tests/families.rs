//! The families that share llama's graph with small changes, on synthetic files against
//! llama.cpp: Qwen2 (NeoX RoPE, q/k/v biases) and Qwen3 (NeoX RoPE, per-head q/k norms, a
//! head size from `attention.key_length` that is not `dim / heads`).
//!
//! Each file is written here, the same bytes every time: F32 weights from a fixed
//! generator (below), SmolLM2's tokenizer copied from the default model. llama.cpp's greedy
//! continuation of each (32 tokens, as text) is stored in tests/data/families/ with the
//! command that made it (README.md there); the tests require chord's to be the same text.

mod common;

use std::path::{Path, PathBuf};

use chord::gguf::{DType, GgufFile, Value, Writer};
use chord::tokenizer::Tokenizer;
use chord::{ScalarBackend, SimdBackend};
use common::{greedy_ids, model_path};

/// A synthetic model's shape.
struct Shape {
    arch: &'static str,
    dim: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
}

const QWEN2: Shape = Shape {
    arch: "qwen2",
    dim: 256,
    layers: 3,
    heads: 4,
    kv_heads: 2,
    head_dim: 64,
    ffn: 512,
};

const QWEN3: Shape = Shape {
    arch: "qwen3",
    dim: 256,
    layers: 3,
    heads: 4,
    kv_heads: 2,
    head_dim: 96, // 4 × 96 = 384 query values from 256: key_length, not dim / heads
    ffn: 512,
};

/// Values uniform on `[-√3 s, √3 s)` (standard deviation `s`), from splitmix64: plain
/// integer and f64 arithmetic, so the same bytes on every machine.
struct Values(u64);

impl Values {
    fn next(&mut self, s: f64) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        ((2.0 * u - 1.0) * 3f64.sqrt() * s) as f32
    }

    fn tensor(&mut self, n: usize, s: f64, offset: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|_| (offset + self.next(s)).to_le_bytes())
            .collect()
    }
}

/// Writes `shape` as `models/variants/{arch}-synthetic.gguf`: the default model's tokenizer
/// (49,152 tokens); embeddings of standard deviation 1, projections of `1/sqrt(cols)`
/// (activations keep their scale through each layer), an output matrix of its own (tied to
/// the embeddings, the logits would favour the input token and the text repeat it) of
/// `16/sqrt(dim)` (logits of standard deviation about 16: top-two gaps far above rounding), norm weights around 1 (0.5 to
/// 1.5), biases of standard deviation 0.5.
fn synthetic(shape: &Shape) -> PathBuf {
    let smollm = GgufFile::open(model_path()).unwrap();
    let g = smollm.gguf();
    let vocab = g.tensor("token_embd.weight").unwrap().rows();
    let mut w = Writer::new();
    for (k, v) in &g.metadata {
        if k.starts_with("tokenizer.") {
            w.metadata(k.clone(), v.clone());
        }
    }
    let a = shape.arch;
    let u32v = |n: usize| Value::U32(n as u32);
    w.metadata("general.architecture", Value::String(a.into()));
    w.metadata("general.name", Value::String(format!("{a} synthetic")));
    w.metadata(format!("{a}.embedding_length"), u32v(shape.dim));
    w.metadata(format!("{a}.block_count"), u32v(shape.layers));
    w.metadata(format!("{a}.attention.head_count"), u32v(shape.heads));
    w.metadata(format!("{a}.attention.head_count_kv"), u32v(shape.kv_heads));
    w.metadata(format!("{a}.attention.key_length"), u32v(shape.head_dim));
    w.metadata(format!("{a}.attention.value_length"), u32v(shape.head_dim));
    w.metadata(format!("{a}.feed_forward_length"), u32v(shape.ffn));
    w.metadata(format!("{a}.context_length"), u32v(1024));
    w.metadata(format!("{a}.rope.freq_base"), Value::F32(1_000_000.0));
    w.metadata(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-6),
    );
    let mut vals = Values(a.bytes().fold(0x5eed, |h, c| h * 31 + c as u64));
    let (d, q, kv) = (
        shape.dim,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let mut put = |w: &mut Writer, name: String, dims: &[usize], s: f64, offset: f32| {
        let n = dims.iter().product();
        w.tensor(name, dims, DType::F32, vals.tensor(n, s, offset))
            .unwrap();
    };
    // GGUF dims: contiguous (columns) first.
    put(&mut w, "token_embd.weight".into(), &[d, vocab], 1.0, 0.0);
    put(&mut w, "output_norm.weight".into(), &[d], 0.29, 1.0);
    put(
        &mut w,
        "output.weight".into(),
        &[d, vocab],
        16.0 / (d as f64).sqrt(),
        0.0,
    );
    for l in 0..shape.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        let proj = |cols: usize| 1.0 / (cols as f64).sqrt();
        put(&mut w, n("attn_norm.weight"), &[d], 0.29, 1.0);
        put(&mut w, n("attn_q.weight"), &[d, q], proj(d), 0.0);
        put(&mut w, n("attn_k.weight"), &[d, kv], proj(d), 0.0);
        put(&mut w, n("attn_v.weight"), &[d, kv], proj(d), 0.0);
        if a == "qwen2" {
            put(&mut w, n("attn_q.bias"), &[q], 0.5, 0.0);
            put(&mut w, n("attn_k.bias"), &[kv], 0.5, 0.0);
            put(&mut w, n("attn_v.bias"), &[kv], 0.5, 0.0);
        }
        if a == "qwen3" {
            put(
                &mut w,
                n("attn_q_norm.weight"),
                &[shape.head_dim],
                0.29,
                1.0,
            );
            put(
                &mut w,
                n("attn_k_norm.weight"),
                &[shape.head_dim],
                0.29,
                1.0,
            );
        }
        put(&mut w, n("attn_output.weight"), &[q, d], proj(q), 0.0);
        put(&mut w, n("ffn_norm.weight"), &[d], 0.29, 1.0);
        put(&mut w, n("ffn_gate.weight"), &[d, shape.ffn], proj(d), 0.0);
        put(&mut w, n("ffn_up.weight"), &[d, shape.ffn], proj(d), 0.0);
        put(
            &mut w,
            n("ffn_down.weight"),
            &[shape.ffn, d],
            proj(shape.ffn),
            0.0,
        );
    }
    common::write_variant(&format!("{a}-synthetic"), &w)
}

const PROMPT: &str = "The capital of France is";

/// llama.cpp's greedy continuation of [`PROMPT`] (32 tokens) on the synthetic `arch` file.
fn reference(arch: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/data/families/{arch}-greedy.txt"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// chord's greedy continuation of [`PROMPT`], `n` tokens, on `backend`, as text; and the
/// smallest top-1 minus top-2 margin met on the way.
fn greedy<B: chord::Backend>(path: &Path, backend: B, n: usize) -> (String, f32) {
    let tok = Tokenizer::from_gguf(GgufFile::open(path).unwrap().gguf()).unwrap();
    let (ids, margin) = greedy_ids(path, backend, &tok.encode(PROMPT, false), n);
    let text = String::from_utf8_lossy(&tok.decode(&ids, false).unwrap()).into_owned();
    (text, margin)
}

fn check(shape: &Shape) {
    let path = synthetic(shape);
    let (got, margin) = greedy(&path, SimdBackend::new(2).unwrap(), 32);
    eprintln!(
        "{}: {got:?}, smallest greedy margin {margin:.3}",
        shape.arch
    );
    // Far from a tie at every step: summation order cannot flip a token.
    assert!(
        margin > 0.01,
        "{}: a greedy step within {margin}",
        shape.arch
    );
    let want = reference(shape.arch);
    assert_eq!(got, want, "{} on simd", shape.arch);
    let (got, _) = greedy(&path, ScalarBackend::new(), 32);
    assert_eq!(got, want, "{} on scalar", shape.arch);
}

/// Qwen2's graph: 32 greedy tokens giving llama.cpp's text, on simd and on scalar.
#[test]
fn qwen2_synthetic_model_matches_llama_cpp_greedy_tokens() {
    check(&QWEN2);
}

/// Qwen3's graph: 32 greedy tokens giving llama.cpp's text, on simd and on scalar.
#[test]
fn qwen3_synthetic_model_matches_llama_cpp_greedy_tokens() {
    check(&QWEN3);
}
