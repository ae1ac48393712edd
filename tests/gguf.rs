//! The GGUF reader against hostile files, and the writer against the reader.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use chord::gguf::{Array, DType, Gguf, GgufFile, Value, Writer};

const MALFORMED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gguf/malformed");

/// Every file of the malformed corpus (made by tests/data/gguf/make_malformed.py) is refused
/// with an error that names the field its manifest gives, from bytes and from a mapped file.
#[test]
fn every_malformed_file_is_refused_with_an_error_naming_the_field() {
    let manifest = std::fs::read_to_string(Path::new(MALFORMED).join("manifest.tsv")).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in manifest.lines().skip(1) {
        let (file, field) = line.split_once('\t').unwrap();
        let path = Path::new(MALFORMED).join(file);
        let bytes = std::fs::read(&path).unwrap();
        for (how, result) in [
            ("parse", catch_unwind(|| Gguf::parse(&bytes).map(|_| ()))),
            (
                "open",
                catch_unwind(AssertUnwindSafe(|| GgufFile::open(&path).map(|_| ()))),
            ),
        ] {
            match result {
                Err(_) => failures.push(format!("{file} ({how}): panicked")),
                Ok(Ok(())) => failures.push(format!("{file} ({how}): accepted")),
                Ok(Err(e))
                    if !e.to_string().contains(field) || !e.to_string().contains("at byte") =>
                {
                    failures.push(format!(
                        "{file} ({how}): error does not name '{field}' and a byte offset: {e}"
                    ))
                }
                Ok(Err(_)) => {}
            }
        }
        checked += 1;
    }
    assert!(checked >= 30, "the corpus has {checked} files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const UNUSUAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/gguf/unusual");

/// Every file of the unusual-but-valid corpus (same script) parses, from bytes and mapped,
/// with the metadata count and the tensors (name, dims, bytes, first F32 value) its manifest
/// gives: scalar and zero-size tensors, unknown keys of every type, nested and empty arrays,
/// empty strings, tensors out of offset order or with gaps.
#[test]
fn every_unusual_but_valid_file_parses_with_its_tensors_in_place() {
    let manifest = std::fs::read_to_string(Path::new(UNUSUAL).join("manifest.tsv")).unwrap();
    let mut checked = 0;
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (file, n_kv, tensors) = (cols[0], cols[1].parse::<usize>().unwrap(), cols[2]);
        let path = Path::new(UNUSUAL).join(file);
        let mapped = GgufFile::open(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let g = mapped.gguf();
        assert_eq!(g.metadata.len(), n_kv, "{file}");
        let want: Vec<&str> = tensors.split(';').filter(|t| !t.is_empty()).collect();
        assert_eq!(g.tensors.len(), want.len(), "{file}");
        for (t, w) in g.tensors.iter().zip(want) {
            let f: Vec<&str> = w.split(':').collect();
            let dims: Vec<usize> = f[1]
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            assert_eq!(
                (t.name.as_str(), &t.dims, t.size),
                (f[0], &dims, f[2].parse().unwrap()),
                "{file}"
            );
            let bytes = mapped.tensor_bytes(t);
            assert_eq!(bytes.len(), t.size, "{file}: {}", t.name);
            if f[3] != "-" {
                let first = f32::from_le_bytes(bytes[..4].try_into().unwrap());
                assert_eq!(first, f[3].parse::<f32>().unwrap(), "{file}: {}", t.name);
            }
        }
        assert_eq!(
            Gguf::parse(&std::fs::read(&path).unwrap()).unwrap().tensors,
            g.tensors,
            "{file}"
        );
        checked += 1;
    }
    assert!(checked >= 11, "the corpus has {checked} files");
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error_never_a_panic() {
    let bytes = sample().to_bytes();
    Gguf::parse(&bytes).expect("the whole file parses");
    for len in 0..bytes.len() {
        let r = catch_unwind(|| Gguf::parse(&bytes[..len]));
        assert!(
            matches!(r, Ok(Err(_))),
            "truncated to {len} of {} bytes: {r:?}",
            bytes.len()
        );
    }
}

/// A file with every metadata type, a nested array and tensors of every format.
fn sample() -> Writer {
    let mut w = Writer::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("u8", Value::U8(7))
        .metadata("i8", Value::I8(-7))
        .metadata("u16", Value::U16(65_000))
        .metadata("i16", Value::I16(-32_000))
        .metadata("u32", Value::U32(4_000_000_000))
        .metadata("i32", Value::I32(-2_000_000_000))
        .metadata("f32", Value::F32(1.5e-5))
        .metadata("bool", Value::Bool(true))
        .metadata("u64", Value::U64(1 << 60))
        .metadata("i64", Value::I64(-(1 << 60)))
        .metadata("f64", Value::F64(-2.5e300))
        .metadata(
            "strings",
            Value::Array(Array::String(vec!["<s>", "Ġthe", "日本", ""].into())),
        )
        .metadata("i32s", Value::Array(Array::I32(vec![1, -2, 3])))
        .metadata(
            "nested",
            Value::Array(Array::Array(vec![
                Array::U8(vec![1, 2]),
                Array::F64(vec![0.5]),
                Array::Bool(vec![]),
            ])),
        );
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let cols = dtype.block_len().max(8);
        let rows = 3;
        let bytes: Vec<u8> = (0..dtype.bytes_for(rows * cols).unwrap())
            .map(|b| (b * 31 + i) as u8)
            .collect();
        w.tensor(format!("t.{}", dtype.name()), &[cols, rows], dtype, bytes)
            .unwrap();
    }
    w
}

#[test]
fn the_writer_round_trips_every_value_type_and_every_format() {
    let w = sample();
    let bytes = w.to_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get("u32"), Some(&Value::U32(4_000_000_000)));
    assert_eq!(g.get("f64"), Some(&Value::F64(-2.5e300)));
    assert_eq!(g.get("i64"), Some(&Value::I64(-(1 << 60))));
    assert_eq!(g.str("general.architecture").unwrap(), "llama");
    assert_eq!(
        g.get("nested"),
        Some(&Value::Array(Array::Array(vec![
            Array::U8(vec![1, 2]),
            Array::F64(vec![0.5]),
            Array::Bool(vec![])
        ])))
    );
    assert_eq!(
        g.get("strings"),
        Some(&Value::Array(Array::String(
            vec!["<s>", "Ġthe", "日本", ""].into()
        )))
    );
    assert_eq!(g.metadata.len(), 15);
    assert_eq!(g.tensors.len(), DType::ALL.len());
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let t = g.tensor(&format!("t.{}", dtype.name())).unwrap();
        assert_eq!((t.dtype(), t.rows()), (Some(dtype), 3));
        assert_eq!(t.offset % g.alignment, 0);
        let expected: Vec<u8> = (0..t.size).map(|b| (b * 31 + i) as u8).collect();
        assert_eq!(
            &bytes[t.offset..t.offset + t.size],
            &expected[..],
            "{dtype}"
        );
    }
    // Written again from what was read: the same bytes.
    let mut again = Writer::new();
    for (k, v) in &g.metadata {
        again.metadata(k.clone(), v.clone());
    }
    for t in &g.tensors {
        again
            .tensor(
                t.name.clone(),
                &t.dims,
                t.dtype().unwrap(),
                bytes[t.offset..t.offset + t.size].to_vec(),
            )
            .unwrap();
    }
    assert_eq!(again.to_bytes(), bytes);
}

#[test]
fn a_custom_alignment_is_honoured() {
    let mut w = Writer::new();
    w.metadata("general.alignment", Value::U32(256));
    w.tensor("a", &[3], DType::F32, vec![1; 12])
        .unwrap()
        .tensor("b", &[5], DType::F32, vec![2; 20])
        .unwrap();
    let bytes = w.to_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.alignment, 256);
    assert!(
        g.tensors.iter().all(|t| t.offset % 256 == 0),
        "{:?}",
        g.tensors
    );
    assert_eq!(bytes[g.tensor("b").unwrap().offset], 2);
}

#[test]
fn the_writer_refuses_tensors_whose_bytes_do_not_match_their_shape() {
    let mut w = Writer::new();
    assert!(
        w.tensor("a", &[33], DType::Q4_0, vec![0; 36]).is_err(),
        "33 is not whole blocks of 32"
    );
    assert!(
        w.tensor("a", &[32], DType::Q4_0, vec![0; 17]).is_err(),
        "one Q4_0 block is 18 bytes"
    );
    assert!(w.tensor("a", &[32], DType::Q4_0, vec![0; 18]).is_ok());
    assert!(
        w.tensor("a", &[32], DType::Q4_0, vec![0; 18]).is_err(),
        "added twice"
    );
}

/// A streamed write gives the same bytes as a writer holding its tensors, and a tensor whose
/// bytes come out short or long is an error naming it.
#[test]
fn streamed_writes_equal_held_writes_and_wrong_sizes_are_refused() {
    use chord::gguf::TensorEntry;
    let a: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = vec![7u8; 34]; // one Q8_0 block
    let mut held = Writer::new();
    held.metadata("general.name", Value::String("streamed".into()));
    held.tensor("a", &[16, 4], DType::F32, a.clone()).unwrap();
    held.tensor("b", &[32], DType::Q8_0, b.clone()).unwrap();
    let mut meta = Writer::new();
    meta.metadata("general.name", Value::String("streamed".into()));
    let table = [
        TensorEntry {
            name: "a".into(),
            dims: vec![16, 4],
            dtype: DType::F32,
        },
        TensorEntry {
            name: "b".into(),
            dims: vec![32],
            dtype: DType::Q8_0,
        },
    ];
    let mut streamed = Vec::new();
    meta.write_streamed(&table, &mut streamed, |i, out| {
        // In pieces, as a generator writes rows.
        let data = if i == 0 { &a } else { &b };
        data.chunks(10).try_for_each(|c| out.write_all(c))
    })
    .unwrap();
    assert_eq!(streamed, held.to_bytes());
    for short in [true, false] {
        let e = meta
            .write_streamed(&table, &mut Vec::new(), |i, out| {
                let data = if i == 0 { &a } else { &b };
                if i == 1 && short {
                    out.write_all(&data[1..])
                } else if i == 1 {
                    out.write_all(data).and_then(|()| out.write_all(&[0]))
                } else {
                    out.write_all(data)
                }
            })
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let want = if short {
            "33 bytes written, 34"
        } else {
            "35 bytes written, 34"
        };
        assert!(
            e.to_string().contains("tensor b") && e.to_string().contains(want),
            "{e}"
        );
    }
}
