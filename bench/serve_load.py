"""A bounded load test of edgellm serve on loopback: --clients concurrent clients for --minutes,
some of them leaving mid-answer at random.

    python bench/serve_load.py OUT [--clients 16] [--minutes 10] [--parallel 4] [--seed 0] [--system]

Each client loops: a greedy chat request (one of several questions; streamed or not, at random),
and with probability --leave it closes the connection after a few streamed pieces. Every answer
that completes must equal the answer the same question got alone at the start (no lost or mixed
tokens between streams); every request must succeed. The server's RSS is sampled every 5 s.
Reports requests, failures, mismatches, p50/p99 TTFT (streamed requests: time to the first
piece, queueing included) and RSS over time; exits 1 on any failure or mismatch.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

QUESTIONS = ["What is the capital of France?", "Name three colours and one fruit of each colour.",
             "Explain in two sentences why the sky is blue.", "Write a haiku about the sea.",
             "What is 12 times 12?", "Give me a short tip for learning to cook.",
             "Who wrote Romeo and Juliet, and when?", "List the first five prime numbers."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --system: one long system prompt before every question (as a chat app sends), so that prompts
# span whole prefill chunks and the server's prefix store keeps and shares them
SYSTEM = ("You are the help desk of a small public library. Answer briefly and kindly, in plain words. The library "
          "opens at nine and closes at six, is closed on Sundays, lends up to ten books for three weeks, and has a "
          "reading room, four study rooms that can be booked a week ahead, a children's corner with story time on "
          "Saturday mornings, free wireless internet, two printers and a scanner. ") * 2


def ask(base: str, question: str, max_tokens: int, streamed: bool, leave_after: int | None, system: bool = False):
    """(outcome, text, ttft): outcome 'ok', 'left' or an error description."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    body = {"model": "m", "messages": messages + [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": streamed}
    t0 = time.perf_counter()
    try:
        if not streamed:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {r.text[:200]}", None, None
            return "ok", r.json()["choices"][0]["message"]["content"], None
        text, ttft, pieces = [], None, 0
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}", None, None
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return f"error event: {chunk['error']}", None, None
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(content)
                    pieces += 1
                    if leave_after is not None and pieces >= leave_after:
                        return "left", None, ttft
        return "ok", "".join(text), ttft
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}", None, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--leave", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", action="store_true", help="a long system prompt before every question")
    a = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", a.out, "--port", str(port),
                               "--parallel", str(a.parallel), "--alias", "m"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read()}")
            time.sleep(0.3)
        expected = {}
        for q in QUESTIONS:  # each alone first: what every later answer must equal
            outcome, text, _ = ask(base, q, a.max_tokens, False, None, a.system)
            if outcome != "ok":
                raise SystemExit(f"{q!r}: {outcome}")
            expected[q] = text
        lock = threading.Lock()
        stats = {"ok": 0, "left": 0, "failed": [], "mismatch": [], "ttft": []}
        rss = [(0.0, rss_mb(server.pid))]
        start = time.time()
        end = start + a.minutes * 60

        def client(i: int) -> None:
            rng = random.Random(a.seed * 1000 + i)
            while time.time() < end:
                q = rng.choice(QUESTIONS)
                streamed = rng.random() < 0.7
                leave = rng.randint(1, 8) if streamed and rng.random() < a.leave else None
                outcome, text, ttft = ask(base, q, a.max_tokens, streamed, leave, a.system)
                with lock:
                    if ttft is not None:
                        stats["ttft"].append(ttft)
                    if outcome == "left":
                        stats["left"] += 1
                    elif outcome != "ok":
                        stats["failed"].append(outcome)
                    elif text != expected[q]:
                        stats["mismatch"].append((q, text))
                    else:
                        stats["ok"] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            rss.append((time.time() - start, rss_mb(server.pid)))
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
    ttft = sorted(stats["ttft"])
    pick = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else float("nan")  # noqa: E731
    first_minute = [m for t, m in rss if t <= 60]
    last_minute = [m for t, m in rss if t >= rss[-1][0] - 60]
    print(f"{a.clients} clients, {a.minutes} min, --parallel {a.parallel}: {stats['ok']} answers equal to their "
          f"solo answer, {stats['left']} left mid-answer, {len(stats['failed'])} failed, "
          f"{len(stats['mismatch'])} mismatched")
    print(f"TTFT (streamed, queueing included): p50 {pick(0.5) * 1e3:.0f} ms, p99 {pick(0.99) * 1e3:.0f} ms "
          f"over {len(ttft)} requests")
    print(f"server RSS: start {rss[0][1]:.0f} MB, first minute max {max(first_minute):.0f} MB, last minute max "
          f"{max(last_minute):.0f} MB, overall max {max(m for _, m in rss):.0f} MB")
    print("\n".join(line for line in metrics.splitlines() if line.startswith(("edgellm_requests", "edgellm_generated", "edgellm_prefix_store",
                                                                  "edgellm_prompt"))))
    for failure in stats["failed"][:5]:
        print("failed:", failure)
    for q, text in stats["mismatch"][:5]:
        print(f"mismatch on {q!r}: {text!r} against {expected[q]!r}")
    if stats["failed"] or stats["mismatch"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
