//! Chat templates: a conversation rendered into the prompt text a model was trained on.
//!
//! Built in: ChatML, Llama 2, Alpaca, Zephyr (TinyLlama's), Llama 3. A GGUF file's own
//! `tokenizer.chat_template` (Jinja) is rendered with minijinja and is the default when the
//! file has one. Every template renders `add_generation_prompt` the same way: the opening of
//! the assistant's turn, so generation continues as the reply.

use minijinja::{Environment, context};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Template {
    /// `<|im_start|>role\n...<|im_end|>\n`.
    ChatMl,
    /// `<s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] reply </s>`.
    Llama2,
    /// `### Instruction:` / `### Response:`.
    Alpaca,
    /// `<|system|>\n...</s>\n<|user|>\n...</s>\n<|assistant|>\n` (Zephyr, TinyLlama chat).
    Zephyr,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// A Jinja template, as `tokenizer.chat_template` holds one.
    Jinja(String),
}

impl Template {
    /// The built-in template named `name`: `chatml`, `llama2`, `alpaca`, `zephyr`, `llama3`.
    pub fn named(name: &str) -> Result<Template, String> {
        Ok(match name {
            "chatml" => Template::ChatMl,
            "llama2" => Template::Llama2,
            "alpaca" => Template::Alpaca,
            "zephyr" => Template::Zephyr,
            "llama3" => Template::Llama3,
            _ => {
                return Err(format!(
                    "unknown template '{name}': expected chatml, llama2, alpaca, zephyr, llama3 or model"
                ));
            }
        })
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the opening of the
    /// assistant's turn. `bos` and `eos` are the model's tokens as text (Jinja templates may
    /// use them as `bos_token` and `eos_token`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, String> {
        let mut out = String::new();
        match self {
            Template::ChatMl => {
                for m in messages {
                    out += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
                }
                if add_generation_prompt {
                    out += "<|im_start|>assistant\n";
                }
            }
            Template::Llama2 => {
                // The system prompt folds into the first user turn.
                let mut system: Option<&str> = None;
                for m in messages {
                    match m.role.as_str() {
                        "system" => system = Some(&m.content),
                        "user" => {
                            out += "<s>[INST] ";
                            if let Some(s) = system.take() {
                                out += &format!("<<SYS>>\n{s}\n<</SYS>>\n\n");
                            }
                            out += &format!("{} [/INST]", m.content);
                        }
                        _ => out += &format!(" {} </s>", m.content),
                    }
                }
            }
            Template::Alpaca => {
                for m in messages {
                    match m.role.as_str() {
                        "system" => out += &format!("{}\n\n", m.content),
                        "user" => out += &format!("### Instruction:\n{}\n\n", m.content),
                        _ => out += &format!("### Response:\n{}\n\n", m.content),
                    }
                }
                if add_generation_prompt {
                    out += "### Response:\n";
                }
            }
            Template::Zephyr => {
                for m in messages {
                    out += &format!("<|{}|>\n{}</s>\n", m.role, m.content);
                }
                if add_generation_prompt {
                    out += "<|assistant|>\n";
                }
            }
            Template::Llama3 => {
                out += "<|begin_of_text|>";
                for m in messages {
                    out += &format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role, m.content
                    );
                }
                if add_generation_prompt {
                    out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            Template::Jinja(source) => {
                let mut env = Environment::new();
                env.add_function(
                    "raise_exception",
                    |msg: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template("chat", source)
                    .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
                let template = env.get_template("chat").map_err(|e| e.to_string())?;
                out = template
                    .render(context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => bos, eos_token => eos })
                    .map_err(|e| format!("the model's chat template failed: {e}"))?;
            }
        }
        Ok(out)
    }
}
