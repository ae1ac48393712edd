//! GGUF files: the reader (over a memory map, no copies) and the writer.
//!
//! Layout (versions 2 and 3, little-endian): the magic `GGUF`, a `u32` version, `u64` tensor
//! and metadata counts; the metadata (`string` key, `u32` type, value); the tensor infos
//! (`string` name, `u32` dimension count, `u64` dimensions with the contiguous one first,
//! `u32` ggml type, `u64` offset into the data section); padding to `general.alignment`
//! (default 32); the tensor data. A string is a `u64` byte length and UTF-8 bytes.
//!
//! The reader trusts nothing: every count, length, offset and dimension is checked against
//! the bytes left and for overflow before anything is allocated or read, and an error names
//! the field and its byte offset.

mod read;
mod write;

use std::path::Path;

pub use chord_kernels::quant::DType;
pub use write::{TensorEntry, Writer};

use crate::backend::WeightView;

/// A malformed file, or one that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The bytes break the format: `field` names what, `offset` where.
    #[error("GGUF {field} at byte {offset}: {problem}")]
    Format {
        field: String,
        offset: u64,
        problem: String,
    },
    /// A key the caller needs is missing or has another type.
    #[error("GGUF metadata '{key}': {problem}")]
    Metadata { key: String, problem: String },
    /// A tensor the caller needs is missing or has another shape.
    #[error("GGUF tensor '{name}': {problem}")]
    Tensor { name: String, problem: String },
    /// What is wrong with the file at `path` ([`GgufFile::open`]'s parse errors).
    #[error("{path}: {source}")]
    InFile {
        path: String,
        source: Box<GgufError>,
    },
}

/// The type tag of a metadata value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type with GGUF tag `tag`.
    pub fn from_tag(tag: u32) -> Option<ValueType> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .get(tag as usize)
        .copied()
    }

    /// The GGUF tag.
    pub fn tag(self) -> u32 {
        self as u32
    }

    /// The fewest bytes a value of this type takes in a file (a string's or an array's
    /// header without contents).
    pub fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: one element type, stored as a typed vector.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Strings),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

/// An array of strings, packed: every string's bytes in one buffer and where each ends.
///
/// A vocabulary is an array of 50k-260k short strings (`tokenizer.ggml.tokens`, `.merges`).
/// Two allocations for the whole array instead of one per string took opening the default
/// model (map, parse, start the backend) from 10-20 ms to 5-7 (AMD Zen 4).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Strings {
    text: String,
    /// Byte offset in `text` where string `i` ends (it starts where `i - 1` ends).
    ends: Vec<usize>,
}

impl Strings {
    /// An empty array with room for `n` strings of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> Strings {
        Strings {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    /// Appends a string.
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the array has no strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// String `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..end])
    }

    /// The strings in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| &self[i])
    }
}

impl std::ops::Index<usize> for Strings {
    type Output = str;

    /// String `i`; panics if `i >= len()`, as a slice does.
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(s) => s,
            None => panic!("string {i} of an array of {}", self.len()),
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for Strings {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Strings {
        let mut out = Strings::default();
        iter.into_iter().for_each(|s| out.push(s.as_ref()));
        out
    }
}

impl<S: AsRef<str>> From<Vec<S>> for Strings {
    fn from(v: Vec<S>) -> Strings {
        v.into_iter().collect()
    }
}

impl std::fmt::Debug for Strings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }
}

impl Value {
    /// The type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_usize(&self) -> Option<usize> {
        match *self {
            Value::U8(v) => Some(v as usize),
            Value::U16(v) => Some(v as usize),
            Value::U32(v) => usize::try_from(v).ok(),
            Value::U64(v) => usize::try_from(v).ok(),
            Value::I8(v) => usize::try_from(v).ok(),
            Value::I16(v) => usize::try_from(v).ok(),
            Value::I32(v) => usize::try_from(v).ok(),
            Value::I64(v) => usize::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f32, from either float type.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }
}

/// A ggml tensor type (`enum ggml_type`): its id, name and block layout. Every type a GGUF
/// file may hold is known here, so that any valid file parses and lists; chord computes on
/// the ones [`GgmlType::dtype`] maps to a [`DType`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Values per block.
    pub block_len: usize,
    /// Bytes per block.
    pub block_bytes: usize,
}

/// ggml's types (`ggml.h`, `ggml-common.h` of llama.cpp b11312): id, name, values and bytes
/// per block. Ids 4, 5 and 31 to 33, 36 to 38 were removed from ggml.
const GGML_TYPES: [(u32, &str, usize, usize); 35] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
    (42, "Q2_0", 64, 18),
];

impl GgmlType {
    /// The type of ggml id `id`, if ggml defines one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block_len, block_bytes)| GgmlType {
                id,
                name,
                block_len,
                block_bytes,
            })
    }

    /// The format chord computes this type as, if it does.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_ggml(self.id)
    }

    /// Bytes of `n` values, if `n` is a whole number of blocks and the size fits.
    pub fn bytes_for(&self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len) {
            return None;
        }
        (n / self.block_len).checked_mul(self.block_bytes)
    }
}

impl From<DType> for GgmlType {
    fn from(d: DType) -> GgmlType {
        GgmlType::from_id(d.ggml_id()).expect("every DType is a ggml type")
    }
}

/// Where a tensor lies in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, the contiguous one first (ggml's `ne`): a weight `W (n, k)` is `[k, n]`.
    /// Empty for a scalar; a dimension may be 0 (a placeholder of no values and no bytes).
    pub dims: Vec<usize>,
    /// The storage type; [`TensorInfo::dtype`] says whether chord computes on it.
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

impl TensorInfo {
    /// The format chord computes this tensor as; `None` for a ggml type chord only lists.
    pub fn dtype(&self) -> Option<DType> {
        self.ggml_type.dtype()
    }

    /// Values per row: the first dimension (1 for a scalar, which has no dimensions).
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Rows: the product of the other dimensions (0 if any is 0).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
}

/// A parsed GGUF header: metadata and tensor table, without the data.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor in it.
    pub alignment: usize,
    /// Byte offset of the data section.
    pub data_start: usize,
}

impl Gguf {
    /// Parses and validates a whole file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        read::parse(bytes)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn metadata_error(key: &str, problem: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// `key` as a non-negative integer; an error if absent or of another type.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| Self::metadata_error(key, "missing"))?;
        v.as_usize().ok_or_else(|| {
            Self::metadata_error(
                key,
                format!(
                    "expected a non-negative integer, found {:?}",
                    v.value_type()
                ),
            )
        })
    }

    /// `key` as f32; an error if absent or not a float.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| Self::metadata_error(key, "missing"))?;
        v.as_f32().ok_or_else(|| {
            Self::metadata_error(key, format!("expected a float, found {:?}", v.value_type()))
        })
    }

    /// `key` as a string; an error if absent or not a string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(Self::metadata_error(
                key,
                format!("expected a string, found {:?}", v.value_type()),
            )),
            None => Err(Self::metadata_error(key, "missing")),
        }
    }
}

/// A GGUF file mapped into memory: its parsed header and views of its tensors.
pub struct GgufFile {
    map: memmap2::Mmap,
    gguf: Gguf,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        // Before opening: opening a FIFO would wait for a writer.
        let kind = std::fs::metadata(path).map_err(io)?.file_type();
        if !kind.is_file() {
            let (e, what) = if kind.is_dir() {
                (std::io::ErrorKind::IsADirectory, "a directory")
            } else {
                (std::io::ErrorKind::InvalidInput, "a pipe, socket or device")
            };
            return Err(io(std::io::Error::new(
                e,
                format!("{what}, not a GGUF file"),
            )));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value. Another process truncating
        // or rewriting the file while it is mapped would change what is read: chord opens model
        // files it does not write to.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let gguf = Gguf::parse(&map).map_err(|e| GgufError::InFile {
            path: path.display().to_string(),
            source: Box::new(e),
        })?;
        Ok(GgufFile { map, gguf })
    }

    /// The parsed header.
    pub fn gguf(&self) -> &Gguf {
        &self.gguf
    }

    /// The bytes of a tensor of this file (bounds checked when parsed; a tensor of zero bytes
    /// has none, wherever its offset points).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        if t.size == 0 {
            return &[];
        }
        &self.map[t.offset..t.offset + t.size]
    }

    /// Releases this process's hold on the whole pages inside `bytes` (bytes of this file,
    /// as [`tensor_bytes`](GgufFile::tensor_bytes) gives them) once nothing needs them in
    /// memory: a backend that repacked or dequantized a tensor into memory of its own. The
    /// pages leave the process's resident set (the page cache keeps them for the next run);
    /// a later read maps the same bytes again from the file, so releasing never changes what
    /// is read. Partial pages at either end are kept. On anything but Unix, or if the system
    /// refuses, nothing happens.
    pub fn release(&self, bytes: &[u8]) {
        #[cfg(unix)]
        {
            // Page size: 4 KiB on x86-64; other targets may use up to 64 KiB pages.
            const PAGE: usize = if cfg!(target_arch = "x86_64") {
                4096
            } else {
                65536
            };
            let base = self.map.as_ptr() as usize;
            let (start, end) = (
                bytes.as_ptr() as usize,
                bytes.as_ptr() as usize + bytes.len(),
            );
            if start < base || end > base + self.map.len() {
                return;
            }
            let first = (start - base).next_multiple_of(PAGE);
            let last = (end - base) / PAGE * PAGE;
            if last > first {
                // SAFETY: the map is a read-only mapping of a file chord does not write:
                // MADV_DONTNEED drops the pages from this process, and any later read faults
                // in the same bytes from the file, so every live borrow keeps reading what it
                // read before. The range lies inside the map (checked above).
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }

    /// The tensor `name` as a weight view `(rows, cols)`, borrowed from the map.
    pub fn weight(&self, name: &str) -> Result<WeightView<'_>, GgufError> {
        let t = self.gguf.tensor(name).ok_or_else(|| GgufError::Tensor {
            name: name.into(),
            problem: "missing".into(),
        })?;
        let dtype = t.dtype().ok_or_else(|| GgufError::Tensor {
            name: name.into(),
            problem: format!(
                "its type {} is one chord lists but does not compute on",
                t.ggml_type.name
            ),
        })?;
        WeightView::new(dtype, t.rows(), t.cols(), self.tensor_bytes(t))
            .map(|v| v.named(&t.name).mapped_from(self))
            .map_err(|e| GgufError::Tensor {
                name: name.into(),
                problem: e.to_string(),
            })
    }
}
