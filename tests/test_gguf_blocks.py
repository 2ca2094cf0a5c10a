"""GGUF block types taken as they are (sources/gguf_blocks.py): each type read bit-exactly against
the gguf package's dequantize; fused projections of unlike types stacked exactly; a GGUF of
K-quants compiled without a plan keeps every type and computes what its float build computes, on
the native target (every instruction set) and on ONNX Runtime."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

import edgellm
from conftest import build
from edgellm.build import Manifest
from edgellm.quant.blocks import concat_rows
from edgellm.sources import gguf_blocks
from edgellm.sources.gguf_blocks import LAYOUTS, read_blocks
from gguf_writer import random_blocks, write_gguf, write_kquant_model
from tiny_models import VOCAB

PROMPT = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 40)]
STEPS = 24
OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("slab", [None, 3], ids=["whole", "slabs-of-3"])
@pytest.mark.parametrize("type_name", sorted(LAYOUTS))
def test_each_type_reads_bit_exactly_as_gguf_dequantizes_it(type_name, slab, monkeypatch):
    """Also read 3 stored blocks at a time (a last slab shorter), as a large tensor is read."""
    if slab is not None:
        monkeypatch.setattr(gguf_blocks, "SLAB", slab)
    raw = random_blocks(8, 512, type_name, np.random.default_rng(1))
    blocks = read_blocks(raw, type_name)
    expected = dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(8, 512)
    assert np.array_equal(_bits(blocks.dequantize()), _bits(expected))
    assert blocks.bits == LAYOUTS[type_name][0] and blocks.origin == f"GGUF {type_name}"


def test_the_real_gemma3_file_reads_bit_exactly(gemma3_gguf):
    reader = gguf.GGUFReader(gemma3_gguf)
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in LAYOUTS or name in seen or t.name.startswith("token_embd"):
            continue
        seen.add(name)
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
        assert np.array_equal(_bits(read_blocks(raw, name).dequantize()), _bits(dequantize(raw, t.tensor_type))), t.name
    assert seen == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q8_0"), ("Q5_0", "Q5_1"), ("Q4_0", "Q6_K", "Q8_0")])
def test_fused_projections_of_unlike_types_stack_exactly(types):
    rng = np.random.default_rng(2)
    parts = [read_blocks(random_blocks(rows, 256, t, rng), t) for rows, t in zip((16, 32, 48), types)]
    fused = concat_rows(parts)
    assert fused is not None and fused.bits == max(p.bits for p in parts)
    expected = np.concatenate([p.dequantize() for p in parts])
    assert np.array_equal(fused.dequantize(), expected)  # equal values (a zero may change its sign)


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    return write_kquant_model(tmp_path_factory.mktemp("kquants"))


@pytest.fixture(scope="module")
def float_build(kquant_gguf, tmp_path_factory, fp32_plan):
    """The same GGUF dequantized by the gguf package (FP32 plan), on ONNX Runtime: the reference."""
    return build(kquant_gguf, tmp_path_factory.mktemp("fp32") / "out", fp32_plan, **OPTIONS)


def _generate(out):
    return edgellm.load(out).generate_ids(PROMPT, max_new_tokens=STEPS, ignore_eos=True, return_logits=True)


@pytest.mark.parametrize("target", ["native", "cpu"])
def test_a_gguf_without_a_plan_keeps_its_types_and_computes_its_float_build(kquant_gguf, float_build, tmp_path, target):
    out = build(kquant_gguf, tmp_path / "out", None, target=target, **OPTIONS)
    log = Manifest.open(out / "manifest.json", fresh=False).weight_report()
    for stored in ("GGUF Q4_K+GGUF Q6_K mapped exactly", "GGUF Q5_K mapped exactly", "GGUF Q5_0+GGUF Q5_1 mapped exactly",
                   "GGUF Q5_0+GGUF Q8_0 mapped exactly", "GGUF Q4_1 mapped exactly"):
        assert stored in log, stored
    expected = _generate(float_build)
    result = _generate(out)
    ours, theirs = np.stack(result.logits), np.stack(expected.logits)
    # float activations on native: the float build's sums in another order. ONNX Runtime runs the
    # 5-, 6- and 8-bit weights as MatMulNBits bits=8, with int8 activations (targets/ort_lowering.py;
    # 1.6% measured on these random weights)
    tolerance = 1e-4 if target == "native" else 3e-2
    assert np.abs(ours - theirs).max() < tolerance * np.abs(theirs).max()
    if target == "native":
        assert result.token_ids == expected.token_ids


def test_int8_activations_on_gguf_types_stay_close_to_the_float_build(kquant_gguf, float_build, tmp_path):
    """Activations quantized to int8 per block (the kernels' integer dot products on 4-, 5-, 6- and
    8-bit values, factored scales and minimums): about 1% of the largest logit on these random
    weights (0.9% measured); a misread weight costs far more."""
    out = build(kquant_gguf, tmp_path / "out", None, target="native", int8_activations=True, **OPTIONS)
    ours, theirs = np.stack(_generate(out).logits), np.stack(_generate(float_build).logits)
    assert np.abs(ours - theirs).max() < 2e-2 * np.abs(theirs).max()


def test_types_a_gguf_cannot_keep_are_converted_and_said_so(tmp_path):
    """Without a plan, an IQ type becomes int4 and an F16 tensor bfloat16 (never float32 at twice
    or eight times the file's size), and the compile log names both."""
    from gguf_writer import KQUANT_SHAPE
    from tiny_models import save_tiny

    types = {"blk.0.attn_output.weight": "IQ4_NL", "blk.1.attn_output.weight": "F16", "blk.0.ffn_down.weight": "Q6_K"}
    model = write_gguf(save_tiny("llama", tmp_path / "hf", **KQUANT_SHAPE), tmp_path / "mixed.gguf", "llama", types)
    out = build(model, tmp_path / "out", None, target="native", **OPTIONS)
    report = Manifest.open(out / "manifest.json", fresh=False).weight_report()
    assert report.get("GGUF IQ4_NL converted to int4") == 1 and report.get("GGUF F16 as bfloat16") == 1, report
    assert report.get("GGUF Q6_K mapped exactly") == 1 and report.get("float32"), report
    assert len(_generate(out).token_ids) == STEPS
