"""Chat answers first: do a build's greedy answers agree with the float model's?

For each of the 20 questions in tests/data/chat_questions.json, the question is rendered with the
build's chat template, and the build's greedy answer (first N tokens, stopping at end of turn) is
compared with transformers' greedy answer on the same GGUF dequantized to float32 (the reference,
computed independently of edgellm). A question agrees when the answers' first N tokens are equal,
up to the end of turn (an answer that ends earlier must end at the same place).

    python bench/chat_agreement.py --build default=out/smollm2 [--build int8=out/x] [--gguf G] [--tokens 16]

Prints one line per question that disagrees, then "NAME: A/20 agree" per build (--json: all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parents[1] / "tests" / "data" / "chat_questions.json"


def _name_value(s: str) -> tuple[str, str]:
    name, _, value = s.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {s!r}")
    return name, value


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """The answer's tokens before its end of turn (engines differ in whether they return it)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def reference_answer(gguf: Path, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    from edgellm.reference import transformers_greedy

    return until_stop(transformers_greedy(gguf, prompt, n), stops)


def main(argv=None) -> int:
    import edgellm
    from edgellm.reference import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=_name_value, action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--gguf", type=Path, help="the GGUF the builds were compiled from (default: SmolLM2 Q4_1)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    gguf = args.gguf or smollm2_gguf()
    questions = json.loads(QUESTIONS.read_text())["questions"]
    results = {}
    references = None
    for name, directory in args.build:
        model = edgellm.load(directory, threads=2)
        stops = set(model.codec.eos_ids)
        prompts = [model.codec.encode_chat([{"role": "user", "content": q}]) for q in questions]
        if references is None:
            references = [reference_answer(gguf, p, args.tokens, stops) for p in prompts]
        rows = []
        for question, prompt, expected in zip(questions, prompts, references):
            got = until_stop(model.generate_ids(prompt, max_new_tokens=args.tokens).token_ids, stops)
            agree = got == expected
            rows.append({"question": question, "agree": agree, "ours": model.codec.decode(got),
                         "reference": model.codec.decode(expected)})
            if not agree:
                print(f"{name}: {question!r}\n  ours:      {rows[-1]['ours']!r}\n  reference: {rows[-1]['reference']!r}")
        results[name] = rows
        print(f"{name}: {sum(r['agree'] for r in rows)}/{len(rows)} agree (first {args.tokens} tokens)")
        model.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
