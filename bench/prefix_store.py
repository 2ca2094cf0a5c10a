"""What the server's prefix store (--cache-ram) saves: a conversation that comes back after its
session answered someone else, with and without the store, interleaved in one run.

    python bench/prefix_store.py OUT [--parallel 1] [--reps 5] [--threads 2] [--history 600]

Two `edgellm serve OUT` processes (--cache-ram 256 and --cache-ram 0), the same requests to each
in turn: a conversation (a system prompt and a document of about --history tokens, one
question), then an unrelated request that takes the session (with the store, the conversation is
copied out first), then the conversation's next turn. Reports the medians of each request's TTFT
(first streamed chunk) and of its cached prompt tokens. Run nothing else meanwhile (2 cores, noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import free_port, wait_ready  # noqa: E402

SYSTEM = "You are a careful assistant. Answer from the document only, in one or two sentences."
PARAGRAPH = ("The river rises in the hills north of the town and runs south through the old mill district, where "
             "three stone bridges cross it. In spring the water is high and brown; by August it is low enough to "
             "wade, and children fish from the middle bridge. ")
OTHER = "Write a short poem about the sea at night."


def chat(base: str, messages: list[dict]) -> tuple[float, int, str]:
    """(TTFT in seconds, cached prompt tokens, answer) of one streamed greedy chat completion."""
    body = {"messages": messages, "temperature": 0, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, text, cached = time.perf_counter(), None, [], 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    return (first or time.perf_counter()) - start, cached, "".join(text)


def round_of(base: str, history: str, rep: int) -> dict[str, tuple[float, int]]:
    # each round's document differs (its first line), so no round reuses another's cache
    document = f"Document {rep}.\n" + history
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{document}\n\nWhere does the river rise?"}]
    ttft, cached, answer = chat(base, first)
    out = {"first turn": (ttft, cached)}
    out["unrelated request"] = chat(base, [{"role": "user", "content": f"{OTHER} ({rep})"}])[:2]
    again = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And where does it go?"}]
    out["conversation again"] = chat(base, again)[:2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=600, help="about this many tokens of document")
    args = ap.parse_args()
    history = PARAGRAPH * max(1, args.history // 60)
    servers = {}
    for name, cache in (("store", 256), ("no store", 0)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", args.build, "--port", str(port),
                                 "--parallel", str(args.parallel), "--threads", str(args.threads),
                                 "--cache-ram", str(cache)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers[name] = (proc, f"http://127.0.0.1:{port}")
    try:
        for proc, base in servers.values():
            wait_ready(f"{base}/health", proc)
        results = {name: [] for name in servers}
        for rep in range(args.reps):
            for name, (_, base) in servers.items():  # interleaved: each round on both
                results[name].append(round_of(base, history, rep))
        print(f"{args.build}: --parallel {args.parallel}, --threads {args.threads}, {args.reps} rounds, medians")
        print("| request | store: TTFT (ms), cached | no store: TTFT (ms), cached | TTFT ratio |")
        print("|---|---:|---:|---:|")
        for request in results["store"][0]:
            cells = {}
            for name, rounds in results.items():
                cells[name] = (statistics.median(r[request][0] for r in rounds) * 1000,
                               statistics.median(r[request][1] for r in rounds))
            print(f"| {request} | {cells['store'][0]:.1f}, {cells['store'][1]:.0f} | {cells['no store'][0]:.1f}, "
                  f"{cells['no store'][1]:.0f} | {cells['store'][0] / cells['no store'][0]:.2f}x |")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
