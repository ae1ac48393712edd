//! Chat templates: a conversation rendered into the prompt text a model was trained on.
//!
//! Built in: ChatML, Llama 2, Alpaca, Zephyr (TinyLlama's), Llama 3. A GGUF file's own
//! `tokenizer.chat_template` (Jinja) is rendered with minijinja and is the default when the
//! file has one. Every template renders `add_generation_prompt` the same way: the opening of
//! the assistant's turn, so generation continues as the reply.

use minijinja::{Environment, context};

use crate::tokenizer::Tokenizer;

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

/// A conversation with a model: its history, rendered through a template each turn, and the
/// tokens already in the KV cache, so each turn feeds only what is new.
pub struct Session {
    pub messages: Vec<Message>,
    template: Template,
    bos: String,
    eos: String,
    /// Tokens whose keys and values the state holds, in order.
    cached: Vec<u32>,
}

impl Session {
    /// An empty conversation rendered with `template`; `bos`, `eos`: the model's tokens as text.
    pub fn new(template: Template, bos: &str, eos: &str) -> Session {
        Session {
            messages: Vec::new(),
            template,
            bos: bos.into(),
            eos: eos.into(),
            cached: Vec::new(),
        }
    }

    /// Sets (or replaces) the system prompt, first in the conversation.
    pub fn set_system(&mut self, text: &str) {
        self.messages.retain(|m| m.role != "system");
        self.messages.insert(0, Message::new("system", text));
    }

    /// Forgets every turn but the system prompt.
    pub fn clear(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }

    /// Adds a turn without generating (`user` or `assistant`).
    pub fn push(&mut self, role: &str, content: &str) {
        self.messages.push(Message::new(role, content));
    }

    /// The prompt for the assistant's next turn, tokenized, leaving `reserve` tokens for the
    /// reply within `ctx`: the oldest turns (after the system prompt) are dropped until it
    /// fits. Returns the ids and how many turns were dropped.
    pub fn prompt(
        &mut self,
        tok: &Tokenizer,
        ctx: usize,
        reserve: usize,
    ) -> Result<(Vec<u32>, usize), String> {
        let mut dropped = 0;
        loop {
            let text = self
                .template
                .render(&self.messages, true, &self.bos, &self.eos)?;
            let ids = tok.encode(&text, true);
            if ids.len() + reserve <= ctx {
                return Ok((ids, dropped));
            }
            // The oldest turn that is not the system prompt, unless it is the last one.
            let oldest = self.messages.iter().position(|m| m.role != "system");
            match oldest {
                Some(i) if i + 1 < self.messages.len() => {
                    self.messages.remove(i);
                    dropped += 1;
                }
                _ => {
                    return Err(format!(
                        "the message alone ({} tokens) and the reply ({reserve}) do not fit the {ctx}-token context",
                        ids.len()
                    ));
                }
            }
        }
    }

    /// Generates the assistant's reply to the conversation, streaming it to `on_token`
    /// (returning `false` stops the reply), and adds it to the history. `reserve` tokens are
    /// kept free for it; the context is `state`'s.
    pub fn reply<B: crate::backend::Backend>(
        &mut self,
        model: &crate::model::Model<'_, B>,
        state: &mut crate::model::State,
        tok: &Tokenizer,
        sampler: &mut crate::sample::Sampler,
        reserve: usize,
        on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<(crate::generate::Generation, usize), String> {
        let (ids, dropped) = self.prompt(tok, state.max_seq(), reserve)?;
        // Reuse the cached prefix; at least the last prompt token runs again.
        let common = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        state.pos = common;
        let req = crate::generate::Request {
            prompt_ids: &ids[common..],
            max_new: reserve,
            ignore_eos: false,
            stop: &[],
        };
        let result = crate::generate::generate(model, state, tok, sampler, req, on_token);
        let g = match result {
            Ok(g) => g,
            Err(e) => {
                self.cached.clear();
                state.reset();
                return Err(e.to_string());
            }
        };
        // The state now holds the prompt and every generated token but the last.
        self.cached = ids;
        self.cached
            .extend_from_slice(&g.generated_ids[..g.generated_ids.len().saturating_sub(1)]);
        self.messages.push(Message::new("assistant", &g.text));
        Ok((g, dropped))
    }
}
