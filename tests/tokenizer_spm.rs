//! The SentencePiece tokenizer (llama, TinyLlama vocabularies) on a synthetic vocabulary:
//! hand-checked cases, and the merge rule checked against a naive implementation of it.

use chord::gguf::{Array, Gguf, Value, Writer};
use chord::tokenizer::{IncrementalDecoder, Tokenizer};

/// `<unk>`, `<s>`, `</s>`, 256 byte tokens, then `pieces` with their scores.
fn vocab(pieces: &[(&str, f32)], add_space_prefix: bool) -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32, 0.0, 0.0];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for &(p, s) in pieces {
        tokens.push(p.into());
        types.push(1);
        scores.push(s);
    }
    let mut w = Writer::new();
    w.metadata("tokenizer.ggml.model", Value::String("llama".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(tokens.into())),
        )
        .metadata("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .metadata("tokenizer.ggml.scores", Value::Array(Array::F32(scores)))
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(2))
        // These tests are about merges; BOS has its own (SentencePiece adds it by default).
        .metadata("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .metadata(
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(add_space_prefix),
        );
    Tokenizer::from_gguf(&Gguf::parse(&w.to_bytes()).unwrap()).unwrap()
}

const PIECES: &[(&str, f32)] = &[
    ("▁", -1.0),
    ("h", -10.0),
    ("e", -10.0),
    ("l", -10.0),
    ("o", -10.0),
    ("w", -10.0),
    ("r", -10.0),
    ("d", -10.0),
    ("ll", -2.0),
    ("he", -3.0),
    ("llo", -2.5),
    ("hello", -1.5),
    ("▁hello", -1.0),
    ("▁w", -4.0),
    ("or", -3.0),
    ("ld", -3.5),
    ("orld", -2.0),
    ("▁world", -0.5),
];

fn id(t: &Tokenizer, piece: &str) -> u32 {
    (0..t.vocab_size() as u32)
        .find(|&i| t.token_text(i) == Some(piece))
        .unwrap()
}

#[test]
fn words_merge_into_their_pieces_with_a_prefix_space() {
    let t = vocab(PIECES, true);
    assert_eq!(
        t.encode("hello world", false),
        vec![id(&t, "▁hello"), id(&t, "▁world")]
    );
    // Without the prefix space the first word has no `▁`.
    let t2 = vocab(PIECES, false);
    assert_eq!(
        t2.encode("hello world", false),
        vec![id(&t2, "hello"), id(&t2, "▁world")]
    );
}

#[test]
fn characters_outside_the_vocabulary_fall_back_to_byte_tokens() {
    let t = vocab(PIECES, true);
    // "é" is C3 A9 in UTF-8; byte token <0xXX> has id 3 + 0xXX.
    assert_eq!(
        t.encode("hé", false),
        vec![id(&t, "▁"), id(&t, "h"), 3 + 0xC3, 3 + 0xA9]
    );
    assert_eq!(
        t.decode(&t.encode("hé", false), false).unwrap(),
        "hé".as_bytes()
    );
}

#[test]
fn special_tokens_split_the_text_and_a_prefix_space_follows_each() {
    let t = vocab(PIECES, true);
    let ids = t.encode("hello</s>world", true);
    assert_eq!(ids, vec![id(&t, "▁hello"), 2, id(&t, "▁world")]);
    // Left as text without parse_special.
    assert!(!t.encode("hello</s>world", false).contains(&2));
}

#[test]
fn decoding_drops_the_prefix_space_once_and_restores_spaces() {
    let t = vocab(PIECES, true);
    for text in ["hello world", "hello  world ", "world hello", "héllo wörld"] {
        let ids = t.encode(text, false);
        assert_eq!(
            String::from_utf8(t.decode(&ids, false).unwrap()).unwrap(),
            text
        );
        let mut dec = IncrementalDecoder::new(&t, false).at_sequence_start();
        let streamed: String = ids
            .iter()
            .map(|&i| dec.push(i).unwrap())
            .collect::<String>()
            + &dec.finish();
        assert_eq!(streamed, text);
    }
}

/// The merge rule, naively: while some adjacent pair's concatenation is a piece, merge the
/// pair with the highest score (the leftmost on ties).
fn naive(pieces: &[(&str, f32)], text: &str) -> Vec<String> {
    let score = |s: &str| pieces.iter().find(|p| p.0 == s).map(|p| p.1);
    let mut syms: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(s) = score(&format!("{}{}", syms[i], syms[i + 1]))
                && best.is_none_or(|(b, _)| s > b)
            {
                best = Some((s, i));
            }
        }
        let Some((_, i)) = best else { return syms };
        let right = syms.remove(i + 1);
        syms[i].push_str(&right);
    }
}

#[test]
fn merges_follow_the_score_rule_on_many_strings() {
    let t = vocab(PIECES, false);
    let alphabet = ['h', 'e', 'l', 'o', 'w', 'r', 'd', ' '];
    let mut state = 12345u32;
    for _ in 0..500 {
        let len = 1 + (state % 14) as usize;
        let text: String = (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                alphabet[(state >> 16) as usize % alphabet.len()]
            })
            .collect();
        let want: Vec<u32> = naive(PIECES, &text.replace(' ', "▁"))
            .iter()
            .map(|p| id(&t, p))
            .collect();
        assert_eq!(t.encode(&text, false), want, "{text:?}");
    }
}
