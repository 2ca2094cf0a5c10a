"""Every supported family on a tiny random model built from its transformers config class:
prefill and 32 decode steps against transformers, in fp32, int4 and int8; bad configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import edgellm
from conftest import build
from edgellm.errors import EdgeLLMError
from tiny_models import VOCAB, reference_with_stored_weights, save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"]
PROMPT = [int(t) for t in np.random.default_rng(21).integers(1, VOCAB, 40)]  # longer than the windows (24)


def _run(out, reference, tolerance):
    result = edgellm.load(out).generate_ids(PROMPT, max_new_tokens=32, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT + result.token_ids])).logits[0].numpy()
    theirs = expected[len(PROMPT) - 1 : len(PROMPT) - 1 + 32]
    ours = np.stack(result.logits)
    err = np.abs(ours - theirs).max()
    assert err < tolerance, f"max abs logit error {err}"
    return result, theirs, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_transformers(tmp_path, fp32_plan, family):
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan, **OPTIONS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result, theirs, _ = _run(out, reference, 1e-4)
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


# int4 runs with float activations (only summation order differs from the reference); int8 weights
# run with int8 activations on the cpu target, so logits move by up to a few hundredths.
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset,bits,tolerance", [("int4", 4, 1e-4), ("int8", 8, 0.05)])
def test_integer_weights_match_transformers_on_the_same_weights(tmp_path, family, preset, bits, tolerance):
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", preset, **OPTIONS)
    result, theirs, _ = _run(out, reference_with_stored_weights(model_dir, bits), tolerance)
    if bits == 4:
        assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_is_masked(tmp_path, fp32_plan, family):
    """The same weights attending over the whole prompt give other logits, so matching
    transformers (test above) is only possible with the window applied."""
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan, **OPTIONS)
    assert "sliding" in json.loads((out / "model_config.json").read_text())["layer_types"]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config.sliding_window = 4096  # longer than the prompt: no window in effect
    for key, value in (("use_sliding_window", False), ("layer_types", ["full_attention"] * 3)):
        if hasattr(config, key):
            setattr(config, key, value)
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()
    result = edgellm.load(out).generate_ids(PROMPT, max_new_tokens=1, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        full = unwindowed(torch.tensor([PROMPT])).logits[0, -1].numpy()
    assert np.abs(result.logits[0] - full).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_required_field_names_field_and_file(tmp_path, family):
    model_dir = save_tiny(family, tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    del config["hidden_size"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match=r"config.json: required field 'hidden_size' is missing"):
        build(model_dir, tmp_path / "out", **OPTIONS)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_contradicting_the_weights_names_fields_and_tensor(tmp_path, family):
    model_dir = save_tiny(family, tmp_path / "hf")
    config = json.loads((model_dir / "config.json").read_text())
    config["num_attention_heads"] = 8  # x head_dim no longer matches q_proj's rows
    config.setdefault("head_dim", 16)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError) as info:
        build(model_dir, tmp_path / "out", **OPTIONS)
    message = str(info.value)
    assert "config.json: num_attention_heads 8 x head_dim 16" in message
    assert re.search(r"self_attn\.(q|qkv|o)_proj\.weight has shape \(\d+, \d+\)", message), message


def test_inspect_prints_config_tensors_and_units_without_compiling(tmp_path):
    model_dir = save_tiny("qwen3", tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "inspect", str(model_dir), "-c", "int4"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"family": "qwen3"' in out and '"qk_norm": true' in out
    assert "model.layers.0.self_attn.q_norm.weight" in out and "(16,)" in out
    assert "A_BF16_W_INT4" in out
    assert not any(model_dir.parent.glob("**/manifest.json"))


def test_longrope_tables_follow_transformers_on_both_sides_of_the_original_context():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgellm.config import build_model_config
    from edgellm.graph.rope import inverse_frequencies
    from tiny_models import COMMON
    from tiny_models import FAMILIES as TINY

    hf_config = transformers.Phi3Config(**{**COMMON, **TINY["phi3"][2]})
    raw = {**json.loads(hf_config.to_json_string()), "model_type": "phi3"}
    rope = build_model_config(raw, "config.json").ropes["full"]
    original = hf_config.rope_parameters["original_max_position_embeddings"]
    for context, seq_len in ((original, original), (2 * original, original + 1)):
        theirs, theirs_scale = ROPE_INIT_FUNCTIONS["longrope"](hf_config, None, seq_len=seq_len)
        ours, ours_scale = inverse_frequencies(rope, context)
        assert np.allclose(ours, theirs.numpy(), rtol=1e-6) and abs(ours_scale - theirs_scale) < 1e-6


# GGUF files of the same tiny models, as llama.cpp lays them out (tests/gguf_writer.py). GGUF cannot
# say which layers slide beyond llama.cpp's fixed patterns, so gemma3 uses its pattern here and
# qwen2 no window.
LLAMA3_ROPE = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
GGUF_CASES = [("llama", "llama", {}), ("llama", "llama", LLAMA3_ROPE), ("qwen2", "qwen2", {"use_sliding_window": False}),
              ("qwen3", "qwen3", {}),
              ("phi3", "phi3", {}), ("gemma", "gemma", {}), ("gemma2", "gemma2", {}),
              ("gemma3", "gemma3", {"layer_types": ["sliding_attention"] * 3})]
CONFIG_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size",
                 "layer_types", "sliding_window", "attention_scale", "qk_norm", "attention_bias",
                 "attn_logit_softcap", "final_logit_softcap", "tie_word_embeddings", "norm_weight_offset",
                 "embedding_scale", "activation")


@pytest.mark.parametrize("family,arch,overrides", GGUF_CASES)
def test_gguf_of_the_family_gives_the_same_config_weights_and_tokens(tmp_path, fp32_plan, family, arch, overrides):
    from edgellm.config import build_model_config
    from edgellm.graph.rope import rope_tables
    from edgellm.sources.gguf_file import GGUFSource
    from edgellm.sources.safetensors_dir import SafetensorsDirSource
    from gguf_writer import write_gguf

    model_dir = save_tiny(family, tmp_path / "hf", **overrides)
    path = write_gguf(model_dir, tmp_path / "tiny.gguf", arch)
    hf, gg = SafetensorsDirSource(model_dir), GGUFSource(path)
    hf_cfg, gg_cfg = (build_model_config(s.raw_config, "x") for s in (hf, gg))
    for field in CONFIG_FIELDS:
        assert getattr(gg_cfg, field) == pytest.approx(getattr(hf_cfg, field)), field
    for kind in set(hf_cfg.layer_types):  # the rope tables the layers use
        for ours, theirs in zip(rope_tables(gg_cfg.ropes[kind], 128), rope_tables(hf_cfg.ropes[kind], 128)):
            # GGUF keeps llama3 scaling as per-frequency divisors: float32 rounding apart, the same
            assert np.allclose(ours, theirs, rtol=0, atol=1e-5), kind
    for role in hf_cfg.layer_tensors:
        ours, theirs = gg.tensor(gg_cfg.tensor_name(role, 1)), hf.tensor(hf_cfg.tensor_name(role, 1))
        if family.startswith("gemma") and role.endswith("norm"):  # stored as 1 + w: float32 rounding
            assert np.allclose(ours, theirs, rtol=0, atol=1e-6), role
        else:
            assert np.array_equal(ours, theirs), role
    out = build(path, tmp_path / "out", fp32_plan, **OPTIONS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result, theirs, _ = _run(out, reference, 1e-4)
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]
