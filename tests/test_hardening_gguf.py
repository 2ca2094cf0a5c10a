"""Bad GGUF files get one line naming the file and what is wrong in it: never a traceback, a hang or
a memory blow-up (sources/gguf_check.py walks the header before the gguf package reads it;
gguf_file.py, gguf_tokenizer.py and mmproj.py check the values they read)."""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.sources.gguf_check import check_gguf
from edgellm.sources.gguf_file import GGUFSource
from edgellm.sources.mmproj import MmprojFile

CLI = [sys.executable, "-m", "edgellm.cli"]
UINT8, INT32, UINT32, FLOAT32, STRING, ARRAY, UINT64 = 0, 5, 4, 6, 8, 9, 10
F32, F64, Q8_0 = 0, 28, 8


def run_cli_bounded(*args):
    """The CLI with 2 GB of address space and a minute: a hang or a memory blow-up fails the test
    instead of taking the machine with it."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=60, preexec_fn=limit)


def assert_one_line(error: EdgeLLMError | str, *needles) -> None:
    text = str(error.value if hasattr(error, "value") else error).strip()
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert str(needle) in text, text


# --- GGUF bytes written by hand -----------------------------------------------------------------


def string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str | bytes, kind: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", kind) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def kv_array(key: str, item: int, count: int, payload: bytes = b"") -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", item, count) + payload)


def tensor_info(name: str, dims, kind: int, offset: int) -> bytes:
    return string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)


def raw_gguf(path: Path, metadata=(), tensors=(), data: bytes = b"", *, version: int = 3, counts=None,
             alignment: int = 32) -> Path:
    """A GGUF file: header, key/values, tensor infos, padding to `alignment` where it has tensors, data.
    counts: (tensors, keys) to claim instead of the real numbers."""
    n_tensors, n_keys = counts or (len(tensors), len(metadata))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys) + b"".join(metadata) + b"".join(tensors)
    padding = -len(head) % alignment if tensors else 0
    path.write_bytes(head + b"\0" * padding + data)
    return path


ARCH = kv("general.architecture", STRING, string("llama"))


# --- 1. the header: every count bounded by the bytes that could hold it ---------------------------


def test_a_huge_array_in_a_tiny_file_is_refused_at_once_through_the_cli(tmp_path):
    # 117 bytes claiming a billion uint8 values: GGUFReader looped over them for gigabytes
    path = raw_gguf(tmp_path / "huge-array.gguf", [ARCH, kv_array("tokenizer.ggml.scores", UINT8, 10**9, b"\1" * 3)])
    assert path.stat().st_size < 128
    result = run_cli_bounded("compile", path, "-o", tmp_path / "out", "--target", "cpu")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, path, "tokenizer.ggml.scores", "1000000000")


def header_cases():
    yield "empty", b"", "empty"
    yield "magic", b"GGUG" + bytes(20), "GGUF"
    yield "short", b"GGUF\3\0\0\0", "ends"
    yield "version", b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"
    yield "tensor-count", b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), str(2**60)
    yield "key-count", b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63), str(2**63)
    yield "key-length", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**64 - 1) + bytes(16), str(2**64 - 1)


@pytest.mark.parametrize("name, data, needle", list(header_cases()), ids=[c[0] for c in header_cases()])
def test_broken_headers_are_one_line(tmp_path, name, data, needle):
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, needle)


def metadata_cases():
    yield "string-length", [kv("general.name", STRING, struct.pack("<Q", 10**12) + b"abc")], "general.name", str(10**12)
    yield "string-array", [kv_array("tokenizer.ggml.tokens", STRING, 2**40, string("a"))], "tokenizer.ggml.tokens", str(2**40)
    yield "array-element-length", [kv_array("tokenizer.ggml.tokens", STRING, 2, string("a") + struct.pack("<Q", 2**50))], \
        "tokenizer.ggml.tokens", str(2**50)
    yield "u32-array", [kv_array("tokenizer.ggml.token_type", INT32, 2**61, bytes(8))], "tokenizer.ggml.token_type", str(2**61)
    yield "nested-array", [kv_array("x.nested", ARRAY, 1, struct.pack("<IQ", UINT8, 1) + b"\0")], "x.nested", "array"
    yield "value-type", [kv("x.odd", 13, bytes(8))], "x.odd", "13"
    yield "item-type", [kv_array("x.odd", 99, 1, bytes(8))], "x.odd", "99"
    yield "duplicate-key", [ARCH, ARCH], "general.architecture", "twice"
    yield "key-utf8", [kv(b"bad\xff", UINT8, b"\0")], "UTF-8", "bad"
    yield "alignment-zero", [kv_u32("general.alignment", 0)], "general.alignment", "0"
    yield "alignment-odd", [kv_u32("general.alignment", 24)], "general.alignment", "24"
    yield "alignment-type", [kv("general.alignment", STRING, string("32"))], "general.alignment", "string"
    yield "truncated-value", [kv("general.count", UINT64, b"\1\2")], "general.count", "ends"


@pytest.mark.parametrize("name, metadata, key, value", list(metadata_cases()), ids=[c[0] for c in metadata_cases()])
def test_metadata_that_does_not_fit_the_file_is_one_line(tmp_path, name, metadata, key, value):
    path = raw_gguf(tmp_path / f"{name}.gguf", metadata)
    start = time.perf_counter()
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert time.perf_counter() - start < 2
    assert_one_line(error, path, key, value)


def test_more_array_elements_than_any_tokenizer_holds_are_refused(tmp_path):
    # each element costs GGUFReader a numpy view (about a kilobyte): 3 million of them would be gigabytes
    count = 3_000_000
    path = raw_gguf(tmp_path / "many.gguf", [ARCH, kv_array("tokenizer.ggml.token_type", UINT8, count, bytes(count))])
    with pytest.raises(EdgeLLMError) as error:
        check_gguf(path)
    assert_one_line(error, path, "tokenizer.ggml.token_type", count)


# --- 3. the tensor table --------------------------------------------------------------------------


def tensor_cases():
    four = np.arange(4, dtype=np.float32).tobytes()
    yield "wraps", [tensor_info("a.weight", [4], F32, 2**64 - 8)], four, "a.weight", "end of the file"
    yield "past-end", [tensor_info("a.weight", [4], F32, 32)], four, "a.weight", "end of the file"
    yield "overlap", [tensor_info("a.weight", [4], F32, 0), tensor_info("b.weight", [4], F32, 8)], four * 2, "b.weight", "overlap"
    # the same bytes, but a type twice as wide: a runs into b
    yield "retyped", [tensor_info("a.weight", [8], F64, 0), tensor_info("b.weight", [8], F32, 32)], four * 4, "a.weight", "overlap"
    yield "unknown-type", [tensor_info("a.weight", [4], 4, 0)], four, "a.weight", "type 4"
    yield "unknown-type-99", [tensor_info("a.weight", [4], 99, 0)], four, "a.weight", "type 99"
    yield "zero-dim", [tensor_info("a.weight", [4, 0], F32, 0)], four, "a.weight", "[4, 0]"
    yield "absurd-dims", [tensor_info("a.weight", [2**40, 2**40], F32, 0)], four, "a.weight", str(2**40)
    yield "wrapping-dims", [tensor_info("a.weight", [2**32, 2**32], F32, 0)], four, "a.weight", str(2**32)
    yield "dims", [tensor_info("a.weight", [1] * 7, F32, 0)], four, "a.weight", "7 dimensions"
    yield "partial-block", [tensor_info("a.weight", [33], Q8_0, 0)], bytes(68), "a.weight", "Q8_0"
    yield "duplicate", [tensor_info("a.weight", [4], F32, 0), tensor_info("a.weight", [4], F32, 32)], four * 3, "a.weight", "twice"


@pytest.mark.parametrize("name, tensors, data, tensor, needle", list(tensor_cases()), ids=[c[0] for c in tensor_cases()])
def test_a_broken_tensor_table_names_the_tensor(tmp_path, name, tensors, data, tensor, needle):
    path = raw_gguf(tmp_path / f"{name}.gguf", [ARCH], tensors, data)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, tensor, needle)


# --- 5. the mmproj file ---------------------------------------------------------------------------


def test_the_mmproj_file_gets_the_same_header_check(tmp_path):
    clip = kv("general.architecture", STRING, string("clip"))
    path = raw_gguf(tmp_path / "mmproj.gguf", [clip, kv_array("clip.vision.image_mean", FLOAT32, 2**62, bytes(12))])
    with pytest.raises(EdgeLLMError) as error:
        MmprojFile(path)
    assert_one_line(error, path, "clip.vision.image_mean", str(2**62))


# --- valid files still read -----------------------------------------------------------------------


def test_the_real_smollm2_file_passes_the_check(smollm2_gguf):
    start = time.perf_counter()
    check_gguf(smollm2_gguf)
    assert time.perf_counter() - start < 5
