"""Bad GGUF files get one line naming the file and what is wrong in it: never a traceback, a hang or
a memory blow-up (sources/gguf_check.py walks the header before the gguf package reads it;
gguf_file.py, gguf_tokenizer.py and mmproj.py check the values they read)."""

from __future__ import annotations

import math
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.sources.gguf_check import check_gguf
from edgellm.sources.gguf_file import GGUFSource
from edgellm.sources.gguf_tokenizer import _derive_merges, tokenizer_from_gguf
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


def test_block_count_beyond_the_tensors_is_refused_through_the_cli(tmp_path):
    # llama metadata claiming 2^32 - 1 layers in a file with no tensors: it ended in MemoryError
    meta = [ARCH] + [kv_u32(f"llama.{key}", value) for key, value in
                     (("block_count", 2**32 - 1), ("embedding_length", 8), ("feed_forward_length", 16),
                      ("attention.head_count", 2))]
    path = raw_gguf(tmp_path / "layers.gguf", meta)
    result = run_cli_bounded("compile", path, "-o", tmp_path / "out", "--target", "cpu")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, path, "llama.block_count", "4294967295")


def test_a_fifo_as_the_model_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    result = run_cli_bounded("compile", fifo, "-o", tmp_path / "out", "--target", "cpu")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, fifo, "not a regular file")


def test_a_lora_gguf_gets_the_header_check(tmp_path):
    from edgellm.sources.lora import _read_gguf

    path = raw_gguf(tmp_path / "lora.gguf", [kv("general.type", STRING, string("adapter")),
                                             kv_array("adapter.lora.alpha", UINT8, 10**9, b"\1")])
    with pytest.raises(EdgeLLMError) as error:
        _read_gguf(path, None)
    assert_one_line(error, path, "adapter.lora.alpha", "1000000000")


def test_a_fifo_as_the_text_model_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "text.gguf"
    os.mkfifo(fifo)
    mmproj = raw_gguf(tmp_path / "mmproj.gguf", [kv("general.architecture", STRING, string("clip"))])
    result = run_cli_bounded("compile", fifo, "--mmproj", mmproj, "-o", tmp_path / "out", "--target", "cpu")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr, fifo, "not a regular file")


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


# --- 2. metadata values of the wrong kind ---------------------------------------------------------

GOOD = {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16, "attention.head_count": 2,
        "attention.head_count_kv": 2, "context_length": 64, "attention.key_length": 4, "rope.dimension_count": 4}


def add_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif value < 0:
        writer.add_int32(key, value)
    else:
        writer.add_uint64(key, value) if value >= 2**32 else writer.add_uint32(key, value)


def small_gguf(path: Path, arch: str = "llama", tensors=("blk.0.attn_q.weight",), tokens=("a", "b", "c"),
               **metadata) -> Path:
    """A little GGUF: GOOD's metadata (a key given as None is left out), a gpt2 tokenizer, 8x8 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {**GOOD, **{k.replace("__", "."): v for k, v in metadata.items()}}.items():
        if value is not None:
            add_value(writer, key if key.startswith(("tokenizer.", "general.")) else f"{arch}.{key}", value)
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(list(tokens))
    for name in ("token_embd.weight", "output_norm.weight", *tensors):
        writer.add_tensor(name, np.ones((8, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BAD_VALUES = [
    ("block_count", "three"), ("block_count", -1), ("block_count", 0), ("block_count", 1.5), ("block_count", [1, 2]),
    ("block_count", 4), ("block_count", 2**40),  # more layers than the file has tensors
    ("embedding_length", float("nan")), ("embedding_length", 0), ("feed_forward_length", -5),
    ("feed_forward_length", [16, 16]), ("attention.head_count", 0), ("attention.head_count", "2"),
    ("attention.head_count_kv", [1, 2]), ("attention.head_count_kv", 0), ("context_length", float("inf")),
    ("context_length", -1), ("vocab_size", -1), ("vocab_size", "big"), ("rope.freq_base", float("nan")),
    ("rope.freq_base", -10000.0), ("attention.layer_norm_rms_epsilon", "tiny"),
    ("attention.layer_norm_rms_epsilon", float("-inf")), ("attention.key_length", 0.5),
    ("attention.sliding_window", -3), ("attention.sliding_window", "4"), ("rope.dimension_count", "x"),
    ("rope.dimension_count", 0), ("rope.scaling.factor", float("nan")), ("embedding_length", True),
]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_a_metadata_value_of_the_wrong_kind_is_one_line(tmp_path, key, value):
    extra = {"rope.scaling.type": "linear"} if key.startswith("rope.scaling") else {}
    path = small_gguf(tmp_path / "m.gguf", **{key.replace(".", "__"): value, **{k.replace(".", "__"): v for k, v in extra.items()}})
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, f"llama.{key}", value)


@pytest.mark.parametrize("key, value", [("attn_logit_softcapping", float("inf")), ("final_logit_softcapping", "30"),
                                        ("final_logit_softcapping", -1.0)])
def test_gemma2_softcapping_of_the_wrong_kind_is_one_line(tmp_path, key, value):
    path = small_gguf(tmp_path / "g.gguf", "gemma2", **{key: value})
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, f"gemma2.{key}", value)


def test_an_architecture_that_is_not_text_is_one_line(tmp_path):
    path = raw_gguf(tmp_path / "arch.gguf", [kv_array("general.architecture", STRING, 1, string("llama"))])
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, "['llama']")


def test_q_rows_that_are_not_rotary_pairs_per_head_are_one_line(tmp_path):
    # ModelConfig refuses this shape before a build reads the tensor; a caller that did not ask it is answered too
    source = GGUFSource(small_gguf(tmp_path / "m.gguf", attention__head_count=3, attention__head_count_kv=3))
    with pytest.raises(EdgeLLMError) as error:
        source.tensor("model.layers.0.self_attn.q_proj.weight")
    assert_one_line(error, source.path, "q_proj", "3 heads")


def test_a_missing_key_is_named(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", embedding_length=None)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, "llama.embedding_length", "missing")


def test_rope_scaling_type_must_be_text(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", rope__scaling__type=3)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, "llama.rope.scaling.type", "3")


def test_good_metadata_reads_as_before(tmp_path):
    source = GGUFSource(small_gguf(tmp_path / "m.gguf", vocab_size=3, rope__freq_base=500000.0,
                                   attention__layer_norm_rms_epsilon=1e-5, attention__sliding_window=16))
    cfg = source.raw_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (1, 8, 16)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 4)
    assert (cfg["max_position_embeddings"], cfg["vocab_size"], cfg["sliding_window"]) == (64, 3, 16)
    assert cfg["rope_theta"] == 500000.0 and math.isclose(cfg["rms_norm_eps"], 1e-5, rel_tol=1e-6)
    assert all(type(cfg[k]) is int for k in ("num_hidden_layers", "hidden_size", "head_dim", "vocab_size"))
    assert type(cfg["rope_theta"]) is float and type(cfg["rms_norm_eps"]) is float
    assert source.tensor_names() == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]


@pytest.mark.parametrize("name", ["blk.0.weight", "blk.weight", "blk.x.attn_q.weight", "blk.01.attn_q.weight"])
def test_a_layer_tensor_name_without_its_parts_is_one_line(tmp_path, name):
    path = small_gguf(tmp_path / "m.gguf", tensors=("blk.0.attn_q.weight", name))
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, name)


def test_one_longrope_factor_tensor_without_the_other_is_one_line(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", "phi3", tensors=("blk.0.attn_qkv.weight", "rope_factors_long.weight"))
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, "rope_factors_short.weight")


@pytest.mark.parametrize("arch, tensors, name", [
    ("llama", ("blk.0.attn_q.weight", "rope_freqs.weight"), "rope_freqs.weight"),  # 8x8: two dimensions
    ("phi3", ("blk.0.attn_qkv.weight", "rope_factors_long.weight", "rope_factors_short.weight"), "rope_factors_short.weight"),
])
def test_rope_factor_tensors_must_be_one_row_of_floats(tmp_path, arch, tensors, name):
    path = small_gguf(tmp_path / "m.gguf", arch, tensors=tensors)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path)
    assert_one_line(error, path, name, "F32")


# --- 4. tokenizer metadata ------------------------------------------------------------------------


def tokenizer_fields(**changes) -> dict:
    fields = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.bos_token_id": 0,
              "tokenizer.ggml.eos_token_id": 1}
    fields.update({key.replace("__", "."): value for key, value in changes.items()})
    return {k: v for k, v in fields.items() if v is not None}


BAD_TOKENIZERS = [
    ("tokenizer.ggml.tokens", [1, 2, 3]), ("tokenizer.ggml.tokens", "abc"), ("tokenizer.ggml.tokens", []),
    ("tokenizer.ggml.scores", [0.0, 1.0]), ("tokenizer.ggml.scores", ["x", "y", "z"]),
    ("tokenizer.ggml.token_type", [1, 1]), ("tokenizer.ggml.token_type", [1.5, 1, 1]),
    ("tokenizer.ggml.merges", [1, 2]), ("tokenizer.ggml.merges", "a b"), ("tokenizer.ggml.merges", ["a c"]),
    ("tokenizer.ggml.bos_token_id", 3), ("tokenizer.ggml.eos_token_id", -2), ("tokenizer.ggml.eos_token_id", "1"),
    ("tokenizer.ggml.pre", ["llama-bpe"]), ("tokenizer.ggml.model", ["gpt2"]), ("tokenizer.chat_template", 7),
    ("general.architecture", ["llama"]), ("tokenizer.ggml.add_bos_token", "false"), ("tokenizer.ggml.add_eos_token", 2),
]


@pytest.mark.parametrize("key, value", BAD_TOKENIZERS, ids=[f"{k}={v}" for k, v in BAD_TOKENIZERS])
def test_bad_tokenizer_metadata_names_the_file(tmp_path, key, value):
    path = tmp_path / "model.gguf"
    with pytest.raises(EdgeLLMError) as error:
        tokenizer_from_gguf(tokenizer_fields(**{key.replace(".", "__"): value}), path)
    assert_one_line(error, path, key)


def test_a_missing_tokenizer_names_the_file(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", tokens=None)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path).tokenizer()
    assert_one_line(error, path, "tokenizer.ggml.model")


def test_a_tokenizer_read_from_a_file_names_it(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", tokenizer__ggml__bos_token_id=7)
    with pytest.raises(EdgeLLMError) as error:
        GGUFSource(path).tokenizer()
    assert_one_line(error, path, "tokenizer.ggml.bos_token_id", "7")


def _derive_merges_quadratic(vocab, scores):
    """The implementation before it was made linear in a token's length: the reference."""
    reverse = scores is not None
    ranked = scores if scores is not None else vocab
    entries = []
    for token, rank in ranked.items():
        size = len(token)
        for i in range(1, size):
            left = token[:i]
            if left in vocab:
                right = token[i:]
                if right in vocab:
                    entries.append((rank, i, size - i, left, right))
    entries.sort(key=lambda e: (e[0], e[1], e[2]), reverse=reverse)
    return [(e[3], e[4]) for e in entries]


@pytest.fixture(scope="module")
def trained_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary of 3000 tokens trained on this repository's own source."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = Path(__file__).resolve().parents[1] / "src" / "edgellm"
    corpus = [p.read_text() for p in sorted(root.rglob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.get_vocab()


def test_derived_merges_are_the_same_as_before(trained_vocab):
    vocab = dict(sorted(trained_vocab.items(), key=lambda item: item[1]))
    assert _derive_merges(vocab, None) == _derive_merges_quadratic(vocab, None)
    rng = np.random.default_rng(0)
    scores = {t: float(s) for t, s in zip(vocab, -rng.integers(0, 200, len(vocab)))}  # many ties
    merges = _derive_merges(vocab, scores)
    assert len(merges) > len(vocab) // 2 and merges == _derive_merges_quadratic(vocab, scores)
    gemma_like = {t: -i for i, t in enumerate(vocab)}
    assert _derive_merges(vocab, gemma_like) == _derive_merges_quadratic(vocab, gemma_like)
    with_empty = {"": len(vocab), **vocab}  # an empty token is no piece of a split
    assert _derive_merges(with_empty, None) == _derive_merges_quadratic(with_empty, None)


def test_a_very_long_token_does_not_stall_the_merges(trained_vocab):
    vocab = dict(trained_vocab)
    vocab["x" * 100_000] = len(vocab)
    vocab["y" * 50_000] = len(vocab)
    vocab["y" * 100_000] = len(vocab)
    start = time.perf_counter()
    merges = _derive_merges(vocab, None)
    assert time.perf_counter() - start < 2
    assert ("y" * 50_000, "y" * 50_000) in merges


# --- 5. the mmproj file ---------------------------------------------------------------------------


def test_the_mmproj_file_gets_the_same_header_check(tmp_path):
    clip = kv("general.architecture", STRING, string("clip"))
    path = raw_gguf(tmp_path / "mmproj.gguf", [clip, kv_array("clip.vision.image_mean", FLOAT32, 2**62, bytes(12))])
    with pytest.raises(EdgeLLMError) as error:
        MmprojFile(path)
    assert_one_line(error, path, "clip.vision.image_mean", str(2**62))


def test_an_mmproj_layer_tensor_without_its_parts_is_one_line(tmp_path):
    path = tmp_path / "mmproj.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.blk.0.weight", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgeLLMError) as error:
        MmprojFile(path)
    assert_one_line(error, path, "v.blk.0.weight")


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory):
    """A tiny SmolVLM as llama.cpp's two files: its directory, the text GGUF, the mmproj."""
    from gguf_writer import text_part, write_gguf, write_mmproj
    from tiny_models import NEWLINES, TILED_MARKERS, save_tiny_idefics3

    root = tmp_path_factory.mktemp("pair")
    model = save_tiny_idefics3(root / "model", "idefics3")
    text = write_gguf(text_part(model, root / "text"), root / "text.gguf", "llama", special=NEWLINES + TILED_MARKERS)
    return model, text, write_mmproj(model, root / "mmproj.gguf")


def test_a_good_mmproj_reads_as_before(vision_pair):
    import json

    from edgellm.sources.mmproj import VisionPairSource

    model, text, mmproj = vision_pair
    vision = json.loads((model / "config.json").read_text())["vision_config"]
    source = VisionPairSource(text, mmproj)
    got = source.raw_config["vision_config"]
    for key in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert got[key] == vision[key] and type(got[key]) is int, key
    assert math.isclose(got["layer_norm_eps"], vision.get("layer_norm_eps", 1e-6), rel_tol=1e-6)
    assert source.raw_config["scale_factor"] == 2 and source.image_processor["size"]["longest_edge"] > 0


@pytest.mark.parametrize("key, value", [("clip.vision.image_size", "512"), ("clip.vision.block_count", -1),
                                        ("clip.vision.projection_dim", float("nan")), ("clip.projector_type", ["idefics3"])])
def test_an_mmproj_value_of_the_wrong_kind_is_one_line(vision_pair, tmp_path, key, value):
    from edgellm.sources.mmproj import VisionPairSource

    _, text, mmproj = vision_pair
    source = gguf.GGUFReader(mmproj)
    path = tmp_path / "bad-mmproj.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    for field in source.fields.values():
        if field.name.startswith("clip."):
            if field.name == key:
                add_value(writer, key, value)
            else:
                sub = field.types[-1] if len(field.types) > 1 else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    for t in source.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgeLLMError) as error:
        VisionPairSource(text, path)
    assert_one_line(error, path, key if key != "clip.projector_type" else "projector type", value)


# --- valid files still read -----------------------------------------------------------------------


def test_the_real_smollm2_file_passes_the_check(smollm2_gguf):
    start = time.perf_counter()
    check_gguf(smollm2_gguf)
    assert time.perf_counter() - start < 5


def test_a_file_written_by_gguf_py_passes_the_check(tmp_path):
    path = small_gguf(tmp_path / "m.gguf", tokens=[f"w{i}" for i in range(100)] + ["é", ""])
    check_gguf(path)
    assert GGUFSource(path).raw_config["vocab_size"] == 102
