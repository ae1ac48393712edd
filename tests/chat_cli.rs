//! Scripted `chord chat` sessions (piped stdin) against llama.cpp's chat references.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// Starts `chord chat` with `args`, every stream piped.
fn spawn_chat(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_chord"))
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `chord chat` with `args`, feeding `script` on stdin; returns the JSON reply lines.
fn chat(args: &[&str], script: &str) -> Vec<Value> {
    let mut child = spawn_chat(args);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each conversation of chat.jsonl, replayed with /system, /user and /assistant lines and
/// its last user message, in fast mode at temperature 0: the reply's tokens are the
/// reference's up to the first position whose margin (top-1 minus top-2) is below 0.1.
#[test]
fn scripted_chat_reproduces_the_reference_replies() {
    let model = common::model_path().to_str().unwrap().to_string();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference/chat.jsonl"),
    )
    .unwrap();
    let (mut n, mut compared) = (0, 0);
    for line in text.lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        let messages = c["messages"].as_array().unwrap();
        let mut script = String::new();
        for (i, m) in messages.iter().enumerate() {
            let (role, content) = (m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
            script += &match (role, i + 1 == messages.len()) {
                ("user", true) => format!("{content}\n"),
                (role, _) => format!("/{role} {content}\n"),
            };
        }
        let replies = chat(
            &[
                "--model",
                &model,
                "--mode",
                "fast",
                "--temperature",
                "0",
                "-n",
                "64",
                "--json",
            ],
            &script,
        );
        assert_eq!(replies.len(), 1, "{}", c["name"]);
        let got: Vec<u64> = replies[0]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let want: Vec<u64> = c["gen_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let margins: Vec<f64> = c["gen_top1_minus_top2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let sure = margins.iter().position(|&m| m < 0.1).unwrap_or(want.len());
        // (multi_turn's very first reference token is a near-tie, margin 0.089: nothing in
        // it is certain enough to compare.)
        let k = sure.min(got.len());
        assert_eq!(
            got[..k],
            want[..k],
            "{}: the first {k} tokens (margins >= 0.1)",
            c["name"]
        );
        compared += k;
        n += 1;
    }
    assert!(n >= 3);
    assert!(
        compared >= 10,
        "only {compared} tokens were certain enough to compare"
    );
}

/// Exact mode on the F32 model: a two-turn session gives the same replies run to run.
#[test]
fn an_exact_mode_two_turn_session_repeats_run_to_run() {
    let model = common::f32_model_path().to_str().unwrap().to_string();
    let script = "My name is Ana.\nWhat is my name?\n";
    let args = [
        "--model",
        model.as_str(),
        "--temperature",
        "0",
        "-n",
        "40",
        "--json",
    ];
    // What a session says: each reply's ids and text (not its timing).
    let said = |replies: Vec<Value>| {
        replies
            .iter()
            .map(|r| (r["ids"].clone(), r["reply"].clone()))
            .collect::<Vec<_>>()
    };
    let first = said(chat(&args, script));
    assert_eq!(first.len(), 2);
    assert_eq!(first, said(chat(&args, script)));
    // Sampling with a fixed seed repeats too.
    let seeded = [
        "--model",
        model.as_str(),
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "-n",
        "40",
        "--json",
    ];
    assert_eq!(said(chat(&seeded, script)), said(chat(&seeded, script)));
}

#[test]
fn chat_commands_and_bad_flags() {
    let model = common::model_path().to_str().unwrap().to_string();
    // /quit ends the session before the second question; EOF would end it too.
    let replies = chat(
        &["--model", &model, "--temperature", "0", "-n", "8", "--json"],
        "Hi\n/quit\nNever asked\n",
    );
    assert_eq!(replies.len(), 1);
    let bad = Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(["chat", "--model", &model, "--template", "vicuna"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown template 'vicuna'"));
}

/// Ctrl-C (SIGINT) during a reply stops that reply, not the program: the next question is
/// still answered.
#[test]
fn ctrl_c_stops_the_reply_not_the_program() {
    use std::io::{BufRead, BufReader, Read};
    let model = common::model_path().to_str().unwrap().to_string();
    let mut child = spawn_chat(&[
        "--model",
        &model,
        "--temperature",
        "0",
        "-n",
        "1500",
        "--ctx",
        "2048",
    ]);
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    stdin
        .write_all(b"Write a very long story about the sea, with many chapters.\n")
        .unwrap();
    // Interrupt once the reply is streaming.
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The banner comes first; then the reply's report.
    let mut line = String::new();
    while line.is_empty() || line.starts_with("chord chat:") {
        line.clear();
        stderr.read_line(&mut line).unwrap();
    }
    assert!(line.contains("stopped"), "stderr: {line:?}");
    let stopped_after: usize = line
        .trim_start_matches('[')
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(stopped_after < 1500, "{line}");
    // The program goes on: a second question, then /quit.
    stdin.write_all(b"Say hi.\n/quit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "the program survived Ctrl-C"
    );
    assert!(
        rest.contains(" tokens, "),
        "the second reply's report: {rest:?}"
    );
}

/// A conversation that outgrows the context drops its oldest turns, with a notice on stderr,
/// and goes on.
#[test]
fn the_oldest_turns_are_dropped_when_the_context_is_full() {
    let model = common::model_path().to_str().unwrap().to_string();
    let mut child = spawn_chat(&[
        "--model",
        &model,
        "--temperature",
        "0",
        "-n",
        "24",
        "--ctx",
        "160",
        "--json",
    ]);
    let script = "Tell me about the sea.\nTell me about the mountains.\nTell me about the desert.\nTell me about rivers.\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().lines().count(),
        4,
        "every question answered"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("oldest turn(s) to fit the 160-token context"),
        "{err}"
    );
}

/// The Zephyr/TinyLlama template (one tag per line) put into a copy of the default model
/// renders as transformers renders it (trim_blocks, lstrip_blocks), and the model answers as
/// it does under that rendering.
#[test]
fn a_one_tag_per_line_template_renders_without_stray_lines() {
    let zephyr = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates/zephyr.jinja"),
    )
    .unwrap();
    let model = common::model_variant("zephyr_template", |w| {
        w.metadata(
            "tokenizer.chat_template",
            chord::gguf::Value::String(zephyr),
        );
    });
    let messages = std::env::temp_dir().join(format!("chord-zephyr-{}.json", std::process::id()));
    std::fs::write(&messages, r#"[{"role": "user", "content": "Hi there"}]"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(["template", "--model"])
        .arg(&model)
        .arg("--messages")
        .arg(&messages)
        .output()
        .unwrap();
    std::fs::remove_file(&messages).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "<|user|>\nHi there<|im_end|>\n<|assistant|>\n"
    );
    let replies = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--json",
        ],
        "What is the capital of France?\n",
    );
    assert_eq!(replies[0]["reply"], "The capital of France is Paris.");
}

/// Qwen-style templates call Python string methods on every message: the chat replies.
#[test]
fn a_template_calling_python_string_methods_chats() {
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content.startswith('<tool') %}tool{% else %}{{ m.content.strip() }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let model = common::model_variant("strip_template", |w| {
        w.metadata(
            "tokenizer.chat_template",
            chord::gguf::Value::String(template.into()),
        );
    });
    let replies = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "16",
            "--json",
        ],
        "  What is the capital of France?  \n",
    );
    assert!(
        replies[0]["reply"].as_str().unwrap().contains("Paris"),
        "{}",
        replies[0]
    );
}

/// A template that fails on any conversation stops `chord chat` before the first turn, with
/// the template's line and construct, and a non-zero exit.
#[test]
fn a_template_that_cannot_render_ends_chat_before_the_first_turn() {
    let model = common::model_variant("raising_template", |w| {
        w.metadata(
            "tokenizer.chat_template",
            chord::gguf::Value::String(
                "{% for m in messages %}\n{{ m.content | no_such_filter }}\n{% endfor %}".into(),
            ),
        );
    });
    let mut child = spawn_chat(&["--model", model.to_str().unwrap()]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi\nHello\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("line 2") && stderr.contains("no_such_filter"),
        "{stderr}"
    );
}

/// The banner names the model given with --model, not the default one.
#[test]
fn the_banner_names_the_model_given() {
    let model = common::model_variant("banner_name", |_| {});
    let mut child = spawn_chat(&["--model", model.to_str().unwrap(), "-n", "4"]);
    child.stdin.take().unwrap().write_all(b"/quit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let banner = stderr
        .lines()
        .find(|l| l.starts_with("chord chat:"))
        .unwrap_or_default();
    assert!(banner.contains("banner_name.gguf"), "{stderr}");
    assert!(
        !banner.contains("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{stderr}"
    );
}
