//! Writing GGUF version 3.

use std::io::{self, Write};

use super::{Array, DType, GgufError, Value};

/// Builds a GGUF file: metadata in insertion order, then tensors in insertion order, each at
/// an offset aligned to `general.alignment` (32 unless that key says otherwise).
#[derive(Clone, Debug, Default)]
pub struct Writer {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, DType, Vec<u8>)>,
}

impl Writer {
    /// An empty file.
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Sets `key` (replacing an earlier value, keeping its place).
    pub fn metadata(&mut self, key: impl Into<String>, value: Value) -> &mut Writer {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Removes `key`, if set.
    pub fn remove_metadata(&mut self, key: &str) -> &mut Writer {
        self.metadata.retain(|(k, _)| k != key);
        self
    }

    /// Adds a tensor: `dims` contiguous dimension first, `data` its bytes in `dtype`.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[usize],
        dtype: DType,
        data: Vec<u8>,
    ) -> Result<&mut Writer, GgufError> {
        let name = name.into();
        let problem = |p: String| GgufError::Tensor {
            name: name.clone(),
            problem: p,
        };
        // No dimensions is a scalar; a dimension of 0 makes a tensor of no values and no bytes.
        if dims.len() > 4 {
            return Err(problem(format!("dimensions {dims:?}: expected at most 4")));
        }
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| problem(format!("dimensions {dims:?} overflow")))?;
        if !dims.first().unwrap_or(&1).is_multiple_of(dtype.block_len())
            || dtype.bytes_for(n) != Some(data.len())
        {
            return Err(problem(format!(
                "{} bytes do not hold {dims:?} values of {dtype}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|(t, ..)| *t == name) {
            return Err(problem("added twice".into()));
        }
        self.tensors.push((name, dims.to_vec(), dtype, data));
        Ok(self)
    }

    fn alignment(&self) -> usize {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as usize,
            _ => 32,
        }
    }

    /// Writes the file.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let table: Vec<TensorEntry> = self
            .tensors
            .iter()
            .map(|(name, dims, dtype, _)| TensorEntry {
                name: name.clone(),
                dims: dims.clone(),
                dtype: *dtype,
            })
            .collect();
        self.write_streamed(&table, w, |i, out| out.write_all(&self.tensors[i].3))
    }

    /// Writes the metadata, then `table` as the file's whole tensor table (tensors added with
    /// [`Writer::tensor`] are not written), then each of its tensors from `fill(i, out)`, in
    /// order, one at a time: a file larger than memory can be written this way. `fill` must
    /// write exactly the bytes of `table[i]`'s values in its format (`dtype.bytes_for` of
    /// the product of its dims); another count is an `InvalidData` error.
    pub fn write_streamed(
        &self,
        table: &[TensorEntry],
        w: &mut impl Write,
        mut fill: impl FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let align = self.alignment();
        let mut sizes = Vec::with_capacity(table.len());
        for t in table {
            let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let size = n.and_then(|n| t.dtype.bytes_for(n)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tensor {}: {:?} values of {}", t.name, t.dims, t.dtype),
                )
            })?;
            sizes.push(size);
        }
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(table.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut header, k);
            header.extend_from_slice(&v.value_type().tag().to_le_bytes());
            put_value(&mut header, v);
        }
        let mut offset = 0usize;
        for (t, size) in table.iter().zip(&sizes) {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + size).next_multiple_of(align);
        }
        header.resize(header.len().next_multiple_of(align), 0);
        w.write_all(&header)?;
        for (i, &size) in sizes.iter().enumerate() {
            let mut counted = Counted {
                inner: &mut *w,
                n: 0,
            };
            fill(i, &mut counted)?;
            if counted.n != size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "tensor {}: {} bytes written, {size} expected",
                        table[i].name, counted.n
                    ),
                ));
            }
            if i + 1 < sizes.len() {
                w.write_all(&vec![0u8; size.next_multiple_of(align) - size])?;
            }
        }
        Ok(())
    }

    /// The file as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec cannot fail");
        out
    }
}

/// A tensor's entry in the file's table: its bytes come later (see
/// [`Writer::write_streamed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, contiguous first (GGUF order).
    pub dims: Vec<usize>,
    /// Storage format.
    pub dtype: DType,
}

/// A writer that counts what passes through it.
struct Counted<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write + ?Sized> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.element_type().tag().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr, $wrap:expr) => {
            for x in $v {
                put_value(out, &$wrap(x.clone()));
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v, Value::I8),
        Array::U16(v) => each!(v, Value::U16),
        Array::I16(v) => each!(v, Value::I16),
        Array::U32(v) => each!(v, Value::U32),
        Array::I32(v) => each!(v, Value::I32),
        Array::F32(v) => each!(v, Value::F32),
        Array::Bool(v) => each!(v, Value::Bool),
        Array::String(v) => v.iter().for_each(|s| put_string(out, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        Array::U64(v) => each!(v, Value::U64),
        Array::I64(v) => each!(v, Value::I64),
        Array::F64(v) => each!(v, Value::F64),
    }
}
