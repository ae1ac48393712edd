//! Special tokens, BOS and SentencePiece details against llama.cpp, on variants of the
//! default model's tokenizer metadata and on tiny SentencePiece vocabularies
//! (tests/data/special: variants.json describes each file, make_reference.py made
//! reference.json with llama.cpp b11312).
//!
//! Where chord departs from llama.cpp on purpose, the test says so and checks chord's rule:
//! BOS is never doubled, and text a SentencePiece vocabulary cannot spell becomes the
//! unknown token (llama.cpp aborts).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use chord::chat::{Message, RenderOptions, Template};
use chord::gguf::{Array, Gguf, GgufFile, Value, Writer};
use chord::tokenizer::{TokenType, Tokenizer};
use serde_json::Value as Json;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/special");

fn load(file: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(Path::new(DATA).join(file)).unwrap()).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// GPT-2's byte-level alphabet, character to byte.
fn gpt2_bytes() -> BTreeMap<char, u8> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
            let c = if printable {
                b as char
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            };
            (c, b)
        })
        .collect()
}

/// The default model's tokens re-labelled as a SentencePiece vocabulary with the same ids
/// (variants.json's `spm_relabel`).
fn spm_relabel(tokens: &mut [String], types: &mut [i32], scores: &mut Vec<f32>) {
    let alphabet = gpt2_bytes();
    for (t, ty) in tokens.iter_mut().zip(types.iter_mut()) {
        if *ty != 1 {
            continue;
        }
        let bytes: Vec<u8> = t.chars().map(|c| alphabet[&c]).collect();
        match String::from_utf8(bytes.clone()) {
            Ok(s) => *t = s.replace(' ', "▁"),
            Err(_) if bytes.len() == 1 => {
                *t = format!("<0x{:02X}>", bytes[0]);
                *ty = 6;
            }
            Err(_) => *ty = 5,
        }
    }
    *scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
}

/// Applies a variant's edits (variants.json) to `w`, whose tokenizer arrays are `tokens`
/// and `types`: spm_relabel, tokens, token_types, set, remove.
fn apply(spec: &Json, w: &mut Writer, mut tokens: Vec<String>, mut types: Vec<i32>) {
    let mut scores = Vec::new();
    if spec["spm_relabel"].as_bool() == Some(true) {
        spm_relabel(&mut tokens, &mut types, &mut scores);
    }
    if let Some(vocab) = spec["tiny_vocab"].as_array() {
        tokens = vocab
            .iter()
            .map(|e| e[0].as_str().unwrap().to_string())
            .collect();
        scores = vocab
            .iter()
            .map(|e| e[1].as_f64().unwrap() as f32)
            .collect();
        types = vocab
            .iter()
            .map(|e| e[2].as_i64().unwrap() as i32)
            .collect();
    }
    for (id, text) in spec["tokens"].as_object().into_iter().flatten() {
        tokens[id.parse::<usize>().unwrap()] = text.as_str().unwrap().to_string();
    }
    for (id, ty) in spec["token_types"].as_object().into_iter().flatten() {
        types[id.parse::<usize>().unwrap()] = ty.as_i64().unwrap() as i32;
    }
    w.metadata(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(tokens.into())),
    );
    w.metadata("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    if !scores.is_empty() {
        w.metadata("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    }
    for (key, tv) in spec["set"].as_object().into_iter().flatten() {
        let v = &tv[1];
        let value = match tv[0].as_str().unwrap() {
            "string" => Value::String(v.as_str().unwrap().into()),
            "bool" => Value::Bool(v.as_bool().unwrap()),
            "u32" => Value::U32(v.as_u64().unwrap() as u32),
            "i32" => Value::I32(v.as_i64().unwrap() as i32),
            "f32" => Value::F32(v.as_f64().unwrap() as f32),
            other => panic!("type {other}"),
        };
        w.metadata(key.clone(), value);
    }
    for key in spec["remove"].as_array().into_iter().flatten() {
        w.remove_metadata(key.as_str().unwrap());
    }
}

/// The default model's tokens and types.
fn default_vocab(g: &Gguf) -> (Vec<String>, Vec<i32>) {
    let Some(Value::Array(Array::String(t))) = g.get("tokenizer.ggml.tokens") else {
        panic!()
    };
    let Some(Value::Array(Array::I32(ty))) = g.get("tokenizer.ggml.token_type") else {
        panic!()
    };
    (t.iter().map(str::to_owned).collect(), ty.clone())
}

/// The tokenizer of variant `name`, built from its metadata alone.
fn tokenizer(name: &str, spec: &Json, base: &Gguf) -> Result<Tokenizer, String> {
    let mut w = Writer::new();
    let (tokens, types) = if spec["base"] == "default" {
        for (k, v) in &base.metadata {
            w.metadata(k.clone(), v.clone());
        }
        default_vocab(base)
    } else {
        (Vec::new(), Vec::new())
    };
    apply(spec, &mut w, tokens, types);
    let g = Gguf::parse(&w.to_bytes()).map_err(|e| format!("{name}: {e}"))?;
    Tokenizer::from_gguf(&g).map_err(|e| format!("{name}: {e}"))
}

#[test]
fn every_reference_record_holds_for_chord() {
    let variants = load("variants.json");
    let records = load("reference.json");
    let base_file = GgufFile::open(common::model_path()).unwrap();
    let base = base_file.gguf();
    let mut built: BTreeMap<String, Result<Tokenizer, String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut checked = BTreeMap::<&str, usize>::new();
    for r in records.as_array().unwrap() {
        let variant = r["variant"].as_str().unwrap();
        let kind = r["kind"].as_str().unwrap();
        if variant == "phi3_name" {
            // llama.cpp cannot load this file (a Phi-3 name on a vocabulary without `<unk>`
            // or `</s>`); phi3_tiny covers the Phi-3 rules.
            continue;
        }
        let tok = built
            .entry(variant.to_string())
            .or_insert_with(|| tokenizer(variant, &variants[variant], base));
        let tok = match tok {
            Ok(t) => &*t,
            Err(e) => {
                failures.push(format!("{variant}: cannot build the tokenizer: {e}"));
                continue;
            }
        };
        let what = format!(
            "{variant} {kind} {}",
            r.get("text").or(r.get("ids")).unwrap_or(&Json::Null)
        );
        let mut fail = |m: String| failures.push(format!("{what}: {m}"));
        match kind {
            "tokenize" => {
                let text = r["text"].as_str().unwrap();
                let (add, parse) = (
                    r["add_special"].as_bool().unwrap(),
                    r["parse_special"].as_bool().unwrap(),
                );
                let got = tok.tokenize(text, add, parse);
                if r.get("error").is_some() {
                    // llama.cpp aborts (std::out_of_range from byte_to_token): no <0xXX> and
                    // no one-byte token for a character. chord gives one unknown token per
                    // such character, as SentencePiece does.
                    let unk = tok.specials().unk.unwrap();
                    let unspellable = text
                        .chars()
                        .filter(|c| tok.tokenize(&c.to_string(), false, false).contains(&unk))
                        .count();
                    let unks = got.iter().filter(|&&id| id == unk).count();
                    if unks != unspellable || unks == 0 {
                        fail(format!(
                            "{unks} unknown tokens in {got:?}, expected one per character chord cannot spell ({unspellable})"
                        ));
                    }
                } else {
                    let mut want = ids(&r["ids"]);
                    // llama.cpp adds BOS even before a BOS the text holds; chord, once.
                    if add
                        && tok.add_bos()
                        && want.len() >= 2
                        && want[0] == want[1]
                        && Some(want[0]) == tok.bos()
                    {
                        want.remove(0);
                    }
                    if got != want {
                        fail(format!("got {got:?}, llama.cpp {want:?}"));
                    }
                }
            }
            "detokenize" => {
                let list = ids(&r["ids"]);
                let got = tok
                    .detokenize(
                        &list,
                        r["remove_special"].as_bool().unwrap(),
                        r["unparse_special"].as_bool().unwrap(),
                    )
                    .unwrap();
                let want = hex(r["bytes_hex"].as_str().unwrap());
                if got != want {
                    fail(format!(
                        "got {:?}, llama.cpp {:?}",
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&want)
                    ));
                }
                for (special, key) in [(true, "special_true"), (false, "special_false")] {
                    for (id, piece) in list.iter().zip(r["pieces_hex"][key].as_array().unwrap()) {
                        let got = tok.token_bytes(*id, special).unwrap();
                        if got != hex(piece.as_str().unwrap()) {
                            fail(format!(
                                "piece {id} (special {special}): got {got:?}, llama.cpp {piece}"
                            ));
                        }
                    }
                }
            }
            "eog" => {
                let s = tok.specials();
                let opt = |v: &Json| v.as_u64().map(|x| x as u32);
                // Where several tokens could fill a role (end of turn, a FIM role), llama.cpp
                // takes the first in its hash map's iteration order, chord the lowest id:
                // compare roles, not ids, there.
                let role = |id: &u32| -> String {
                    let text = tok.token_text(*id).unwrap();
                    FIM_ROLES
                        .iter()
                        .find(|(_, names)| names.contains(&text))
                        .map_or(text.to_string(), |(role, _)| role.to_string())
                };
                let ambiguous_fim = r["note"].as_str().is_some_and(|n| n.contains("FIM role"));
                let roles = |list: &[u32]| -> Vec<String> {
                    let mut v: Vec<String> = list.iter().map(role).collect();
                    v.sort();
                    v
                };
                let (mine, theirs) = (tok.eog().to_vec(), ids(&r["ids"]));
                if (ambiguous_fim && roles(&mine) != roles(&theirs))
                    || (!ambiguous_fim && mine != theirs)
                {
                    fail(format!("end of generation {mine:?}, llama.cpp {theirs:?}"));
                }
                if s.eos != opt(&r["eos"]) || s.eom != opt(&r["eom"]) {
                    fail(format!(
                        "eos/eom {:?}/{:?}, llama.cpp {}/{}",
                        s.eos, s.eom, r["eos"], r["eom"]
                    ));
                }
                let eot_candidates = (0..tok.vocab_size() as u32)
                    .filter(|&i| EOT_NAMES.contains(&tok.token_text(i).unwrap()))
                    .count();
                if eot_candidates <= 1 && s.eot != opt(&r["eot"]) {
                    fail(format!("eot {:?}, llama.cpp {}", s.eot, r["eot"]));
                }
                let corrected: Vec<u32> = s
                    .corrected
                    .iter()
                    .filter(|(_, _, to)| *to == TokenType::Control)
                    .map(|(id, ..)| *id)
                    .collect();
                let theirs = ids(&r["control_ids_corrected"]);
                if (ambiguous_fim && roles(&corrected) != roles(&theirs))
                    || (!ambiguous_fim && corrected != theirs)
                {
                    fail(format!(
                        "corrected to control {corrected:?}, llama.cpp {}",
                        r["control_ids_corrected"]
                    ));
                }
            }
            "add_bos" => {
                if tok.add_bos() != r["add_bos"].as_bool().unwrap()
                    || tok.bos() != r["bos"].as_u64().map(|b| b as u32)
                {
                    fail(format!(
                        "add_bos {} bos {:?}, llama.cpp {} {}",
                        tok.add_bos(),
                        tok.bos(),
                        r["add_bos"],
                        r["bos"]
                    ));
                }
            }
            "chat_prompt" => {
                // With --jinja llama.cpp runs the model's own template (chord's default);
                // without, its built-in ChatML (chord's `--template chatml`).
                let template = if r["use_jinja"].as_bool().unwrap() {
                    let Some(Value::String(src)) =
                        variants[variant]["set"]["tokenizer.chat_template"][1]
                            .as_str()
                            .map(|s| Value::String(s.into()))
                            .or_else(|| base.get("tokenizer.chat_template").cloned())
                    else {
                        panic!()
                    };
                    Template::jinja(&src).unwrap()
                } else {
                    Template::ChatMl
                };
                let messages: Vec<Message> = serde_json::from_value(r["messages"].clone()).unwrap();
                let text_of =
                    |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
                let (bos, eos) = (text_of(tok.bos()), text_of(tok.eos()));
                let rendered = template
                    .render(
                        &messages,
                        &RenderOptions {
                            add_generation_prompt: true,
                            bos_token: &bos,
                            eos_token: &eos,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                let got = tok.encode(&rendered, true);
                if got != ids(&r["prompt_ids"]) {
                    fail(format!("prompt {got:?}, llama.cpp {}", r["prompt_ids"]));
                }
            }
            "generate" => {} // the model runs in its own test below
            other => panic!("unknown record kind {other}"),
        }
        *checked.entry(kind_name(kind)).or_default() += 1;
    }
    assert!(
        failures.is_empty(),
        "{} records differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checked["tokenize"] >= 120 && checked["detokenize"] >= 130 && checked["eog"] >= 15,
        "{checked:?}"
    );
}

/// llama.cpp's end-of-turn names (src/llama-vocab.cpp): a vocabulary with two of them has
/// two candidates for eot.
const EOT_NAMES: [&str; 11] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// llama.cpp's fill-in-the-middle names by role.
const FIM_ROLES: [(&str, &[&str]); 6] = [
    (
        "fim_pre",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        "fim_suf",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        "fim_mid",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        "fim_pad",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        "fim_rep",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    ("fim_sep", &["<|file_sep|>"]),
];

fn kind_name(k: &str) -> &'static str {
    [
        "tokenize",
        "detokenize",
        "eog",
        "add_bos",
        "chat_prompt",
        "generate",
    ]
    .into_iter()
    .find(|n| *n == k)
    .unwrap()
}

/// The reference generations, run by `chord generate` on the variant files (same weights,
/// changed tokenizer metadata): the same ids, the same printed text, the same stop.
#[test]
fn generations_match_llama_cpp_on_variant_models() {
    let variants = load("variants.json");
    let records = load("reference.json");
    let base = GgufFile::open(common::model_path()).unwrap();
    let mut n = 0;
    for r in records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "generate")
    {
        let variant = r["variant"].as_str().unwrap();
        let (tokens, types) = default_vocab(base.gguf());
        let path = common::model_variant(&format!("special_{variant}"), |w| {
            apply(&variants[variant], w, tokens, types)
        });
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            path.to_str().unwrap().into(),
            "--prompt".into(),
            r["prompt"].as_str().unwrap().into(),
            "-n".into(),
            r["n_predict"].to_string(),
            "--temperature".into(),
            "0".into(),
            "--json".into(),
        ];
        if r["parse_special"] == true {
            args.push("--parse-special".into());
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_chord"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{variant}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Json = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            ids(&v["prompt_ids"]),
            ids(&r["prompt_ids"]),
            "{variant}: prompt"
        );
        let mut gen_ids = ids(&r["gen_ids"]);
        if r["stopped_at_eog"] == true {
            gen_ids.push(r["eog_id"].as_u64().unwrap() as u32); // chord lists the end token too
            assert_eq!(v["stop_reason"], "end_token", "{variant}");
        }
        assert_eq!(ids(&v["generated_ids"]), gen_ids, "{variant}: ids");
        assert_eq!(v["text"], r["gen_text"], "{variant}: text");
        n += 1;
    }
    assert_eq!(n, 2);
}

/// The built-in templates that write BOS (Llama 2, Llama 3) on a vocabulary that adds BOS
/// too: the prompt starts with exactly one.
#[test]
fn built_in_templates_that_write_bos_do_not_double_it() {
    let variants = load("variants.json");
    let base = GgufFile::open(common::model_path()).unwrap();
    let tok = tokenizer("bos_chatml", &variants["bos_chatml"], base.gguf()).unwrap();
    assert!(tok.add_bos());
    let bos = tok.bos().unwrap();
    let bos_text = tok.token_text(bos).unwrap().to_string();
    for t in [Template::Llama2, Template::Llama3] {
        let text = t
            .render(
                &[Message::new("user", "Hi")],
                &RenderOptions {
                    add_generation_prompt: true,
                    bos_token: &bos_text,
                    eos_token: "<|im_end|>",
                    ..Default::default()
                },
            )
            .unwrap();
        let ids = tok.encode(&text, true);
        assert_eq!(ids[0], bos, "{t:?}: {ids:?}");
        assert_ne!(ids[1], bos, "{t:?}: {ids:?}");
    }
}

/// llama.cpp's `clean_spaces` (byte-level BPE vocabularies but smollm and command-r), on
/// lone quotes between spaces, as its own detokenizer gives them (llama.cpp b11312 on the
/// bpe_no_pre variant): the space after a collapsed quote is blanked, so a quote right after
/// it keeps its space.
#[test]
fn clean_spaces_collapses_lone_quotes_as_llama_cpp_does() {
    let variants = load("variants.json");
    let base = GgufFile::open(common::model_path()).unwrap();
    let tok = tokenizer("bpe_no_pre", &variants["bpe_no_pre"], base.gguf()).unwrap();
    for (text, llama_cpp) in [
        ("a ' ' b", "a'' b"),
        ("x ' ' ' y", "x'''y"),
        (" ' ' 's", "'''s"),
        ("Hello , world !", "Hello, world!"),
    ] {
        let ids = tok.tokenize(text, false, false);
        let got = tok.detokenize(&ids, false, false).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), llama_cpp, "{text:?}");
    }
}

/// `add_space_prefix` makes detokenizing drop the first piece's leading space for byte-level
/// BPE too, as llama.cpp's `llama_detokenize` does ([38699, 905] is " Hello", " world").
#[test]
fn a_bpe_vocabulary_with_add_space_prefix_drops_the_first_space_when_detokenizing() {
    let base = GgufFile::open(common::model_path()).unwrap();
    let prefixed = serde_json::json!({"base": "default", "set": {"tokenizer.ggml.add_space_prefix": ["bool", true]}});
    let tok = tokenizer("bpe_add_space_prefix", &prefixed, base.gguf()).unwrap();
    assert_eq!(
        tok.detokenize(&[38699, 905], false, false).unwrap(),
        b"Hello world"
    );
    let plain = tokenizer(
        "default",
        &serde_json::json!({"base": "default"}),
        base.gguf(),
    )
    .unwrap();
    assert_eq!(
        plain.detokenize(&[38699, 905], false, false).unwrap(),
        b" Hello world"
    );
}
