//! `chord generate` and `chord tokenize`.

use super::*;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Recognise special tokens written in the prompt (`<|im_start|>`...).
    #[arg(long)]
    parse_special: bool,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when this text is generated (not printed); may be given several times.
    #[arg(long)]
    stop: Vec<String>,
    #[command(flatten)]
    run: RunArgs,
    /// Print one JSON object (ids, text, tokens/s) instead of streaming the text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn generate(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    args.sampling.config()?; // refuse bad flags before loading anything
    if args.stop.iter().any(String::is_empty) {
        return Err("--stop \"\": an empty stop text would end generation before any text".into());
    }
    on_backend!(&args.run, file, opened, b => generate_on(b, &file, opened, &args))
}

pub(crate) fn generate_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    opened: std::time::Instant,
    args: &GenerateArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write as _;
    // Load time as llama.cpp's `load time` counts it: from opening the file (`opened`: its
    // metadata parsed) to the tokenizer built and the weights ready for the backend
    // (repacked, or packed).
    let (tok, model) = super::load(file, backend)?;
    let load_seconds = opened.elapsed().as_secs_f64();
    let ctx = args.run.ctx().min(model.config.ctx_len);
    let prompt_ids = prompt_ids(&tok, &args.prompt, args.parse_special)?;
    if prompt_ids.len() + args.n > ctx {
        return Err(format!(
            "the prompt ({} tokens) and -n {} exceed the {ctx}-token context (--ctx)",
            prompt_ids.len(),
            args.n
        )
        .into());
    }
    let mut state = chord::model::State::new(&model.config, ctx, 512);
    let stdout = std::io::stdout();
    let mut write_error = None;
    let cfg = args.sampling.config()?;
    let seed = cfg.seed;
    let mut sampler = chord::sample::Sampler::new(cfg)?;
    let request = chord::generate::Request {
        prompt_ids: &prompt_ids,
        max_new: args.n,
        ignore_eos: args.ignore_eos,
        stop: &args.stop,
    };
    let g = chord::generate::generate(
        &model,
        &mut state,
        &tok,
        &mut sampler,
        request,
        |_, text: &str| {
            if args.json {
                return true;
            }
            let mut lock = stdout.lock();
            match lock.write_all(text.as_bytes()).and_then(|()| lock.flush()) {
                Ok(()) => true,
                Err(e) => {
                    write_error = Some(e);
                    false
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let backend = model.backend().name();
    if args.json {
        let v = serde_json::json!({
            "model": file_label(args),
            "backend": backend,
            "threads": model.backend().threads(),
            "mode": args.run.mode.name(),
            "seed": seed,
            "temperature": args.sampling.temperature,
            "prompt_ids": g.prompt_ids,
            "generated_ids": g.generated_ids,
            "text": g.text,
            "stop_reason": g.stop_reason,
            "load_seconds": load_seconds,
            "prompt_tokens_per_second": g.prompt_tokens_per_second(),
            "generation_tokens_per_second": g.generation_tokens_per_second(),
        });
        out!("{v}")?;
    } else {
        out!()?;
        note!(
            "[loaded in {load_seconds:.2} s; {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s; {backend}, {} mode, stop: {}]",
            g.prompt_ids.len(),
            g.prompt_tokens_per_second(),
            g.generated_ids.len(),
            g.generation_tokens_per_second(),
            args.run.mode.name(),
            g.stop_reason
        );
    }
    Ok(())
}

pub(crate) fn file_label(args: &GenerateArgs) -> String {
    args.run.model.as_ref().map_or_else(
        || super::pull::FILE_NAME.to_string(),
        |p| p.display().to_string(),
    )
}

pub(crate) fn tokenize(
    model: Option<std::path::PathBuf>,
    parse_special: bool,
    text: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let file = chord::gguf::GgufFile::open(model_path(model)?)?;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    out!(
        "{}",
        serde_json::to_string(&tok.encode(text, parse_special))?
    )?;
    Ok(())
}
