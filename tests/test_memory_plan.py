"""The static memory plan (native target groundwork): sound, and between the bound and no reuse."""

from __future__ import annotations

import itertools

import pytest

from conftest import build
from edgellm.graph.io import load
from edgellm.graph.units import plan_units
from edgellm.targets.link import link
from edgellm.targets.memory_plan import plan_memory
from tiny_models import save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)


def _decode_program(out, layers):
    units = [u for u in plan_units(layers, [32, 64, 96, 128]) if not u.is_group and u.bucket in (0, 32)]
    return link([load(out / "quant" / f"{u.name}.onnx") for u in units], "single", kv_dim="kv_len")


def test_plan_never_overlaps_live_tensors_and_lies_between_bound_and_total(tmp_path):
    out = build(save_tiny("gemma3", tmp_path / "hf"), tmp_path / "out", "int4", keep_intermediates=True, **OPTIONS)
    plan = plan_memory(_decode_program(out, 3), {"kv_len": 64})
    assert len(plan.placements) > 50
    for a, b in itertools.combinations(plan.placements, 2):
        if a.first <= b.last and b.first <= a.last:  # alive at the same time: disjoint bytes
            assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
    assert 0 < plan.lower_bound <= plan.arena <= plan.total
    assert plan.arena < plan.total / 2  # reuse happens: most activations die young
    assert "lower bound" in plan.report()


def test_symbolic_dimensions_need_values(tmp_path):
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", "int4", keep_intermediates=True, **OPTIONS)
    with pytest.raises(ValueError, match="kv_len"):
        plan_memory(_decode_program(out, 3), {})
