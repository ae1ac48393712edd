//! A SentencePiece tokenizer (a synthetic vocabulary with byte fallback, user-defined and
//! control tokens) on arbitrary text, with and without special-token parsing: encoding never
//! panics, and decoding gives the text back wherever the vocabulary is lossless: text
//! without U+2581 (which SentencePiece reads as a space) and without special or user-defined
//! tokens (after each, SentencePiece prefixes the next text with a space, as llama.cpp does).
//!
//! Run: `cargo +nightly fuzz run tokenizer_spm fuzz/seeds/text` (from the repository root).
#![no_main]

use std::sync::LazyLock;

use chord::gguf::{Array, Gguf, Value, Writer};
use chord::tokenizer::{IncrementalDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, a user-defined `<|tool|>`, then pieces.
static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(|| {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    tokens.push("<|tool|>".into());
    types.push(4);
    let pieces = [
        "▁", "a", "e", "h", "l", "o", "t", "▁t", "he", "▁the", "ll", "llo", "▁hello", "é", "日", "本",
        "日本", "▁a", "at", "▁at", "▁▁", "▁▁▁▁", "\n", "🍕",
    ];
    for p in pieces {
        tokens.push(p.into());
        types.push(1);
    }
    let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
    let mut w = Writer::new();
    w.metadata("tokenizer.ggml.model", Value::String("llama".into()))
        .metadata("tokenizer.ggml.tokens", Value::Array(Array::String(tokens.into())))
        .metadata("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .metadata("tokenizer.ggml.scores", Value::Array(Array::F32(scores)))
        .metadata("tokenizer.ggml.add_bos_token", Value::Bool(false));
    Tokenizer::from_gguf(&Gguf::parse(&w.to_bytes()).unwrap()).unwrap()
});

fuzz_target!(|data: &[u8]| {
    let tok = &*TOKENIZER;
    let text = String::from_utf8_lossy(data);
    for parse_special in [false, true] {
        let ids = tok.encode(&text, parse_special);
        let back = tok.decode(&ids, parse_special).expect("ids from encode are in the vocabulary");
        // 0 to 2 are <unk>, <s>, </s>; 259 is the user-defined <|tool|>.
        let specials = ids.iter().any(|&id| id < 3 || id == 259);
        if !text.contains('▁') && !specials {
            assert_eq!(String::from_utf8_lossy(&back), text, "parse_special {parse_special}: {ids:?}");
            // The same text streamed from the start of the sequence.
            let mut dec = IncrementalDecoder::new(tok, parse_special).at_sequence_start();
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &dec.push(id).expect("in the vocabulary");
            }
            streamed += &dec.finish();
            assert_eq!(streamed, text);
        }
    }
});
