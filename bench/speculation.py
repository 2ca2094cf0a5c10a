"""What speculative decoding costs and gains on one build: the verify call's cost against a decode
step, and prompt lookup's decode tokens/s against plain greedy, interleaved in one run.

    python bench/speculation.py out/smollm2 [--reps 5] [--gen 128] [--threads 2] [--draft-max 4]
                                [--gguf SmolLM2.gguf] [--draft DRAFT_OUT]

(a) verify: one call of K+1 rows at position ~100 against one decode step (1 row), K = 1..8,
    interleaved, median of --reps * 10 calls each; the ratio is the verify call's cost in steps.
    With --cold MB, again with MB of other memory written before each call (weights from memory).
(b) lookup: chat prompts that copy from their input (rewrite or annotate a given block of code or
    text) and open questions; plain greedy and --lookup 3 alternate; decode tokens/s ratio (median
    of --reps each), acceptance, and how many speculative runs gave plain greedy's tokens.
(c) with --gguf (the GGUF the build was compiled from): llama.cpp (llama-cpp-python) on the same
    token ids, plain greedy and LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=
    --draft-max), alternating with edgellm's runs.
(d) with --draft (a smaller build with the same tokenizer): the draft model's speculation against
    plain greedy on code-writing prompts and open questions instead of (b); llama.cpp's plain
    decode beside it (llama-cpp-python exposes no draft-model speculation).
Run nothing else meanwhile (2 cores, noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

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
CODING = ["Write a Python function that checks whether a string is a palindrome.",
          "Write a Python class for a stack with push, pop and peek methods.",
          "Write a Python function that returns the n-th Fibonacci number, iteratively."]


def verify_cost(model, reps: int, max_k: int, cold_mb: int = 0) -> dict:
    """cold_mb: before each call, write that many MB elsewhere, so that the weights come from
    memory (a device whose last-level cache is smaller than the model) rather than from a cache
    that holds them all (a large server cache)."""
    session = model.engine.open_session()
    prompt = model.codec.encode(CODE * 3)[:100]
    session.prefill(prompt, 0)
    times = {k: [] for k in range(max_k + 1)}
    rows = prompt[:max_k + 1]
    sweep = np.zeros(cold_mb << 20, np.uint8) if cold_mb else None
    for _ in range(reps * 10):
        for k in times:  # interleaved: every K in each round
            session.truncate(len(prompt))
            if sweep is not None:
                sweep += 1
            t = time.perf_counter()
            session.forward(rows[: k + 1], len(prompt), logits_from=0)
            times[k].append(time.perf_counter() - t)
    step = statistics.median(times[0])
    return {k: {"ms": 1000 * statistics.median(v), "steps": statistics.median(v) / step} for k, v in times.items()}


class LlamaCpp:
    """llama.cpp through llama-cpp-python: plain greedy, and its prompt-lookup speculation."""

    def __init__(self, gguf: str, threads: int, draft_max: int):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        settings = dict(model_path=gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.plain = llama_cpp.Llama(**settings)
        self.lookup = llama_cpp.Llama(**settings, draft_model=LlamaPromptLookupDecoding(max_ngram_size=3,
                                                                                         num_pred_tokens=draft_max))
        self.eos = self.plain.token_eos()

    @staticmethod
    def run(llm, ids: list[int], gen: int) -> tuple[list[int], float]:
        """(tokens, decode tokens/s after the first)."""
        llm.reset()
        out, t_first = [], None
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            if token == llm.token_eos():
                break
            out.append(token)
            if len(out) >= gen:
                break
        elapsed = time.perf_counter() - t_first
        return out, (len(out) - 1) / elapsed if len(out) > 1 else 0.0


def lookup_gain(model, reps: int, gen: int, draft_max: int, llama: LlamaCpp | None = None,
                drafter=None) -> list[dict]:
    """drafter: a draft model's (d) instead of prompt lookup (b)."""
    rows = []
    kinds = (("code", CODING), ("open", OPEN)) if drafter else (("grounded", GROUNDED), ("open", OPEN))
    how = {"drafter": drafter} if drafter else {"lookup": 3}
    for kind, prompts in kinds:
        for prompt in prompts:
            ids = model.codec.encode_chat([{"role": "user", "content": prompt}])
            plain, fast, peer_plain, peer_fast = [], [], [], []
            for _ in range(reps):
                model.reset()
                plain.append(model.generate_ids(ids, max_new_tokens=gen))
                model.reset()
                fast.append(model.generate_ids(ids, max_new_tokens=gen, draft_max=draft_max, **how))
                if llama:
                    peer_plain.append(LlamaCpp.run(llama.plain, ids, gen))
                    if not drafter:
                        peer_fast.append(LlamaCpp.run(llama.lookup, ids, gen))
            same = sum(f.token_ids == plain[0].token_ids for f in fast)
            p = statistics.median(r.decode_tps for r in plain)
            f = statistics.median(r.decode_tps for r in fast)
            row = {"kind": kind, "prompt": prompt[:40], "tokens": plain[0].gen_tokens, "plain_tps": p,
                   "lookup_tps": f, "ratio": f / p, "identical_runs": f"{same}/{len(fast)}", **fast[0].speculation}
            if llama:
                lp = statistics.median(r[1] for r in peer_plain)
                row.update(llama_plain_tps=lp, llama_tokens=len(peer_plain[0][0]), speculative_vs_llama_plain=f / lp)
                if peer_fast:
                    lf = statistics.median(r[1] for r in peer_fast)
                    row.update(llama_lookup_tps=lf, llama_ratio=lf / lp, lookup_vs_llama_lookup=f / lf)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-max", type=int, default=4)
    parser.add_argument("--gguf", help="the GGUF the build came from: llama.cpp runs beside it")
    parser.add_argument("--draft", help="a draft build: measure draft-model speculation (d) instead of lookup (b)")
    parser.add_argument("--cold", type=int, default=0, metavar="MB",
                        help="(a) again with MB written between calls: the weights from memory, not from the cache")
    args = parser.parse_args()
    model = edgellm.load(args.build, threads=args.threads)
    drafter = model.drafter(draft=args.draft, threads=args.threads) if args.draft else None
    for cold in (0, args.cold) if args.cold else (0,):
        cost = verify_cost(model, args.reps, 8, cold)
        where = f", {cold} MB written before each call" if cold else ""
        print(f"verify call of K+1 rows, in decode steps{where}:",
              json.dumps({k: round(v["steps"], 3) for k, v in cost.items()}))
        print("decode step:", f"{cost[0]['ms']:.2f} ms")
    llama = LlamaCpp(args.gguf, args.threads, args.draft_max) if args.gguf else None
    rows = lookup_gain(model, args.reps, args.gen, args.draft_max, llama, drafter)
    for r in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    for kind in ("code", "open") if drafter else ("grounded", "open"):
        ratios = [r["ratio"] for r in rows if r["kind"] == kind]
        print(f"{kind}: speculative/plain decode tokens/s median {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
        if llama and drafter:
            versus = [r["speculative_vs_llama_plain"] for r in rows if r["kind"] == kind]
            print(f"{kind}: edgellm speculative / llama.cpp plain tokens/s median {statistics.median(versus):.2f}x")
        elif llama:
            peer = [r["llama_ratio"] for r in rows if r["kind"] == kind]
            versus = [r["lookup_vs_llama_lookup"] for r in rows if r["kind"] == kind]
            print(f"{kind}: llama.cpp lookup/plain median {statistics.median(peer):.2f}x; edgellm lookup / llama.cpp "
                  f"lookup tokens/s median {statistics.median(versus):.2f}x (range {min(versus):.2f}-{max(versus):.2f})")


if __name__ == "__main__":
    main()
