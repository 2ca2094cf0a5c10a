"""Real weights: SmolLM2-135M (GGUF Q4_1) and Gemma 3 270M (GGUF Q4_K_M) against transformers
running the same GGUF dequantized to fp32."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from conftest import build
from edgellm.reference import transformers_greedy

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_gguf, fp32_plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "out"
    return build(smollm2_gguf, out, fp32_plan, max_num_tokens=256, language_group_size=32, future_token_mask_size=64, jobs=2)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_gguf, smollm2_fp32):
    model = edgellm.load(smollm2_fp32)
    ids = model.codec.encode(PROMPT)
    result = model.generate_ids(ids, max_new_tokens=32, ignore_eos=True)
    assert result.token_ids == transformers_greedy(smollm2_gguf, ids, 32)


@pytest.mark.slow
def test_smollm2_chat_answers(smollm2_fp32):
    model = edgellm.load(smollm2_fp32)
    first = model.chat("What is the capital of France? Answer in one word.", max_new_tokens=16)
    assert "Paris" in first.text
    assert first.finish_reason == "eos"
    second = model.chat("And of Italy?", max_new_tokens=16)
    assert "Rome" in second.text


@pytest.mark.slow
def test_gemma3_greedy_equals_transformers(gemma3_gguf, fp32_plan, tmp_path):
    out = build(gemma3_gguf, tmp_path / "out", fp32_plan, max_num_tokens=128, language_group_size=32, future_token_mask_size=64, jobs=2)
    model = edgellm.load(out)
    ids = model.codec.encode(PROMPT)
    result = model.generate_ids(ids, max_new_tokens=32, ignore_eos=True)
    assert result.token_ids == transformers_greedy(gemma3_gguf, ids, 32)
