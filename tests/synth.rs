//! `chord synth` files against llama.cpp: the acceptance shape of issue 12 (dim 320, 5
//! layers, 5 heads, 1 KV head, FFN 864, vocabulary 2000; F32, seed 1), written here by the
//! library, must be the file the reference was made from (its SHA-256), tokenize as
//! llama.cpp does, and give llama.cpp's 32 greedy tokens, byte for byte, on every backend.
//!
//! Reference: tests/data/synth/ (made by `make-reference.sh` there, with llama.cpp b11312).

mod common;

use std::path::{Path, PathBuf};

use chord::backend::Mode;
use chord::gguf::{DType, GgufFile};
use chord::synth::Shape;
use chord::tokenizer::Tokenizer;
use chord::{SimdBackend, Variant};
use common::greedy_ids;
use sha2::Digest;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/synth")
        .join(name)
}

const SHAPE: Shape = Shape {
    dim: 320,
    layers: 5,
    heads: 5,
    kv_heads: 1,
    ffn: 864,
    vocab: 2000,
    ctx: 2048,
    rope_base: 10_000.0,
    eps: 1e-5,
};

/// Writes the acceptance file to `models/synth/` (per process, then renamed: another test
/// process never reads half a file) and returns its path and bytes' SHA-256.
fn acceptance_file() -> (PathBuf, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/synth");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s320-f32-seed1.test.gguf");
    let mut bytes = Vec::new();
    chord::synth::write(&SHAPE, DType::F32, 1, &mut bytes).unwrap();
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (path, sha)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(data(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn synthetic_f32_model_gives_llama_cpp_greedy_tokens_on_every_backend() {
    let (path, sha) = acceptance_file();
    let want_sha = String::from_utf8(read("s320-f32-seed1.sha256")).unwrap();
    assert_eq!(
        sha,
        want_sha.trim(),
        "the file differs from the reference's"
    );
    let tok = Tokenizer::from_gguf(GgufFile::open(&path).unwrap().gguf()).unwrap();
    let prompts = String::from_utf8(read("prompts.txt")).unwrap();
    for (i, prompt) in prompts.lines().enumerate() {
        let n = i + 1;
        let ids = tok.encode(prompt, false);
        let want_ids: Vec<u32> = serde_json::from_slice(&read(&format!("prompt{n}.ids"))).unwrap();
        assert_eq!(ids, want_ids, "prompt {n} tokenizes as llama.cpp does");
        let want = read(&format!("prompt{n}.greedy"));
        let mut runs: Vec<(String, Vec<u32>, f32)> = Vec::new();
        for v in Variant::available() {
            let run = || -> Result<(Vec<u32>, f32), chord::Error> {
                Ok(chord::with_variant!(v, 2, Mode::Exact, b => greedy_ids(&path, b, &ids, 32)))
            };
            let (got, margin) = run().unwrap();
            runs.push((v.to_string(), got, margin));
        }
        for (name, got, margin) in runs {
            eprintln!("prompt {n} on {name}: smallest greedy margin {margin:.3}");
            // Far from a tie at every step: no summation order can flip a token.
            assert!(
                margin > 0.01,
                "prompt {n} on {name}: a greedy step within {margin}"
            );
            let text = tok.decode(&got, false).unwrap();
            assert_eq!(
                text,
                want,
                "prompt {n} on {name}: {:?} against llama.cpp's {:?}",
                String::from_utf8_lossy(&text),
                String::from_utf8_lossy(&want)
            );
        }
    }
}

/// The same seed and shape give the same bytes whatever the thread count; another seed
/// gives other weights; quantized files load and run.
#[test]
fn synth_is_deterministic_and_every_written_format_loads() {
    let small = Shape {
        dim: 64,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        ffn: 96,
        vocab: 300,
        ..SHAPE
    };
    let write = |dtype, seed, threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = Vec::new();
        pool.install(|| chord::synth::write(&small, dtype, seed, &mut out))
            .unwrap();
        out
    };
    let one = write(DType::F32, 7, 1);
    assert_eq!(one, write(DType::F32, 7, 2));
    assert_ne!(one, write(DType::F32, 8, 2));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/synth");
    std::fs::create_dir_all(&dir).unwrap();
    for dtype in chord::convert::TARGETS {
        let bytes = write(dtype, 7, 2);
        let path = dir.join(format!(
            "small-{}-{}.test.gguf",
            dtype.name(),
            std::process::id()
        ));
        std::fs::write(&path, &bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(
            file.gguf().tensor("blk.0.ffn_up.weight").unwrap().dtype(),
            Some(dtype)
        );
        let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
        let model = chord::model::Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
        let mut state = chord::model::State::new(&model.config, 64, 16);
        let logits = model
            .forward(&mut state, &tok.encode("hello world", false))
            .unwrap();
        assert_eq!(logits.len(), 300);
        assert!(
            logits.iter().all(|v| v.is_finite()),
            "{dtype}: logits not finite"
        );
        // Not degenerate: the logits spread about LOGIT_STD.
        let mean = logits.iter().sum::<f32>() / 300.0;
        let sd = (logits.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 300.0).sqrt();
        assert!(
            (3.0..20.0).contains(&sd),
            "{dtype}: logit standard deviation {sd}"
        );
        drop(model);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }
}
