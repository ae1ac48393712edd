//! The research testbed: `chord dump` and `chord diverge`.

use std::process::ExitCode;

use super::*;

#[derive(Args)]
pub(crate) struct DumpArgs {
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
pub(crate) struct DivergeArgs {
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

pub(crate) fn dump(args: DumpArgs) -> Result<(), Box<dyn std::error::Error>> {
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
        let (ids, model) =
            prompt_and_model(&file, b, &args.prompt, args.parse_special, args.run.ctx())?;
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
        note!(
            "wrote {} ({} tokens, {} bytes)",
            args.out.display(),
            ids.len(),
            bytes.len()
        );
        Ok(())
    })
}

/// `chord diverge`: 0 when the backends agree, 1 on a divergence, 2 on an error.
pub(crate) fn diverge(args: DivergeArgs) -> ExitCode {
    match diverge_run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            note!("chord: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn diverge_run(args: &DivergeArgs) -> Result<bool, Box<dyn std::error::Error>> {
    on_backend!(&args.run, file, b => {
        // The reference reads the same file, in exact mode on the same threads.
        chord::with_backend!(&args.reference, args.run.threads, chord::backend::Mode::Exact, r => {
            let (ids, model) =
                prompt_and_model(&file, b, &args.prompt, args.parse_special, args.run.ctx())?;
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

/// The ids of `--prompt` and the model on `backend`, the prompt checked to fit the context
/// before the weights load (the tokenizer and the config are read first, in a few ms), so
/// that a bad prompt is refused at once rather than after a load of up to seconds.
fn prompt_and_model<'f, B: chord::Backend>(
    file: &'f chord::gguf::GgufFile,
    backend: B,
    prompt: &str,
    parse_special: bool,
    ctx: usize,
) -> Result<(Vec<u32>, chord::model::Model<'f, B>), Box<dyn std::error::Error>> {
    let tok = chord::tokenizer::Tokenizer::from_gguf(file.gguf())?;
    let ids = prompt_ids(&tok, prompt, parse_special)?;
    check_prompt_fits(ids.len(), &chord::model::Config::from_gguf(file)?, ctx)?;
    Ok((ids, chord::model::Model::load(file, backend)?))
}
