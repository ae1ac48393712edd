//! `chord chat` and `chord template`: conversations through a chat template.

use super::*;

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Chat template: model (the GGUF's own, the default when it has one), chatml, llama2,
    /// alpaca, zephyr, llama3, plain (each message's text on a line: the default for a model
    /// without a template), or a file holding a Jinja template.
    #[arg(long)]
    template: Option<String>,
    /// System prompt to start with (also: /system TEXT).
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n: usize,
    /// Print each reply as one JSON line (reply, ids, tokens/s) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct TemplateArgs {
    /// The GGUF model whose template and BOS/EOS tokens to use (default: the default model).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// The conversation: a JSON array of {"role", "content"} objects (further fields such as
    /// "tool_calls" are passed to the template as they are).
    #[arg(long)]
    messages: std::path::PathBuf,
    /// Tool descriptions: a JSON array of schemas, passed to the template as `tools`.
    #[arg(long)]
    tools: Option<std::path::PathBuf>,
    /// Leave out the opening of the assistant's turn.
    #[arg(long)]
    no_generation_prompt: bool,
    /// Chat template: model (the default), chatml, llama2, alpaca, zephyr, llama3, plain, or
    /// a file holding a Jinja template.
    #[arg(long)]
    template: Option<String>,
}

pub(crate) fn chat(args: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    args.sampling.config()?;
    if let Some(name) = args.template.as_deref().filter(|&n| n != "model") {
        chosen_template(name)?;
    }
    on_backend!(&args.run, file, b => chat_on(b, &file, &args))
}

/// A template named on the command line: a built-in name, or a file holding Jinja.
pub(crate) fn chosen_template(
    name: &str,
) -> Result<chord::chat::Template, Box<dyn std::error::Error>> {
    let unknown = match chord::chat::Template::named(name) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    if !std::path::Path::new(name).is_file() {
        // The built-in names come from the library's error; a file is the CLI's addition.
        return Err(
            format!("--template {name}: {unknown}, or a file holding a Jinja template").into(),
        );
    }
    let source = std::fs::read_to_string(name).map_err(|e| format!("--template {name}: {e}"))?;
    Ok(chord::chat::Template::jinja(&source).map_err(|e| format!("--template {name}: {e}"))?)
}

/// The template `--template` asks for (default: the model's own; for a model without one,
/// a base model, plain continuation, with a notice on stderr).
pub(crate) fn model_template(
    file: &chord::gguf::GgufFile,
    flag: Option<&str>,
) -> Result<chord::chat::Template, Box<dyn std::error::Error>> {
    let own = file.gguf().str("tokenizer.chat_template").ok();
    Ok(match (flag, own) {
        (None | Some("model"), Some(src)) => chord::chat::Template::jinja(src)
            .map_err(|e| format!("the model's tokenizer.chat_template: {e}"))?,
        (Some("model"), None) => {
            return Err("--template model: this model file has no tokenizer.chat_template".into());
        }
        (None, None) => {
            note!(
                "note: this model has no chat template (tokenizer.chat_template): it is likely a base model, so the conversation is given as plain text to continue (--template chatml|llama2|alpaca|zephyr|llama3 chooses a chat format)"
            );
            chord::chat::Template::Plain
        }
        (Some(name), _) => chosen_template(name)?,
    })
}

/// The model's BOS and EOS tokens as text, for templates.
pub(crate) fn bos_eos_text(tok: &chord::tokenizer::Tokenizer) -> (String, String) {
    let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    (text_of(tok.bos()), text_of(tok.eos()))
}

pub(crate) fn template(args: TemplateArgs) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write as _;
    let read_json = |path: &std::path::Path,
                     flag: &str|
     -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--{flag} {}: {e}", path.display()))?;
        Ok(serde_json::from_str(&text).map_err(|e| format!("--{flag} {}: {e}", path.display()))?)
    };
    // Passed to the template as they are: any fields, in their order, as transformers does.
    let messages = match read_json(&args.messages, "messages")? {
        serde_json::Value::Array(a) => a,
        _ => {
            return Err(format!(
                "--messages {}: expected a JSON array of {{\"role\", \"content\"}} objects",
                args.messages.display()
            )
            .into());
        }
    };
    let tools = match &args.tools {
        None => None,
        Some(path) => match read_json(path, "tools")? {
            serde_json::Value::Array(a) => Some(a),
            _ => return Err(format!("--tools {}: expected a JSON array", path.display()).into()),
        },
    };
    let file = chord::gguf::GgufFile::open(model_path(args.model)?)?;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let template = model_template(&file, args.template.as_deref())?;
    let (bos, eos) = bos_eos_text(&tok);
    let text = template.render_json(
        &messages,
        &chord::chat::RenderOptions {
            add_generation_prompt: !args.no_generation_prompt,
            bos_token: &bos,
            eos_token: &eos,
            tools: tools.as_deref(),
            documents: None,
        },
    )?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Set by Ctrl-C: the reply in progress stops at its next token.
pub(crate) static INTERRUPTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub(crate) fn chat_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    args: &ChatArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal, Write as _};
    use std::sync::atomic::Ordering;
    // A template that is unknown or does not parse fails before the weights load.
    let template = model_template(file, args.template.as_deref())?;
    let (tok, model) = super::load(file, backend)?;
    let (bos, eos) = bos_eos_text(&tok);
    let mut session = chord::chat::Session::new(template, &bos, &eos);
    if let Some(s) = &args.system {
        session.set_system(s);
    }
    // A template that cannot render a plain first turn fails now, before any turn.
    session.push("user", "Hello");
    let trial = session.render();
    session.messages.pop();
    trial.map_err(|e| format!("the chat template cannot render a conversation: {e}"))?;
    let ctx = args.run.ctx().min(model.config.ctx_len);
    if args.n >= ctx {
        return Err(format!(
            "-n {}: a reply must leave room for the conversation in the {ctx}-token context",
            args.n
        )
        .into());
    }
    let mut state = chord::model::State::new(&model.config, ctx, 512);
    let mut sampler = chord::sample::Sampler::new(args.sampling.config()?)?;
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .map_err(|e| format!("cannot catch Ctrl-C: {e}"))?;
    let interactive = std::io::stdin().is_terminal();
    // On stderr, so that piped replies stay alone on stdout.
    {
        note!(
            "chord chat: {} on {}. /quit, /clear, /system TEXT; Ctrl-C stops a reply.",
            args.run.model.as_deref().map_or_else(
                || super::pull::FILE_NAME.to_string(),
                |p| p
                    .file_name()
                    .unwrap_or(p.as_os_str())
                    .to_string_lossy()
                    .into_owned()
            ),
            model.backend().name()
        );
    }
    let stdout = std::io::stdout();
    let mut input = std::io::stdin().lock();
    let mut buf = String::new();
    loop {
        if interactive {
            note_part!("> ");
        }
        buf.clear();
        if input.read_line(&mut buf)? == 0 {
            break; // EOF ends the session
        }
        let line = buf.trim();
        let (command, rest) = line
            .split_once(' ')
            .map_or((line, ""), |(c, r)| (c, r.trim()));
        match command {
            "" => continue,
            "/quit" | "/exit" => break,
            "/clear" => {
                session.clear();
                note!("[conversation cleared]");
                continue;
            }
            "/system" => {
                session.set_system(rest);
                note!("[system prompt set]");
                continue;
            }
            // Record a turn without generating: replaying a conversation from a script.
            "/user" | "/assistant" => {
                session.push(&command[1..], rest);
                continue;
            }
            c if c.starts_with('/') => {
                note!(
                    "[unknown command {c}: /quit, /clear, /system TEXT, /user TEXT, /assistant TEXT]"
                );
                continue;
            }
            _ => session.push("user", line),
        }
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut write_error = None;
        let result = session.reply(&model, &mut state, &tok, &mut sampler, args.n, |_, text| {
            if !args.json {
                let mut out = stdout.lock();
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    write_error = Some(e);
                    return false;
                }
            }
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        if let Some(e) = write_error {
            return Err(e.into());
        }
        match result {
            Ok((g, dropped)) => {
                if dropped > 0 {
                    note!("[dropped the {dropped} oldest turn(s) to fit the {ctx}-token context]");
                }
                if args.json {
                    let v = serde_json::json!({ "reply": g.text, "ids": g.generated_ids, "stop_reason": g.stop_reason,
                        "generation_tokens_per_second": g.generation_tokens_per_second() });
                    out!("{v}")?;
                } else {
                    out!()?;
                }
                let stopped = if g.stop_reason == "stopped" {
                    ", stopped"
                } else {
                    ""
                };
                note!(
                    "[{} tokens, {:.1} tok/s{stopped}]",
                    g.generated_ids.len(),
                    g.generation_tokens_per_second()
                );
            }
            Err(e) => {
                // This turn cannot run (the context is too small for it): say so, keep going.
                session.messages.pop();
                note!("[{e}]");
            }
        }
    }
    Ok(())
}
