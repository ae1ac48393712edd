//! The tokenizer of the default model against llama.cpp's ids and bytes
//! (tests/data/reference/tokenize.jsonl and detokenize.jsonl).

use std::path::{Path, PathBuf};

use chord::gguf::GgufFile;
use chord::tokenizer::{IncrementalDecoder, Tokenizer};
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference");

fn tokenizer() -> Tokenizer {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let path = chord::pull::ensure_default_model(&dir, true)
        .unwrap_or_else(|e| panic!("the tokenizer tests need the default model: {e}"));
    Tokenizer::from_gguf(GgufFile::open(path).unwrap().gguf()).unwrap()
}

fn lines(file: &str) -> Vec<Value> {
    std::fs::read_to_string(Path::new(REFERENCE).join(file))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_reference_text_tokenizes_to_llama_cpp_ids() {
    let tok = tokenizer();
    let cases = lines("tokenize.jsonl");
    assert_eq!(cases.len(), 52);
    let mut failures = Vec::new();
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let special = c["parse_special"].as_bool().unwrap();
        let got = tok.encode(text, special);
        let want = ids(&c["ids"]);
        if got != want {
            failures.push(format!(
                "{text:?} (parse_special {special}):\n  got  {got:?}\n  want {want:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn every_reference_id_list_decodes_to_llama_cpp_bytes() {
    let tok = tokenizer();
    let cases = lines("detokenize.jsonl");
    assert_eq!(cases.len(), 22);
    for c in &cases {
        let special = c["special"].as_bool().unwrap();
        let want: Vec<u8> = (0..c["bytes_hex"].as_str().unwrap().len() / 2)
            .map(|i| {
                u8::from_str_radix(&c["bytes_hex"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
            })
            .collect();
        let got = tok.decode(&ids(&c["ids"]), special).unwrap();
        assert_eq!(got, want, "{:?} (special {special})", c["text"]);
    }
}

#[test]
fn the_incremental_decoder_never_splits_a_character_and_loses_nothing() {
    let tok = tokenizer();
    for c in lines("tokenize.jsonl")
        .iter()
        .filter(|c| !c["parse_special"].as_bool().unwrap())
    {
        let text = c["text"].as_str().unwrap();
        let mut dec = IncrementalDecoder::new(&tok, false);
        let mut out = String::new();
        for id in ids(&c["ids"]) {
            // Each emitted chunk is whole characters: a &str cannot hold less.
            out.push_str(&dec.push(id).unwrap());
        }
        out.push_str(&dec.finish());
        assert_eq!(out, text);
    }
    // An emoji split over tokens comes out only when whole.
    let ids = tok.encode("🍕", false);
    assert!(ids.len() > 1, "the emoji spans several tokens: {ids:?}");
    let mut dec = IncrementalDecoder::new(&tok, false);
    let chunks: Vec<String> = ids.iter().map(|&i| dec.push(i).unwrap()).collect();
    assert_eq!(chunks.concat(), "🍕");
    assert!(
        chunks[..chunks.len() - 1].iter().all(String::is_empty),
        "{chunks:?}"
    );
}

#[test]
fn unknown_ids_are_errors() {
    let tok = tokenizer();
    let err = tok.decode(&[19556, 49152], false).unwrap_err();
    assert!(err.to_string().contains("49152"), "{err}");
}
