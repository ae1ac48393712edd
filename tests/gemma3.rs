//! Gemma 3 270M (Q4_K_M), the second model family, fetched by name as `chord pull
//! gemma3-270m` does: its SentencePiece tokenizer against llama.cpp's ids
//! (tests/data/gemma3/, copied from the project's reference outputs; made by llama.cpp
//! b11312 through llama-cpp-python, BOS added as the file asks).

use std::path::{Path, PathBuf};
use std::process::Command;

use chord::gguf::GgufFile;
use chord::tokenizer::Tokenizer;
use serde_json::Value;

fn gemma3_path() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let model = chord::pull::known("gemma3-270m").expect("a known model");
    chord::pull::ensure(&model, &dir, true)
        .unwrap_or_else(|e| panic!("the Gemma 3 tests need gemma3-270m: {e}"))
}

#[test]
fn every_reference_text_tokenizes_to_llama_cpp_ids() {
    let file = GgufFile::open(gemma3_path()).unwrap();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let rows: Vec<Value> = include_str!("data/gemma3/tokenize.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 88);
    let mut failures = Vec::new();
    for r in &rows {
        let text = r["text"].as_str().unwrap();
        let special = r["parse_special"].as_bool().unwrap();
        assert_eq!(r["add_bos"], true);
        let want: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, special);
        if got != want {
            failures.push(format!(
                "{text:?} (special {special}): {got:?}, want {want:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `--model gemma3-270m` names the fetched file anywhere a model is taken; an unknown name
/// that is no file is an error naming the known ones.
#[test]
fn the_model_is_named_by_its_short_name() {
    gemma3_path();
    let chord = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_chord"))
            .args(args)
            .env(
                "CHORD_MODELS",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
            )
            .output()
            .unwrap()
    };
    let o = chord(&["tokenize", "--model", "gemma3-270m", "Hello, world!"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The first row of tokenize.jsonl: BOS, then llama.cpp's pieces.
    let ids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids, [2, 9259, 236764, 1902, 236888]);
    let o = chord(&["pull", "gemma9"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("smollm2-135m, gemma3-270m"),
        "{err}"
    );
}
