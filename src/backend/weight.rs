//! Weights as a file stores them, before a backend prepares them.

use std::borrow::Cow;

use super::Error;

/// The storage format of a weight tensor.
///
/// chord computes on f32 weights today; quantized GGUF formats join this list with the
/// GGUF reader, each with its dequantization kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision, little-endian.
    F32,
}

impl DType {
    /// Bytes of a `rows × cols` tensor of this type.
    pub fn bytes_for(self, rows: usize, cols: usize) -> Option<usize> {
        match self {
            DType::F32 => rows.checked_mul(cols)?.checked_mul(4),
        }
    }
}

/// A weight `(rows, cols)`, row-major, as stored: its format and its bytes (typically a view
/// into a memory-mapped file).
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'w> {
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: &'w [u8],
}

impl<'w> WeightView<'w> {
    /// A view of `bytes` as a `(rows, cols)` tensor of `dtype`; the length must match exactly.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'w [u8]) -> Result<Self, Error> {
        let expected = dtype.bytes_for(rows, cols).filter(|_| rows > 0 && cols > 0);
        if expected != Some(bytes.len()) {
            return Err(Error::Shape {
                op: "weight",
                detail: format!(
                    "{dtype:?} {rows} × {cols} needs {expected:?} bytes, got {}",
                    bytes.len()
                ),
            });
        }
        Ok(WeightView {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    /// A view of f32 values as a `(rows, cols)` weight.
    pub fn f32(values: &'w [f32], rows: usize, cols: usize) -> Result<Self, Error> {
        WeightView::new(DType::F32, rows, cols, bytemuck::cast_slice(values))
    }

    /// The storage format.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &'w [u8] {
        self.bytes
    }

    /// The values as f32: borrowed when the bytes are 4-aligned, copied otherwise.
    pub fn to_f32(&self) -> Cow<'w, [f32]> {
        match self.dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(self.bytes) {
                Ok(v) => Cow::Borrowed(v),
                Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.bytes)),
            },
        }
    }
}

/// A row-major f32 weight `(rows, cols)`, borrowed from the file where it is aligned: the
/// prepared weight of the scalar and blocked backends.
#[derive(Clone, Debug)]
pub struct F32Weight<'w> {
    /// `n`: rows.
    pub rows: usize,
    /// `k`: values per row.
    pub cols: usize,
    /// `(rows, cols)`, row-major.
    pub data: Cow<'w, [f32]>,
}

impl<'w> F32Weight<'w> {
    /// Prepares a view for row-major f32 kernels, borrowing its bytes where aligned.
    pub fn from_view(w: WeightView<'w>) -> Self {
        let (rows, cols) = w.dims();
        F32Weight {
            rows,
            cols,
            data: w.to_f32(),
        }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..][..self.cols]
    }
}
