"""What LoRA branches cost on SmolLM2-135M int4 (native target), and what int8 adapter storage costs
in accuracy, in one run.

    python bench/lora.py WORK_DIR [--reps 5] [--threads 2] [--gen 128] [--prompt 100]

Builds (from the reference GGUF, -c int4-style plans, --quantize_embeddings --int8_activations,
--target native) under WORK_DIR: no branches; LORA_BRANCH with a rank-8 adapter on every linear
layer (PEFT, random factors: speed does not depend on their values) and the manual adapter
(tests/lora_training.py), stored int8; LORA_MERGED with the rank-8 adapter. Then, interleaved,
--reps times each: TTFT (--prompt tokens) and decode tokens/s (--gen tokens) of the plain build,
the branch build with the rank-8 adapter and with none, and the merged build. Then: the time of a
first switch to an adapter (reading and placing it) and of switching between loaded ones, RSS per
loaded adapter, the adapters' file sizes; and at fp32 (cpu target) the int8-stored manual adapter
against the same adapter stored float32: top-1 agreement and KL on the manual's questions and on
Python's pydoc text. Prints one JSON object. Run nothing else meanwhile (2 cores, noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

import edgellm  # noqa: E402
from edgellm import reference  # noqa: E402
from edgellm.build import BuildOptions, compile_model  # noqa: E402
from edgellm.measure.accuracy import default_text, log_softmax  # noqa: E402

CACHE = Path.home() / ".cache" / "edgellm-test-models"
NATIVE = dict(target="native", quantize_embeddings="int8", int8_activations=True, jobs=2)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def plan(work: Path, lora: str | None, precision: str = "A_BF16_W_INT4") -> str:
    body = {"default": {"precision": precision, **({"lora": lora} if lora else {})}}
    path = work / f"plan-{precision}-{lora}.json"
    path.write_text(json.dumps(body))
    return str(path)


def build(source, out: Path, plan_path: str, **options) -> tuple[Path, float]:
    start = time.perf_counter()
    compile_model(source, out, BuildOptions(configuration_file=plan_path, **options))
    return out, time.perf_counter() - start


def speed_adapter(base: Path, out: Path) -> Path:
    import peft
    import torch
    import transformers

    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, peft.LoraConfig(**settings)).save_pretrained(out)
    return out


def one_run(model, ids: list[int], gen: int):
    model.reset()
    result = model.generate_ids(ids, max_new_tokens=gen, ignore_eos=True)
    return result.ttft_s * 1000, result.decode_tps


def agreement(float_logits: np.ndarray, int8_logits: np.ndarray) -> dict:
    p, q = log_softmax(float_logits), log_softmax(int8_logits)
    return {"tokens": len(p), "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).mean()),
            "kl_nats_per_token": float((np.exp(p) * (p - q)).sum(-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=100)
    args = parser.parse_args()
    from lora_training import manual, trained_adapter

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gguf = reference.smollm2_gguf()
    base = reference.hf_dir_from_gguf(gguf, CACHE / "smollm2-135m-hf")
    rank8 = speed_adapter(base, work / "rank8-all-linear")
    manual_adapter = trained_adapter(base, CACHE)
    report: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             cwd=ROOT).stdout.strip(), "threads": args.threads}

    builds, seconds = {}, {}
    builds["plain"], seconds["plain"] = build(gguf, work / "plain", plan(work, None), **NATIVE)
    builds["branch"], seconds["branch"] = build(gguf, work / "branch", plan(work, "LORA_BRANCH"),
                                                lora=(("rank8", str(rank8)), ("manual", str(manual_adapter))), **NATIVE)
    builds["merged"], seconds["merged"] = build(gguf, work / "merged", plan(work, "LORA_MERGED"),
                                                lora=(("rank8", str(rank8)),), **NATIVE)
    report["build_seconds"] = seconds
    report["adapter_bytes"] = {p.parent.name: p.stat().st_size for p in (builds["branch"] / "adapters").glob("*/adapter.safetensors")}

    # speed, interleaved
    models = {name: edgellm.load(path, threads=args.threads) for name, path in builds.items()}
    ids = models["plain"].codec.encode(default_text()[0])[: args.prompt]
    runs = {"plain": models["plain"].session(), "branch rank8": models["branch"].session(),
            "branch none": models["branch"].session(), "merged": models["merged"].session()}
    runs["branch rank8"].set_adapter("rank8")
    for runner in runs.values():  # warm-up
        runner.reset()
        runner.generate_ids(ids[:8], max_new_tokens=4, ignore_eos=True)
    samples: dict[str, list] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, runner in runs.items():
            samples[name].append(one_run(runner, ids, args.gen))
    speed = {}
    for name, values in samples.items():
        speed[name] = {"ttft_ms": statistics.median(v[0] for v in values),
                       "decode_tps": statistics.median(v[1] for v in values)}
    for name in speed:
        speed[name]["decode_vs_plain"] = speed[name]["decode_tps"] / speed["plain"]["decode_tps"]
        speed[name]["ttft_vs_plain"] = speed[name]["ttft_ms"] / speed["plain"]["ttft_ms"]
    report["speed"] = speed
    for model in models.values():
        model.close()

    # switching and memory, on a fresh load of the branch build
    model = edgellm.load(builds["branch"], threads=args.threads)
    session = model.session()
    first, rss = {}, {}
    for name in ("rank8", "manual"):
        before = rss_mb()
        start = time.perf_counter()
        session.set_adapter(name)
        first[name] = 1000 * (time.perf_counter() - start)
        rss[name] = rss_mb() - before
    switches = []
    for i in range(20):
        start = time.perf_counter()
        session.set_adapter(("rank8", "manual", None)[i % 3])
        switches.append(1000 * (time.perf_counter() - start))
    report["switch_ms"] = {"first_load": first, "loaded_median": statistics.median(switches),
                           "loaded_max": max(switches)}
    report["rss_mb_per_loaded_adapter"] = rss  # the process's RSS growth (0: freed heap pages were reused)
    report["placed_mb_per_adapter"] = {  # what the loaded adapter holds: its factors as the kernels read them
        name: sum(x.nbytes for arrays in model.adapters.inputs(name).arrays for x in arrays if x is not None) / 2**20
        for name in ("rank8", "manual")}
    question = manual()["held_out"][0]
    session.set_adapter("manual")
    report["int4_answers"] = {
        name: model.session().generate(question, chat=True, max_new_tokens=24).text if name == "base"
        else session.generate(question, chat=True, max_new_tokens=24).text for name in ("base", "manual")}
    model.close()

    # int8 storage against float32, at fp32 (cpu target)
    fp32, seconds["fp32 branch"] = build(base, work / "fp32", plan(work, "LORA_BRANCH", "FP32"),
                                         lora=(("manual", str(manual_adapter)),), target="cpu", max_num_tokens=1024, jobs=2)
    if not (fp32 / "adapters" / "manual-f32").is_dir():  # (a second run in the same WORK_DIR has it)
        subprocess.run([sys.executable, "-m", "edgellm.cli", "compile-lora", str(fp32), str(manual_adapter), "--name",
                        "manual-f32", "--lora_dtype", "float32"], check=True, cwd=ROOT)
    model = edgellm.load(fp32, threads=args.threads)
    texts = {"manual questions": model.codec.encode_chat(
                 [m for q, a in manual()["pairs"] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]),
             "pydoc": model.codec.encode(default_text()[0])[:1024]}
    accuracy = {}
    for label, text_ids in texts.items():
        logits = {}
        for name in ("manual-f32", "manual"):
            s = model.session()
            s.set_adapter(name)
            logits[name] = s.engine_session.prompt_logits(text_ids[: model.max_num_tokens])
        accuracy[label] = agreement(logits["manual-f32"], logits["manual"])
    report["int8_vs_float32_adapter_fp32_base"] = accuracy
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
