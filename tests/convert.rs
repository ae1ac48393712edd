//! `chord convert` on the default model: metadata kept, matrices re-encoded, vectors F32.

mod common;

use chord::gguf::{DType, Gguf, GgufFile, Value};
use chord::kernels::quant;

fn source() -> GgufFile {
    GgufFile::open(common::model_path()).unwrap()
}

fn values(file: &GgufFile, t: &chord::gguf::TensorInfo) -> Vec<f32> {
    let mut v = vec![0.0f32; t.rows() * t.cols()];
    quant::dequantize(t.dtype().unwrap(), file.tensor_bytes(t), &mut v);
    v
}

#[test]
fn to_f32_keeps_the_metadata_and_dequantizes_every_tensor_exactly() {
    let src = source();
    let bytes = chord::convert::convert(&src, DType::F32)
        .unwrap()
        .to_bytes();
    let out = Gguf::parse(&bytes).unwrap();
    let (a, b) = (src.gguf(), &out);
    assert_eq!(b.metadata.len(), a.metadata.len());
    for (k, v) in &a.metadata {
        let expected = if k == "general.file_type" {
            &Value::U32(0)
        } else {
            v
        };
        assert_eq!(b.get(k), Some(expected), "{k}");
    }
    assert_eq!(b.tensors.len(), a.tensors.len());
    for (ta, tb) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(
            (&ta.name, &ta.dims, tb.dtype()),
            (&tb.name, &tb.dims, Some(DType::F32))
        );
        let got: &[f32] = bytemuck::cast_slice(&bytes[tb.offset..tb.offset + tb.size]);
        assert!(
            got.iter()
                .zip(values(&src, ta))
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            ta.name
        );
    }
}

#[test]
fn to_q8_0_quantizes_matrices_and_keeps_vectors_f32() {
    let src = source();
    let bytes = chord::convert::convert(&src, DType::Q8_0)
        .unwrap()
        .to_bytes();
    let out = Gguf::parse(&bytes).unwrap();
    assert_eq!(out.get("general.file_type"), Some(&Value::U32(7)));
    for t in &out.tensors {
        let expected = if t.dims.len() == 1 {
            DType::F32
        } else {
            DType::Q8_0
        };
        assert_eq!(t.dtype(), Some(expected), "{}", t.name);
    }
    // The token embedding was Q8_0 already: its bytes pass through unchanged.
    let (ta, tb) = (
        src.gguf().tensor("token_embd.weight").unwrap(),
        out.tensor("token_embd.weight").unwrap(),
    );
    assert_eq!(src.tensor_bytes(ta), &bytes[tb.offset..tb.offset + tb.size]);
}
