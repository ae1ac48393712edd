//! Parsing and validating GGUF bytes.

use std::collections::HashSet;

use super::{Array, GgmlType, Gguf, GgufError, Strings, TensorInfo, Value, ValueType};

/// Most dimensions a ggml tensor has.
const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays accepted (llama.cpp files nest at most once).
const MAX_ARRAY_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: usize = 32;

/// A position in the file and the checks that go with reading at it.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

fn format_error(field: impl Into<String>, offset: usize, problem: impl Into<String>) -> GgufError {
    GgufError::Format {
        field: field.into(),
        offset: offset as u64,
        problem: problem.into(),
    }
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() {
            return Err(format_error(
                field(),
                self.pos,
                format!(
                    "needs {n} bytes, only {} left in the file (truncated?)",
                    self.left()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        Ok(self.take(N, field)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A count of items of at least `min_size` bytes each, checked against the bytes left
    /// before anything is allocated for them.
    fn count(&mut self, min_size: usize, field: &dyn Fn() -> String) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(field)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.left()));
        fits.ok_or_else(|| {
            format_error(
                field(),
                at,
                format!(
                    "{n} items of at least {min_size} bytes cannot fit in the {} bytes left",
                    self.left()
                ),
            )
        })
    }

    fn str(&mut self, field: &dyn Fn() -> String) -> Result<&'a str, GgufError> {
        let at = self.pos;
        let len = self.count(1, field)?;
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes)
            .map_err(|e| format_error(field(), at, format!("string is not valid UTF-8: {e}")))
    }

    fn string(&mut self, field: &dyn Fn() -> String) -> Result<String, GgufError> {
        self.str(field).map(str::to_owned)
    }

    /// `n` little-endian numbers of `N` bytes each, read in one piece.
    fn numbers<const N: usize, T>(
        &mut self,
        n: usize,
        from_le: fn([u8; N]) -> T,
        field: &dyn Fn() -> String,
    ) -> Result<Vec<T>, GgufError> {
        let len = n.saturating_mul(N); // too many fails in `take`
        let bytes = self.take(len, field)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| from_le(c.try_into().expect("N bytes")))
            .collect())
    }

    fn value(
        &mut self,
        ty: ValueType,
        depth: usize,
        field: &dyn Fn() -> String,
    ) -> Result<Value, GgufError> {
        let at = self.pos;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(field)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(field)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(self.u32(field)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::U64 => Value::U64(self.u64(field)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Bool => match self.array::<1>(field)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(format_error(
                        field(),
                        at,
                        format!("bool must be 0 or 1, found {b}"),
                    ));
                }
            },
            ValueType::String => Value::String(self.string(field)?),
            ValueType::Array => Value::Array(self.array_value(depth + 1, field)?),
        })
    }

    fn array_value(
        &mut self,
        depth: usize,
        field: &dyn Fn() -> String,
    ) -> Result<Array, GgufError> {
        let at = self.pos;
        if depth > MAX_ARRAY_DEPTH {
            return Err(format_error(
                field(),
                at,
                format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
            ));
        }
        let tag = self.u32(field)?;
        let ty = ValueType::from_tag(tag).ok_or_else(|| {
            format_error(field(), at, format!("unknown array element type {tag}"))
        })?;
        let n = self.count(ty.min_size(), field)?;
        let item = |i: usize| move || format!("{}[{i}]", field());
        macro_rules! collect {
            ($variant:ident, $pat:ident) => {{
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    match self.value(ty, depth, &item(i))? {
                        Value::$pat(x) => v.push(x),
                        _ => unreachable!("value() returns the type it was asked for"),
                    }
                }
                Array::$variant(v)
            }};
        }
        Ok(match ty {
            ValueType::U8 => Array::U8(self.take(n, field)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n, field)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => Array::U16(self.numbers(n, u16::from_le_bytes, field)?),
            ValueType::I16 => Array::I16(self.numbers(n, i16::from_le_bytes, field)?),
            ValueType::U32 => Array::U32(self.numbers(n, u32::from_le_bytes, field)?),
            ValueType::I32 => Array::I32(self.numbers(n, i32::from_le_bytes, field)?),
            ValueType::F32 => Array::F32(self.numbers(n, f32::from_le_bytes, field)?),
            ValueType::Bool => collect!(Bool, Bool),
            ValueType::String => {
                let mut v = Strings::with_capacity(n, 0);
                for i in 0..n {
                    v.push(self.str(&item(i))?);
                }
                Array::String(v)
            }
            ValueType::Array => collect!(Array, Array),
            ValueType::U64 => Array::U64(self.numbers(n, u64::from_le_bytes, field)?),
            ValueType::I64 => Array::I64(self.numbers(n, i64::from_le_bytes, field)?),
            ValueType::F64 => Array::F64(self.numbers(n, f64::from_le_bytes, field)?),
        })
    }
}

pub(super) fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>(&|| "header.magic".into())?;
    if &magic != b"GGUF" {
        return Err(format_error(
            "header.magic",
            0,
            format!("expected \"GGUF\", found {magic:02x?}"),
        ));
    }
    let version = c.u32(&|| "header.version".into())?;
    if !(2..=3).contains(&version) {
        return Err(format_error(
            "header.version",
            4,
            format!("unsupported version {version} (chord reads 2 and 3)"),
        ));
    }
    // A tensor info takes at least 24 bytes (name length, dimension count, type, offset), a
    // metadata entry at least 13 (key length, type, a one-byte value).
    let n_tensors = c.count(24, &|| "header.tensor_count".into())?;
    let n_kv = c.count(13, &|| "header.metadata_kv_count".into())?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv);
    let mut keys: HashSet<String> = HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.string(&|| format!("metadata[{i}].key"))?;
        if !keys.insert(key.clone()) {
            return Err(format_error(
                format!("metadata[{i}].key"),
                at,
                format!("duplicate key '{key}'"),
            ));
        }
        let field = || format!("metadata '{key}'");
        let tag_at = c.pos;
        let tag = c.u32(&field)?;
        let ty = ValueType::from_tag(tag)
            .ok_or_else(|| format_error(field(), tag_at, format!("unknown value type {tag}")))?;
        let value = c.value(ty, 0, &field)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as usize,
        Some((_, v)) => {
            return Err(format_error(
                "metadata 'general.alignment'",
                0,
                format!("expected a power of two as u32, found {v:?}"),
            ));
        }
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut relative = Vec::with_capacity(n_tensors);
    let mut names: HashSet<String> = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let at = c.pos;
        let name = c.string(&|| format!("tensor[{i}].name"))?;
        if !names.insert(name.clone()) {
            return Err(format_error(
                format!("tensor[{i}].name"),
                at,
                format!("duplicate tensor name '{name}'"),
            ));
        }
        let field = |what: &str| format!("tensor '{name}'.{what}");
        let dims_at = c.pos;
        let n_dims = c.u32(&|| field("n_dims"))? as usize;
        // 0 dimensions is a scalar (one value), as ggml reads it.
        if n_dims > MAX_DIMS {
            return Err(format_error(
                field("n_dims"),
                dims_at,
                format!("{n_dims} dimensions, expected at most {MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        let mut elements: usize = 1;
        for d in 0..n_dims {
            let d_at = c.pos;
            let v = c.u64(&|| field(&format!("dims[{d}]")))?;
            // A dimension may be 0: the tensor then holds no values and no bytes (real files
            // carry such placeholders, and ggml accepts them).
            let v = usize::try_from(v).ok().filter(|&v| v <= i64::MAX as usize);
            let Some(v) = v else {
                return Err(format_error(
                    field(&format!("dims[{d}]")),
                    d_at,
                    "a dimension must be below 2^63",
                ));
            };
            elements = elements
                .checked_mul(v)
                .filter(|&e| e <= i64::MAX as usize)
                .ok_or_else(|| {
                    format_error(
                        field("dims"),
                        dims_at,
                        format!("the product of the dimensions {dims:?} × {v} overflows"),
                    )
                })?;
            dims.push(v);
        }
        let type_at = c.pos;
        let tag = c.u32(&|| field("type"))?;
        let ggml_type = GgmlType::from_id(tag).ok_or_else(|| {
            format_error(field("type"), type_at, format!("unknown ggml type {tag}"))
        })?;
        if !dims
            .first()
            .unwrap_or(&1)
            .is_multiple_of(ggml_type.block_len)
        {
            return Err(format_error(
                field("dims[0]"),
                dims_at + 4,
                format!(
                    "{} values per row are not whole {} blocks of {}",
                    dims.first().unwrap_or(&1),
                    ggml_type.name,
                    ggml_type.block_len
                ),
            ));
        }
        let size = ggml_type.bytes_for(elements).ok_or_else(|| {
            format_error(
                field("dims"),
                dims_at,
                "the tensor's size in bytes overflows",
            )
        })?;
        let off_at = c.pos;
        let offset = c.u64(&|| field("offset"))?;
        let offset = usize::try_from(offset).map_err(|_| {
            format_error(
                field("offset"),
                off_at,
                format!("offset {offset} overflows"),
            )
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(format_error(
                field("offset"),
                off_at,
                format!("offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        relative.push(off_at);
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            size,
        });
    }

    let data_start = c.pos.next_multiple_of(alignment);
    // Tensors of zero bytes need no data section: the file may end before its padding.
    if tensors.iter().any(|t| t.size > 0) && data_start > bytes.len() {
        return Err(format_error(
            "data section",
            c.pos,
            format!(
                "starts at {data_start}, past the end of the {}-byte file",
                bytes.len()
            ),
        ));
    }
    // Absolute extents, each inside the file; a tensor of zero bytes has no extent to check.
    for (t, &off_at) in tensors.iter_mut().zip(&relative) {
        if t.size == 0 {
            t.offset = t.offset.saturating_add(data_start);
            continue;
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size));
        match end {
            Some(end) if end <= bytes.len() => t.offset += data_start,
            _ => {
                return Err(format_error(
                    format!("tensor '{}'.offset", t.name),
                    off_at,
                    format!(
                        "{} bytes at data offset {} run past the end of the {}-byte file",
                        t.size,
                        t.offset,
                        bytes.len()
                    ),
                ));
            }
        }
    }
    // No two tensors share bytes. The table may list them in any order.
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].size > 0)
        .collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.offset + a.size > b.offset {
            return Err(format_error(
                format!("tensor '{}'.offset", b.name),
                relative[w[1]],
                format!(
                    "overlaps tensor '{}' (bytes {}..{})",
                    a.name,
                    a.offset,
                    a.offset + a.size
                ),
            ));
        }
    }
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
