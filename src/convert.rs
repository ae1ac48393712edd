//! Converting a whole GGUF model to another storage format, metadata kept.
//!
//! Matrices (tensors of two or more dimensions whose rows are whole blocks of the target)
//! are dequantized to f32 and re-encoded; vectors (norm weights) stay F32, as llama.cpp's
//! quantizer keeps them. `general.file_type` is set to the target's llama.cpp value.

use chord_kernels::quant;

use crate::gguf::{DType, GgufError, GgufFile, Value, Writer};

/// llama.cpp's `general.file_type` for a model mostly in `dtype`.
pub(crate) fn file_type(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::Q5_0 => 8,
        DType::Q5_1 => 9,
        DType::Q4K => 15,
        DType::Q5K => 17,
        DType::Q6K => 18,
        DType::BF16 => 32,
    }
}

/// The formats `convert` writes.
pub const TARGETS: [DType; 5] = [
    DType::F32,
    DType::F16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
];

/// The file's metadata and tensors, with every matrix re-encoded as `to`.
pub fn convert(file: &GgufFile, to: DType) -> Result<Writer, GgufError> {
    if !TARGETS.contains(&to) {
        return Err(GgufError::Tensor {
            name: "*".into(),
            problem: format!("chord does not write {to}"),
        });
    }
    let g = file.gguf();
    let mut w = Writer::new();
    for (k, v) in &g.metadata {
        w.metadata(k.clone(), v.clone());
    }
    w.metadata("general.file_type", Value::U32(file_type(to)));
    for t in &g.tensors {
        let dtype = t.dtype().ok_or_else(|| GgufError::Tensor {
            name: t.name.clone(),
            problem: format!("chord cannot convert its type {}", t.ggml_type.name),
        })?;
        let is_matrix = t.dims.len() >= 2 && to.bytes_for(t.cols()).is_some();
        let target = if is_matrix { to } else { DType::F32 };
        let bytes = if target == dtype {
            file.tensor_bytes(t).to_vec()
        } else {
            let mut values = vec![0.0f32; t.rows() * t.cols()];
            quant::dequantize(dtype, file.tensor_bytes(t), &mut values);
            quant::quantize(target, &values).expect("a target chord writes, in whole blocks")
        };
        w.tensor(t.name.clone(), &t.dims, target, bytes)?;
    }
    Ok(w)
}
