"""edgellm serve against llama.cpp's server (llama-cpp-python's llama_cpp.server) on the same GGUF,
interleaved in one run: one stream and N parallel streams, streamed text completions of --gen
tokens each (EOS suppressed: ignore_eos for edgellm, logit_bias for llama.cpp), plus edgellm in
process (no HTTP) for the server's overhead.

    python bench/serve.py OUT --gguf SmolLM2.gguf [--parallel 4] [--gen 128] [--reps 3] [--threads 2]

Reports per system: one stream's TTFT and decode tokens/s, N streams' aggregate tokens/s (all
answer tokens over the wall time from the first request to the last token) and its ratio to one
stream's, medians over --reps. Run nothing else meanwhile (2 cores, noisy).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import edgellm  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a detailed recipe for a vegetable soup. First, take",
    "A tour of the solar system, planet by planet, starting with Mercury:",
    "The rules of chess, explained for a beginner. The board has",
    "An essay on why rivers meander across flat land. Rivers",
    "A letter to a friend describing a journey by train through the mountains. Dear",
    "Notes from a lecture on the basics of thermodynamics. The first law",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url}: not ready after {seconds} s")


_clients = threading.local()


def stream(base: str, prompt: str, gen: int, extra: dict) -> dict:
    """One streamed completion: TTFT, decode tokens/s, tokens, end time. Each thread keeps one
    client (making an httpx client takes ~20 ms: its SSL context), so none is made while timed."""
    if not hasattr(_clients, "http"):
        _clients.http = httpx.Client(timeout=600)
    body = {"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True, "model": "m", **extra}
    t0 = time.perf_counter()
    first = None
    pieces = 0
    with _clients.http.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                pieces += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - t0, "tps": (gen - 1) / (end - first), "start": t0, "end": end, "pieces": pieces}


def parallel(base: str, n: int, gen: int, extra: dict) -> float:
    results = [None] * n

    def run(i):
        results[i] = stream(base, PROMPTS[i % len(PROMPTS)], gen, extra)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n * gen / (max(r["end"] for r in results) - min(r["start"] for r in results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    model = edgellm.load(a.out, threads=a.threads)
    eos = sorted(model.codec.eos_ids)
    local = []

    ours_port, theirs_port = free_port(), free_port()
    ours = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", a.out, "--port", str(ours_port),
                             "--parallel", str(a.parallel), "--threads", str(a.threads), "--alias", "m"],
                            stderr=subprocess.DEVNULL)
    theirs = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", a.gguf, "--host", "127.0.0.1",
                               "--port", str(theirs_port), "--n_threads", str(a.threads), "--n_ctx", "1024", "--model_alias", "m"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its loading log would fill a pipe
    systems = {
        "edgellm": (f"http://127.0.0.1:{ours_port}", {"ignore_eos": True}, f"http://127.0.0.1:{ours_port}/health"),
        "llama.cpp": (f"http://127.0.0.1:{theirs_port}", {"logit_bias": {str(t): -100 for t in eos}},
                      f"http://127.0.0.1:{theirs_port}/v1/models"),
    }
    try:
        for name, (_, _, ready) in systems.items():
            wait_ready(ready, ours if name == "edgellm" else theirs)
        one = {k: [] for k in systems}
        many = {k: [] for k in systems}
        for base, extra, _ in systems.values():  # warm-up
            stream(base, PROMPTS[0], 8, extra)
        model.generate_ids(model.codec.encode(PROMPTS[0]), max_new_tokens=8, ignore_eos=True)
        for rep in range(a.reps):
            r = model.generate_ids(model.codec.encode(PROMPTS[rep % len(PROMPTS)]), max_new_tokens=a.gen,
                                   ignore_eos=True)
            local.append({"ttft": r.ttft_s, "tps": r.decode_tps})
            for name, (base, extra, _) in systems.items():
                one[name].append(stream(base, PROMPTS[rep % len(PROMPTS)], a.gen, extra))
                many[name].append(parallel(base, a.parallel, a.gen, extra))
                print(f"rep {rep} {name}: one stream {one[name][-1]['tps']:.1f} tok/s, TTFT "
                      f"{one[name][-1]['ttft'] * 1e3:.0f} ms; {a.parallel} streams {many[name][-1]:.1f} tok/s",
                      flush=True)
    finally:
        for p in (ours, theirs):
            p.terminate()
            p.wait(timeout=30)
    med = statistics.median
    print(f"\nedgellm in process: TTFT {med(x['ttft'] for x in local) * 1e3:.1f} ms, "
          f"{med(x['tps'] for x in local):.1f} tok/s (median of {a.reps})")
    for name in systems:
        tps, ttft, agg = med(x["tps"] for x in one[name]), med(x["ttft"] for x in one[name]), med(many[name])
        print(f"{name}: one stream {tps:.1f} tok/s, TTFT {ttft * 1e3:.1f} ms; {a.parallel} streams {agg:.1f} tok/s "
              f"aggregate = {agg / tps:.2f}x one stream")
    e, lc = med(many["edgellm"]), med(many["llama.cpp"])
    print(f"edgellm / llama.cpp: one stream {med(x['tps'] for x in one['edgellm']) / med(x['tps'] for x in one['llama.cpp']):.2f}x, "
          f"{a.parallel} streams {e / lc:.2f}x")
    print(f"server overhead: one stream {med(x['tps'] for x in one['edgellm']) / med(x['tps'] for x in local):.3f}x "
          f"in-process tokens/s, TTFT +{(med(x['ttft'] for x in one['edgellm']) - med(x['ttft'] for x in local)) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
