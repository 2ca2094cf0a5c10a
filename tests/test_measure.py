"""`edgellm eval` and `edgellm bench` on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import transformers

from conftest import build
from edgellm.measure.speed import kv_cache_bytes_per_token
from tiny_models import VOCAB, save_tiny

OPTIONS = dict(max_num_tokens=64, language_group_size=16, future_token_mask_size=32)
CLI = [sys.executable, "-m", "edgellm.cli"]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_eval_perplexity_matches_transformers_and_self_agreement_is_total(tmp_path, fp32_plan):
    model_dir = save_tiny("llama", tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", fp32_plan, **OPTIONS)
    ids = [int(t) for t in np.random.default_rng(8).integers(1, VOCAB, 100)]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in ids))
    result = _run("eval", out, "--text", text, "--reference", out, "--json")
    assert result.returncode == 0, result.stderr
    score = json.loads(result.stdout.strip().splitlines()[-1])
    assert score["tokens"] == 98  # windows of the 64-token context: 64 + 36 tokens predict 63 + 35
    assert score["agreement"] == 1.0 and abs(score["kl"]) < 1e-6
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = 0.0
    for window in (ids[:64], ids[64:]):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([window])).logits[0, :-1].double(), -1)
        nll -= float(logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum())
    assert abs(score["perplexity"] - float(np.exp(nll / 98))) < 1e-3 * score["perplexity"]


def test_eval_of_an_unreadable_text_is_a_user_error(tmp_path, fp32_plan):
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", fp32_plan, **OPTIONS)
    result = _run("eval", out, "--text", tmp_path / "missing.txt")
    assert result.returncode == 2
    assert "missing.txt: cannot read the text" in result.stderr


def test_bench_reports_every_metric(tmp_path, fp32_plan):
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", fp32_plan, **OPTIONS)
    result = _run("bench", out, "--prompt-tokens", 20, "--gen-tokens", 8, "--repeats", 1, "--json")
    assert result.returncode == 0, result.stderr
    speed = json.loads(result.stdout.strip().splitlines()[-1])
    assert speed["gen_tokens"] == 8 and speed["ttft_ms"] > 0 and speed["decode_tps"] > 0
    weights = (out / "compiled" / "cpu" / "weights.bin").stat().st_size
    # a decode step reads every layer weight and the LM head, not the embedding table
    assert 0.5 * weights < speed["weight_mb_per_token"] * 1e6 <= weights
    assert speed["artifact_mb"] * 1e6 > weights and speed["peak_rss_mb"] > 0
    # the cpu target's attention reads the bucket its calls bind: steps at positions 20..26 attend
    # to at most 27 positions, which the first bucket (future_token_mask_size 32) covers
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    per_position = hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * head_dim * 4
    assert abs(speed["kv_cache_mb_per_token"] * 1e6 - 32 * per_position) < 1e-6 * per_position
    read = (speed["weight_mb_per_token"] + speed["kv_cache_mb_per_token"]) * speed["decode_tps"] / 1e3
    assert abs(speed["read_gbs"] - read) < 1e-6 * read


def test_kv_cache_bytes_count_buckets_windows_and_float16_values(tmp_path, fp32_plan):
    out = build(save_tiny("llama", tmp_path / "hf"), tmp_path / "out", fp32_plan, **OPTIONS)
    cfg = json.loads((out / "model_config.json").read_text())
    per_position = 2 * cfg["num_kv_heads"] * cfg["head_dim"] * 4
    layers = cfg["num_layers"]
    # the cpu target reads its bucket (32 or 64 positions here), every layer
    assert kv_cache_bytes_per_token(out, range(20, 31)) == layers * 32 * per_position
    assert kv_cache_bytes_per_token(out, range(30, 34)) == layers * 48 * per_position  # 32, 32, 64, 64
    cfg["layer_types"] = ["sliding"] + ["full"] * (layers - 1)
    cfg["sliding_window"] = 16
    (out / "model_config.json").write_text(json.dumps(cfg))
    assert kv_cache_bytes_per_token(out, range(39, 40)) == layers * 64 * per_position
    # the native targets read the positions each layer attends to: a sliding layer its window
    record = json.loads((out / "build.json").read_text())
    record["target"] = "native"
    (out / "build.json").write_text(json.dumps(record))
    assert kv_cache_bytes_per_token(out, range(39, 40)) == (16 + (layers - 1) * 40) * per_position
    assert kv_cache_bytes_per_token(out, range(9, 12)) == layers * 11 * per_position  # 10, 11, 12: within the window
    record["kv_cache_dtype"] = "float16"
    (out / "build.json").write_text(json.dumps(record))
    assert kv_cache_bytes_per_token(out, range(9, 10)) == layers * 10 * per_position // 2


def test_peak_rss_is_the_process_own_not_its_parents():
    """A process started by a large one (a benchmark's parent, a test run) reports its own peak:
    Linux's ru_maxrss carries the parent's across fork and exec, the memory map's VmHWM does not."""
    from edgellm.runtime.session import peak_rss_mb

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in this process
    code = "from edgellm.runtime.session import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_mb() > 400 and child < peak_rss_mb() - 300, (child, peak_rss_mb())
    del ballast
