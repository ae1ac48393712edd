//! Gemma 3 270M (Q4_K_M), the second model family, fetched by name as `chord pull
//! gemma3-270m` does, against llama.cpp's outputs (tests/data/gemma3/, copied from the
//! project's reference set; made by llama.cpp b11312 through llama-cpp-python with an F32
//! KV cache, BOS added as the file asks): its SentencePiece tokenizer, the last logits and
//! greedy continuations of 10 prompts, and perplexity.

mod common;

use std::path::Path;
use std::process::Command;

use chord::backend::{Backend, Mode};
use chord::gguf::GgufFile;
use chord::model::{Model, State};
use chord::tokenizer::Tokenizer;
use chord::{BlockedBackend, ScalarBackend, SimdBackend};
use common::{Case, argmax, gemma3_f32_path, gemma3_path, max_abs_diff};
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gemma3");

fn cases() -> Vec<Case> {
    common::greedy_cases(&Path::new(REFERENCE).join("greedy_f32_kvf32.jsonl"))
}

/// The last logits after `case`'s prompt, from llama.cpp's F32 model.
fn reference_logits(case: &Case) -> Vec<f32> {
    let file = format!("logits_last_f32_kvf32_{}.bin", case.name);
    common::read_f32s(&Path::new(REFERENCE).join(&file)).unwrap_or_else(|| panic!("{file}"))
}

/// The bound on the last logits' distance from llama.cpp's F32 model. The issue asked for
/// 0.01; llama.cpp's own F32 logits are not that well defined for this model. Its GELU goes
/// through an f16 lookup table (`GGML_GELU_FP16`, ggml-cpu/vec.h: the input rounded to f16,
/// the output read from a table of f16), so every GEGLU output moves by up to 2^-11 of
/// itself, and a summation order's last-bit differences flip those roundings. Measured on
/// capital_france: chord's scalar, AVX2 and AVX-512 backends running that same table differ
/// from one another by up to 5.1e-3, where with the true GELU (below) they agree within 5e-5.
/// chord computes the true function; its distance from llama.cpp over the 10 prompts is
/// 4.6e-3 to 2.1e-2 (question), the same on every backend. 0.025 holds those with a margin of
/// a fifth and still fails any real error (a wrong RoPE base or norm moves logits by > 0.1).
const LOGIT_TOL: f32 = 0.025;

/// The steps of `case` a correct model must reproduce: up to the first whose margin (top-1
/// minus top-2 logit, recorded by llama.cpp) is below 0.01, where a difference of summation
/// order may flip the choice, at most `limit`.
fn decided_steps(case: &Case, limit: usize) -> usize {
    let close = case.margins.iter().position(|&m| m < 0.01);
    close.unwrap_or(case.gen_ids.len()).min(limit)
}

/// For each case: the last prompt logits within [`LOGIT_TOL`] of llama.cpp's F32 model, and the greedy
/// tokens identical up to [`decided_steps`] (at most `limit`). Returns the logits.
fn check_cases<B: Backend>(path: &Path, backend: B, cases: &[Case], limit: usize) -> Vec<Vec<f32>> {
    let file = GgufFile::open(path).unwrap();
    let model = Model::load(&file, backend).unwrap();
    let name = model.backend().name();
    let mut state = State::new(&model.config, 512, 64);
    let mut all = Vec::new();
    for case in cases {
        state.reset();
        let logits = model
            .forward(&mut state, &case.prompt_ids)
            .unwrap()
            .to_vec();
        let diff = max_abs_diff(&logits, &reference_logits(case));
        eprintln!(
            "{} on {name}: last logits within {diff:.2e} of llama.cpp's F32",
            case.name
        );
        assert!(
            diff <= LOGIT_TOL,
            "{} on {name}: last logits differ by {diff}",
            case.name
        );
        let steps = decided_steps(case, limit);
        let mut got = vec![argmax(&logits)];
        while got.len() < steps {
            let next = *got.last().unwrap();
            got.push(argmax(model.forward(&mut state, &[next]).unwrap()));
        }
        assert_eq!(
            got[..steps],
            case.gen_ids[..steps],
            "{} on {name}",
            case.name
        );
        all.push(logits);
    }
    all
}

/// Exact mode on the F32 conversion (`chord convert --to f32`), every SIMD level this CPU
/// runs: all 10 prompts' last logits within [`LOGIT_TOL`] and every decided greedy token.
/// The AMX level's exact mode runs the AVX-512 kernels, bit for bit (`tests/model.rs`,
/// `exact_mode_on_simd_amx_gives_simd_avx512s_bits`), so it is not run again here.
#[test]
fn f32_conversion_in_exact_mode_matches_llama_cpp_on_every_simd_level() {
    use chord::kernels::simd::Level;
    let cases = cases();
    assert_eq!(cases.len(), 10);
    for level in Level::ALL
        .into_iter()
        .filter(|&l| l.is_supported() && l != Level::Amx)
    {
        check_cases(
            gemma3_f32_path(),
            SimdBackend::with_level(level, 2).unwrap(),
            &cases,
            usize::MAX,
        );
    }
}

/// The Q4_K_M file in exact mode computes the F32 model's numbers (its Q8_0, Q5_0, Q4_K and
/// Q6_K blocks dequantized in registers): the same acceptance as its F32 conversion, and the
/// two runs' logits within 1e-4 of each other (measured: 1e-5).
#[test]
fn q4_k_m_in_exact_mode_gives_the_f32_conversions_numbers() {
    let cases = cases();
    let q = check_cases(
        gemma3_path(),
        SimdBackend::new(2).unwrap(),
        &cases,
        usize::MAX,
    );
    let two = &cases[..2];
    let f = check_cases(gemma3_f32_path(), SimdBackend::new(2).unwrap(), two, 1);
    for ((case, a), b) in two.iter().zip(&q).zip(&f) {
        let diff = max_abs_diff(a, b);
        eprintln!(
            "{}: Q4_K_M exact vs F32 conversion within {diff:.2e}",
            case.name
        );
        assert!(diff <= 1e-4, "{}: {diff}", case.name);
    }
}

/// The scalar reference and the blocked backend run the family too: two prompts each, the
/// first 8 decided greedy tokens (kept short for CI time).
#[test]
fn scalar_and_blocked_backends_match_llama_cpp_on_two_prompts() {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.name == "capital_france" || c.name == "unicode_mix")
        .collect();
    assert_eq!(cases.len(), 2);
    check_cases(gemma3_path(), ScalarBackend::new(), &cases, 8);
    check_cases(gemma3_path(), BlockedBackend::new(2).unwrap(), &cases, 8);
}

/// Perplexity over the GPL-3 text at ctx 512 (BOS at the start of every chunk, as
/// llama-perplexity adds it for this model), within 1% of llama.cpp: exact mode against the
/// F32 model's 13.8295, fast mode (8-bit activations) against llama.cpp's Q4_K_M, 13.8831.
#[test]
fn perplexity_on_gpl3_matches_llama_cpp_within_1_percent() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/GPL-3.txt"))
            .unwrap();
    let file = GgufFile::open(gemma3_path()).unwrap();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    for (mode, reference) in [(Mode::Exact, 13.8295), (Mode::Fast, 13.8831)] {
        let model = Model::load(&file, SimdBackend::new(2).unwrap().with_mode(mode)).unwrap();
        let r = chord::perplexity::perplexity(&model, &tok, &text, 512, |_, _, _| {}).unwrap();
        eprintln!(
            "{mode:?}: PPL = {:.4} +/- {:.5} over {} chunks",
            r.ppl, r.stderr, r.chunks
        );
        assert!(
            (r.ppl / reference - 1.0).abs() <= 0.01,
            "{mode:?}: PPL {:.4}, llama.cpp {reference}",
            r.ppl
        );
    }
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

/// A base model without `tokenizer.chat_template` chats as plain continuation, with a notice,
/// instead of another model's markers: the conversation renders as its texts, one per line,
/// and `chord chat` replies to each piped line with one line.
#[test]
fn a_base_model_without_a_template_chats_as_plain_continuation() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    gemma3_path();
    let messages = models.join("variants/plain-chat-messages.json");
    std::fs::create_dir_all(messages.parent().unwrap()).unwrap();
    std::fs::write(
        &messages,
        r#"[{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "there was a king."}, {"role": "user", "content": "He had"}]"#,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(["template", "--model", "gemma3-270m", "--messages"])
        .arg(&messages)
        .env("CHORD_MODELS", &models)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no chat template"), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Once upon a time\nthere was a king.\nHe had\n"
    );

    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chord"))
        .args([
            "chat",
            "--model",
            "gemma3-270m",
            "-n",
            "40",
            "--temperature",
            "0",
        ])
        .env("CHORD_MODELS", &models)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The three primary colors are\nName a fruit:\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no chat template"), "{err}");
    // Two replies, each ending with its line (greedy: "A. red, blue, and yellow"), well
    // before the 40 tokens allowed.
    let replies: Vec<&str> = out.lines().collect();
    assert_eq!(replies.len(), 2, "{out:?} {err}");
    assert!(replies.iter().all(|r| !r.trim().is_empty()), "{out:?}");
}

/// The architecture read from the file, rule by rule as llama.cpp's `gemma3` reads it
/// (src/model/config.rs cites each): 18 layers of 4 query heads over 1 kv head of 256
/// (`key_length`, not 640 / 4), every sixth layer global (5, 11, 17) with RoPE base 1e6, the
/// others local (window 512, base 10,000), NeoX RoPE, scale 1/sqrt(256), embeddings times
/// sqrt(640), GEGLU, q/k norms and post-norms, no soft cap.
#[test]
fn the_architecture_is_read_from_the_file() {
    use chord::backend::RopeLayout;
    use chord::model::{Config, GateActivation};
    let file = GgufFile::open(gemma3_path()).unwrap();
    let c = Config::from_gguf(&file).unwrap();
    assert_eq!(
        (
            c.dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_dim
        ),
        (640, 18, 4, 1, 256, 2048)
    );
    assert_eq!((c.attn_dim(), c.kv_dim(), c.vocab), (1024, 256, 262_144));
    let globals: Vec<usize> = (0..18)
        .filter(|&l| c.layer_attention(l).0.is_none())
        .collect();
    assert_eq!(globals, [5, 11, 17]);
    assert_eq!(c.layer_attention(0), (Some(512), 10_000.0));
    assert_eq!(c.layer_attention(5), (None, 1_000_000.0));
    assert_eq!(c.rope_layout, RopeLayout::Neox);
    assert_eq!(c.attn_scale, 1.0 / 16.0);
    assert_eq!(c.embed_scale, 640f32.sqrt());
    assert_eq!(c.activation, GateActivation::Gelu);
    assert!(c.qk_norm && c.post_norms);
    assert_eq!((c.final_logit_softcap, c.norm_eps), (None, 1e-6));
}

/// Sliding-window attention at model level: a 661-token prompt (the first 3,000 characters
/// of the GPL-3 text), long enough that the local layers' 512-position window masks the
/// start of it. chord's 24 greedy tokens after it, on the F32 conversion, give llama.cpp's
/// text (tests/data/gemma3/long_prompt_greedy.txt: `llama-completion -m F32 -f PROMPT -n 24
/// --temp 0 -ctk f32 -ctv f32 -c 1024 -b 1024 -ub 1024 -no-cnv`, two trailing newlines
/// dropped); the same run with the window taken away (the local layers attending to every
/// position, their RoPE base unchanged) moves the last logits by far more than any rounding.
#[test]
fn a_prompt_longer_than_the_window_continues_as_llama_cpp() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/GPL-3.txt"))
            .unwrap();
    let prompt: String = text.chars().take(3000).collect();
    let want =
        std::fs::read_to_string(Path::new(REFERENCE).join("long_prompt_greedy.txt")).unwrap();
    let file = GgufFile::open(gemma3_f32_path()).unwrap();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let ids = tok.encode(&prompt, false);
    assert_eq!(ids.len(), 661);
    let mut model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let mut state = State::new(&model.config, 1024, 512);
    let windowed = model.forward(&mut state, &ids).unwrap().to_vec();
    let mut got = vec![argmax(&windowed)];
    while got.len() < 24 {
        let next = *got.last().unwrap();
        got.push(argmax(model.forward(&mut state, &[next]).unwrap()));
    }
    let got = String::from_utf8_lossy(&tok.decode(&got, false).unwrap()).into_owned();
    assert_eq!(got, want);

    model.config.window = None;
    state.reset();
    let global = model.forward(&mut state, &ids).unwrap();
    let moved = max_abs_diff(&windowed, global);
    eprintln!("without the window the last logits move by {moved}");
    assert!(moved > 0.5, "the window changed the logits by only {moved}");
}
