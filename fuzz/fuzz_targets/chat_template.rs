//! The chat template renderer on arbitrary templates and conversations: compiling and
//! rendering give a string or an error, never a panic or a hang (fuel bounds every render).
//!
//! Run: `cargo +nightly fuzz run chat_template fuzz/corpus/chat_template tests/data/templates --
//! -dict=fuzz/dicts/jinja.dict` (the first folder collects new inputs; the second seeds it).
//! (from the repository root).
#![no_main]

use arbitrary::Arbitrary;
use chord::chat::{Message, RenderOptions, Template};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    template: String,
    messages: Vec<(u8, String)>,
    tools: Option<Vec<String>>,
    add_generation_prompt: bool,
}

fuzz_target!(|input: Input| {
    let Ok(template) = Template::jinja(&input.template) else { return };
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<Message> = input
        .messages
        .iter()
        .take(16)
        .map(|(r, c)| Message::new(roles[*r as usize % roles.len()], c))
        .collect();
    let tools: Option<Vec<serde_json::Value>> = input
        .tools
        .map(|t| t.into_iter().map(|name| serde_json::json!({"type": "function", "function": {"name": name}})).collect());
    let _ = template.render(
        &messages,
        &RenderOptions {
            add_generation_prompt: input.add_generation_prompt,
            bos_token: "<s>",
            eos_token: "</s>",
            tools: tools.as_deref(),
            documents: None,
        },
    );
});
