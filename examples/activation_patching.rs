//! Activation patching, the researcher's first experiment: run two prompts that differ in
//! one word, copy the residual stream of one layer at the last position from the first run
//! into the second, and see how the next-token probabilities move.
//!
//! `cargo run --release --example activation_patching [-- LAYER]` (default layer 24) on the
//! default model (fetched by `chord pull`), then a sweep over every layer. The observer is any closure over an
//! `Activation`: it sees every named point of the pass (`chord::model::observe`) and may
//! change the values in place.

use std::path::PathBuf;

use chord::SimdBackend;
use chord::gguf::GgufFile;
use chord::model::observe::{Activation, Point};
use chord::model::{Model, State};
use chord::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer: usize = std::env::args().nth(1).map_or(Ok(24), |a| a.parse())?;
    // The default model, where `chord pull` puts it ($CHORD_MODELS, else ./models).
    let dir = std::env::var_os("CHORD_MODELS").map_or_else(|| "models".into(), PathBuf::from);
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        return Err(format!(
            "{} is absent: fetch it with `cargo run --release -- pull`",
            path.display()
        )
        .into());
    }
    let file = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(file.gguf())?;
    let model = Model::load(&file, SimdBackend::new(2)?)?;
    if layer >= model.config.n_layers {
        return Err(format!("layer {layer}: the model has {}", model.config.n_layers).into());
    }
    let (clean, corrupt) = (
        "The Eiffel Tower is in the city of",
        "The Colosseum is in the city of",
    );
    let (clean_ids, corrupt_ids) = (tok.encode(clean, false), tok.encode(corrupt, false));

    // Run `ids`, letting `edit` see (and change) every activation; return the probabilities
    // of the next token.
    let run = |ids: &[u32], edit: &mut dyn FnMut(Activation<'_>)| {
        let mut state = State::new(&model.config, ids.len(), ids.len());
        let mut observer = |a: Activation<'_>| edit(a);
        let logits = model.forward_observed(&mut state, ids, &mut observer)?;
        Ok::<_, chord::model::ModelError>(softmax(logits))
    };
    // 1. The clean run, keeping the residual after every layer at the last position.
    let mut saved = vec![Vec::new(); model.config.n_layers];
    let p_clean = run(&clean_ids, &mut |a| {
        if let (Point::ResidFfn, Some(l)) = (a.point, a.layer) {
            saved[l] = a.data[(a.rows - 1) * a.cols..].to_vec();
        }
    })?;
    // 2. The corrupted prompt as it is, then with the clean residual of layer `l` patched in.
    let p_corrupt = run(&corrupt_ids, &mut |_| {})?;
    let patched = |l: usize| {
        run(&corrupt_ids, &mut |a| {
            if a.point == Point::ResidFfn && a.layer == Some(l) {
                let last = (a.rows - 1) * a.cols;
                a.data[last..].copy_from_slice(&saved[l]);
            }
        })
    };
    let p_patched = patched(layer)?;

    println!("patching resid_ffn of layer {layer} at the last position");
    println!("  clean:   {clean:?}\n  corrupt: {corrupt:?}\n");
    println!(
        "{:<16} {:>10} {:>10} {:>10}",
        "next token", "clean", "corrupt", "patched"
    );
    // The tokens the three runs rank highest.
    let mut top: Vec<usize> = Vec::new();
    for p in [&p_clean, &p_corrupt, &p_patched] {
        for id in top_k(p, 3) {
            if !top.contains(&id) {
                top.push(id);
            }
        }
    }
    for id in top {
        let text = String::from_utf8_lossy(&tok.decode(&[id as u32], true)?).into_owned();
        println!(
            "{:<16} {:>9.2}% {:>9.2}% {:>9.2}%",
            format!("{text:?}"),
            100.0 * p_clean[id],
            100.0 * p_corrupt[id],
            100.0 * p_patched[id]
        );
    }

    // 3. Every layer in turn: where does the last position come to carry the answer?
    let (a, b) = (top_k(&p_clean, 1)[0], top_k(&p_corrupt, 1)[0]);
    let name = |id: usize| {
        tok.decode(&[id as u32], true)
            .map(|t| String::from_utf8_lossy(&t).into_owned())
    };
    println!(
        "\npatching each layer in turn: p({:?}) and p({:?}) after the patch",
        name(a)?,
        name(b)?
    );
    for l in 0..model.config.n_layers {
        let p = patched(l)?;
        let bar = "#".repeat((40.0 * p[a]).round() as usize);
        println!(
            "  layer {l:>2}  {:>6.2}%  {:>6.2}%  {bar}",
            100.0 * p[a],
            100.0 * p[b]
        );
    }
    Ok(())
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

fn top_k(p: &[f64], k: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..p.len()).collect();
    ids.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    ids.truncate(k);
    ids
}
