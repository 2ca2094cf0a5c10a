"""Fuzzing every input edgellm reads (issue 15): model files, configs, tokenizer files, plans,
chat templates, runtime flags and build outputs, each case run through the `edgellm` command as a
user runs it.

Every case must either work (exit 0) or be refused: exit code 2 with one `error:` line and no
traceback. Anything else is a finding: a traceback (any other exit code), a hang (no exit within
the time limit), a crash (death by a signal), a run whose peak memory passed 1 GB, or a damaged
build that `edgellm verify` accepted. Cases are mutations of a tiny llama model written once per
run (safetensors, its GGUF, a cpu and a native build); each is reproducible from (seed, index).

    python tests/fuzz.py --cases 10000 --seed 1          # the long run (docs/RELIABILITY.md)
    python tests/fuzz.py --cases 200 --category gguf     # one category
tests/test_fuzz.py runs a short, fixed budget of it in the test suite.

Cases run in processes forked from this one after it has imported edgellm, so a case costs the
command's work, not Python's start; each runs with OMP_NUM_THREADS=1 and an address-space limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MEMORY_BAR = 1 << 30  # peak resident bytes a case may reach
ADDRESS_LIMIT = 8 << 30  # a backstop, so a runaway case fails in its own process, not the machine
CASE_SECONDS = 60
SMALL = ["--max_num_tokens", "64", "--future_token_mask_size", "64", "--language_group_size", "16"]
CATEGORIES = ("gguf", "safetensors", "config", "tokenizer", "plan", "template", "flags", "outputs")
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 64, 255, 256, 1023, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                    10**9, 10**12, -(2**31), -(2**63)]
INTERESTING_VALUES = [*INTERESTING_INTS, 0.0, -0.0, 0.5, 1e-30, 1e30, 1e308, math.nan, math.inf, -math.inf, "", "64",
                      "nan", "llama", None, True, False, [], [1, 2], {}, {"rope_type": "linear"}, "x" * 1000]


@dataclass
class Seeds:
    """The valid inputs every case mutates, written once per run under root."""
    root: Path
    model: Path = field(init=False)  # a Hugging Face directory
    gguf: Path = field(init=False)
    builds: dict[str, Path] = field(init=False)  # target -> complete build

    def __post_init__(self):
        self.model, self.gguf = self.root / "model", self.root / "model.gguf"
        self.builds = {target: self.root / f"build-{target}" for target in ("cpu", "native")}

    @classmethod
    def ready(cls, root: Path) -> "Seeds":
        seeds = cls(root)
        if not all((b / "build.json").is_file() for b in seeds.builds.values()):
            # in another process: torch and transformers stay out of the process cases fork from
            import subprocess

            root.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, __file__, "--write-seeds", str(root)], check=True)
        return seeds

    def write(self) -> None:
        from edgellm.build import BuildOptions, compile_model
        from gguf_writer import write_gguf
        from tiny_models import save_tiny

        if not (self.model / "config.json").is_file():
            save_tiny("llama", self.model)
            (self.model / "tokenizer_config.json").write_text(json.dumps({
                "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>",
                "bos_token": "w1", "eos_token": "w2"}))
        if not self.gguf.is_file():
            write_gguf(self.model, self.gguf, "llama")
        for target, out in self.builds.items():
            if not (out / "build.json").is_file():
                compile_model(self.model, out, BuildOptions(max_num_tokens=64, future_token_mask_size=64,
                                                            language_group_size=16, target=target))


@dataclass
class Case:
    category: str
    index: int
    commands: list[list[str]]  # run in order until one does not exit 0
    must_refuse: bool = False  # the first command must exit 2 (a damaged build under verify)
    note: str = ""  # what was mutated


@dataclass
class Outcome:
    kind: str  # ok, refused, traceback, hang, crash, memory, accepted-damage
    seconds: float
    peak: int  # bytes
    detail: str = ""


# --- mutations --------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, hot: int | None = None) -> tuple[bytes, str]:
    """A random byte-level damage; hot: most damage falls in the first `hot` bytes (headers)."""
    data = bytearray(data)
    span = len(data) if hot is None or rng.random() < 0.3 else min(hot, len(data))
    at = rng.randrange(max(span, 1))
    kind = rng.choice(["flip", "int", "truncate", "insert", "delete", "zero", "append"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    elif kind == "int":
        value = rng.choice(INTERESTING_INTS) & 0xFFFFFFFFFFFFFFFF
        width = rng.choice([4, 8])
        data[at : at + width] = value.to_bytes(8, "little")[:width]
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        del data[at : at + rng.randint(1, 64)]
    elif kind == "zero":
        size = rng.randint(1, 1 << 20)
        data[at : at + size] = bytes(len(data[at : at + size]))
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(data), f"{kind} at {at}"


def mutate_json(value, rng: random.Random, depth: int = 0):
    """The value with one random change somewhere inside: a value replaced, a key removed or added."""
    if isinstance(value, dict) and value and (depth < 4 and rng.random() < 0.6):
        key = rng.choice(sorted(value, key=str))
        copy = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del copy[key]
        elif roll < 0.25:
            copy[rng.choice(["defualt", "when", "x", key + "_"])] = rng.choice(INTERESTING_VALUES)
        else:
            copy[key] = mutate_json(value[key], rng, depth + 1)
        return copy
    if isinstance(value, list) and value and (depth < 4 and rng.random() < 0.6):
        copy = list(value)
        i = rng.randrange(len(copy))
        copy[i] = mutate_json(copy[i], rng, depth + 1)
        if rng.random() < 0.1:
            del copy[i]
        return copy
    return rng.choice(INTERESTING_VALUES)


def dump_json(value, rng: random.Random) -> str:
    text = json.dumps(value)  # (NaN and Infinity as Python writes them: config.json files in the wild do)
    return text[: rng.randrange(len(text))] if rng.random() < 0.05 else text


def copy_model(seeds: Seeds, case_dir: Path) -> Path:
    return Path(shutil.copytree(seeds.model, case_dir / "model"))


def gguf_case(seeds, rng, case_dir) -> tuple[list[str], str]:
    path = case_dir / "model.gguf"
    data = seeds.gguf.read_bytes()
    if rng.random() < 0.5:
        data, note = mutate_gguf_field(seeds.gguf, rng)
    else:
        data, note = mutate_bytes(data, rng, hot=4096)
    path.write_bytes(data)
    return [str(path)], note


def mutate_gguf_field(path: Path, rng: random.Random) -> tuple[bytes, str]:
    """One metadata value or type tag of the GGUF overwritten, found through the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    target = rng.choice(fields)
    # parts: [key length, key, type, (array type, count,) value(s)]
    offsets, at = [], target.offset
    for part in target.parts:
        offsets.append(at)
        at += part.nbytes
    data = bytearray(path.read_bytes())
    what = rng.random()
    if what < 0.3:
        data[offsets[2] : offsets[2] + 4] = struct.pack("<I", rng.choice([0, 4, 5, 6, 8, 9, 10, 12, 13, 255]))
        note = f"{target.name}: type tag"
    elif what < 0.5 and len(target.parts) > 4:
        data[offsets[4] : offsets[4] + 8] = struct.pack("<Q", rng.choice(INTERESTING_INTS) & (2**64 - 1))
        note = f"{target.name}: array count"
    elif what < 0.6:
        data[offsets[0] : offsets[0] + 8] = struct.pack("<Q", rng.choice(INTERESTING_INTS) & (2**64 - 1))
        note = f"{target.name}: key length"
    else:
        start = offsets[-1]
        width = int(target.parts[-1].nbytes)
        value = rng.choice([*INTERESTING_INTS, math.nan, math.inf, -1.5])
        raw = struct.pack("<d", value) if isinstance(value, float) else (value & (2**64 - 1)).to_bytes(8, "little")
        if isinstance(value, float) and width == 4:
            raw = struct.pack("<f", value)
        data[start : start + width] = raw[:width].ljust(width, b"\0")
        note = f"{target.name}: value {value}"
    return bytes(data), note


def safetensors_case(seeds, rng, case_dir):
    model = copy_model(seeds, case_dir)
    path = model / "model.safetensors"
    data = path.read_bytes()
    if rng.random() < 0.6:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        roll = rng.random()
        if roll < 0.1:
            header = rng.choice([[], 5, "x", [header]])
            note = "header not an object"
        else:
            name = rng.choice(sorted(k for k in header if k != "__metadata__"))
            entry = dict(header[name])
            key = rng.choice(["data_offsets", "dtype", "shape"])
            if rng.random() < 0.2:
                del entry[key]
            elif key == "data_offsets":
                begin, end = entry["data_offsets"]
                entry[key] = rng.choice([[-128, 0], [end, begin], [0, end], [begin, end + 4], [begin - 4, end - 4],
                                         [begin, 2**63], [begin], "0", [begin, end, 1], [float(begin), end]])
            elif key == "dtype":
                entry[key] = rng.choice(["F16", "BF16", "I8", "U8", "F64", "I64", "BOOL", "X", 3, None])
            else:
                entry[key] = rng.choice([[], [0], [2**40, 2], [-1, 64], list(reversed(entry["shape"])), "64",
                                         entry["shape"] + [1], [64, 64, 64]])
            header[name] = entry
            note = f"{name}.{key} = {entry.get(key)!r}"
        body = json.dumps(header).encode()
        length = len(body) + rng.choice([0, 0, 0, -1, 1, 2**40])
        data = struct.pack("<Q", length & (2**64 - 1)) + body + data[8 + struct.unpack("<Q", data[:8])[0] :]
    else:
        data, note = mutate_bytes(data, rng, hot=2048)
    path.write_bytes(data)
    return [str(model)], note


def config_case(seeds, rng, case_dir):
    model = copy_model(seeds, case_dir)
    config = json.loads((model / "config.json").read_text())
    key = rng.choice(sorted(config))
    if rng.random() < 0.8:
        config[key] = mutate_json(config[key], rng) if rng.random() < 0.3 else rng.choice(INTERESTING_VALUES)
        note = f"{key} = {config[key]!r}"[:200]
    else:
        config = mutate_json(config, rng)
        note = "structure"
    (model / "config.json").write_text(dump_json(config, rng))
    if rng.random() < 0.1:  # a shard index that points elsewhere
        shard = rng.choice(["/dev/zero", "../../etc/passwd", "/etc/hostname", "model.safetensors", "fifo", "nope"])
        if shard == "fifo":
            os.mkfifo(model / "fifo")
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            name: shard for name in _tensor_names(model)}}))
        note += f"; index -> {shard}"
    return [str(model)], note


def _tensor_names(model: Path) -> list[str]:
    data = (model / "model.safetensors").read_bytes()
    return [k for k in json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]]) if k != "__metadata__"]


def tokenizer_case(seeds, rng, case_dir):
    model = copy_model(seeds, case_dir)
    name = rng.choice(["tokenizer.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"])
    path = model / name
    if rng.random() < 0.15:
        data, note = mutate_bytes(path.read_bytes(), rng)
        path.write_bytes(data)
    else:
        path.write_text(dump_json(mutate_json(json.loads(path.read_text()), rng), rng))
        note = "json"
    return [str(model)], f"{name}: {note}"


PLAN_SNIPPETS = [
    "while True: pass", "x = 'a' * (1 << 34)", "raise RuntimeError('plan')", "import os; os._exit(3)",
    "import sys; sys.exit(0)", "1/0", "get_layer_configuration = 5", "print('x' * 100000)",
    "def get_layer_configuration(p, layer): return {'precision': 'int8'}",
    "def get_layer_configuration(p, layer): return {'precision': 'INT4'}",
    "def get_layer_configuration(p, layer): return None",
    "def get_layer_configuration(p, layer): return {'precision': 'A_BF16_W_INT4', 'lora': 'NOPE'}",
    "def get_layer_configuration(p, layer): return get_layer_configuration(p, layer)",
    "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
]
PLAN_JSON = {"default": {"precision": "A_BF16_W_INT8"},
             "rules": [{"match": {"part": "POST", "index": 1}, "set": {"precision": "A_BF16_W_INT4"}}]}


def plan_case(seeds, rng, case_dir):
    suffix = rng.choice([".py", ".json", ".json", ".toml", ".txt", ".yaml", ""])
    plan = case_dir / f"plan{suffix}"
    if suffix == ".py":
        plan.write_text("\n".join(rng.sample(PLAN_SNIPPETS, rng.randint(1, 2))))
        note = "python"
    elif suffix == ".toml":
        plan.write_text(rng.choice(['default = { precision = "A_BF16_W_INT8" }', "default = [", "x = 1\n[[rules]]\nmatch = 3",
                                    '[default]\nprecision = 7', "\x00\xff"]))
        note = "toml"
    else:
        plan.write_text(dump_json(mutate_json(PLAN_JSON, rng), rng))
        note = "json"
    argv = [str(seeds.model), "-c", str(plan) if rng.random() < 0.9 else rng.choice(["int4", "int8", "nope", ""])]
    return argv, note


TEMPLATE_SNIPPETS = [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "{{ bos_token }}", "{{ eos_token }}",
    "{% if add_generation_prompt %}assistant:{% endif %}", "{{ raise_exception('bad') }}", "{{ messages[5] }}",
    "{{ 'a' * 10**10 }}", "{{ 10 ** 100000 }}", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{{ '%1000000000d' % 1 }}", "{{ 'x'|center(1000000000) }}", "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__ }}",
    "{% for", "{{ }}", "{% endfor %}", "{{ messages|tojson }}", "{{ strftime_now('%Y') }}", "{{ undefined_name.x }}",
    "{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}", "\x00\ud800", "{{ messages[0]['content'][::-1] }}",
]


def template_case(seeds, rng, case_dir):
    build = Path(shutil.copytree(seeds.builds["cpu"], case_dir / "build", ignore=shutil.ignore_patterns("onnx", "quant")))
    settings = json.loads((build / "runtime" / "runtime_config.json").read_text())
    template = "".join(rng.choice(TEMPLATE_SNIPPETS) for _ in range(rng.randint(1, 4)))
    settings["chat_template"] = template if rng.random() < 0.95 else rng.choice(INTERESTING_VALUES)
    (build / "runtime" / "runtime_config.json").write_text(json.dumps(settings))
    return [["generate", str(build), "--chat", "-p", "hello", "-n", "2", "--threads", "1"]], template[:200]


FLAG_VALUES = ["0", "1", "-1", "2", "1e9", "nan", "inf", "-inf", "abc", "", "0.5", "100000", "99999999999999999999",
               "-0", "1.5", "0x10"]


def flags_case(seeds, rng, case_dir):
    build = seeds.builds[rng.choice(["cpu", "native"])]
    argv = ["generate", str(build)]
    for flag in rng.sample(["-n", "--temperature", "--top-p", "--top-k", "--seed", "--threads", "--lookup",
                            "--draft-max", "--adapter", "--image"], rng.randint(1, 4)):
        argv += [flag, rng.choice(FLAG_VALUES)]
    prompt = rng.choice(["hello", "", "w1 w2 " * 200, "\udcff\udcfe", "a\x00b", "ü" * 50, "w1 " * 70])
    argv += ["-p", prompt]
    if rng.random() < 0.5:
        argv += ["--chat"]
    if "-n" not in argv:
        argv += ["-n", "2"]
    if rng.random() < 0.2:
        argv.insert(rng.randrange(1, len(argv)), rng.choice(["--bogus", "-z", "--json", "--", "-p"]))
    return [argv], " ".join(argv[2:])[:200]


def outputs_case(seeds, rng, case_dir):
    """A build with one file damaged: verify must refuse it; generate works or refuses."""
    target = rng.choice(["cpu", "native"])
    build = Path(shutil.copytree(seeds.builds[target], case_dir / "build", ignore=shutil.ignore_patterns("onnx", "quant")))
    listed = sorted(json.loads((build / "build.json").read_text())["files"])
    name = rng.choice(listed + [f"compiled/{target}/weights.bin"] * len(listed))  # weights most often
    path = build / name
    before = path.read_bytes()
    after, note = mutate_bytes(before, rng)
    path.write_bytes(after)
    if after == before:
        return None
    return [["verify", str(build)], ["generate", str(build), "-p", "w1 w2", "-n", "2", "--threads", "1"]], f"{name}: {note}"


MAKERS = {"gguf": gguf_case, "safetensors": safetensors_case, "config": config_case, "tokenizer": tokenizer_case,
          "plan": plan_case, "template": template_case, "flags": flags_case, "outputs": outputs_case}


def make_case(seeds: Seeds, category: str, seed: int, index: int, case_dir: Path) -> Case | None:
    rng = random.Random(f"{seed}:{category}:{index}")
    made = MAKERS[category](seeds, rng, case_dir)
    if made is None:
        return None
    if category == "outputs":
        commands, note = made
        return Case(category, index, commands, must_refuse=True, note=note)
    if category in ("template", "flags"):
        commands, note = made
        return Case(category, index, commands, note=note)
    model_args, note = made
    out = str(case_dir / "out")
    compile_ = ["compile", model_args[0], "-o", out, "--target", "cpu", *SMALL, *model_args[1:]]
    run = ["generate", out, "-p", "w1 w2", "-n", "2", "--threads", "1"]
    return Case(category, index, [compile_, run], note=note)


# --- running ------------------------------------------------------------------------------------

def start(argv: list[str], case_dir: Path, log_name: str) -> int:
    """Fork a process that runs `edgellm ARGV` with its output in case_dir; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a hang is killed with everything it started
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
        log = os.open(case_dir / log_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log, 2)
        os.chdir(case_dir)
        sys.argv = ["edgellm", *argv]
        from edgellm.cli import main

        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (a finding: written out for the report)
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def classify(status: int, rusage, stderr: str, timed_out: bool, seconds: float) -> Outcome:
    peak = rusage.ru_maxrss * 1024
    lines = [line for line in stderr.splitlines() if line.strip()]
    if timed_out:
        return Outcome("hang", seconds, peak, stderr[-500:])
    if os.WIFSIGNALED(status):
        return Outcome("crash", seconds, peak, f"signal {os.WTERMSIG(status)}; {stderr[-500:]}")
    code = os.WEXITSTATUS(status)
    if peak > MEMORY_BAR:
        return Outcome("memory", seconds, peak, f"exit {code}; {stderr[-300:]}")
    if code == 0 and "Traceback" not in stderr:
        return Outcome("ok", seconds, peak)
    errors = [line for line in lines if line.startswith("error:")]
    if code == 2 and "Traceback" not in stderr and len(errors) == 1 and lines[-1] == errors[0]:
        return Outcome("refused", seconds, peak, errors[0][:300])
    return Outcome("traceback", seconds, peak, f"exit {code}; {stderr[-1500:]}")


def run_commands(case: Case, case_dir: Path, limit: float):
    """A generator: yields while the case runs (so many run at once), then returns its Outcome."""
    outcome = None
    for step, argv in enumerate(case.commands):
        began = time.monotonic()
        pid = start(argv, case_dir, f"stderr{step}")
        timed_out = False
        while True:
            done, status, rusage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - began > limit:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                done, status, rusage = os.wait4(pid, 0)
                break
            yield
        try:
            os.killpg(pid, signal.SIGKILL)  # anything the command left running
        except ProcessLookupError:
            pass
        stderr = (case_dir / f"stderr{step}").read_text(errors="replace")
        result = classify(status, rusage, stderr, timed_out, time.monotonic() - began)
        damage_check = case.must_refuse and step == 0
        if damage_check and result.kind == "ok":
            return Outcome("accepted-damage", result.seconds, result.peak, "verify accepted a damaged build")
        if result.kind not in ("ok", "refused"):
            return result
        if outcome is None or outcome.kind == "ok":
            outcome = result  # (the first refusal is the case's outcome)
        if result.kind == "refused" and not damage_check:
            break  # refused input: nothing further to run
    return outcome


def fuzz(seeds: Seeds, cases: int, seed: int, categories=CATEGORIES, workers: int | None = None,
         limit: float = CASE_SECONDS, report=print) -> dict:
    """Run `cases` cases spread over categories; returns counts per category and the findings."""
    # imported before forking, so that a case pays for its own work only
    from edgellm import build, cli, sources  # noqa: F401
    from edgellm.runtime import model  # noqa: F401

    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one thread a case: many run at once
    workers = workers or os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="edgellm-fuzz-"))
    counts: dict[str, Counter] = {c: Counter() for c in categories}
    findings, peaks = [], []
    running: list[tuple[Case, Path, object]] = []
    queue = [(categories[i % len(categories)], i) for i in range(cases)]
    started = time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < workers:
                category, index = queue.pop(0)
                case_dir = scratch / f"{category}-{index}"
                case_dir.mkdir()
                try:
                    case = make_case(seeds, category, seed, index, case_dir)
                except Exception as e:  # noqa: BLE001 (the harness's own failure: reported, not counted)
                    report(f"  could not make {category} case {index}: {type(e).__name__}: {e}")
                    case = None
                if case is None:
                    shutil.rmtree(case_dir, ignore_errors=True)
                    counts[category]["unchanged"] += 1
                    continue
                running.append((case, case_dir, run_commands(case, case_dir, limit)))
            for item in list(running):
                case, case_dir, steps = item
                try:
                    next(steps)
                except StopIteration as stop:
                    running.remove(item)
                    outcome: Outcome = stop.value
                    counts[case.category][outcome.kind] += 1
                    peaks.append(outcome.peak)
                    if outcome.kind not in ("ok", "refused"):
                        findings.append((case, outcome))
                        report(f"  {outcome.kind}: {case.category} #{case.index} ({case.note}): {outcome.detail[-400:]}")
                    shutil.rmtree(case_dir, ignore_errors=True)
            time.sleep(0.005)
    finally:
        for _, _, steps in running:
            steps.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"counts": counts, "findings": findings, "seconds": time.monotonic() - started,
            "peak": max(peaks, default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--category", action="append", choices=CATEGORIES)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seeds-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgellm-fuzz-seeds")
    parser.add_argument("--write-seeds", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(errors="backslashreplace")  # (findings quote inputs: lone surrogates included)
    if args.write_seeds:
        return Seeds(args.write_seeds).write()
    seeds = Seeds.ready(args.seeds_dir)
    result = fuzz(seeds, args.cases, args.seed, tuple(args.category or CATEGORIES), args.workers)
    total = Counter()
    for category, counts in result["counts"].items():
        total.update(counts)
        print(f"{category:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{'all':12s} " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    print(f"{sum(total.values())} cases in {result['seconds']:.0f} s; findings: {len(result['findings'])}; "
          f"largest peak resident memory of a case: {result['peak'] / 2**20:.0f} MB")
    sys.exit(1 if result["findings"] else 0)


if __name__ == "__main__":
    main()
