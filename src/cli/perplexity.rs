//! `chord perplexity`, with KL divergence against a stored base.

use super::*;

#[derive(Args)]
pub(crate) struct PerplexityArgs {
    /// The GGUF model (default: the default model, fetched if absent).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// The text file to score.
    #[arg(long)]
    file: std::path::PathBuf,
    /// Tokens per chunk; each chunk is scored on its second half.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Backend (as for generate).
    #[arg(long, default_value = "simd")]
    backend: chord::backend::BackendSpec,
    /// Threads for the backend.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// exact or fast, as for generate.
    #[arg(long, default_value = "exact")]
    mode: chord::backend::Mode,
    /// Store this run's distributions in FILE, as the base of later --kld comparisons.
    #[arg(long, value_name = "FILE")]
    kld_base: Option<std::path::PathBuf>,
    /// Compare this run with the base stored in FILE: KL divergence and same top token.
    #[arg(long, value_name = "FILE", conflicts_with = "kld_base")]
    kld: Option<std::path::PathBuf>,
    /// Print one JSON object instead of the summary line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn perplexity(args: PerplexityArgs) -> Result<(), Box<dyn std::error::Error>> {
    check_mode(&args.backend, args.mode)?;
    if args.ctx < 4 {
        return Err(format!("--ctx {}: a chunk needs at least 4 tokens", args.ctx).into());
    }
    check_threads(args.threads)?;
    let text =
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let file = chord::gguf::GgufFile::open(model_path(args.model.clone())?)?;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let threads = args.threads;
    let (result, kld) = chord::with_backend!(&args.backend, threads, args.mode, b => {
        perplexity_on(b, &file, &tok, &text, &args)?
    });
    let mode = args.mode.name();
    if args.json {
        let mut v = serde_json::to_value(&result)?;
        v["mode"] = mode.into();
        if let Some(k) = &kld {
            v["kl_divergence"] = serde_json::to_value(k)?;
        }
        out!("{v}")?;
    } else {
        let (ppl, se, n, c, t) = (
            result.ppl,
            result.stderr,
            result.chunks,
            result.ctx,
            result.tokens_scored,
        );
        out!("PPL = {ppl:.4} +/- {se:.5} ({n} chunks of {c}, {t} tokens scored, {mode} mode)")?;
        if let Some(k) = kld {
            out!(
                "KL divergence from the base: mean {:.6} +/- {:.6}, median {:.6}, 99th percentile {:.6}, max {:.6}",
                k.mean,
                k.stderr,
                k.median,
                k.p99,
                k.max
            )?;
            out!(
                "same top token: {:.3}% +/- {:.3}% of {} positions",
                100.0 * k.same_top,
                100.0 * k.same_top_stderr,
                k.positions
            )?;
        }
    }
    Ok(())
}

pub(crate) fn perplexity_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    tok: &chord::tokenizer::Tokenizer,
    text: &str,
    args: &PerplexityArgs,
) -> Result<(chord::perplexity::Perplexity, Option<chord::kld::KldStats>), Box<dyn std::error::Error>>
{
    use chord::kld::{BaseReader, BaseRow, BaseWriter, KldAccumulator};
    let ctx = args.ctx;
    let model = chord::model::Model::load(file, backend)?;
    if ctx > model.config.ctx_len {
        return Err(format!(
            "--ctx {ctx} exceeds the model's context of {}",
            model.config.ctx_len
        )
        .into());
    }
    let vocab = model.config.vocab;
    let hash = chord::kld::tokens_hash(tok, text);
    let open_err = |p: &std::path::Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut writer = match &args.kld_base {
        Some(p) => {
            let f = std::fs::File::create(p).map_err(|e| open_err(p, e))?;
            Some(BaseWriter::new(
                std::io::BufWriter::new(f),
                vocab,
                ctx,
                hash,
            )?)
        }
        None => None,
    };
    let mut reader = match &args.kld {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| open_err(p, e))?;
            Some(
                BaseReader::new(std::io::BufReader::new(f), vocab, ctx, hash)
                    .map_err(|e| format!("--kld {}: {e}", p.display()))?,
            )
        }
        None => None,
    };
    let mut acc = KldAccumulator::default();
    let mut row = BaseRow::default();
    let progress = |done: usize, of: usize, ppl: f64| {
        // A progress bar on stderr, redrawn in place.
        let width = 30;
        let filled = done * width / of;
        note_part!(
            "\r[{}{}] chunk {done}/{of}, PPL so far {ppl:.4}",
            "#".repeat(filled),
            ".".repeat(width - filled)
        );
        if done == of {
            note!();
        }
    };
    let result =
        chord::perplexity::perplexity_visiting(&model, tok, text, ctx, progress, |logits, _| {
            let mut step = || -> Result<(), chord::kld::KldError> {
                if let Some(w) = writer.as_mut() {
                    w.push(&BaseRow::of(logits))?;
                }
                if let Some(r) = reader.as_mut() {
                    r.next(&mut row)?;
                    acc.add(&row, logits);
                }
                Ok(())
            };
            step().map_err(|e| chord::model::ModelError::Input(format!("KL divergence: {e}")))
        });
    let result = result?;
    if let Some(w) = writer {
        w.finish()?;
    }
    Ok((result, reader.map(|_| acc.stats())))
}
