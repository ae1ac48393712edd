//! The `chord` command line, run as a user runs it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn chord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(args)
        .output()
        .expect("chord runs")
}

fn model() -> PathBuf {
    common::model_path().to_path_buf()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file in the models folder that is not the model it is named for is refused by name,
/// not fetched over: `chord pull` says to delete it, and a command that takes `--model` also
/// says it can point elsewhere (`chord pull` has no `--model` to offer).
#[test]
fn a_wrong_file_in_the_models_folder_is_named_and_each_command_gives_its_own_way_out() {
    let dir = std::env::temp_dir().join(format!("chord-cli-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        b"not the model",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_chord"))
            .args(args)
            .env("CHORD_MODELS", &dir)
            .output()
            .expect("chord runs")
    };
    let pull = run(&["pull"]);
    let generate = run(&["generate", "--prompt", "Hi", "-n", "1"]);
    std::fs::remove_dir_all(&dir).unwrap();
    for o in [&pull, &generate] {
        let e = stderr(o);
        assert!(!o.status.success(), "{e}");
        assert!(
            e.contains("is not smollm2-135m") && e.contains("delete it"),
            "{e}"
        );
        assert!(!e.contains("cannot fetch"), "{e}");
    }
    assert!(!stderr(&pull).contains("--model"), "{}", stderr(&pull));
    assert!(
        stderr(&generate).contains("--model PATH"),
        "{}",
        stderr(&generate)
    );
}

/// Notes for the user go to stderr; where no one reads it any more (a pipe whose reader
/// has gone, as in `chord pull 2>&1 | head -1`) they are dropped and the run still
/// succeeds, where `eprintln!` panicked.
#[test]
fn a_closed_stderr_pipe_drops_the_notes_not_the_run() {
    let m = model();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(["generate", "--model", m.to_str().unwrap(), "--prompt", "Hi"])
        .args(["-n", "2", "--temperature", "0"])
        .stderr(writer)
        .output()
        .expect("chord runs");
    assert!(o.status.success(), "{:?}", o.status);
    assert!(!o.stdout.is_empty());
}

#[test]
fn generate_json_reproduces_the_exact_math_reference() {
    let m = model();
    let o = chord(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "-n",
        "16",
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u64> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // greedy_f32_kvf32.jsonl, capital_france: the first 16 tokens.
    assert_eq!(
        ids,
        [
            7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33
        ]
    );
    assert_eq!(
        v["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(v["mode"], "exact");
    assert!(v["generation_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(
        v["text"].as_str().unwrap().starts_with(" Paris."),
        "{}",
        v["text"]
    );
}

#[test]
fn generate_streams_text_and_stops_at_the_end_token() {
    let m = model();
    let o = chord(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "-n",
        "40",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with(" Paris."), "{text:?}");
    assert!(stderr(&o).contains("stop: end_token"), "{}", stderr(&o));
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let m = model();
    let o = chord(&[
        "tokenize",
        "--model",
        m.to_str().unwrap(),
        "--parse-special",
        "<|im_start|>user\nHello there<|im_end|>\n",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    let plain = chord(&[
        "tokenize",
        "--model",
        m.to_str().unwrap(),
        "<|im_start|>user\nHello there<|im_end|>\n",
    ]);
    let plain_ids: Vec<u32> = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(
        (ids.len(), plain_ids.len()),
        (7, 19),
        "{ids:?} {plain_ids:?}"
    );
    assert_eq!(
        (ids[0], ids[5]),
        (1, 2),
        "<|im_start|> and <|im_end|> parsed: {ids:?}"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_a_non_zero_exit() {
    let m = model();
    let m = m.to_str().unwrap();
    let malformed = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gguf/malformed/tensor_count_2_60.gguf"
    );
    let cases: [(&[&str], &str); 16] = [
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--temperature",
                "-1",
            ],
            "--temperature",
        ),
        (
            &["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"],
            "--top-p",
        ),
        (
            &["generate", "--model", m, "--prompt", "x", "--min-p", "2"],
            "--min-p",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--backend",
                "gpu",
            ],
            "unknown backend 'gpu'",
        ),
        (
            &["generate", "--model", m, "--prompt", "x", "--threads", "0"],
            "--threads",
        ),
        // Thousands of threads would exhaust the process's memory maps: refused by name.
        (
            &[
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--threads",
                "9999",
            ],
            "--threads 9999: this process may run on",
        ),
        (
            &[
                "bench",
                "model",
                "--model",
                m,
                "--pp",
                "0",
                "--tg",
                "0",
                "--threads",
                "1",
            ],
            "--pp 0 --tg 0: no test to run",
        ),
        (
            &[
                "profile", "--model", m, "--pp", "0", "--tg", "4", "--depth", "61", "--ctx", "64",
            ],
            "a test of 4 tokens after a depth of 61 exceeds the 64-token context (--ctx)",
        ),
        (
            // Without --ctx, profile's context is the model's (8192), not generate's 2048.
            &[
                "profile", "--model", m, "--pp", "0", "--tg", "4", "--depth", "8189",
            ],
            "a test of 4 tokens after a depth of 8189 exceeds the 8192-token context (--ctx)",
        ),
        (
            &[
                "generate", "--model", m, "--prompt", "x", "-n", "5000", "--ctx", "64",
            ],
            "context",
        ),
        (
            &[
                "generate",
                "--model",
                "/nonexistent/model.gguf",
                "--prompt",
                "x",
            ],
            "/nonexistent/model.gguf",
        ),
        (&["inspect", malformed], "header.tensor_count at byte 8"),
        // A directory, and a bare word that is neither a file nor a known name.
        (
            &["generate", "--model", "/", "--prompt", "x"],
            "/: a directory, not a GGUF file",
        ),
        (
            &["generate", "--model", "smollm3", "--prompt", "x"],
            "--model smollm3: no such file, and not a model chord knows by name (smollm2-135m,",
        ),
        (
            &["generate", "--model", "qwen2.5", "--prompt", "x"],
            "--model qwen2.5: no such file, and not a model chord knows by name",
        ),
        // An empty stop text would end generation before any text.
        (
            &["generate", "--model", m, "--prompt", "x", "--stop", ""],
            "--stop \"\"",
        ),
    ];
    for (args, needle) in cases {
        let o = chord(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn the_same_seed_gives_the_same_text_and_another_seed_another() {
    let m = model();
    let run = |seed: &str| {
        let o = chord(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "-n",
            "24",
            "--ignore-eos",
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["seed"].as_u64(), Some(seed.parse().unwrap()));
        v["generated_ids"].clone()
    };
    assert_eq!(run("42"), run("42"));
    assert_ne!(run("42"), run("43"));
}

/// Logits divided by a tiny temperature once overflowed to infinity and the draw fell through
/// to the least likely token (38362); a tiny temperature is greedy: " Paris" (7042).
#[test]
fn a_tiny_temperature_draws_the_greedy_token() {
    let m = model();
    for seed in ["1", "2", "3"] {
        let o = chord(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--temperature",
            "1e-38",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            seed,
            "-n",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["generated_ids"], serde_json::json!([7042]), "seed {seed}");
    }
}

/// Real files carry placeholder tensors with a zero dimension; llama.cpp accepts them. The
/// file parses, `inspect` lists them with 0 bytes, and the model, which does not use them,
/// runs.
#[test]
fn zero_size_tensors_are_listed_and_the_model_runs() {
    use chord::gguf::DType;
    let path = common::model_variant("zero_size_tensors", |w| {
        w.tensor("placeholder.empty", &[0], DType::F32, vec![])
            .unwrap();
        w.tensor("placeholder.rows", &[576, 0], DType::Q8_0, vec![])
            .unwrap();
    });
    let p = path.to_str().unwrap();
    let o = chord(&["inspect", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = String::from_utf8_lossy(&o.stdout);
    for (name, dims) in [
        ("placeholder.empty", "[0]"),
        ("placeholder.rows", "[576, 0]"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{listing}"));
        assert!(
            line.contains(dims) && line.trim_end().ends_with(" 0"),
            "{line}"
        );
    }
    let o = chord(&[
        "generate",
        "--model",
        p,
        "--prompt",
        "The capital of France is",
        "-n",
        "2",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["generated_ids"][0], 7042);
}

/// `dump` writes the chosen activations; `diverge` exits 0 when a mixed backend agrees with
/// the reference and 1 when the tolerance is below what it measures; bad names are errors.
#[test]
fn dump_and_diverge_work_from_the_command_line() {
    let m = model();
    let m = m.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("chord-dump-{}.safetensors", std::process::id()));
    let o = chord(&[
        "dump",
        "--model",
        m,
        "--prompt",
        "Hi there",
        "--points",
        "q_rope,logits",
        "--layers",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["layer.2.q_rope", "logits"]);

    let mixed = "matmul=simd,softmax=scalar,*=blocked";
    let base = [
        "diverge",
        "--model",
        m,
        "--prompt",
        "Hi there",
        "--backend",
        mixed,
    ];
    let o = chord(&base);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("agrees with scalar at every point"));
    let o = chord(&[&base[..], &["--tol", "1e-12"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("departs from scalar at "));

    for (args, says) in [
        (
            vec![
                "dump",
                "--model",
                m,
                "--prompt",
                "x",
                "--points",
                "qq",
                "--out",
                "/dev/null",
            ],
            "unknown point 'qq'",
        ),
        (
            vec![
                "dump",
                "--model",
                m,
                "--prompt",
                "x",
                "--layers",
                "99",
                "--out",
                "/dev/null",
            ],
            "layer 99 does not exist",
        ),
        (
            vec![
                "diverge",
                "--model",
                m,
                "--prompt",
                "x",
                "--backend",
                "softmax=scalar",
            ],
            "names matmul=BACKEND or *=BACKEND",
        ),
    ] {
        let o = chord(&args);
        assert!(
            !o.status.success() && stderr(&o).contains(says),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

/// Hostile architecture metadata is a clear error before anything is sized by it: a block
/// count of 4 billion (no allocation, no panic), a RoPE base of 0, a partial rotary.
#[test]
fn hostile_architecture_metadata_is_a_clear_error() {
    use chord::gguf::Value;
    for (name, key, value, says) in [
        (
            "huge_block_count",
            "llama.block_count",
            Value::U32(u32::MAX),
            "block_count 4294967295",
        ),
        (
            "zero_rope_base",
            "llama.rope.freq_base",
            Value::F32(0.0),
            "RoPE bases 0",
        ),
        (
            "partial_rotary",
            "llama.rope.dimension_count",
            Value::U32(32),
            "partial rotary",
        ),
    ] {
        let path = common::model_variant(name, |w| {
            w.metadata(key, value);
        });
        let o = chord(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "Hi",
            "-n",
            "1",
        ]);
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(says), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

/// `chord synth`: bad shapes, presets and formats are refused by name before any file is
/// made; a good one writes a file that `chord inspect` reads as llama and `chord bench model
/// --svg` runs and draws.
#[test]
fn synth_refuses_bad_shapes_and_writes_a_model_that_runs() {
    let dir = std::env::temp_dir().join(format!("chord-synth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("m.gguf");
    let o = out.to_str().unwrap();
    // dim, heads, vocab, dtype
    let shape =
        |dim: &'static str, heads: &'static str, vocab: &'static str, dtype: &'static str| {
            vec![
                "--dim", dim, "--layers", "2", "--heads", heads, "--ffn", "96", "--vocab", vocab,
                "--dtype", dtype,
            ]
        };
    let small = shape("64", "2", "300", "f32");
    let refused: [(Vec<&str>, &str); 5] = [
        (vec!["--preset", "gpt-5"], "tinyllama-1.1b"),
        (vec!["--dim", "64", "--layers", "1"], "--heads is needed"),
        (
            shape("64", "3", "300", "f32"),
            "dim 64 is not a multiple of heads 3",
        ),
        (shape("64", "2", "300", "q4_k"), "does not write Q4_K"),
        (shape("64", "2", "100", "f32"), "vocab 100"),
    ];
    for (flags, want) in refused {
        let args = [&["synth", o][..], &flags].concat();
        let r = chord(&args);
        assert!(!r.status.success(), "{flags:?} was accepted");
        assert!(stderr(&r).contains(want), "{flags:?}: {}", stderr(&r));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{flags:?} left {left:?}");
    }
    let r = chord(&[&["synth", o, "--kv-heads", "1", "--seed", "3"][..], &small].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    let info = chord(&["inspect", o]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("general.architecture") && text.contains("\"llama\""));
    assert!(text.contains("llama.attention.head_count_kv") && text.contains("300 tokens"));
    // One small bench model run, with `extra` flags.
    let bench = |extra: &[&str]| {
        let base = [
            "bench",
            "model",
            "--model",
            o,
            "--pp",
            "8",
            "--tg",
            "4",
            "--reps",
            "1",
            "--threads",
            "1",
            "--modes",
            "exact",
        ];
        chord(&[&base[..], extra].concat())
    };
    let svg = dir.join("bench.svg");
    let r = bench(&["--svg", svg.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"));
    assert!(picture.contains("pp8 1 thread") && picture.contains("tg4 1 thread"));
    // At depths the tests are named as llama-bench names them; a context that cannot hold
    // the depth and the test is refused by name, even where the sum would overflow.
    let bench_at = |depth: &str| bench(&["--depth", depth, "--json"]);
    let r = bench_at("16,32");
    assert!(r.status.success(), "{}", stderr(&r));
    let rows: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let names: Vec<(&str, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["test"].as_str().unwrap(), r["depth"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("pp8 @ d16", 16),
            ("tg4 @ d16", 16),
            ("pp8 @ d32", 32),
            ("tg4 @ d32", 32)
        ]
    );
    for (depth, want) in [
        (
            "100000",
            "a test of 8 tokens after a depth of 100000 exceeds the 2048-token context",
        ),
        (
            "18446744073709551615",
            "after a depth of 18446744073709551615 exceeds the 2048-token context",
        ),
    ] {
        let r = bench_at(depth);
        assert_eq!(r.status.code(), Some(1), "{depth}: {}", stderr(&r));
        assert!(stderr(&r).contains(want), "{depth}: {}", stderr(&r));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `chord bench kernels` times attention and embedding from the shared case table, names
/// the probe that set each roof, and draws the rows with --svg.
#[test]
fn bench_kernels_times_every_op_of_the_table_against_named_roofs() {
    let svg = std::env::temp_dir().join(format!("chord-kernels-{}.svg", std::process::id()));
    let o = chord(&[
        "bench",
        "kernels",
        "--ops",
        "attention,embedding",
        "--shapes",
        "smollm",
        "--threads",
        "1",
        "--backends",
        "scalar",
        "--budget-ms",
        "5",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let probe = v["roofs"][0]["read_probe"].as_str().unwrap();
    assert!(chord::bench::READ_PROBES.contains(&probe), "{probe}");
    let rows: Vec<(String, String)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("op"), s("shape"))
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("embedding".into(), "smollm vocab=49152 dim=576".into()),
            (
                "attention".into(),
                "smollm m=1 pos=511 heads=9x64 kv=3".into()
            ),
            (
                "attention".into(),
                "smollm m=512 pos=0 heads=9x64 kv=3".into()
            ),
        ]
    );
    assert_eq!(v["rows"][2]["unit"], "GFLOP/s");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.contains("attention F32 smollm m=512 pos=0 heads=9x64 kv=3"));
    std::fs::remove_file(&svg).unwrap();
}

/// `dump` and `diverge` check the prompt before the weights load: on a model missing a
/// weight, a prompt too long for `--ctx` is the error they name (the load would fail too, as
/// the same command with room for the prompt shows).
#[test]
fn research_commands_refuse_a_bad_prompt_before_loading_the_weights() {
    let m = common::model_variant_without("missing_ffn_down", &["blk.3.ffn_down.weight"], |_| {});
    let m = m.to_str().unwrap();
    let long = "one two three four five six seven eight";
    for cmd in [
        vec!["dump", "--points", "logits", "--out", "/dev/null"],
        vec!["diverge"],
    ] {
        let run = |ctx: &str| {
            let args = [&cmd[..], &["--model", m, "--prompt", long, "--ctx", ctx]].concat();
            stderr(&chord(&args))
        };
        let e = run("4");
        assert!(e.contains("exceeds the 4-token context"), "{cmd:?}: {e}");
        assert!(!e.contains("blk.3.ffn_down"), "{cmd:?}: {e}");
        let e = run("64");
        assert!(e.contains("blk.3.ffn_down"), "{cmd:?}: {e}");
    }
}
