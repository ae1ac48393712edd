//! The default model's byte-level BPE tokenizer on arbitrary text, with and without
//! special-token parsing: encoding never panics; decoding what it encoded gives the text back
//! wherever the vocabulary is lossless (SmolLM2's lacks 21 of the 256 byte symbols, which
//! llama.cpp drops as chord does; control tokens render with `special`); and streaming
//! arbitrary ids gives the lossy UTF-8 of their bytes.
//!
//! Needs the default model in models/ (`cargo run --release -- pull`).
//! Run: `cargo +nightly fuzz run tokenizer_bpe fuzz/seeds/text` (from the repository root).
#![no_main]

use std::sync::LazyLock;

use chord::gguf::GgufFile;
use chord::tokenizer::{IncrementalDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{path}: {e} (run `chord pull` first)"));
    Tokenizer::from_gguf(file.gguf()).expect("the default model's tokenizer")
});

/// The bytes that some token holds alone.
static BYTES: LazyLock<[bool; 256]> = LazyLock::new(|| {
    let tok = &*TOKENIZER;
    let mut has = [false; 256];
    for id in 0..tok.vocab_size() as u32 {
        if let [b] = tok.token_bytes(id, false).unwrap()[..] {
            has[b as usize] = true;
        }
    }
    has
});

fuzz_target!(|data: &[u8]| {
    let tok = &*TOKENIZER;
    let text = String::from_utf8_lossy(data);
    let lossless = text.bytes().all(|b| BYTES[b as usize]);
    for parse_special in [false, true] {
        let ids = tok.encode(&text, parse_special);
        let back = tok.decode(&ids, parse_special).expect("ids from encode are in the vocabulary");
        if lossless {
            assert_eq!(String::from_utf8_lossy(&back), text, "parse_special {parse_special}: {ids:?}");
        }
    }
    // Arbitrary ids, two bytes each: a stream is the lossy UTF-8 of all their bytes.
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32 % tok.vocab_size() as u32)
        .collect();
    let mut dec = IncrementalDecoder::new(tok, false);
    let mut streamed = String::new();
    let mut bytes = Vec::new();
    for &id in &ids {
        streamed += &dec.push(id).expect("in the vocabulary");
        bytes.extend(tok.token_bytes(id, false).expect("in the vocabulary"));
    }
    streamed += &dec.finish();
    assert_eq!(streamed, String::from_utf8_lossy(&bytes));
});
