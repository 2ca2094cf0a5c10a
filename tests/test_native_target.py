"""The native target: generated C against transformers and against the ONNX Runtime target, the
standalone program, other instruction sets (portable C, AVX2, aarch64 under qemu), bad input."""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import edgellm
from conftest import build
from edgellm.errors import EdgeLLMError
from edgellm.quant.blocks import quantize
from edgellm.quant.codebooks import quantize_codebooks
from edgellm.runtime.native import NativeEngine
from edgellm.targets import native as native_target
from edgellm.targets.native import codegen
from edgellm.targets.native.codegen import plan_arena
from edgellm.targets.native.lower import Lowering
from edgellm.targets.native.toolchain import KERNELS, TOOLCHAINS, Toolchain, build_programs
from tiny_models import (
    VOCAB,
    bf16_build_reference,
    decode_logits,
    reference_with_stored_weights,
    round_embeddings_to_bf16,
    save_tiny,
)

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
PROMPT = [int(t) for t in np.random.default_rng(21).integers(1, VOCAB, 40)]  # longer than the windows (24)
STEPS = 32
# every codebook width in one model: CB4 before the cache, CB3 after it, CB2 in layer 1
CODEBOOKS = ('{"default": {"precision": "A_BF16_W_CB4"}, "rules": [{"match": {"part": "POST"}, "set": {"precision": '
             '"A_BF16_W_CB3"}}, {"match": {"index": 1}, "set": {"precision": "A_BF16_W_CB2"}}]}')


def _generate(out):
    return edgellm.load(out).generate_ids(PROMPT, max_new_tokens=STEPS, ignore_eos=True, return_logits=True)


def _reference_logits(reference, tokens):
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT + tokens])).logits[0].numpy()
    return logits[len(PROMPT) - 1 : len(PROMPT) - 1 + STEPS]


# Float activations: the native program computes what the IR says, so it meets transformers on
# the same (dequantized) weights as closely as fp32 summation order allows, at every precision.
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["fp32", "int4", "int8"])
def test_native_matches_transformers_on_the_same_weights(tmp_path, fp32_plan, family, preset):
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan if preset == "fp32" else preset, target="native", **OPTIONS)
    assert (out / "compiled" / "native" / "libmodel.so").is_file()
    if preset == "fp32":
        reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    else:
        reference = reference_with_stored_weights(model_dir, int(preset[-1]))
    result = _generate(out)
    theirs = _reference_logits(reference, result.token_ids)
    err = np.abs(np.stack(result.logits) - theirs).max()
    assert err < 1e-4, f"max abs logit error {err}"
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


def test_a_long_prefill_of_integer_weights_in_many_ranges_matches_transformers(tmp_path, monkeypatch):
    """A 45-row prefill call of int4 weights with float activations: on AMX tiles (a pass of 32
    rows with two row tiles, then one of 13 with one, and the matmuls cut into ranges of one block
    by a small EM_TILE_RANGE_BYTES, each range adding to the outputs); without AMX, the float
    panels' blocks of 8 rows and the 5 left over."""
    defines = native_target.toolchain.kernel_defines
    monkeypatch.setattr(native_target.toolchain, "kernel_defines",
                        lambda program: [*defines(program), "-DEM_TILE_RANGE_BYTES=12288"])
    model_dir = save_tiny("llama", tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", "int4", target="native", max_num_tokens=128, language_group_size=64,
                future_token_mask_size=32)
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 45)]
    result = edgellm.load(out).generate_ids(prompt, max_new_tokens=4, ignore_eos=True, return_logits=True)
    reference = reference_with_stored_weights(model_dir, 4)
    with torch.no_grad():
        theirs = reference(torch.tensor([prompt + result.token_ids])).logits[0].numpy()[len(prompt) - 1 : len(prompt) + 3]
    err = np.abs(np.stack(result.logits) - theirs).max()
    assert err < 1e-4, f"max abs logit error {err}"
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("variant", ["asymmetric", "block16"])
def test_native_minimums_and_small_blocks_match_transformers(tmp_path, family, variant):
    """Blocks with float16 minimums (--asymmetric); int4 blocks of 16."""
    model_dir = save_tiny(family, tmp_path / "hf")
    options = {"asymmetric": True} if variant == "asymmetric" else {"block_size": 16}
    out = build(model_dir, tmp_path / "out", "int4", target="native", **OPTIONS, **options)
    if variant == "asymmetric":
        reference = reference_with_stored_weights(model_dir, 4, "minimum")
    else:
        reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(torch.from_numpy(quantize(p.numpy(), 4, 16).dequantize()))
        round_embeddings_to_bf16(reference)
    result = _generate(out)
    err = np.abs(np.stack(result.logits) - _reference_logits(reference, result.token_ids)).max()
    assert err < 1e-4, f"max abs logit error {err}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_codebook_precisions_match_transformers_on_both_targets(tmp_path, family, bits):
    model_dir = save_tiny(family, tmp_path / "hf")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": {"precision": f"A_BF16_W_CB{bits}"}}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(quantize_codebooks(p.numpy(), bits).dequantize()))
    round_embeddings_to_bf16(reference)
    for target in ("cpu", "native"):
        result = _generate(build(model_dir, tmp_path / target, plan, target=target, **OPTIONS))
        err = np.abs(np.stack(result.logits) - _reference_logits(reference, result.token_ids)).max()
        assert err < 1e-4, f"{target}: max abs logit error {err}"


# Int8 activations: the kernels quantize each activation block as ONNX Runtime's MatMulNBits
# does at accuracy level 4 (scale max|x| / 127, round to nearest even), so the two targets agree
# closely; the tolerance is relative to the largest logit.
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("preset", ["int4", "int8"])
def test_int8_activations_match_the_onnx_runtime_target(tmp_path, family, preset):
    model_dir = save_tiny(family, tmp_path / "hf")
    results = {}
    for target in ("cpu", "native"):
        out = build(model_dir, tmp_path / target, preset, target=target, int8_activations=True, **OPTIONS)
        results[target] = _generate(out)
    ours, theirs = np.stack(results["native"].logits), np.stack(results["cpu"].logits)
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative < 5e-3, f"relative logit difference {relative}"
    assert results["native"].token_ids[:8] == results["cpu"].token_ids[:8]


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("mistral", {"sliding_window": 100}),  # a 100-position window spans two chunks
    ("qwen3", {"num_attention_heads": 28, "num_key_value_heads": 1}),  # more query heads than one item takes (24)
], ids=["llama", "mistral-window", "qwen3-28-query-heads"])
def test_long_context_decode_splits_attention_across_threads(tmp_path, fp32_plan, family, overrides):
    """Past 64 positions a decode step's attention runs in chunks merged by their maxima."""
    model_dir = save_tiny(family, tmp_path / "hf", **overrides)
    options = dict(max_num_tokens=1024, language_group_size=64, future_token_mask_size=256)
    prompt = [int(t) for t in np.random.default_rng(3).integers(1, VOCAB, 700)]
    runs = []
    for target in ("cpu", "native"):
        out = build(model_dir, tmp_path / target, fp32_plan, target=target, **options)
        runs.append(edgellm.load(out).generate_ids(prompt, max_new_tokens=8, ignore_eos=True, return_logits=True))
    assert runs[0].token_ids == runs[1].token_ids
    assert np.abs(np.stack(runs[0].logits) - np.stack(runs[1].logits)).max() < 1e-4


@pytest.mark.parametrize("apart", ["rotation", "merge"])
def test_decode_attention_with_its_neighbours_apart_matches_transformers(tmp_path, fp32_plan, monkeypatch, apart):
    """The decode attention rotates the token's query and key itself when only it reads them, and
    leaves its chunks to the output projection to merge when only that reads its output. Where
    the lowering cannot show that, the rotation runs first (em_rope) and the attention merges
    its chunks itself (out not NULL)."""
    if apart == "rotation":
        monkeypatch.setattr(Lowering, "_only_into_attention", lambda self, name: False)
    else:
        monkeypatch.setattr(Lowering, "_identity_end", lambda self, name: name + ".read by another node")
    model_dir = save_tiny("llama", tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan, target="native", **OPTIONS)
    decode = (out / "compiled" / "native" / "model.c").read_text().split("em_model_single")[1]
    if apart == "rotation":
        assert "em_rope(" in decode and re.search(r"em_team_attention\([^;]*NULL, NULL, 0, start", decode)
    else:
        assert "em_rope(" not in decode and "EM_ATTENTION" not in decode and "NULL);" not in decode
    result = _generate(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    theirs = _reference_logits(reference, result.token_ids)
    assert np.abs(np.stack(result.logits) - theirs).max() < 1e-4
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


def test_the_rows_the_attention_caches_outlive_its_barrier_free_end(tmp_path, fp32_plan, monkeypatch):
    """em_team_attention(out NULL) returns while threads may still copy the token's key and value
    to the cache: the output projection that merges its chunks counts them as its inputs, so the
    memory plan cannot put its output on them."""
    lowered = []

    def keep(program, tokens):
        lowered.append((program, tokens))
        return plan_arena(program, tokens)

    monkeypatch.setattr(native_target, "plan_arena", keep)
    build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", fp32_plan, target="native", **OPTIONS)
    calls = next(program for program, tokens in lowered if tokens == 1).calls
    attentions = [i for i, call in enumerate(calls) if call.code.startswith("em_team_attention") and "NULL);" in call.code]
    assert len(attentions) == 3  # one per layer
    for i in attentions:
        merge = next(call for call in calls[i + 1:] if "EM_ATTENTION" in call.code)
        k_and_v = set(calls[i].reads[1:])
        assert len(k_and_v) >= 1 and k_and_v <= set(merge.reads), (calls[i].code, merge.code)


def _reference_reading_float16_kv(model_dir):
    """transformers with every key and value rounded to float16 before attention reads them: what
    a float16 KV cache holds."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eager = sys.modules[type(reference).__module__].eager_attention_forward

    def rounded(module, query, key, value, *args, **kwargs):  # saturating at the largest float16, as the cache does
        key, value = (t.clamp(-65504, 65504).half().float() for t in (key, value))
        return eager(module, query, key, value, *args, **kwargs)

    transformers.AttentionInterface.register("edgellm_float16_kv", rounded)
    masks = transformers.masking_utils.AttentionMaskInterface
    masks.register("edgellm_float16_kv", masks._global_mapping["eager"])  # the additive masks eager reads
    reference.set_attn_implementation("edgellm_float16_kv")
    return reference


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])  # gemma: soft-capping, sliding windows
def test_float16_kv_cache_matches_transformers_reading_float16_keys_and_values(tmp_path, fp32_plan, family):
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan, target="native", kv_cache_dtype="float16", **OPTIONS)
    assert json.loads((out / "compiled" / "native" / "program.json").read_text())["kv_cache_dtype"] == "float16"
    result = _generate(out)
    ours = np.stack(result.logits)
    theirs = _reference_logits(_reference_reading_float16_kv(model_dir), result.token_ids)
    err = np.abs(ours - theirs).max()
    assert err < 1e-4, f"max abs logit error {err}"
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]
    # the rounding is there to see: float32 keys and values give other logits
    exact = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert np.abs(ours - _reference_logits(exact, result.token_ids)).max() > 3 * err


def test_float16_kv_cache_saturates_values_past_the_float16_range(tmp_path, fp32_plan):
    """Values past 65504 are stored as +-65504, not as infinities that turn the logits into NaN."""
    model_dir = save_tiny("llama", tmp_path / "hf")
    weights = safetensors.torch.load_file(model_dir / "model.safetensors")
    for name in weights:
        if "v_proj" in name:
            weights[name] *= 1e6
    safetensors.torch.save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = build(model_dir, tmp_path / "out", fp32_plan, target="native", kv_cache_dtype="float16", **OPTIONS)
    result = _generate(out)
    ours = np.stack(result.logits)
    assert np.isfinite(ours).all()
    theirs = _reference_logits(_reference_reading_float16_kv(model_dir), result.token_ids)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]
    # the values did overflow: unclamped float16 has infinities
    exact = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        layer = exact.model.layers[0]
        values = layer.self_attn.v_proj(layer.input_layernorm(exact.model.embed_tokens(torch.tensor(PROMPT))))
    assert torch.isinf(values.half()).any()


def test_portable_float16_rounding_matches_numpy(tmp_path):
    """The float16 cache's conversion in portable C (x86-64 without F16C, any target without a
    hardware one) rounds as numpy does: ties to even, subnormals, overflow to infinity."""
    if shutil.which("cc") is None or subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() != "x86_64":
        pytest.skip("builds the portable path with an x86-64 cc (-march=x86-64 -mno-f16c)")
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # halfway between two float16 values
    values = np.concatenate([
        bits.view(np.float32), ties.view(np.float32),
        rng.normal(0, 1, 5000).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 20, 5000).astype(np.float32),
        np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26,
                  np.inf, -np.inf, 1e-45], np.float32)])
    values = values[~np.isnan(values)]
    harness = tmp_path / "half.c"
    harness.write_text('#include <stdio.h>\n#include "edgellm_simd.h"\n'
                       "int main(void) { float f; while (fread(&f, 4, 1, stdin) == 1) { uint16_t h = half_bits(f); "
                       "fwrite(&h, 2, 1, stdout); } return 0; }\n")
    program = tmp_path / "half"
    subprocess.run(["cc", "-O2", "-march=x86-64", "-mno-f16c", f"-I{KERNELS}",
                    str(harness), "-o", str(program), "-lm"], check=True, capture_output=True)
    out = subprocess.run([str(program)], input=values.tobytes(), capture_output=True, check=True).stdout
    ours = np.frombuffer(out, np.uint16)
    with np.errstate(over="ignore"):  # past 65504: infinity, as the C side rounds too
        theirs = values.astype(np.float16).view(np.uint16)
    wrong = np.flatnonzero(ours != theirs)
    assert wrong.size == 0, f"{wrong.size} differ, e.g. {values[wrong[0]]!r}: {ours[wrong[0]]:#06x} != {theirs[wrong[0]]:#06x}"


def test_float16_kv_cache_needs_a_native_target(tmp_path):
    with pytest.raises(EdgeLLMError, match="kv_cache_dtype float16 needs a native target"):
        build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", "int4", target="cpu", kv_cache_dtype="float16",
              **OPTIONS)


def _prompt_logits(model, tokens):
    return model.engine.open_session().prompt_logits(tokens)


def _tiny_native(tmp_path, family="llama", preset="int4", **options):
    if preset == "kquants":  # a GGUF of every block type, compiled as it is (tests/test_gguf_blocks.py)
        return build(_kquant_gguf(tmp_path), tmp_path / "out", None, **{"target": "native", **OPTIONS, **options})
    model_dir = save_tiny(family, tmp_path / "hf")
    return build(model_dir, tmp_path / "out", preset, **{"target": "native", **OPTIONS, **options})


def _kquant_gguf(tmp_path):
    from gguf_writer import write_kquant_model

    return write_kquant_model(tmp_path)


def _model_main(program_dir, runner=(), gen=STEPS):
    result = subprocess.run([*runner, str(program_dir / "model_main"), "--tokens", ",".join(map(str, PROMPT)),
                             "--gen", str(gen), "--threads", "2", "--weights", str(program_dir / "weights.bin")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ids_line, metrics = result.stdout.strip().splitlines()
    assert re.fullmatch(r"TTFT [\d.]+ ms, decode [\d.]+ tokens/s \(\d+ tokens\)", metrics), metrics
    return [int(t) for t in ids_line.split(",")]


def test_model_main_runs_without_python_and_agrees_with_the_runtime(tmp_path):
    out = _tiny_native(tmp_path)
    program_dir = out / "compiled" / "native"
    assert _model_main(program_dir) == _generate(out).token_ids
    code = (program_dir / "model.c").read_text()
    assert "group.layer000_pre/RotaryEmbedding" in code  # ONNX node names in comments
    size = r"([\d.]+ [kM]B)"
    plan = re.search(rf"group: arena {size}.*no reuse: {size}; lower bound[^:]*: {size}", code)
    arena, total, bound = (float(v.split()[0]) * (1e6 if v.endswith("MB") else 1e3) for v in plan.groups())
    assert bound <= arena < total / 2  # lifetimes let activations share bytes


def _refusal(program_dir) -> str | None:
    """The program's refusal to run on this CPU (its one-line message), or None if it runs. Run in a
    child process, so that a program that dies of an illegal instruction fails the test, not the run."""
    result = subprocess.run([str(program_dir / "model_main"), "--tokens", "1", "--gen", "1",
                             "--weights", str(program_dir / "weights.bin")], capture_output=True, text=True, timeout=600)
    assert result.returncode >= 0, f"model_main died of signal {-result.returncode}: {result.stderr}"
    if result.returncode == 0:
        return None
    assert "which this one lacks" in result.stderr, result.stderr
    return result.stderr.strip()


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def _without_tiles(program_dir: Path, tmp_path: Path) -> Path:
    """The native program as a CPU without AMX runs it: on one with AMX-BF16 the bfloat16 LM head
    and embedding rows of a prefill multiply activations rounded to bfloat16 (edgellm_amx.c),
    which the other instruction sets, like every CPU without AMX, keep in float32."""
    if "amx_bf16" not in _cpu_flags():
        return program_dir
    plain = tmp_path / "no-tiles"
    plain.mkdir()
    for name in ("model.c", "weights.bin", "program.json"):
        shutil.copy(program_dir / name, plain)
    build_programs(Toolchain("native", "cc", ("-march=native", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"), "gcc"), plain)
    return plain


# Extensions the guard must name, each with the flag that compiles for it on top of AVX2 and its
# /proc/cpuinfo name; the test takes the first one this CPU lacks.
MISSING_CANDIDATES = [("-mavxvnni", "avx_vnni", "AVX-VNNI"), ("-mavx512fp16", "avx512_fp16", "AVX-512 FP16"),
                      ("-mamx-tile", "amx_tile", "AMX-TILE"), ("-mavx512vp2intersect", "avx512_vp2intersect",
                                                             "AVX-512 VP2INTERSECT")]


def test_a_program_for_an_extension_this_cpu_lacks_refuses_to_load_naming_it(tmp_path):
    if subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() != "x86_64":
        pytest.skip("x86-64 instruction sets need an x86-64 machine")
    flags = _cpu_flags()
    lacking = [(flag, label) for flag, cpuinfo, label in MISSING_CANDIDATES if cpuinfo not in flags]
    if not lacking or "avx2" not in flags:
        pytest.skip(f"this CPU has every candidate extension ({', '.join(c[2] for c in MISSING_CANDIDATES)}), or no AVX2")
    flag, label = lacking[0]
    out = _tiny_native(tmp_path, int8_activations=True)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.c", "weights.bin", "program.json"):
        shutil.copy(out / "compiled" / "native" / name, other)
    build_programs(Toolchain("native", "cc", ("-march=x86-64-v3", flag), "gcc"), other)
    refusal = _refusal(other)
    assert refusal and f"with {label}, which this one lacks" in refusal
    # the Python runtime, in a child process too, gets the same refusal as an exception
    script = ("import sys; from edgellm.runtime.native import NativeEngine; import edgellm\n"
              "spec = edgellm.load(sys.argv[1]).engine.spec\n"
              "try: NativeEngine(sys.argv[2], spec)\n"
              "except Exception as e: print(type(e).__name__, e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", script, str(out), str(other)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stdout.startswith("EdgeLLMError") and label in result.stdout


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "x86-64-v3 -mavxvnni"])  # portable C; AVX2; AVX-VNNI
@pytest.mark.parametrize("preset,int8_activations,kv_cache_dtype", [
    ("int4", False, "float32"), ("int4", True, "float32"), ("int8", True, "float32"), ("int8", False, "float32"),
    ("int4", True, "float16"), ("codebooks", False, "float32"), ("kquants", False, "float32"), ("kquants", True, "float32")])
def test_other_instruction_sets_compute_the_same_logits(tmp_path, march, preset, int8_activations, kv_cache_dtype):
    if subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() != "x86_64":
        pytest.skip("x86-64 instruction sets need an x86-64 machine")
    if preset == "kquants" and int8_activations and march == "x86-64":
        pytest.skip("int8 activations on the random GGUF blocks: portable C's float steps before each matmul round "
                    "differently from AVX-512's, and on these weights that moves activations across int8 rounding "
                    "steps (0.5% of the largest logit); the integer kernels themselves agree (AVX2 case)")
    if preset == "codebooks":
        preset = tmp_path / "codebooks.json"
        preset.write_text(CODEBOOKS)
    out = _tiny_native(tmp_path, preset=preset, int8_activations=int8_activations, kv_cache_dtype=kv_cache_dtype)
    native = out / "compiled" / "native"
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.c", "weights.bin", "program.json"):  # program.json: the settings the kernels compile with
        shutil.copy(native / name, other)
    build_programs(Toolchain("native", "cc", tuple(f"-march={march}".split()), "gcc"), other)
    refusal = _refusal(other)
    if refusal:  # the program's own guard, run in a child process: an illegal instruction cannot end this run
        pytest.skip(f"-march={march}: this CPU cannot run it ({refusal})")
    model = edgellm.load(out)
    reference = _without_tiles(native, tmp_path)
    expected = NativeEngine(reference, model.engine.spec).open_session().prompt_logits(PROMPT)
    got = NativeEngine(other, model.engine.spec).open_session().prompt_logits(PROMPT)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    assert _model_main(other) == _model_main(reference)


@pytest.mark.parametrize("weights,int8_activations,kv_cache_dtype", [
    ("integer", True, "float32"),  # dot-product kernels
    ("integer", False, "float32"),  # float-activation NEON kernels
    ("integer", True, "float16"),
    ("codebooks", False, "float32"),  # table-lookup kernel
    ("kquants", False, "float32"), ("kquants", True, "float32")])  # GGUF block types as they are
def test_aarch64_cross_compile_runs_under_qemu(tmp_path, weights, int8_activations, kv_cache_dtype):
    toolchain = TOOLCHAINS["aarch64-linux"]
    missing = [tool for tool in (toolchain.compiler, toolchain.emulator[0]) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/setup.sh installs gcc-aarch64-linux-gnu and qemu-user)")
    model_dir = save_tiny("qwen3", tmp_path / "hf")
    # int4 and int8 weights, the three codebook widths, or a GGUF's own block types (no plan)
    plan = tmp_path / "plan.json"
    plan.write_text(CODEBOOKS if weights == "codebooks" else '{"default": {"precision": "A_BF16_W_INT4"}, "rules": '
                    '[{"match": {"part": "POST"}, "set": {"precision": "A_BF16_W_INT8"}}]}')
    if weights == "kquants":
        model_dir, plan = _kquant_gguf(tmp_path), None
    settings = dict(int8_activations=int8_activations, kv_cache_dtype=kv_cache_dtype, **OPTIONS)
    native = build(model_dir, tmp_path / "native", plan, target="native", **settings)
    arm = build(model_dir, tmp_path / "arm", plan, target="aarch64-linux", **settings)
    program_dir = arm / "compiled" / "aarch64-linux"
    elf = (program_dir / "model_main").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    assert _model_main(program_dir, toolchain.runner()) == _model_main(_without_tiles(native / "compiled" / "native",
                                                                                      tmp_path))
    with pytest.raises(EdgeLLMError, match="aarch64-linux"):
        edgellm.load(arm)


def test_missing_compiler_names_the_package_and_leaves_the_build_incomplete(tmp_path, monkeypatch):
    monkeypatch.setitem(TOOLCHAINS, "native", Toolchain("native", "no-such-cc", (), "gcc"))
    with pytest.raises(EdgeLLMError, match=r"no C compiler 'no-such-cc'.*apt-get install gcc"):
        _tiny_native(tmp_path)
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_compile_error_names_the_generated_line_and_resume_retries(tmp_path, monkeypatch):
    out = _tiny_native(tmp_path)
    real = codegen.generate
    monkeypatch.setattr("edgellm.targets.native.generate", lambda *a, **k: real(*a, **k) + "int broken = ;\n")
    with pytest.raises(EdgeLLMError, match=r"model\.c:\d+:\d+: error"):
        _tiny_native(tmp_path, resume=True)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(EdgeLLMError, match="incomplete"):
        edgellm.load(out)
    monkeypatch.undo()
    _tiny_native(tmp_path, resume=True)
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert _generate(out).gen_tokens == STEPS


def test_a_library_rebuilt_after_its_engine_was_released_runs_the_new_code(tmp_path):
    """A path stays loaded in the process; loading it again would hand back the old code. Here
    the rebuild changes only model.c (int8 activations), so the weights' digest still matches."""
    out = _tiny_native(tmp_path)
    float_logits = _prompt_logits(edgellm.load(out), PROMPT[:10])
    gc.collect()  # the engine above is released
    model_dir = tmp_path / "hf"
    build(model_dir, out, "int4", target="native", int8_activations=True, **OPTIONS)
    expected = _prompt_logits(edgellm.load(build(model_dir, tmp_path / "int8", "int4", target="native",
                                                 int8_activations=True, **OPTIONS)), PROMPT[:10])
    got = _prompt_logits(edgellm.load(out), PROMPT[:10])
    assert not np.array_equal(got, float_logits)
    assert np.array_equal(got, expected)


def test_a_copy_that_cannot_be_loaded_names_the_fix(tmp_path, monkeypatch):
    from edgellm.runtime import native

    out = _tiny_native(tmp_path)
    first = edgellm.load(out)
    _tiny_native(tmp_path, int8_activations=True)  # rebuilt in place: the next load needs a private copy
    real = native.ctypes.CDLL

    def no_copies(path, *args, **kwargs):  # as on a noexec temporary directory
        if "edgellm-model-" in str(path):
            raise OSError(f"{path}: failed to map segment from shared object")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(native.ctypes, "CDLL", no_copies)
    with pytest.raises(EdgeLLMError, match="needs a private copy.*set TMPDIR"):
        edgellm.load(out)
    assert first.default_session.engine_session.decode(PROMPT[0], 0).shape == (VOCAB,)


def test_weights_of_another_build_are_refused(tmp_path):
    out = _tiny_native(tmp_path)
    other = build(save_tiny("llama", tmp_path / "hf2", seed=1), tmp_path / "other", "int4", target="native", **OPTIONS)
    shutil.copy(other / "compiled" / "native" / "weights.bin", out / "compiled" / "native" / "weights.bin")
    with pytest.raises(EdgeLLMError, match="not the weights this program was built with"):
        edgellm.load(out)


def test_bad_calls_are_refused_with_a_message(tmp_path):
    session = edgellm.load(_tiny_native(tmp_path)).engine.open_session()
    with pytest.raises(EdgeLLMError, match="outside the vocabulary"):
        session.decode(VOCAB + 5, 0)
    with pytest.raises(EdgeLLMError, match="bad call"):
        session.forward(list(range(1, 18)), 0)  # more rows than a group holds
    with pytest.raises(EdgeLLMError, match="bad call: 1 rows at position 3 of a session holding 0"):
        session.length = 3  # past Python's check: C's own refuses a gap before the rows
        session.decode(1, 3)


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(EdgeLLMError, match="unknown target 'riscv'.*native"):
        _tiny_native(tmp_path, target="riscv")


def _encoder_with_mask(mask: np.ndarray):
    """An image encoder's program of one attention over its 4 patch rows, with a constant mask."""
    from onnx import TensorProto, helper, numpy_helper

    rows = mask.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Attention", ["pixel_patches", "pixel_patches", "pixel_patches", "mask"], ["attn"],
                          name="attention", q_num_heads=2, kv_num_heads=2),
         helper.make_node("Identity", ["attn"], ["image_features"], name="out")],
        "encoder", [helper.make_tensor_value_info("pixel_patches", TensorProto.FLOAT, [1, rows, 8])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [1, rows, 8])],
        [numpy_helper.from_array(mask, "mask")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])


def test_an_encoder_mask_must_split_the_rows_into_groups_that_see_each_other(tmp_path):
    """The C encoder attends a masked attention group by group (Qwen2.5-VL's unequal windows); a
    mask of any other shape is refused at compile, naming the node, not computed wrongly."""
    from edgellm.targets.native.encoder import EncoderLowering
    from edgellm.targets.native.weights import WeightsFile

    groups = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], bool)  # rows {0, 2} and {1, 3}
    weights = WeightsFile(tmp_path / "weights.bin")
    lowered = EncoderLowering(_encoder_with_mask(groups), weights, "enc").run()
    code = " ".join(call.code for call in lowered.calls)
    assert code.count("em_attention_rows(") == 2 and code.count("em_scatter_rows(") == 2
    weights.abort()
    for bad in (np.tril(np.ones((4, 4), bool)),  # causal: row 0 sees less than row 3
                np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], bool)):  # overlapping windows
        weights = WeightsFile(tmp_path / "weights.bin")
        with pytest.raises(EdgeLLMError, match="attention: a mask whose rows do not fall into groups"):
            EncoderLowering(_encoder_with_mask(bad), weights, "enc").run()
        weights.abort()


@pytest.mark.parametrize("overrides", [
    dict(hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2),  # heads of 10
    dict(hidden_size=152, intermediate_size=200, num_attention_heads=2, num_key_value_heads=1),  # heads of 76
], ids=["head-10", "head-76"])
def test_widths_that_are_no_whole_panels_match_transformers(tmp_path, fp32_plan, overrides):
    """Prefill (16 rows a call) through em_matmul_rows with widths that are no whole panel of 16
    outputs nor whole 16-column tiles (40, 72, 152, 200), float32 and bfloat16 weights, and
    attention at head sizes that are no whole vector of 16 (10, 76: the masked last one, several
    queries per value load): float32 against transformers; the default BF16 build, on both
    targets, against transformers on the build's bfloat16 weights (with the prompt's activations
    rounded to bfloat16 in the group calls where the native prefill runs on AMX tiles)."""
    model_dir = save_tiny("llama", tmp_path / "hf", **overrides)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = _generate(build(model_dir, tmp_path / "fp32", fp32_plan, target="native", **OPTIONS))
    theirs = _reference_logits(reference, result.token_ids)
    assert np.abs(np.stack(result.logits) - theirs).max() < 1e-4
    assert result.token_ids == [int(t) for t in theirs.argmax(-1)]
    stored = bf16_build_reference(model_dir)
    for target in ("cpu", "native"):
        model = edgellm.load(build(model_dir, tmp_path / f"bf16-{target}", None, target=target, **OPTIONS))
        result = model.generate_ids(PROMPT, max_new_tokens=STEPS, ignore_eos=True, return_logits=True)
        # the prompt's 40 rows: two group calls of 16, then 8 rows, which the decode program runs
        theirs = decode_logits(stored, PROMPT, result.token_ids, rounded_rows=32 if model.engine.bf16_tiles else 0)
        assert np.abs(np.stack(result.logits) - theirs).max() < 1e-4, (target, model.engine.bf16_tiles)
        assert result.token_ids == [int(t) for t in theirs.argmax(-1)]
        model.close()
