//! The `chord` command line: a file per command group, and what they share (the run
//! flags, the sampling flags, the model path, the backend dispatch).

pub(crate) use clap::Args;

/// `println!` that returns the write error (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// A line (`note!`) or text (`note_part!`) for the user on stderr: progress, speeds,
/// warnings. A closed stderr (`chord pull 2>&1 | head -1`) drops it rather than panicking,
/// as `eprintln!` would.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// [`note!`] without the line's end.
macro_rules! note_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, $($arg)*);
        let _ = e.flush();
    }};
}

/// Opens the model `run` names, checks the run flags, and evaluates `$body` with `$b` bound to
/// the backend `run` names (see [`chord::with_backend!`]).
/// With `$opened`, also binds the instant the file's opening began (where llama.cpp's `load
/// time` starts).
macro_rules! on_backend {
    ($run:expr, $file:ident, $b:ident => $body:expr) => {
        on_backend!($run, $file, _opened, $b => $body)
    };
    ($run:expr, $file:ident, $opened:ident, $b:ident => $body:expr) => {{
        let run: &RunArgs = $run;
        check_threads(run.threads)?;
        check_mode(&run.backend, run.mode)?;
        let path = model_path(run.model.clone())?;
        let $opened = std::time::Instant::now();
        let $file = chord::gguf::GgufFile::open(&path)?;
        chord::with_backend!(&run.backend, run.threads, run.mode, $b => $body)
    }};
}

pub(crate) mod bench;
pub(crate) mod chat;
pub(crate) mod files;
pub(crate) mod generate;
pub(crate) mod perplexity;
pub(crate) mod pull;
pub(crate) mod research;

/// The tokenizer and the model of `file` on `backend`, built side by side: the tokenizer on a
/// thread of its own while the backend's threads prepare the weights. On the default model
/// the tokenizer takes 8-22 ms and the weights 45-90 (2 threads, AMD Zen 4; most of it the
/// first touch of fresh memory, see the README), so a load does not wait for both in turn.
pub(crate) fn load<'f, B: chord::Backend + 'f>(
    file: &'f chord::gguf::GgufFile,
    backend: B,
) -> Result<(chord::tokenizer::Tokenizer, chord::model::Model<'f, B>), Box<dyn std::error::Error>> {
    std::thread::scope(|s| {
        let tok = s.spawn(|| chord::tokenizer::Tokenizer::from_gguf(file.gguf()));
        let model = chord::model::Model::load(file, backend);
        let tok = tok
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        Ok((tok, model?))
    })
}

impl RunArgs {
    /// The context for generating and chatting: `--ctx`, else 2048 (the caller caps it at
    /// the model's).
    fn ctx(&self) -> usize {
        self.ctx.unwrap_or(2048)
    }
}

/// Which model runs where: shared by generate and chat.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// The GGUF model (default: the default model, fetched if absent).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Backend: scalar, blocked, simd (the widest level this CPU runs), simd-amx,
    /// simd-avx512, simd-avx2, simd-portable; or a mix, op by op: matmul=simd,softmax=scalar,*=blocked
    /// (ops: matmul, rmsnorm, rope, softmax, swiglu, geglu, add, attention; * for the rest).
    #[arg(long, default_value = "simd")]
    backend: chord::backend::BackendSpec,
    /// Threads for the backend.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// Context length in tokens (at most the model's). Default: 2048; `chord profile`: the
    /// model's, so that `--depth` reaches it.
    #[arg(long)]
    ctx: Option<usize>,
    /// How quantized weights are computed on: exact (dequantize, f32 math) or fast (8-bit
    /// activations and integer dot products, as ggml; simd backend only).
    #[arg(long, default_value = "exact")]
    mode: chord::backend::Mode,
}

/// Sampling flags, shared by generate (and chat).
#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// Temperature: 0 is greedy (argmax); higher flattens the distribution.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the K most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches P, in (0, 1].
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep tokens at least P times as likely as the most likely one, in [0, 1].
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens among the last --repeat-last-n (1 is off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Subtract this times a recent token's count from its logit.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Subtract this from the logit of every recent token.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Seed of the sampler's random stream (default: a fresh one, reported in --json output).
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn config(&self) -> Result<chord::sample::GenerationConfig, String> {
        let seed = self.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ ((std::process::id() as u64) << 32)
        });
        let cfg = chord::sample::GenerationConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed,
        };
        cfg.validate()
            .map_err(|e| format!("--{}", e.replacen('_', "-", 1)))?;
        Ok(cfg)
    }
}

/// The GGUF file `--model` names: a path, or the name of a known model (fetched if absent);
/// without `--model`, the default model (fetched if absent).
pub(crate) fn model_path(
    model: Option<std::path::PathBuf>,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let known = match &model {
        None => pull::DEFAULT,
        Some(path) => match path.to_str().and_then(pull::known) {
            Some(k) if !path.exists() => k,
            // A bare word (no folder, not a .gguf name) that is neither a file nor a name
            // chord knows: say which names it knows.
            None if !path.exists()
                && path.components().count() == 1
                && path.extension().is_none_or(|e| e != "gguf") =>
            {
                return Err(format!(
                    "--model {}: no such file, and not a model chord knows by name ({})",
                    path.display(),
                    pull::known_names()
                )
                .into());
            }
            _ => return Ok(path.clone()),
        },
    };
    let dir = pull::models_dir();
    if !dir.join(known.file).exists() {
        note!(
            "{} is not in {}: fetching it (chord pull {})...",
            known.name,
            dir.display(),
            known.name
        );
    }
    // `chord pull` has no --model: the advice is for the commands that do.
    pull::ensure(&known, &dir, false).map_err(|e| {
        format!("{e}\n  (or pass --model PATH to use a GGUF file you already have)").into()
    })
}

/// The ids of `--prompt` in `tok` (BOS added as the model asks); an empty prompt is an
/// error.
pub(crate) fn prompt_ids(
    tok: &chord::tokenizer::Tokenizer,
    prompt: &str,
    parse_special: bool,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let ids = tok.encode(prompt, parse_special);
    if ids.is_empty() {
        return Err("--prompt: the prompt is empty".into());
    }
    Ok(ids)
}

/// Fast mode is the simd backend's: refuse it elsewhere rather than silently run exact math.
pub(crate) fn check_mode(
    backend: &chord::backend::BackendSpec,
    mode: chord::backend::Mode,
) -> Result<(), Box<dyn std::error::Error>> {
    if mode == chord::backend::Mode::Fast && !matches!(backend.matmul(), chord::Variant::Simd(_)) {
        return Err(format!("--mode fast runs on the simd backend, not {backend} (use --backend simd or --mode exact)").into());
    }
    Ok(())
}

/// A thread count a user asked for (`--threads`): at least 1, and at most
/// [`MAX_THREADS_PER_CPU`] per CPU this process may run on. More threads than CPUs take
/// turns on the same cores, and a team spin-waits for its slowest member, so each extra
/// one costs time: a warning says so.
pub(crate) fn check_threads(threads: usize) -> Result<(), Box<dyn std::error::Error>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = MAX_THREADS_PER_CPU * cpus;
    if threads == 0 {
        return Err("--threads 0: a thread count must be at least 1".into());
    }
    if threads > most {
        return Err(format!(
            "--threads {threads}: this process may run on {cpus} CPUs; at most {most} (4 per CPU)"
        )
        .into());
    }
    if threads > cpus {
        note!(
            "chord: warning: --threads {threads} is more than the {cpus} CPUs this process may run on: the threads take turns on the same cores"
        );
    }
    Ok(())
}

/// Threads per CPU [`check_threads`] allows.
const MAX_THREADS_PER_CPU: usize = 4;

/// A prompt of `tokens` fits the context (`--ctx`, at most the model's).
pub(crate) fn check_prompt_fits(
    tokens: usize,
    config: &chord::model::Config,
    ctx: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = ctx.min(config.ctx_len);
    if tokens > ctx {
        return Err(format!(
            "the prompt ({tokens} tokens) exceeds the {ctx}-token context (--ctx)"
        )
        .into());
    }
    Ok(())
}
