#!/usr/bin/env python3
"""Writes two GGUF corpora, independently of chord's writer on purpose:
- malformed/: one file per way a file can lie, and manifest.tsv with the field each file's
  error must name;
- unusual/: files that are valid by the GGUF spec but unusual: scalar and zero-size tensors,
  tensors of ggml types chord lists but does not compute on, unknown keys of every type,
  nested and empty arrays, empty strings, tensors listed out of offset order or with gaps
  between them. ggml itself refuses five of them (arrays of arrays, empty arrays of arrays,
  offsets out of order or with gaps, a file ending before its data section's padding);
  chord reads them all, as the spec allows. manifest.tsv lists each
  file's metadata count and its tensors as name:dims:bytes:first value (F32 data are the
  tensor's index times 100 plus the element's index, so a misplaced read shows).

Run from this folder: python3 make_malformed.py"""
import os
import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def s(text):
    b = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, tag, payload):
    return s(key) + struct.pack("<I", tag) + payload


def tensor(name, dims, ggml_type, offset):
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)


def gguf(kvs=(), tensors=(), data=b"", version=3, n_tensors=None, n_kv=None, align=32):
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * ((-len(body)) % align)
    return body + data


NAME = kv("general.name", STR, s("m"))
F32_8 = struct.pack("<8f", *range(8))  # one F32 tensor of 8 values: 32 bytes

cases = {
    "empty": (b"", "header.magic"),
    "bad_magic": (b"GGUX" + gguf()[4:], "header.magic"),
    "version_1": (gguf(version=1), "header.version"),
    "version_99": (gguf(version=99), "header.version"),
    "truncated_header": (gguf()[:13], "header.tensor_count"),
    "tensor_count_2_60": (gguf(n_tensors=1 << 60), "header.tensor_count"),
    "kv_count_2_60": (gguf(n_kv=1 << 60), "header.metadata_kv_count"),
    "key_length_2_60": (gguf(kvs=[struct.pack("<Q", 1 << 60) + b"general.name"], n_kv=1), "metadata[0].key"),
    "string_length_2_60": (gguf(kvs=[s("general.name") + struct.pack("<IQ", STR, 1 << 60)]), "metadata 'general.name'"),
    "array_count_2_60": (gguf(kvs=[s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, 1 << 60)]), "metadata 'tokenizer.ggml.tokens'"),
    "unknown_value_type": (gguf(kvs=[kv("general.name", 99, b"")]), "metadata 'general.name'"),
    "unknown_array_type": (gguf(kvs=[kv("a", ARR, struct.pack("<IQ", 42, 1))]), "metadata 'a'"),
    "bool_not_0_or_1": (gguf(kvs=[kv("b", BOOL, b"\x07")]), "metadata 'b'"),
    "arrays_nested_10_deep": (gguf(kvs=[kv("deep", ARR, struct.pack("<IQ", ARR, 1) * 10 + struct.pack("<IQ", U32, 0))]), "metadata 'deep'"),
    "key_not_utf8": (gguf(kvs=[s(b"\xff\xfe") + struct.pack("<I", U32) + struct.pack("<I", 1)]), "metadata[0].key"),
    "duplicate_key": (gguf(kvs=[NAME, NAME]), "metadata[1].key"),
    "alignment_not_power_of_two": (gguf(kvs=[kv("general.alignment", U32, struct.pack("<I", 3))]), "general.alignment"),
    "truncated_metadata": (gguf(kvs=[NAME, kv("llama.block_count", U32, struct.pack("<I", 30))])[:88], "metadata 'llama.block_count'"),
    "five_dims": (gguf(tensors=[tensor("x", [1, 1, 1, 1, 8], 0, 0)], data=F32_8), "tensor 'x'.n_dims"),
    "dimension_2_63": (gguf(tensors=[tensor("x", [8, 1 << 63], 0, 0)], data=F32_8), "tensor 'x'.dims[1]"),
    "dims_product_overflows": (gguf(tensors=[tensor("x", [1 << 40, 1 << 40], 0, 0)], data=F32_8), "tensor 'x'.dims"),
    "unknown_ggml_type": (gguf(tensors=[tensor("x", [8], 99, 0)], data=F32_8), "tensor 'x'.type"),
    "row_not_whole_blocks": (gguf(tensors=[tensor("x", [33], 2, 0)], data=b"\0" * 64), "tensor 'x'.dims[0]"),
    "misaligned_offset": (gguf(tensors=[tensor("x", [8], 0, 4)], data=F32_8 + b"\0" * 32), "tensor 'x'.offset"),
    "tensor_past_end": (gguf(tensors=[tensor("x", [8], 0, 64)], data=F32_8), "tensor 'x'.offset"),
    "offset_2_63": (gguf(tensors=[tensor("x", [8], 0, 1 << 63)], data=F32_8), "tensor 'x'.offset"),
    "truncated_tensor_data": (gguf(tensors=[tensor("x", [8], 0, 0)], data=F32_8[:20]), "tensor 'x'.offset"),
    "overlapping_tensors": (gguf(tensors=[tensor("a", [16], 0, 0), tensor("b", [8], 0, 32)], data=F32_8 * 3), "tensor 'b'.offset"),
    "duplicate_tensor_name": (gguf(tensors=[tensor("x", [8], 0, 0), tensor("x", [8], 0, 32)], data=F32_8 * 2), "tensor[1].name"),
    "truncated_tensor_info": (gguf(tensors=[tensor("x", [8], 0, 0)], data=F32_8)[:24 + 8 + 1 + 4 + 4], "tensor 'x'.dims[0]"),
}

os.makedirs("malformed", exist_ok=True)
with open("malformed/manifest.tsv", "w") as manifest:
    manifest.write("file\tfield named by the error\n")
    for name, (data, field) in sorted(cases.items()):
        with open(f"malformed/{name}.gguf", "wb") as f:
            f.write(data)
        manifest.write(f"{name}.gguf\t{field}\n")
print(f"wrote {len(cases)} malformed files")


def values(index, n):
    """F32 data of tensor `index`: index*100 + 0, 1, 2..."""
    return struct.pack(f"<{n}f", *(index * 100 + i for i in range(n)))


def pad(b, align=32):
    return b + b"\0" * ((-len(b)) % align)


def arr(tag, items):
    return struct.pack("<IQ", tag, len(items)) + b"".join(items)


EVERY_TYPE = [
    kv("x.u8", U8, b"\xff"), kv("x.i8", I8, b"\x80"), kv("x.u16", U16, struct.pack("<H", 65535)),
    kv("x.i16", I16, struct.pack("<h", -1)), kv("x.u32", U32, struct.pack("<I", 7)),
    kv("x.i32", I32, struct.pack("<i", -7)), kv("x.f32", F32, struct.pack("<f", 0.5)),
    kv("x.bool", BOOL, b"\x01"), kv("x.string", STR, s("text")), kv("x.u64", U64, struct.pack("<Q", 1 << 63)),
    kv("x.i64", I64, struct.pack("<q", -(1 << 63))), kv("x.f64", F64, struct.pack("<d", -0.0)),
    kv("x.array", ARR, arr(U16, [struct.pack("<H", 1), struct.pack("<H", 2)])),
]
EMPTY = [kv(f"empty.array.{t}", ARR, arr(t, [])) for t in range(13)] + [kv("empty.string", STR, s(""))]
NESTED = [
    kv("nested.u32", ARR, arr(ARR, [arr(U32, [struct.pack("<I", 1)]), arr(U32, []), arr(U32, [struct.pack("<I", 2)] * 3)])),
    kv("nested.strings", ARR, arr(ARR, [arr(STR, [s("a"), s("")]), arr(STR, [])])),
    kv("nested.deep", ARR, arr(ARR, [arr(ARR, [arr(F64, [struct.pack("<d", 1.5)])])])),
]

# name: (bytes, [(tensor name, dims, bytes, first value or "-")], metadata count)
unusual = {
    "scalar_tensor": (gguf(tensors=[tensor("s", [], 0, 0)], data=values(0, 1)), [("s", [], 4, 0.0)], 0),
    "zero_dim_1d": (gguf(tensors=[tensor("z", [0], 0, 0), tensor("a", [8], 0, 0)], data=values(1, 8)),
                    [("z", [0], 0, "-"), ("a", [8], 32, 100.0)], 0),
    "zero_dim_2d": (gguf(tensors=[tensor("a", [8], 0, 0), tensor("z", [576, 0], 8, 32)], data=values(0, 8)),
                    [("a", [8], 32, 0.0), ("z", [576, 0], 0, "-")], 0),
    # The only tensor has no bytes: the file ends after the tensor table, without padding.
    "zero_size_no_data": (gguf(tensors=[tensor("z", [0, 4], 0, 0)], align=1), [("z", [0, 4], 0, "-")], 0),
    "out_of_offset_order": (gguf(tensors=[tensor("b", [8], 0, 32), tensor("a", [8], 0, 0)], data=values(1, 8) + values(0, 8)),
                            [("b", [8], 32, 0.0), ("a", [8], 32, 100.0)], 0),
    "gap_between_tensors": (gguf(tensors=[tensor("a", [8], 0, 0), tensor("b", [8], 0, 96)], data=values(0, 8) + b"\0" * 64 + values(1, 8)),
                            [("a", [8], 32, 0.0), ("b", [8], 32, 100.0)], 0),
    "unknown_key_of_every_type": (gguf(kvs=EVERY_TYPE), [], len(EVERY_TYPE)),
    "empty_arrays_and_strings": (gguf(kvs=EMPTY), [], len(EMPTY)),
    "nested_arrays": (gguf(kvs=NESTED), [], len(NESTED)),
    # I32, F64, Q2_K and IQ4_NL: types chord lists (inspect) but does not compute on.
    "other_ggml_types": (gguf(tensors=[tensor("i", [4], 26, 0), tensor("f", [2], 28, 32), tensor("k", [256], 10, 64),
                                       tensor("n", [32], 20, 160)], data=pad(b"\1" * 16) + pad(b"\2" * 16) + pad(b"\3" * 84) + b"\4" * 18),
                         [("i", [4], 16, "-"), ("f", [2], 16, "-"), ("k", [256], 84, "-"), ("n", [32], 18, "-")], 0),
    "version_2": (gguf(kvs=[NAME], tensors=[tensor("a", [8], 0, 0)], data=values(0, 8), version=2), [("a", [8], 32, 0.0)], 1),
    "alignment_64": (gguf(kvs=[kv("general.alignment", U32, struct.pack("<I", 64))],
                          tensors=[tensor("a", [8], 0, 0), tensor("b", [8], 0, 64)], data=pad(values(0, 8), 64) + values(1, 8), align=64),
                     [("a", [8], 32, 0.0), ("b", [8], 32, 100.0)], 1),
}

os.makedirs("unusual", exist_ok=True)
with open("unusual/manifest.tsv", "w") as manifest:
    manifest.write("file\tmetadata entries\ttensors (name:dims:bytes:first value)\n")
    for name, (data, tensors, n_kv) in sorted(unusual.items()):
        with open(f"unusual/{name}.gguf", "wb") as f:
            f.write(data)
        listed = ";".join(f"{t}:{','.join(map(str, d))}:{b}:{v}" for t, d, b, v in tensors)
        manifest.write(f"{name}.gguf\t{n_kv}\t{listed}\n")
print(f"wrote {len(unusual)} unusual files")
