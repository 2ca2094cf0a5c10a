"""Tiny random-weight llama and gemma3 models: edgellm's logits and greedy tokens against
transformers, in fp32, across several prefill groups, KV buckets and gemma's sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import edgellm
from conftest import build
from tiny_models import VOCAB, save_tiny

# group 16, bucket 32: a 40-token prompt spans three groups and 40 + 32 tokens cross two bucket
# boundaries; gemma's window of 24 is shorter than the prompt.
OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
TOLERANCE = 1e-4  # max abs logit error, fp32


def reference_logits(model_dir, ids):
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),  # MQA, tied embeddings
    ("llama", {"num_key_value_heads": 4, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),  # MHA, llama3 rope
    ("gemma3", {}),
])
@pytest.mark.parametrize("prompt_len", [40, 7])
def test_logits_and_greedy_match_transformers(tmp_path, fp32_plan, family, overrides, prompt_len):
    model_dir = save_tiny(family, tmp_path / "hf", **overrides)
    out = build(model_dir, tmp_path / "out", fp32_plan, **OPTIONS)
    model = edgellm.load(out)
    prompt = [int(t) for t in np.random.default_rng(prompt_len).integers(1, VOCAB, prompt_len)]
    result = model.generate_ids(prompt, max_new_tokens=32, ignore_eos=True, return_logits=True)
    assert result.gen_tokens == 32
    expected = reference_logits(model_dir, prompt + result.token_ids)
    ours = np.stack(result.logits)
    theirs = expected[prompt_len - 1 : prompt_len - 1 + len(ours)]
    assert np.abs(ours - theirs).max() < TOLERANCE
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


def test_multi_turn_reuses_cache_and_matches_fresh_run(tmp_path, fp32_plan):
    """A second request sharing a prefix with the cache gives the same logits as a fresh run."""
    model_dir = save_tiny("gemma3", tmp_path / "hf")
    model = edgellm.load(build(model_dir, tmp_path / "out", fp32_plan, **OPTIONS))
    first = [int(t) for t in np.random.default_rng(3).integers(1, VOCAB, 30)]
    turn1 = model.generate_ids(first, max_new_tokens=8, ignore_eos=True)
    second = first + turn1.token_ids + [5, 6, 7, 8, 9]
    cached = model.generate_ids(second, max_new_tokens=8, ignore_eos=True, return_logits=True)
    model.reset()
    fresh = model.generate_ids(second, max_new_tokens=8, ignore_eos=True, return_logits=True)
    assert cached.token_ids == fresh.token_ids
    assert np.abs(np.stack(cached.logits) - np.stack(fresh.logits)).max() < TOLERANCE


def test_bf16_weights_are_half_the_size_and_close(tmp_path, fp32_plan):
    model_dir = save_tiny("llama", tmp_path / "hf")
    fp32 = edgellm.load(build(model_dir, tmp_path / "fp32", fp32_plan, **OPTIONS))
    bf16_out = build(model_dir, tmp_path / "bf16", None, **OPTIONS)  # the default plan is BF16
    bf16 = edgellm.load(bf16_out)
    prompt = [int(t) for t in np.random.default_rng(9).integers(1, VOCAB, 20)]
    a = fp32.generate_ids(prompt, max_new_tokens=4, ignore_eos=True, return_logits=True)
    b = bf16.generate_ids(prompt, max_new_tokens=4, ignore_eos=True, return_logits=True)
    def size(out):
        return (out / "compiled" / "cpu" / "weights.bin").stat().st_size

    assert size(bf16_out) < 0.55 * size(tmp_path / "fp32")
    err = np.abs(a.logits[0] - b.logits[0]).max()
    assert 0 < err < 0.05  # bf16 rounding changes the logits, but only a little
