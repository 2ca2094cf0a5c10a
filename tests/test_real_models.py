"""Real weights: SmolLM2-135M (GGUF Q4_1) and Gemma 3 270M (GGUF Q4_K_M) against transformers
running the same GGUF dequantized to fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgellm
from conftest import MODEL_CACHE, build
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


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_gguf, tmp_path_factory):
    plan = tmp_path_factory.mktemp("plan") / "int4.json"
    plan.write_text('{"default": {"precision": "A_BF16_W_INT4"}}')
    out = tmp_path_factory.mktemp("smollm2_int4") / "out"
    return build(smollm2_gguf, out, plan, max_num_tokens=256, language_group_size=32, future_token_mask_size=64, jobs=2)


@pytest.mark.slow
def test_smollm2_native_target_equals_the_onnx_runtime_target(smollm2_gguf, smollm2_int4, tmp_path):
    """Same int4 build (Q4_1 blocks as they are, bf16 embeddings), float activations on both
    targets: 64 greedy tokens identical, logits within 1e-3 of the largest."""
    plan = tmp_path / "int4.json"
    plan.write_text('{"default": {"precision": "A_BF16_W_INT4"}}')
    native = build(smollm2_gguf, tmp_path / "native", plan, target="native", max_num_tokens=256, language_group_size=32,
                   future_token_mask_size=64, jobs=2)
    runs = []
    for out in (native, smollm2_int4):
        model = edgellm.load(out)
        runs.append(model.generate_ids(model.codec.encode(PROMPT), max_new_tokens=64, ignore_eos=True, return_logits=True))
    assert runs[0].token_ids == runs[1].token_ids
    ours, theirs = np.stack(runs[0].logits), np.stack(runs[1].logits)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


@pytest.mark.slow
def test_smollm2_q4_1_blocks_run_as_they_are(smollm2_gguf, smollm2_int4, smollm2_fp32):
    """Every Q4_1 layer weight is taken without re-quantization, so the int4 build computes what
    the float build of the same GGUF computes: same greedy tokens as transformers, logits within
    bfloat16 rounding of the (float) embedding table."""
    manifest = json.loads((smollm2_int4 / "manifest.json").read_text())
    stored = {}
    for key, entry in manifest["units"].items():
        if key.startswith("quantize:"):
            stored.update(entry.get("weights", {}))
    layer_weights = {w: how for w, how in stored.items() if w.startswith("layer")}
    # q/k/v and gate/up are fused into one matmul each: 4 weights per layer
    assert len(layer_weights) == 30 * 4 and set(layer_weights.values()) == {"GGUF Q4_1 mapped exactly"}
    ids = edgellm.load(smollm2_int4).codec.encode(PROMPT)
    int4 = edgellm.load(smollm2_int4).generate_ids(ids, max_new_tokens=32, ignore_eos=True, return_logits=True)
    fp32 = edgellm.load(smollm2_fp32).generate_ids(ids, max_new_tokens=32, ignore_eos=True, return_logits=True)
    assert int4.token_ids == transformers_greedy(smollm2_gguf, ids, 32)
    err = np.abs(np.stack(int4.logits) - np.stack(fp32.logits)).max()
    assert err < 0.1, err


@pytest.mark.slow
def test_smollm2_compressed_tensors_int4_runs_as_the_library_decompresses_it(smollm2_gguf, tmp_path):
    """SmolLM2 quantized by edgellm's compressed-tensors writer (int4, groups of 32): the compiled
    model gives the greedy tokens of transformers running the library's decompression."""
    import torch
    import transformers

    from edgellm.quant.export import export_compressed_tensors
    from edgellm.reference import hf_dir_from_gguf
    from tiny_models import round_embeddings_to_bf16

    hf = hf_dir_from_gguf(smollm2_gguf, MODEL_CACHE / "SmolLM2-135M-Instruct.Q4_1-hf")
    ct = export_compressed_tensors(hf, tmp_path / "ct", bits=4, group_size=32)
    out = build(ct, tmp_path / "out", "int4", max_num_tokens=256, language_group_size=32, future_token_mask_size=64, jobs=2)
    model = edgellm.load(out)
    ids = model.codec.encode(PROMPT)
    ours = model.generate_ids(ids, max_new_tokens=32, ignore_eos=True).token_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        ct, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval()
    round_embeddings_to_bf16(reference)  # the build stores the (float) embedding table as bfloat16
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(ids):]
    assert ours == theirs.tolist()
