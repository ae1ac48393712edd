//! Chat templates: the model's own reproduces llama.cpp's renderings and prompt ids; each
//! built-in template has a known rendering.

use std::path::Path;

use chord::chat::{Message, RenderOptions, Template};
use chord::gguf::GgufFile;
use chord::tokenizer::Tokenizer;
use serde_json::Value;

mod common;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference");

fn opts<'a>(bos: &'a str, eos: &'a str) -> RenderOptions<'a> {
    RenderOptions {
        add_generation_prompt: true,
        bos_token: bos,
        eos_token: eos,
        ..Default::default()
    }
}

fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "2+2?"),
    ]
}

#[test]
fn the_models_own_template_reproduces_every_reference_rendering_and_prompt() {
    let file = GgufFile::open(common::model_path()).unwrap();
    let source = file
        .gguf()
        .str("tokenizer.chat_template")
        .unwrap()
        .to_string();
    assert_eq!(
        source,
        std::fs::read_to_string(Path::new(REFERENCE).join("chat_template.jinja")).unwrap()
    );
    let template = Template::jinja(&source).unwrap();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let text = std::fs::read_to_string(Path::new(REFERENCE).join("chat.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let rendered = template
            .render(&messages, &opts("<|im_start|>", "<|im_end|>"))
            .unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap());
        let ids: Vec<u32> = c["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(&rendered, true), ids, "{}", c["name"]);
        n += 1;
    }
    assert!(n >= 3, "{n} conversations");
}

#[test]
fn chatml_renders_roles_between_markers() {
    let r = Template::ChatMl
        .render(&conversation(), &opts("", ""))
        .unwrap();
    assert_eq!(
        r,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama2_folds_the_system_prompt_into_the_first_instruction() {
    let r = Template::Llama2
        .render(&conversation(), &opts("<s>", "</s>"))
        .unwrap();
    assert_eq!(
        r,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]"
    );
}

#[test]
fn alpaca_uses_instruction_and_response_headers() {
    let r = Template::Alpaca
        .render(&conversation(), &opts("", ""))
        .unwrap();
    assert_eq!(
        r,
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n"
    );
}

#[test]
fn zephyr_ends_each_turn_with_eos() {
    let r = Template::Zephyr
        .render(&conversation(), &opts("<s>", "</s>"))
        .unwrap();
    assert_eq!(
        r,
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"
    );
}

#[test]
fn llama3_uses_headers_and_eot() {
    let r = Template::Llama3
        .render(&conversation()[1..2], &opts("<|begin_of_text|>", ""))
        .unwrap();
    assert_eq!(
        r,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn unknown_template_names_and_broken_templates_are_errors() {
    assert!(
        Template::named("vicuna")
            .unwrap_err()
            .to_string()
            .contains("unknown template 'vicuna'")
    );
    let broken = Template::jinja("Hi\n{% for m in messages %}")
        .unwrap_err()
        .to_string();
    assert!(
        broken.contains("line 2") && broken.contains("syntax error"),
        "{broken}"
    );
    let raising = Template::jinja("{{ raise_exception('roles must alternate') }}").unwrap();
    let e = raising
        .render(&conversation(), &opts("", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1: roles must alternate"), "{e}");
}

/// A method the template calls on a value that lacks it names the line and the construct.
#[test]
fn a_render_error_names_the_line_and_the_failing_construct() {
    let t =
        Template::jinja("{% for m in messages %}\n{{ m.content.shout() }}\n{% endfor %}").unwrap();
    let e = t
        .render(&conversation(), &opts("", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains(".shout()"), "{e}");
}

/// A template that never ends is stopped: an error, not a hang.
#[test]
fn a_template_that_loops_without_end_is_an_error() {
    let t = Template::jinja(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let e = t
        .render(&conversation(), &opts("", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fuel"), "{e}");
    assert!(started.elapsed().as_secs() < 60);
}

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/templates");

/// Every case of the template corpus (tests/data/templates/cases.json), rendered by
/// `chord template` through the default model, is byte for byte what jinja2 configured as
/// transformers configures it renders (make_expected.py), or fails with the message the
/// template raises.
#[test]
fn chord_template_renders_the_corpus_as_transformers_does() {
    let model = common::model_path();
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(Path::new(TEMPLATES).join("cases.json")).unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("chord-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        assert_eq!(c["bos_token"], "<|im_start|>", "{name}: the model's BOS");
        assert_eq!(c["eos_token"], "<|im_end|>", "{name}: the model's EOS");
        let messages = dir.join(format!("{name}.messages.json"));
        std::fs::write(&messages, c["messages"].to_string()).unwrap();
        let template =
            Path::new(TEMPLATES).join(format!("{}.jinja", c["template"].as_str().unwrap()));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chord"));
        cmd.env("SOURCE_DATE_EPOCH", "1767225600")
            .args(["template", "--model"])
            .arg(model)
            .arg("--template")
            .arg(&template)
            .arg("--messages")
            .arg(&messages);
        if !c["tools"].is_null() {
            let tools = dir.join(format!("{name}.tools.json"));
            std::fs::write(&tools, c["tools"].to_string()).unwrap();
            cmd.arg("--tools").arg(tools);
        }
        if !c["add_generation_prompt"].as_bool().unwrap() {
            cmd.arg("--no-generation-prompt");
        }
        let o = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        match (c["expected"].as_str(), c["error"].as_str()) {
            (Some(want), _) => {
                if !o.status.success() {
                    failures.push(format!("{name}: failed: {stderr}"));
                } else if o.stdout != want.as_bytes() {
                    failures.push(format!(
                        "{name}:\n  got  {:?}\n  want {want:?}",
                        String::from_utf8_lossy(&o.stdout)
                    ));
                }
            }
            (None, Some(error)) => {
                if o.status.success() || !stderr.contains(error) {
                    failures.push(format!(
                        "{name}: expected the error {error:?}, got {stderr:?}"
                    ));
                }
            }
            _ => panic!("{name}: a case has an expected output or an error"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Values nested deeper than any real conversation holds (a template can build them in a
/// loop) give an error or a string, never a stack overflow.
#[test]
fn deeply_nested_values_render_or_fail_cleanly() {
    let build = "{% set ns = namespace(v=[]) %}{% for i in range(100000) %}{% set ns.v = [ns.v] %}{% endfor %}";
    let render = |tail: &str| {
        Template::jinja(&format!("{build}{tail}"))
            .unwrap()
            .render(&conversation(), &opts("", ""))
    };
    let e = render("{{ ns.v|tojson }}").unwrap_err().to_string();
    assert!(e.contains("nested deeper than"), "{e}");
    assert_eq!(render("{{ ns.v|length }}").unwrap(), "1");
    assert_eq!(render("{{ (''~ns.v)|length }}").unwrap(), "200002");
    let printed = render("{{ ns.v }}").unwrap();
    assert!(
        printed.contains("[[[...]]]") && printed.len() < 2000,
        "{}",
        printed.len()
    );
}
