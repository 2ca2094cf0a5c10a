"""Pre-quantized checkpoints (compressed-tensors pack-quantized, AutoGPTQ with act-order, AutoAWQ)
run as they are: the weights edgellm reads equal what the format's own reader (or an independent
packer written here) says, and the compiled model matches transformers on those weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import edgellm
from conftest import build
from edgellm.errors import EdgeLLMError
from edgellm.quant.export import export_compressed_tensors
from edgellm.sources.safetensors_dir import SafetensorsDirSource
from tiny_models import VOCAB, round_embeddings_to_bf16, save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plan(tmp_path: Path, precision: str) -> Path:
    path = tmp_path / f"{precision}.json"
    path.write_text(json.dumps({"default": {"precision": precision}}))
    return path


def _weights_report(out: Path) -> set[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {how for key, e in manifest["units"].items() if key.startswith("quantize:")
            for w, how in e.get("weights", {}).items() if w.startswith("layer")}


def _compare_with(reference, out: Path, tolerance: float):
    round_embeddings_to_bf16(reference)  # the build keeps them float, stored as bfloat16
    prompt = [int(t) for t in np.random.default_rng(12).integers(1, VOCAB, 40)]
    result = edgellm.load(out).generate_ids(prompt, max_new_tokens=32, ignore_eos=True, return_logits=True)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt + result.token_ids])).logits[0].numpy()
    theirs = expected[len(prompt) - 1 : len(prompt) - 1 + 32]
    assert np.abs(np.stack(result.logits) - theirs).max() < tolerance
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


@pytest.mark.parametrize("bits,symmetric,group,precision,tolerance,target", [
    (4, True, 32, "A_BF16_W_INT4", 1e-4, "cpu"),
    (4, False, 32, "A_BF16_W_INT4", 1e-4, "cpu"),
    # zero points make minimums (-scale x zero point) float16 cannot hold: the native target keeps them in float32
    (4, False, 32, "A_BF16_W_INT4", 1e-4, "native"),
    (8, True, 32, "A_BF16_W_INT8", 0.05, "cpu"),  # int8 weights run with int8 activations (targets/ort_lowering.py)
])
def test_compressed_tensors_checkpoint_runs_as_the_library_decompresses_it(tmp_path, bits, symmetric, group, precision, tolerance,
                                                                          target):
    hf = save_tiny("llama", tmp_path / "hf")
    ct = export_compressed_tensors(hf, tmp_path / "ct", bits=bits, group_size=group, symmetric=symmetric)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        ct, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    state = reference.state_dict()
    source = SafetensorsDirSource(ct)
    linear = [n for n in state if n.split(".")[-2] in LINEAR]
    assert len(linear) == 7 * 3
    for name in linear:  # the compressed-tensors library's decompression, bit for bit
        assert np.array_equal(source.tensor(name), state[name].numpy()), name
    out = build(ct, tmp_path / "out", _plan(tmp_path, precision), target=target, **OPTIONS)
    assert _weights_report(out) == {"compressed-tensors mapped exactly"}
    _compare_with(reference, out, tolerance)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] -> int32 [K*bits/32, N]: AutoGPTQ's qweight, rows packed from the low bits."""
    per = 32 // bits
    words = np.zeros((values.shape[0] // per, values.shape[1]), np.uint32)
    for j in range(per):
        words |= values[j::per].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def _pack_cols(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[R, N] -> int32 [R, N*bits/32], columns packed from the low bits, optionally interleaved."""
    per = 32 // bits
    order = np.arange(per) if order is None else order
    words = np.zeros((values.shape[0], values.shape[1] // per), np.uint32)
    for p in range(per):
        words |= values[:, order[p]::per].astype(np.uint32) << np.uint32(bits * p)
    return words.view(np.int32)


def _group_quantize(w: np.ndarray, groups: np.ndarray, n_groups: int, bits: int):
    """Asymmetric per-(group, output) quantization of w [N, K]; groups[k] is column k's group.
    Returns q [K, N], scale [G, N] (fp16, as the checkpoints store it), zero [G, N]."""
    levels = (1 << bits) - 1
    n, k = w.shape
    scale = np.zeros((n_groups, n), np.float16)
    zero = np.zeros((n_groups, n), np.uint8)
    q = np.zeros((k, n), np.uint8)
    for g in range(n_groups):
        cols = np.flatnonzero(groups == g)
        lo, hi = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        s = ((hi - lo) / levels).astype(np.float16)
        z = np.clip(np.rint(-lo / s.astype(np.float32)), 0, levels).astype(np.uint8)
        scale[g], zero[g] = s, z
        q[cols] = np.clip(np.rint(w[:, cols] / s.astype(np.float32)[:, None]) + z[:, None], 0, levels).T
    return q, scale, zero


def _write_prequantized(hf: Path, out: Path, method: str, bits: int = 4, group: int = 32) -> dict[str, np.ndarray]:
    """A GPTQ (act-order, v1 zero - 1 format) or AWQ (GEMM) checkpoint of the tiny model; returns the
    dequantized weights it encodes, computed here from the integers."""
    from safetensors.numpy import save_file

    source = SafetensorsDirSource(hf)
    rng = np.random.default_rng(3)
    tensors, expected, orders = {}, {}, {}
    for name in source.tensor_names():
        w = source.tensor(name)
        if name.split(".")[-2] not in LINEAR:
            tensors[name] = w
            continue
        prefix, k = name[: -len(".weight")], w.shape[1]
        n_groups = k // group
        if method == "gptq":  # act-order: groups follow a permutation of the input columns, which
            # GPTQ derives from the input, so weights reading the same input share it
            shared_input = prefix.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            g_idx = np.empty(k, np.int32)
            g_idx[orders.setdefault(shared_input, rng.permutation(k))] = np.arange(k) // group
        else:
            g_idx = (np.arange(k) // group).astype(np.int32)
        q, scale, zero = _group_quantize(w, g_idx, n_groups, bits)
        expected[name] = ((q.astype(np.float32) - zero[g_idx].astype(np.float32)) * scale[g_idx].astype(np.float32)).T
        tensors[f"{prefix}.scales"] = scale
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = _pack_rows(q, bits)
            tensors[f"{prefix}.qzeros"] = _pack_cols(((zero.astype(np.int16) - 1) & ((1 << bits) - 1)).astype(np.uint8), bits)
            tensors[f"{prefix}.g_idx"] = g_idx
        else:
            awq_order = np.array([0, 2, 4, 6, 1, 3, 5, 7])
            tensors[f"{prefix}.qweight"] = _pack_cols(q, bits, awq_order)
            tensors[f"{prefix}.qzeros"] = _pack_cols(zero, bits, awq_order)
    out.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = dict(source.raw_config)
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": True, "sym": False}
        if method == "gptq" else {"quant_method": "awq", "bits": bits, "group_size": group, "version": "gemm", "zero_point": True})
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(hf / "tokenizer.json", out / "tokenizer.json")
    return expected


@pytest.mark.parametrize("method,origin", [("gptq", "GPTQ"), ("awq", "AWQ")])
def test_autogptq_and_autoawq_layouts_run_as_they_are(tmp_path, method, origin):
    hf = save_tiny("llama", tmp_path / "hf")
    expected = _write_prequantized(hf, tmp_path / method, method)
    source = SafetensorsDirSource(tmp_path / method)
    for name, w in expected.items():
        assert np.array_equal(source.tensor(name), w), name
    if method == "gptq":  # act-order really reorders the columns
        assert source.packed("model.layers.0.self_attn.q_proj.weight").order is not None
    out = build(tmp_path / method, tmp_path / "out", _plan(tmp_path, "A_BF16_W_INT4"), **OPTIONS)
    assert _weights_report(out) == {f"{origin} mapped exactly"}
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in expected:
                p.copy_(torch.from_numpy(expected[name]))
    _compare_with(reference, out, 1e-4)


def test_unsupported_quantization_method_names_the_file(tmp_path):
    hf = save_tiny("llama", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match=r"config.json: quantization method 'bitsandbytes' is not supported"):
        build(hf, tmp_path / "out", **OPTIONS)
