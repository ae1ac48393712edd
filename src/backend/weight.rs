//! Weights as a file stores them, before a backend prepares them.

use std::borrow::Cow;

use super::Error;

pub use chord_kernels::quant::DType;

/// A weight `(rows, cols)`, row-major, as stored: its format and its bytes (typically a view
/// into a memory-mapped file).
#[derive(Clone, Copy)]
pub struct WeightView<'w> {
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: &'w [u8],
    /// The tensor's name in its file (`blk.3.attn_q.weight`), or empty.
    name: &'w str,
    /// The mapped file the bytes come from, if any: see [`WeightView::release`].
    file: Option<&'w crate::gguf::GgufFile>,
}

impl std::fmt::Debug for WeightView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightView")
            .field("dtype", &self.dtype)
            .field("dims", &(self.rows, self.cols))
            .field("name", &self.name)
            .field("mapped", &self.file.is_some())
            .finish()
    }
}

impl<'w> WeightView<'w> {
    /// A view of `bytes` as a `(rows, cols)` tensor of `dtype`: each row a whole number of
    /// blocks, the length exactly `rows` such rows.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'w [u8]) -> Result<Self, Error> {
        if rows == 0 || cols == 0 {
            return Err(Error::Shape {
                op: "weight",
                detail: format!("{rows} × {cols}: a weight needs at least one row and one column"),
            });
        }
        let Some(row_bytes) = dtype.bytes_for(cols) else {
            return Err(Error::Shape {
                op: "weight",
                detail: format!(
                    "{dtype} rows of {cols} values are not whole blocks of {}",
                    dtype.block_len()
                ),
            });
        };
        if row_bytes.checked_mul(rows) != Some(bytes.len()) {
            return Err(Error::Shape {
                op: "weight",
                detail: format!(
                    "{dtype} {rows} × {cols} needs {rows} × {row_bytes} bytes, got {}",
                    bytes.len()
                ),
            });
        }
        Ok(WeightView {
            dtype,
            rows,
            cols,
            bytes,
            name: "",
            file: None,
        })
    }

    /// The same view, labelled with the tensor's name (for profiles and errors).
    pub fn named(self, name: &'w str) -> Self {
        WeightView { name, ..self }
    }

    /// The same view, its bytes part of `file`'s map (so [`release`](WeightView::release)
    /// can drop their pages).
    pub fn mapped_from(self, file: &'w crate::gguf::GgufFile) -> Self {
        WeightView {
            file: Some(file),
            ..self
        }
    }

    /// Tells the view that `part` of its bytes (a sub-slice) has been copied and will not be
    /// read again by the caller: when the view is part of a mapped file, that range's pages
    /// are dropped from the process (`GgufFile::release`; a later read faults them back in
    /// from the file, so any borrow stays valid). A backend that repacks a weight calls it as
    /// it goes, so that a large tensor is never held twice. Otherwise nothing happens.
    pub fn release(&self, part: &[u8]) {
        if let Some(file) = self.file {
            file.release(part);
        }
    }

    /// The tensor's name in its file, or empty.
    pub fn name(&self) -> &'w str {
        self.name
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

    /// The values as f32: borrowed when the weight is f32 and 4-aligned, dequantized or
    /// copied otherwise.
    pub fn to_f32(&self) -> Cow<'w, [f32]> {
        if self.dtype == DType::F32
            && let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(self.bytes)
        {
            return Cow::Borrowed(v);
        }
        let mut out = vec![0.0f32; self.rows * self.cols];
        chord_kernels::simd::dequantize(
            chord_kernels::simd::Isa::best(),
            self.dtype,
            self.bytes,
            &mut out,
        );
        Cow::Owned(out)
    }
}

/// A row-major f32 weight `(rows, cols)`, borrowed from the file where it is aligned f32,
/// dequantized once otherwise: the prepared weight of the scalar and blocked backends.
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

/// F32 weights compute natively; every other format is dequantized when prepared.
impl super::PreparedWeight for F32Weight<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn support(dtype: DType) -> super::Support {
        match dtype {
            DType::F32 => super::Support::Native,
            _ => super::Support::Dequantized,
        }
    }
}
