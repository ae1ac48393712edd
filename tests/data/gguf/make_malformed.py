#!/usr/bin/env python3
"""Writes the malformed GGUF corpus: one file per way a file can lie, and manifest.tsv with
the field each file's error must name. Independent of chord's writer on purpose.

Run from this folder: python3 make_malformed.py"""
import os
import struct

U32, U64, STR, ARR, BOOL = 4, 10, 8, 9, 7


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
    "zero_dims": (gguf(tensors=[tensor("x", [], 0, 0)], data=F32_8), "tensor 'x'.n_dims"),
    "five_dims": (gguf(tensors=[tensor("x", [1, 1, 1, 1, 8], 0, 0)], data=F32_8), "tensor 'x'.n_dims"),
    "dimension_0": (gguf(tensors=[tensor("x", [8, 0], 0, 0)], data=F32_8), "tensor 'x'.dims[1]"),
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
print(f"wrote {len(cases)} files")
