"""Bad Hugging Face model directories: config.json values, safetensors headers and shard indexes
are one error naming the file (and the field or tensor), never a traceback, a hang or a model that
computes garbage; valid ones read as before."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellm.config import build_model_config
from edgellm.errors import EdgeLLMError
from edgellm.sources.safetensors_dir import SafetensorsDirSource, SafetensorsFile
from tiny_models import FAMILIES, save_tiny, save_tiny_llava

CLI = [sys.executable, "-m", "edgellm.cli"]
NAN, INF = float("nan"), float("inf")
PHI3_ROPE = FAMILIES["phi3"][2]["rope_parameters"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """family -> a tiny model directory, each written once; tests copy what they change."""
    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny(family, root / family) for family in ("llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3")}


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


def config_of(model: Path) -> dict:
    return json.loads((model / "config.json").read_text())


def copy_model(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def assert_error(call, *needles: str) -> None:
    with pytest.raises(EdgeLLMError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# (family, fields replaced in its config.json, what the error says after "config.json")
WHOLE = "must be a whole number from 1 to"
FINITE = "must be a finite number above 0"
BAD_VALUES = [
    ("llama", {"hidden_size": 0}, f"field 'hidden_size' {WHOLE} 16777216, got 0"),
    ("llama", {"num_attention_heads": "64"}, f"field 'num_attention_heads' {WHOLE} 16384, got '64'"),
    ("llama", {"num_attention_heads": 1e12}, f"field 'num_attention_heads' {WHOLE} 16384, got 1000000000000.0"),
    ("llama", {"num_attention_heads": 10 ** 12}, f"field 'num_attention_heads' {WHOLE} 16384, got 1000000000000"),
    ("llama", {"num_hidden_layers": True}, f"field 'num_hidden_layers' {WHOLE} 16384, got True"),
    ("llama", {"num_hidden_layers": 0}, f"field 'num_hidden_layers' {WHOLE} 16384, got 0"),
    ("llama", {"num_key_value_heads": 0}, f"field 'num_key_value_heads' {WHOLE} 16384, got 0"),
    ("llama", {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("llama", {"vocab_size": 0}, f"field 'vocab_size' {WHOLE} 16777216, got 0"),
    ("llama", {"intermediate_size": 96.0}, f"field 'intermediate_size' {WHOLE} 16777216, got 96.0"),
    ("llama", {"max_position_embeddings": 0}, f"field 'max_position_embeddings' {WHOLE} 16777216, got 0"),
    ("llama", {"max_position_embeddings": -1}, f"field 'max_position_embeddings' {WHOLE} 16777216, got -1"),
    ("llama", {"head_dim": 0}, f"field 'head_dim' {WHOLE} 16777216, got 0"),
    ("llama", {"head_dim": 15}, "the rotary dimension 15 (head_dim x partial_rotary_factor) must be even"),
    ("llama", {"head_dim": None, "num_attention_heads": 3, "num_key_value_heads": 1},
     "hidden_size 64 is not a multiple of num_attention_heads 3"),
    ("llama", {"head_dim": None, "num_attention_heads": 128, "num_key_value_heads": 1},
     "hidden_size 64 is not a multiple of num_attention_heads 128"),
    ("llama", {"rms_norm_eps": NAN}, f"field 'rms_norm_eps' {FINITE}, got nan"),
    ("llama", {"rms_norm_eps": INF}, f"field 'rms_norm_eps' {FINITE}, got inf"),
    ("llama", {"rms_norm_eps": 0}, f"field 'rms_norm_eps' {FINITE}, got 0"),
    ("llama", {"rms_norm_eps": -1e-6}, f"field 'rms_norm_eps' {FINITE}, got -1e-06"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": NAN}}, f"field 'rope_theta' {FINITE}, got nan"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, f"field 'rope_theta' {FINITE}, got 0"),
    ("llama", {"rope_parameters": None, "rope_theta": -INF}, f"field 'rope_theta' {FINITE}, got -inf"),
    ("llama", {"rope_parameters": [1, 2]}, "field 'rope_parameters' must be a JSON object, got [1, 2]"),
    ("llama", {"rope_parameters": "linear"}, "field 'rope_parameters' must be a JSON object, got 'linear'"),
    ("llama", {"rope_parameters": 8.0}, "field 'rope_parameters' must be a JSON object, got 8.0"),
    ("llama", {"rope_parameters": None, "rope_scaling": [["type", "linear"]]}, "field 'rope_scaling' must be a JSON object"),
    ("llama", {"rope_parameters": None, "rope_scaling": "linear"}, "field 'rope_scaling' must be a JSON object"),
    ("llama", {"rope_parameters": None, "rope_scaling": 2}, "field 'rope_scaling' must be a JSON object, got 2"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope scaling type 'yarn' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": ["linear"], "rope_theta": 1e4}},
     "rope scaling type ['linear'] is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "required field 'factor' is missing"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": NAN}},
     f"field 'factor' {FINITE}, got nan"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": INF}}, f"field 'low_freq_factor' {FINITE}, got inf"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "high_freq_factor": 1.0}},
     "high_freq_factor 1.0 must exceed low_freq_factor 1.0"),
    ("llama", {"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": "64"}},
     f"field 'original_max_position_embeddings' {WHOLE} 16777216, got '64'"),
    # what a GGUF's rope_freqs tensor becomes: one divisor per rotary frequency (8 of head_dim 16)
    ("llama", {"rope_parameters": {"rope_type": "freq_factors", "rope_theta": 1e4, "factors": [1.0, 2.0]}},
     "field 'factors' must list 8 finite numbers above 0, got [1.0, 2.0]"),
    ("llama", {"partial_rotary_factor": 0}, f"field 'partial_rotary_factor' {FINITE} and at most 1.0, got 0"),
    ("llama", {"partial_rotary_factor": 2}, f"field 'partial_rotary_factor' {FINITE} and at most 1.0, got 2"),
    ("llama", {"partial_rotary_factor": 0.3125}, "the rotary dimension 5 (head_dim x partial_rotary_factor) must be even"),
    ("llama", {"hidden_act": []}, "field 'hidden_act' must be a string, got []"),
    ("llama", {"tie_word_embeddings": "false"}, "field 'tie_word_embeddings' must be true or false, got 'false'"),
    ("llama", {"model_type": ["llama"]}, "unsupported architecture ['llama']"),
    ("mistral", {"sliding_window": 0}, f"field 'sliding_window' {WHOLE} 16777216, got 0"),
    ("mistral", {"sliding_window": -24}, f"field 'sliding_window' {WHOLE} 16777216, got -24"),
    ("mistral", {"sliding_window": "24"}, f"field 'sliding_window' {WHOLE} 16777216, got '24'"),
    ("mistral", {"num_hidden_layers": "3"}, f"field 'num_hidden_layers' {WHOLE} 16384, got '3'"),
    ("qwen2", {"layer_types": "full_attention"}, "field 'layer_types' must list 3 of"),
    ("qwen2", {"layer_types": 3}, "field 'layer_types' must list 3 of ['full_attention', 'sliding_attention'], got 3"),
    ("qwen2", {"layer_types": [1, 2, 3]}, "field 'layer_types' must list 3 of"),
    ("qwen2", {"layer_types": {"full_attention": 1}}, "field 'layer_types' must list 3 of"),
    ("qwen2", {"layer_types": None, "max_window_layers": "1"}, "field 'max_window_layers' must be a whole number from 0"),
    ("qwen2", {"layer_types": None, "use_sliding_window": "yes"}, "field 'use_sliding_window' must be true or false"),
    ("phi3", {"rope_parameters": {**PHI3_ROPE, "partial_rotary_factor": 0}}, f"field 'partial_rotary_factor' {FINITE}"),
    ("phi3", {"rope_parameters": {**PHI3_ROPE, "short_factor": [1.0, NAN, 2.0, 3.0]}},
     "field 'short_factor' must list 4 finite numbers above 0, got [1.0, nan, 2.0, 3.0]"),
    ("phi3", {"rope_parameters": {**PHI3_ROPE, "long_factor": [2.0]}}, "field 'long_factor' must list 4 finite numbers"),
    ("phi3", {"rope_parameters": {k: v for k, v in PHI3_ROPE.items() if k != "original_max_position_embeddings"},
              "original_max_position_embeddings": None}, "required field 'original_max_position_embeddings' is missing"),
    ("gemma2", {"attn_logit_softcapping": NAN}, f"field 'attn_logit_softcapping' {FINITE}, got nan"),
    ("gemma2", {"final_logit_softcapping": -30.0}, f"field 'final_logit_softcapping' {FINITE}, got -30.0"),
    ("gemma2", {"attn_logit_softcapping": "50"}, f"field 'attn_logit_softcapping' {FINITE}, got '50'"),
    ("gemma3", {"layer_types": 7}, "field 'layer_types' must list 3 of"),
    ("gemma3", {"layer_types": ["sliding_attention"]}, "field 'layer_types' must list 3 of"),
    ("gemma3", {"layer_types": None, "_sliding_window_pattern": 0}, f"field '_sliding_window_pattern' {WHOLE} 16384, got 0"),
    ("gemma3", {"sliding_window": 0}, f"field 'sliding_window' {WHOLE} 16777216, got 0"),
    ("gemma3", {"sliding_window": None}, "sliding-window layers need a 'sliding_window' size"),
    ("gemma3", {"query_pre_attn_scalar": 0}, f"field 'query_pre_attn_scalar' {FINITE}, got 0"),
    ("gemma3", {"rope_parameters": {"full_attention": "x", "sliding_attention": {"rope_theta": 1e4}}},
     "field 'full_attention' must be a JSON object, got 'x'"),
    ("gemma3", {"rope_parameters": None, "rope_theta": 1e6, "rope_local_base_freq": NAN},
     f"field 'rope_local_base_freq' {FINITE}, got nan"),
]


@pytest.mark.parametrize("family,fields,needle", BAD_VALUES, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else None)
def test_a_bad_config_value_is_one_error_naming_the_file_the_field_and_the_value(models, family, fields, needle):
    raw = {**config_of(models[family]), **fields}
    assert_error(lambda: build_model_config(raw, "dir/config.json"), "dir/config.json", needle)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3"])
def test_null_reads_as_an_absent_field(models, family):
    raw = config_of(models[family])
    nulls = {key: None for key in ("num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "rope_scaling",
                                   "max_position_embeddings", "attn_logit_softcapping")}
    assert build_model_config({**raw, **nulls}, "config.json").num_kv_heads == raw["num_attention_heads"]


def test_bad_values_in_config_json_are_one_line_through_the_cli(models, tmp_path):
    """NaN, Infinity and strings as config.json holds them (Python's json reads NaN and Infinity)."""
    for name, fields, needle in (
        ("nan", {"rms_norm_eps": NAN}, "field 'rms_norm_eps' must be a finite number above 0, got nan"),
        ("string", {"num_attention_heads": "64"}, "field 'num_attention_heads' must be a whole number"),
        ("yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope scaling type 'yarn' is not supported"),
    ):
        model = copy_model(models["llama"], tmp_path / name)
        (model / "config.json").write_text(json.dumps({**config_of(model), **fields}))
        assert_one_line_error(run_cli("compile", model, "-o", tmp_path / f"{name}-out", "--target", "cpu"),
                              f"{model / 'config.json'}", needle)


def test_config_json_that_json_cannot_parse_is_one_error(models, tmp_path):
    for name, text in (("deep", "[" * 100_000), ("digits", '{"vocab_size": ' + "9" * 5000 + "}"),
                       ("binary", b"\xff\xfe{")):
        model = copy_model(models["llama"], tmp_path / name)
        if isinstance(text, bytes):
            (model / "config.json").write_bytes(text)
        else:
            (model / "config.json").write_text(text)
        assert_error(lambda: SafetensorsDirSource(model), f"{model / 'config.json'}: malformed JSON")


def test_quantization_config_null_is_no_quantization_and_a_list_is_an_error(models, tmp_path):
    model = copy_model(models["llama"], tmp_path / "m")
    config = config_of(model)
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": None}))
    assert SafetensorsDirSource(model).prequantized is None
    for value, needle in (([], "field 'quantization_config' must be a JSON object, got []"),
                          ({"quant_method": "gptq", "bits": 4.0}, "field 'bits' must be a whole number"),
                          ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "field 'group_size' must be a whole number"),
                          ({"quant_method": "compressed-tensors", "config_groups": ["g"]}, "config_groups"),
                          ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                            "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": "32"}}}},
                           "field 'group_size' must be a whole number")):
        (model / "config.json").write_text(json.dumps({**config, "quantization_config": value}))
        assert_error(lambda: SafetensorsDirSource(model), f"{model / 'config.json'}", needle)


# vision-language configs: the vision and text parts are read by the same field readers
BAD_VISION = [
    (lambda raw: raw["vision_config"].update(num_channels="3"), "config.json (vision_config): field 'num_channels'"),
    (lambda raw: raw["vision_config"].update(layer_norm_eps=NAN), "config.json (vision_config): field 'layer_norm_eps'"),
    (lambda raw: raw["vision_config"].update(hidden_act=[]), "config.json (vision_config): field 'hidden_act' must be a string"),
    (lambda raw: raw["vision_config"].update(num_hidden_layers=0), "config.json (vision_config): field 'num_hidden_layers'"),
    (lambda raw: raw["vision_config"].update(image_size=10 ** 9), "config.json (vision_config): field 'image_size'"),
    (lambda raw: raw["text_config"].update(hidden_size="64"), "config.json (text_config): field 'hidden_size'"),
    (lambda raw: raw["text_config"].update(model_type=[]), "config.json (text_config): field 'model_type' must be a string"),
    (lambda raw: raw["text_config"].update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "config.json (rope of the full layers): rope scaling type 'dynamic' is not supported"),
    (lambda raw: raw.update(image_token_index="95"), "config.json: field 'image_token_index' must be a whole number"),
    (lambda raw: raw.update(image_seq_length="16"), "config.json: field 'image_seq_length' must be a whole number"),
    (lambda raw: raw.update(projector_hidden_act=[]), "config.json: field 'projector_hidden_act' must be a string"),
    (lambda raw: raw.update(vision_feature_layer=True), "config.json: vision_feature_layer True"),
    (lambda raw: raw.update(vision_feature_select_strategy=3), "config.json: field 'vision_feature_select_strategy'"),
]


@pytest.mark.parametrize("edit,needle", BAD_VISION)
def test_a_bad_vision_language_config_value_names_config_json(llava, edit, needle):
    source = SafetensorsDirSource(llava)
    raw = copy.deepcopy(source.raw_config)
    edit(raw)
    assert_error(lambda: build_model_config(raw, str(source.config_path), set(source.tensor_names()), source.image_processor),
                 f"{llava}/{needle}")


def test_a_gemma3_vision_config_whose_text_config_is_not_an_object_is_an_error():
    raw = {"model_type": "gemma3", "text_config": [1], "vision_config": {}}
    assert_error(lambda: build_model_config(raw, "config.json", set(), None),
                 "config.json: field 'text_config' must be a JSON object, got [1]")


# safetensors headers
def write_safetensors(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [
    ([], b"", "the safetensors header must be a JSON object, got []"),
    (5, b"", "the safetensors header must be a JSON object, got 5"),
    ({"w": 5}, bytes(8), "tensor 'w': the header entry must be a JSON object, got 5"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor 'w': unknown dtype None"),
    ({"w": entry(dtype="Q9")}, bytes(8), "tensor 'w': unknown dtype 'Q9'"),
    ({"w": entry(dtype=["F32"])}, bytes(8), "tensor 'w': unknown dtype ['F32']"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "tensor 'w': shape must be a list of whole numbers, got None"),
    ({"w": entry(shape=[-2])}, bytes(8), "tensor 'w': shape must be a list of whole numbers, got [-2]"),
    ({"w": entry(shape=["2"])}, bytes(8), "tensor 'w': shape must be a list of whole numbers"),
    ({"w": entry(shape=[2.0])}, bytes(8), "tensor 'w': shape must be a list of whole numbers"),
    ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "tensor 'w': data_offsets must be two whole numbers 0 <= begin <= end"),
    ({"w": entry(offsets=[0])}, bytes(8), "data_offsets must be two whole numbers 0 <= begin <= end, got [0]"),
    ({"w": entry(offsets=[0, "8"])}, bytes(8), "data_offsets must be two whole numbers"),
    ({"w": entry(offsets=[0.0, 8.0])}, bytes(8), "data_offsets must be two whole numbers"),
    ({"w": entry(offsets=[False, 8])}, bytes(8), "data_offsets must be two whole numbers"),
    ({"w": entry(offsets=[8, 0])}, bytes(8), "data_offsets must be two whole numbers 0 <= begin <= end, got [8, 0]"),
    # negative offsets read the header's own bytes as weights
    ({"w": entry(offsets=[-8, 0])}, bytes(8), "data_offsets must be two whole numbers 0 <= begin <= end, got [-8, 0]"),
    ({"w": entry(shape=[3])}, bytes(8), "tensor 'w': data_offsets [0, 8] span 8 bytes; shape [3] of F32 takes 12"),
    ({"a": entry(), "b": entry(offsets=[4, 12])}, bytes(12), "tensors 'a' and 'b' overlap in the file"),
    ({"a": entry(), "b": entry()}, bytes(8), "tensors 'a' and 'b' overlap in the file"),
    ({"w": entry(offsets=[8, 16])}, bytes(8), "truncated safetensors file"),
]


@pytest.mark.parametrize("header,data,needle", BAD_HEADERS)
def test_a_bad_safetensors_header_is_one_error_naming_the_file(tmp_path, header, data, needle):
    path = write_safetensors(tmp_path / "model.safetensors", header, data)
    assert_error(lambda: SafetensorsFile(path), f"{path}: ", needle)


def test_a_header_length_that_json_cannot_parse_or_that_passes_the_end_is_one_error(tmp_path):
    blob = json.dumps({"w": entry()}).encode()
    for name, header, header_len, needle in (
        ("short", blob, len(blob) - 1, "not a readable safetensors file (Expecting"),
        ("huge", blob, 1 << 62, "not a readable safetensors file (header length beyond end of file)"),
        ("deep", b"[" * 100_000, None, "not a readable safetensors file (maximum recursion depth"),
        ("binary", b"\xff\xfe\x00{", None, "not a readable safetensors file"),
        ("tiny", b"", 0, "not a readable safetensors file"),
    ):
        path = write_safetensors(tmp_path / f"{name}.safetensors", header, bytes(8), header_len)
        assert_error(lambda: SafetensorsFile(path), f"{path}: ", needle)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x01\x02")
    assert_error(lambda: SafetensorsFile(stub), f"{stub}: not a readable safetensors file")


def test_a_valid_header_reads_its_tensors(tmp_path):
    values = np.array([1.5, -2.0], np.float32)
    header = {"__metadata__": {"format": "pt"}, "w": entry(), "empty": entry(shape=[0], offsets=[8, 8]),
              "i": entry(dtype="I8", shape=[2], offsets=[8, 10]), "f8": entry(dtype="F8_E4M3", shape=[1], offsets=[10, 11])}
    path = write_safetensors(tmp_path / "ok.safetensors", header, values.tobytes() + b"\x03\x04\x00")
    st = SafetensorsFile(path)
    assert np.array_equal(st.tensor("w"), values)
    assert st.raw("i").tolist() == [3, 4]
    assert st.tensor("empty").shape == (0,)


def test_negative_offsets_in_a_model_are_refused_not_read_as_weights(models, tmp_path):
    model = copy_model(models["llama"], tmp_path / "m")
    path = model / "model.safetensors"
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [-(end - begin), 0]
    write_safetensors(path, header, blob[8 + header_len :])
    assert_one_line_error(run_cli("compile", model, "-o", tmp_path / "out", "--target", "cpu"),
                          f"{path}: tensor 'model.norm.weight': data_offsets must be two whole numbers")


# shard indexes (model.safetensors.index.json)
@pytest.fixture
def sharded(models, tmp_path) -> Path:
    """The tiny llama with its weights as one shard named by an index, as the hub lays out large models."""
    model = copy_model(models["llama"], tmp_path / "sharded")
    shard = "model-00001-of-00001.safetensors"
    (model / "model.safetensors").rename(model / shard)
    names = SafetensorsFile(model / shard).entries
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return model


def write_index(model: Path, index) -> Path:
    path = model / "model.safetensors.index.json"
    path.write_text(index if isinstance(index, str) else json.dumps(index))
    return path


def first_tensor_to(model: Path, shard: str) -> dict:
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return {"weight_map": {**weight_map, sorted(weight_map)[0]: shard}}


def test_a_sharded_model_reads_and_a_shard_linked_elsewhere_is_followed(sharded, tmp_path):
    source = SafetensorsDirSource(sharded)
    assert "model.norm.weight" in source.tensor_names()
    # the Hugging Face cache links each snapshot file to a blob outside the snapshot directory
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shard = sharded / "model-00001-of-00001.safetensors"
    shard.rename(blob)
    shard.symlink_to(blob)
    assert np.array_equal(SafetensorsDirSource(sharded).tensor("model.norm.weight"), source.tensor("model.norm.weight"))


def test_a_malformed_index_is_one_error_naming_it(sharded):
    for index, needle in (("{not json", "malformed JSON"), ([], "expected a JSON object"),
                          ({}, "'weight_map' must map each tensor name to a shard file name, got None"),
                          ({"weight_map": ["a"]}, "'weight_map' must map each tensor name to a shard file name, got ['a']"),
                          ({"weight_map": {"model.norm.weight": 5}}, "'weight_map' must map each tensor name")):
        path = write_index(sharded, index)
        assert_error(lambda: SafetensorsDirSource(sharded), f"{path}: ", needle)


def test_an_index_may_name_only_regular_files_inside_the_model_directory(sharded, tmp_path):
    index = sharded / "model.safetensors.index.json"
    outside = shutil.copy(sharded / "model-00001-of-00001.safetensors", tmp_path / "outside.safetensors")
    for shard in (str(outside), "../outside.safetensors", "/dev/zero", "sub/../../outside.safetensors"):
        write_index(sharded, first_tensor_to(sharded, shard))
        assert_error(lambda: SafetensorsDirSource(sharded), f"{index}: shard '{shard}' is not a file in the model directory")
    (sharded / "folder.safetensors").mkdir()
    write_index(sharded, first_tensor_to(sharded, "folder.safetensors"))
    assert_error(lambda: SafetensorsDirSource(sharded), f"{sharded / 'folder.safetensors'}: not a regular file")
    (sharded / "zero.safetensors").symlink_to("/dev/zero")
    write_index(sharded, first_tensor_to(sharded, "zero.safetensors"))
    assert_error(lambda: SafetensorsDirSource(sharded), f"{sharded / 'zero.safetensors'}: not a regular file")
    write_index(sharded, first_tensor_to(sharded, "gone.safetensors"))
    assert_error(lambda: SafetensorsDirSource(sharded), f"{sharded / 'gone.safetensors'}: missing")


def test_a_fifo_named_by_the_index_or_found_beside_the_weights_does_not_block(sharded, tmp_path):
    os.mkfifo(sharded / "pipe.safetensors")
    write_index(sharded, first_tensor_to(sharded, "pipe.safetensors"))
    # a child process, so that a read that blocks fails the test instead of hanging it
    assert_one_line_error(run_cli("compile", sharded, "-o", tmp_path / "a", "--target", "cpu"),
                          f"{sharded / 'pipe.safetensors'}: not a regular file")
    (sharded / "model.safetensors.index.json").unlink()
    assert_one_line_error(run_cli("compile", sharded, "-o", tmp_path / "b", "--target", "cpu"),
                          f"{sharded / 'pipe.safetensors'}: not a regular file")


def test_a_tensor_the_index_puts_in_a_shard_that_lacks_it_is_one_error(sharded):
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    path = write_index(sharded, {"weight_map": {**weight_map, "model.ghost.weight": "model-00001-of-00001.safetensors"}})
    assert_error(lambda: SafetensorsDirSource(sharded),
                 f"{path}: tensor 'model.ghost.weight' is in model-00001-of-00001.safetensors by the index, "
                 "but that file does not hold it")


# token ids and special tokens the runtime compares with what it samples
def test_token_ids_and_special_tokens_of_the_wrong_type_are_one_error_naming_the_file(models, tmp_path):
    model = copy_model(models["llama"], tmp_path / "m")
    generation, config = json.loads((model / "generation_config.json").read_text()), config_of(model)
    files = SafetensorsDirSource(model).tokenizer()
    assert (files.bos_token_id, files.eos_token_ids) == (1, [2])
    for file, fields, needle in (
        ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id must be a token id or a list of them, got '2'"),
        ("generation_config.json", {"eos_token_id": [[2]]}, "eos_token_id must be a token id or a list of them, got [[2]]"),
        ("generation_config.json", {"eos_token_id": -1}, "eos_token_id must be a token id"),
        ("generation_config.json", {"bos_token_id": 1.0}, "bos_token_id must be a token id"),
        ("config.json", {"eos_token_id": True}, "eos_token_id must be a token id"),
        ("tokenizer_config.json", {"eos_token": 5}, 'eos_token must be a string or {"content": string}, got 5'),
        ("tokenizer_config.json", {"bos_token": {"content": ["<s>"]}}, "bos_token must be a string"),
        ("tokenizer_config.json", {"add_bos_token": "false"}, "field 'add_bos_token' must be true or false"),
    ):
        shutil.rmtree(model)
        copy_model(models["llama"], model)
        if file == "config.json":  # read from config.json when generation_config.json does not say
            (model / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if k not in fields}))
        original = {"generation_config.json": generation, "config.json": config, "tokenizer_config.json": {}}[file]
        (model / file).write_text(json.dumps({**original, **fields}))
        assert_error(lambda: SafetensorsDirSource(model).tokenizer(), f"{model / file}: ", needle)


@pytest.mark.parametrize("text, needle", [("{not json", "not a tokenizer the tokenizers library reads"),
                                          ('{"model": 5}', "not a tokenizer the tokenizers library reads"),
                                          (b"\xff\xfe{}", "tokenizer.json: not UTF-8 text")])
def test_a_tokenizer_file_the_library_cannot_read_is_one_line_at_compile(models, tmp_path, text, needle):
    model = copy_model(models["llama"], tmp_path / "m")
    path = model / "tokenizer.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(run_cli("compile", model, "-o", tmp_path / "out", "--target", "cpu"), needle)


def test_a_list_of_named_chat_templates_gives_the_default_one(models, tmp_path):
    model = copy_model(models["llama"], tmp_path / "m")
    templates = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": "{{ messages }}"}]
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert SafetensorsDirSource(model).tokenizer().chat_template == "{{ messages }}"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates[:1]}))
    assert_error(lambda: SafetensorsDirSource(model).tokenizer(), "tokenizer_config.json", "none named 'default'")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    assert_error(lambda: SafetensorsDirSource(model).tokenizer(), "tokenizer_config.json", "chat_template must be text")


def test_an_edit_in_place_that_keeps_size_and_mtime_is_seen_by_resume(models, tmp_path):
    model = copy_model(models["llama"], tmp_path / "m")
    before = SafetensorsDirSource(model).fingerprint()
    path = model / "config.json"
    stat = path.stat()
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same modification time
    assert path.stat().st_size == stat.st_size
    assert SafetensorsDirSource(model).fingerprint() != before


def test_an_error_naming_a_file_with_brackets_is_printed_as_it_is(tmp_path):
    odd = tmp_path / "x[/red]y[bold]"
    result = run_cli("generate", odd, "-p", "hi")
    assert_one_line_error(result, f"{odd}: not an edgellm output directory")
