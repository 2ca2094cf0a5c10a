"""Memory of sessions on one loaded build: the weights count once, each session its own KV cache.

    python bench/sessions_rss.py OUT [--sessions 3] [--prompt-tokens 100] [--gen 128]

Prints the process's resident memory (VmRSS) after loading and after each new session has run
the same prompt, with the bytes of KV cache that session filled (positions x layers x 2 x
kv_width x the cache's element size) for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import edgellm  # noqa: E402
from edgellm.measure.accuracy import default_text  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--gen", type=int, default=128)
    args = parser.parse_args()
    model = edgellm.load(args.build, threads=2)
    options = json.loads((Path(args.build) / "manifest.json").read_text()).get("options", {})
    element = 2 if options.get("kv_cache_dtype") == "float16" else 4
    spec = model.engine.spec
    ids = model.codec.encode(default_text()[0])[: args.prompt_tokens]
    print(f"loaded: {rss_mb():.1f} MB")
    sessions = []
    for i in range(args.sessions):
        before = rss_mb()
        session = model.session()
        sessions.append(session)
        session.generate_ids(ids, max_new_tokens=args.gen, ignore_eos=True)
        filled = len(session.tokens) * spec.num_layers * 2 * spec.kv_width * element
        print(f"session {i + 1}: {rss_mb():.1f} MB (+{rss_mb() - before:.1f}); its KV cache holds "
              f"{len(session.tokens)} positions = {filled / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
