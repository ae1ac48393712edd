//! `chord bench kernels`, `chord bench model` and `chord profile`: where the time goes.

use std::time::Duration;

use chord::backend::Op;
use chord::bench::kernels;

use super::*;

#[derive(Args)]
pub(crate) struct KernelArgs {
    /// Ops to time (comma-separated): matmul, rmsnorm, rope, softmax, swiglu, geglu, add,
    /// embedding, attention.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "matmul,rmsnorm,rope,softmax,swiglu,add,attention"
    )]
    ops: Vec<Op>,
    /// Backends (comma-separated): scalar, blocked, simd, simd-amx, simd-avx512, simd-avx2,
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
    /// Also draw the results as an SVG picture in FILE (the `svg` feature, on by default).
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

pub(crate) fn bench_kernels(args: KernelArgs) -> Result<(), Box<dyn std::error::Error>> {
    for &t in &args.threads {
        check_threads(t)?;
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
    check_svg(args.svg.as_deref())?;
    note!("measuring roofs on {:?} threads...", cfg.threads);
    let roofs = chord::bench::measure_roofs(&cfg.threads);
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
    // Last: a picture that cannot be drawn or written costs none of the measurements.
    if let Some(path) = &args.svg {
        let title = format!("chord bench kernels on {}", chord::bench::cpu_name());
        write_svg(path, svg_kernels(&rows, &title))?;
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct ModelBenchArgs {
    /// The GGUF model (default: the default model, fetched if absent).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Prompt tokens of the pp test (0 to skip).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Generated tokens of the tg test (0 to skip).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Positions already in the KV cache when each test starts (comma-separated, as
    /// llama-bench's `-d`): long context, filled once by an untimed prompt.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    depth: Vec<usize>,
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
    /// Also draw the results as an SVG picture in FILE (the `svg` feature, on by default).
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

pub(crate) fn bench_model(args: ModelBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.reps == 0 {
        return Err("--reps 0: at least one repetition".into());
    }
    for &t in &args.threads {
        check_threads(t)?;
    }
    if args.pp == 0 && args.tg == 0 {
        return Err("--pp 0 --tg 0: no test to run".into());
    }
    check_svg(args.svg.as_deref())?;
    let path = model_path(args.model)?;
    let file = chord::gguf::GgufFile::open(&path)?;
    let config = chord::model::Config::from_gguf(&file)?;
    for &depth in &args.depth {
        chord::bench::check_depth(config.ctx_len, args.pp, args.tg, depth)?;
    }
    // The test column fits the longest name.
    let width = args
        .depth
        .iter()
        .map(|&d| chord::bench::test_name(&format!("pp{}", args.pp.max(args.tg)), d).len())
        .max()
        .unwrap_or(0)
        .max("test".len());
    let mut rows = Vec::new();
    if !args.json {
        let runs = if args.reps == 1 { "run" } else { "runs" };
        out!(
            "{}: simd backend, median of {} {runs}",
            path.display(),
            args.reps
        )?;
        out!(
            "{:<width$} {:<14} {:<6} {:>7} {:>12}",
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
            for &depth in &args.depth {
                let (pp, tg, reps) = (args.pp, args.tg, args.reps);
                for r in chord::bench::model::run(&model, mode.name(), pp, tg, depth, reps)? {
                    if !args.json {
                        out!(
                            "{:<width$} {:<14} {:<6} {:>7} {:>12.1}",
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
    }
    if args.json {
        out!("{}", serde_json::to_string(&rows)?)?;
    }
    if let Some(svg) = &args.svg {
        let name = path.file_name().map_or(path.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        });
        let title = format!("chord bench model: {name} on {}", chord::bench::cpu_name());
        write_svg(svg, svg_model(&rows, &title))?;
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct ProfileArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Prompt tokens of the prefill phase (0 to skip).
    #[arg(long, default_value_t = 128)]
    pp: usize,
    /// Tokens of the decode phase (0 to skip).
    #[arg(long, default_value_t = 32)]
    tg: usize,
    /// Positions already in the KV cache when each phase starts (as `chord bench model
    /// --depth`): long context, filled once by an untimed prompt. With the phase, at most
    /// `--ctx`.
    #[arg(long, default_value_t = 0)]
    depth: usize,
    /// Print one JSON object (roof and phases) instead of the tables.
    #[arg(long)]
    json: bool,
}

pub(crate) fn profile(args: ProfileArgs) -> Result<(), Box<dyn std::error::Error>> {
    on_backend!(&args.run, file, b => profile_on(b, &file, &args))
}

pub(crate) fn profile_on<B: chord::Backend>(
    backend: B,
    file: &chord::gguf::GgufFile,
    args: &ProfileArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    use chord::Backend as _;
    use chord::bench::profile::{self, Profiled};
    let threads = backend.threads();
    if args.pp == 0 && args.tg == 0 {
        return Err("--pp 0 --tg 0: no phase to profile".into());
    }
    let config = chord::model::Config::from_gguf(file)?;
    let ctx = args.run.ctx.unwrap_or(config.ctx_len).min(config.ctx_len);
    chord::bench::check_depth(ctx, args.pp, args.tg, args.depth)
        .map_err(|e| format!("{e} (--ctx)"))?;
    note!("measuring the roofs on {threads} thread(s)...");
    let roof = chord::bench::measure_roofs(&[threads]).remove(0);
    let model = chord::model::Model::load(file, Profiled::new(backend))?;
    let phases = profile::run(&model, args.pp, args.tg, args.depth, &roof)?;
    if args.json {
        out!(
            "{}",
            serde_json::json!({ "backend": model.backend().name(), "mode": args.run.mode.name(), "threads": threads, "depth": args.depth, "roof": roof, "phases": phases })
        )?;
    } else {
        out!(
            "{} on {}, {} mode, {threads} thread(s); roofs: {:.1} GFLOP/s, {:.1} GB/s ({})",
            args.run
                .model
                .as_ref()
                .map_or(super::pull::FILE_NAME.into(), |p| p.display().to_string()),
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

/// `--svg` needs the `svg` feature: refuse it before measuring anything.
fn check_svg(path: Option<&std::path::Path>) -> Result<(), Box<dyn std::error::Error>> {
    match path {
        Some(p) if !cfg!(feature = "svg") => Err(format!(
            "--svg {}: this chord was built without the svg feature (cargo build --release --features svg)",
            p.display()
        )
        .into()),
        _ => Ok(()),
    }
}

fn write_svg(
    path: &std::path::Path,
    svg: Result<String, String>,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::write(path, svg?).map_err(|e| format!("--svg {}: {e}", path.display()))?;
    note!("wrote {}", path.display());
    Ok(())
}

#[cfg(feature = "svg")]
fn svg_kernels(rows: &[kernels::Row], title: &str) -> Result<String, String> {
    chord::bench::svg::kernels(rows, title)
}

#[cfg(feature = "svg")]
fn svg_model(rows: &[chord::bench::model::ModelRow], title: &str) -> Result<String, String> {
    chord::bench::svg::model(rows, title)
}

#[cfg(not(feature = "svg"))]
fn svg_kernels(_: &[kernels::Row], _: &str) -> Result<String, String> {
    Err("built without the svg feature".into())
}

#[cfg(not(feature = "svg"))]
fn svg_model(_: &[chord::bench::model::ModelRow], _: &str) -> Result<String, String> {
    Err("built without the svg feature".into())
}
