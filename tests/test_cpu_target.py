"""The cpu target's program layouts: two programs, or one shared program (filter sharing)."""

from __future__ import annotations

import json
import logging

import numpy as np

import edgellm
from conftest import build
from tiny_models import VOCAB, save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)


def _plan(tmp_path, body: dict):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(body))
    return path


def test_filter_sharing_runs_prefill_and_decode_from_one_program(tmp_path):
    model_dir = save_tiny("gemma3", tmp_path / "hf")
    plan = _plan(tmp_path, {"default": {"precision": "A_BF16_W_INT4"}})
    two = build(model_dir, tmp_path / "two", plan, **OPTIONS)
    one = build(model_dir, tmp_path / "one", plan, enable_filter_sharing=True, **OPTIONS)
    assert sorted(p.name for p in (one / "compiled" / "cpu").iterdir()) == ["shared.onnx", "weights.bin"]
    assert sorted(p.name for p in (two / "compiled" / "cpu").iterdir()) == ["group.onnx", "single.onnx", "weights.bin"]
    prompt = [int(t) for t in np.random.default_rng(4).integers(1, VOCAB, 40)]
    a = edgellm.load(two).generate_ids(prompt, max_new_tokens=24, ignore_eos=True, return_logits=True)
    b = edgellm.load(one).generate_ids(prompt, max_new_tokens=24, ignore_eos=True, return_logits=True)
    assert a.token_ids == b.token_ids
    assert np.abs(np.stack(a.logits) - np.stack(b.logits)).max() < 1e-5


def test_filter_sharing_with_differing_precisions_keeps_two_programs(tmp_path, caplog):
    model_dir = save_tiny("llama", tmp_path / "hf")
    plan = _plan(tmp_path, {"default": {"precision": "A_BF16_W_INT4"},
                            "rules": [{"match": {"is_group": True, "index": 1}, "set": {"precision": "A_BF16_W_INT8"}}]})
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        out = build(model_dir, tmp_path / "out", plan, enable_filter_sharing=True, **OPTIONS)
    assert "layers [1] differ" in caplog.text
    assert (out / "compiled" / "cpu" / "group.onnx").is_file() and not (out / "compiled" / "cpu" / "shared.onnx").exists()


def test_a_group_call_returns_the_rows_asked_for(tmp_path, fp32_plan):
    """Prefill's rows (any suffix of a call's rows) equal what one decode step per token computes."""
    model = edgellm.load(build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", fp32_plan, **OPTIONS))
    prompt = [int(t) for t in np.random.default_rng(6).integers(1, VOCAB, 37)]  # two groups and a short one
    rows = model.engine.open_session().prompt_logits(prompt)
    assert rows.shape == (37, VOCAB)
    one_by_one = model.engine.open_session()
    assert np.abs(rows - np.stack([one_by_one.decode(t, p) for p, t in enumerate(prompt)])).max() < 1e-4
