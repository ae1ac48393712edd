//! Chat templates: the model's own reproduces llama.cpp's renderings and prompt ids; each
//! built-in template has a known rendering.

use std::path::Path;

use chord::chat::{Message, Template};
use chord::gguf::GgufFile;
use chord::tokenizer::Tokenizer;
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/reference");

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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let path = chord::pull::ensure_default_model(&dir, true)
        .unwrap_or_else(|e| panic!("the chat tests need the default model: {e}"));
    let file = GgufFile::open(path).unwrap();
    let source = file
        .gguf()
        .str("tokenizer.chat_template")
        .unwrap()
        .to_string();
    assert_eq!(
        source,
        std::fs::read_to_string(Path::new(REFERENCE).join("chat_template.jinja")).unwrap()
    );
    let template = Template::Jinja(source);
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let text = std::fs::read_to_string(Path::new(REFERENCE).join("chat.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let rendered = template
            .render(&messages, true, "<|im_start|>", "<|im_end|>")
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
        .render(&conversation(), true, "", "")
        .unwrap();
    assert_eq!(
        r,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama2_folds_the_system_prompt_into_the_first_instruction() {
    let r = Template::Llama2
        .render(&conversation(), true, "<s>", "</s>")
        .unwrap();
    assert_eq!(
        r,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST]"
    );
}

#[test]
fn alpaca_uses_instruction_and_response_headers() {
    let r = Template::Alpaca
        .render(&conversation(), true, "", "")
        .unwrap();
    assert_eq!(
        r,
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n"
    );
}

#[test]
fn zephyr_ends_each_turn_with_eos() {
    let r = Template::Zephyr
        .render(&conversation(), true, "<s>", "</s>")
        .unwrap();
    assert_eq!(
        r,
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"
    );
}

#[test]
fn llama3_uses_headers_and_eot() {
    let r = Template::Llama3
        .render(&conversation()[1..2], true, "", "")
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
            .contains("unknown template 'vicuna'")
    );
    let broken = Template::Jinja("{% for m in messages %}".into());
    assert!(
        broken
            .render(&conversation(), true, "", "")
            .unwrap_err()
            .contains("does not parse")
    );
    let raising = Template::Jinja("{{ raise_exception('roles must alternate') }}".into());
    assert!(
        raising
            .render(&conversation(), true, "", "")
            .unwrap_err()
            .contains("roles must alternate")
    );
}
