"""What speculative decoding costs and gains on one build: the verify call's cost against a decode
step, and prompt lookup's decode tokens/s against plain greedy, interleaved in one run.

    python bench/speculation.py out/smollm2 [--reps 5] [--gen 128] [--threads 2] [--draft-max 4]

(a) verify: one call of K+1 rows at position ~100 against one decode step (1 row), K = 1..8,
    interleaved, median of --reps * 10 calls each; the ratio is the verify call's cost in steps.
(b) lookup: chat prompts that copy from their input (rewrite or annotate a given block of code or
    text) and open questions; plain greedy and --lookup 3 alternate; decode tokens/s ratio (median
    of --reps each), acceptance, and how many speculative runs gave plain greedy's tokens.
Run nothing else meanwhile (2 cores, noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import edgellm  # noqa: E402

CODE = '''def moving_average(values, window):
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
TEXT = ("The river rises in the hills north of the town and runs south through the old mill district, where "
        "three stone bridges cross it. In spring the water is high and brown; by August it is low enough to wade.")
GROUNDED = [
    f"Rewrite this Python function with type hints and a docstring, keeping the code the same:\n\n{CODE}",
    f"Add a comment above every line of this function, keeping the code:\n\n{CODE}",
    f"Repeat the following paragraph, replacing 'river' with 'stream':\n\n{TEXT}",
]
OPEN = ["Give three tips for staying focused while studying.", "What causes the seasons on Earth?",
        "Write a short poem about autumn."]


def verify_cost(model, reps: int, max_k: int) -> dict:
    session = model.engine.open_session()
    prompt = model.codec.encode(CODE * 3)[:100]
    session.prefill(prompt, 0)
    times = {k: [] for k in range(max_k + 1)}
    rows = prompt[:max_k + 1]
    for _ in range(reps * 10):
        for k in times:  # interleaved: every K in each round
            session.truncate(len(prompt))
            t = time.perf_counter()
            session.forward(rows[: k + 1], len(prompt), logits_from=0)
            times[k].append(time.perf_counter() - t)
    step = statistics.median(times[0])
    return {k: {"ms": 1000 * statistics.median(v), "steps": statistics.median(v) / step} for k, v in times.items()}


def lookup_gain(model, reps: int, gen: int, draft_max: int) -> list[dict]:
    rows = []
    for kind, prompts in (("grounded", GROUNDED), ("open", OPEN)):
        for prompt in prompts:
            ids = model.codec.encode_chat([{"role": "user", "content": prompt}])
            plain, fast = [], []
            for _ in range(reps):
                model.reset()
                plain.append(model.generate_ids(ids, max_new_tokens=gen))
                model.reset()
                fast.append(model.generate_ids(ids, max_new_tokens=gen, lookup=3, draft_max=draft_max))
            same = sum(f.token_ids == plain[0].token_ids for f in fast)
            p = statistics.median(r.decode_tps for r in plain)
            f = statistics.median(r.decode_tps for r in fast)
            rows.append({"kind": kind, "prompt": prompt[:40], "tokens": plain[0].gen_tokens, "plain_tps": p,
                         "lookup_tps": f, "ratio": f / p, "identical_runs": f"{same}/{len(fast)}",
                         **fast[0].speculation})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-max", type=int, default=4)
    args = parser.parse_args()
    model = edgellm.load(args.build, threads=args.threads)
    cost = verify_cost(model, args.reps, 8)
    print("verify call of K+1 rows, in decode steps:", json.dumps({k: round(v["steps"], 3) for k, v in cost.items()}))
    print("decode step:", f"{cost[0]['ms']:.2f} ms")
    rows = lookup_gain(model, args.reps, args.gen, args.draft_max)
    for r in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    for kind in ("grounded", "open"):
        ratios = [r["ratio"] for r in rows if r["kind"] == kind]
        print(f"{kind}: lookup/plain decode tokens/s median {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
