//! The tokenizer of the default model against llama.cpp's ids and bytes
//! (tests/data/reference/tokenize.jsonl and detokenize.jsonl).

use std::path::Path;

use chord::gguf::GgufFile;
use chord::tokenizer::{IncrementalDecoder, Tokenizer};
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference");

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(GgufFile::open(common::model_path()).unwrap().gguf()).unwrap()
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

/// The merge rule written the plain way (the quadratic loop chord used before its priority
/// queue): the lowest-ranked adjacent pair merges, the leftmost on ties, until none is left.
struct NaiveBpe {
    ranks: std::collections::HashMap<(String, String), usize>,
    ids: std::collections::HashMap<String, u32>,
    pre: chord::tokenizer::PreTokenizer,
}

impl NaiveBpe {
    fn new() -> NaiveBpe {
        use chord::gguf::{Array, Value};
        let file = GgufFile::open(common::model_path()).unwrap();
        let g = file.gguf();
        let strings = |k: &str| match g.get(k) {
            Some(Value::Array(Array::String(v))) => v.clone(),
            _ => panic!("{k}"),
        };
        let mut ranks = std::collections::HashMap::new();
        for (r, m) in strings("tokenizer.ggml.merges").iter().enumerate() {
            let (a, b) = m.split_once(' ').unwrap();
            ranks.entry((a.to_string(), b.to_string())).or_insert(r);
        }
        let ids = strings("tokenizer.ggml.tokens")
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_owned(), i as u32))
            .collect();
        let pre =
            chord::tokenizer::PreTokenizer::named(g.str("tokenizer.ggml.pre").unwrap()).unwrap();
        NaiveBpe { ranks, ids, pre }
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        // GPT-2's byte alphabet: printable bytes are themselves, the rest from U+0100 on.
        let mut alphabet = Vec::new();
        let mut next = 256u32;
        for b in 0..256u32 {
            let printable = (0x21..=0x7e).contains(&b)
                || (0xa1..=0xac).contains(&b)
                || (0xae..=0xff).contains(&b);
            alphabet.push(
                char::from_u32(if printable {
                    b
                } else {
                    next += 1;
                    next - 1
                })
                .unwrap(),
            );
        }
        let mut out = Vec::new();
        for piece in self.pre.split(text) {
            let mut syms: Vec<String> = piece
                .bytes()
                .map(|b| alphabet[b as usize].to_string())
                .collect();
            loop {
                let best = syms
                    .windows(2)
                    .enumerate()
                    .filter_map(|(i, w)| {
                        self.ranks
                            .get(&(w[0].clone(), w[1].clone()))
                            .map(|&r| (r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let right = syms.remove(i + 1);
                syms[i].push_str(&right);
            }
            out.extend(syms.iter().map(|s| self.ids[s]));
        }
        out
    }
}

mod common;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// The priority-queue merge gives the plain loop's ids on any text, long runs included.
    #[test]
    fn bpe_matches_the_plain_merge_loop(text in "([a-zA-Z]{1,40}|[0-9 ,.!'\n]|é|ü|日本語|🍕|aaaaaaaaaaaaaaaa| {2,5}){0,40}") {
        static NAIVE: std::sync::OnceLock<NaiveBpe> = std::sync::OnceLock::new();
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        let naive = NAIVE.get_or_init(NaiveBpe::new);
        let tok = TOK.get_or_init(tokenizer);
        proptest::prop_assert_eq!(tok.encode(&text, false), naive.encode(&text));
    }
}

#[test]
fn a_long_word_tokenizes_like_the_plain_merge_loop() {
    // 6,000 letters without a space: one piece, thousands of merges.
    let word: String = (0..6000u32)
        .map(|i| (b'a' + ((i * 7 + i / 13) % 26) as u8) as char)
        .collect();
    assert_eq!(
        tokenizer().encode(&word, false),
        NaiveBpe::new().encode(&word)
    );
}

/// The token of the default model whose bytes are `b` alone.
fn byte_token(tok: &Tokenizer, b: u8) -> u32 {
    (0..tok.vocab_size() as u32)
        .find(|&i| tok.token_bytes(i, false).unwrap() == [b])
        .unwrap()
}

/// A stray byte before a character split over tokens: the stray byte becomes U+FFFD at once,
/// and the character's first bytes wait for the rest (once, they were flushed with it).
#[test]
fn a_stray_byte_does_not_take_the_next_characters_first_bytes_with_it() {
    let tok = tokenizer();
    // C3 starts a two-byte character but F0 does not continue it; F0 9F 8D 95 is 🍕.
    let ids: Vec<u32> = [0xC3, 0xF0, 0x9F, 0x8D, 0x95]
        .iter()
        .map(|&b| byte_token(&tok, b))
        .collect();
    let mut dec = IncrementalDecoder::new(&tok, false);
    let chunks: Vec<String> = ids.iter().map(|&i| dec.push(i).unwrap()).collect();
    assert_eq!(chunks, ["", "\u{FFFD}", "", "", "🍕"]);
    assert_eq!(dec.finish(), "");
}

proptest::proptest! {
    /// Whatever the tokens, the streamed text is the lossy UTF-8 of all their bytes, and no
    /// chunk holds the start of a character that a later token completes.
    #[test]
    fn streaming_any_tokens_gives_the_lossy_text_of_their_bytes(ids in proptest::collection::vec(0u32..49152, 0..40)) {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        let tok = TOK.get_or_init(tokenizer);
        let mut dec = IncrementalDecoder::new(tok, false);
        let mut streamed = String::new();
        let mut bytes = Vec::new();
        for &id in &ids {
            streamed.push_str(&dec.push(id).unwrap());
            bytes.extend(tok.token_bytes(id, false).unwrap());
        }
        streamed.push_str(&dec.finish());
        proptest::prop_assert_eq!(streamed, String::from_utf8_lossy(&bytes).into_owned());
    }
}
