"""Run a cpu-target build (ONNX Runtime): one engine, any number of sessions.

The engine holds one InferenceSession per program variant (group = up to the group size rows per
call, single = one row), or one for both with filter sharing; a session (OrtSession) holds its own
KV cache buffers and its own I/O bindings. The cache is one position-major buffer per layer and
K/V, sized max_num_tokens; each call binds a view of its first `bucket` positions (the smallest
bucket covering the positions the call writes), so attention costs grow with the bucket, and the
program's present.* outputs alias the cache inputs, so the cache is updated in place.

A call of 2 to 8 rows runs as that many decode steps, so that speculative decoding keeps the plain
decode's tokens (it gains no speed here: no program reads the weights once for several rows). The
group program runs a fixed number of rows unless filter sharing made it generic: a call of
fewer rows is padded at its end (the padding writes K/V past the call's last position, which
later calls overwrite before anything reads them), or, near the end of the context, moved back
over positions the session already holds (recomputing them rewrites the same K/V).
"""

from __future__ import annotations

import bisect
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from .engine import VERIFY_ROWS, Engine, EngineSession, EngineSpec, physical_cores, rope_positions


def open_program(path: Path, opts) -> ort.InferenceSession:
    """ONNX Runtime's session of a build's program; a program it cannot load is one line."""
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own classes, one per status code)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EdgeLLMError(f"{path}: ONNX Runtime cannot load it ({first}); `edgellm verify` checks a build's "
                           "files") from None


class OrtEngine(Engine):
    def __init__(self, program_dir: Path, spec: EngineSpec, threads: int | None = None):
        self.spec = spec
        self.program_dir = Path(program_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Integer weights run in MatMulNBits; its accuracy level picks float activations (1) or
        # activations quantized to int8 per block inside the kernel (4, ONNX Runtime's default).
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4" if spec.int8_activations else "1")
        if (self.program_dir / "shared.onnx").is_file():  # filter sharing: one program serves both
            shared = open_program(self.program_dir / "shared.onnx", opts)
            self.programs = {"group": shared, "single": shared}
            self.rows = {"group": None, "single": 1}  # None: generic in the rows per call
        else:
            self.programs = {v: open_program(self.program_dir / f"{v}.onnx", opts) for v in ("group", "single")}
            self.rows = {"group": spec.group_size, "single": 1}
        self.sessions: weakref.WeakSet[OrtSession] = weakref.WeakSet()
        self._closed = False
        # LORA_BRANCH programs: the adapter factors and scale are inputs (runtime/adapters.py)
        self.branch_inputs = {i.name: tuple(i.shape) for i in self.programs["single"].get_inputs()
                              if i.name.startswith("lora.")}
        # no adapter: zero factors (views of one buffer), which every session binds until it chooses one
        factors = {n: s for n, s in self.branch_inputs.items() if n != "lora.scale"}
        zeros = np.zeros(max((int(np.prod(s)) for s in factors.values()), default=0), np.float32)
        self.no_adapter = {n: zeros[: int(np.prod(s))].reshape(s) for n, s in factors.items()}

    @property
    def closed(self) -> bool:
        return self._closed

    def branch_sites(self) -> dict[str, tuple[int, int, int]]:
        return {name[len("lora.") : -len(".a")]: (shape[0], self.branch_inputs[name[:-2] + ".b"][1], shape[1])
                for name, shape in self.branch_inputs.items() if name.endswith(".a")}

    def branch_arrays(self, factors) -> dict[str, np.ndarray]:
        """The factors as the program's float inputs: lora.<site>.a [K, C], lora.<site>.b [C, N]."""
        arrays = {}
        for site, f in factors.items():
            arrays[f"lora.{site}.a"] = np.ascontiguousarray(f.float_a().T, np.float32)
            arrays[f"lora.{site}.b"] = np.ascontiguousarray(f.float_b(), np.float32)
        return arrays

    def _new_session(self) -> "OrtSession":
        return OrtSession(self)

    def session_bytes(self) -> int:
        return 2 * self.spec.num_layers * self.spec.max_num_tokens * self.spec.kv_width * 4

    def _free(self) -> None:
        self.programs = {}
        self._closed = True


class OrtSession(EngineSession):
    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.spec = spec = engine.spec
        self.length = 0
        self.tokens = np.zeros(spec.max_num_tokens, np.int64)  # the ids at each position (negative: an embedding row)
        self.until = np.arange(1, spec.max_num_tokens + 1)  # the attend_until each held position was computed with
        if spec.rope_grid:  # M-RoPE: each held position's three (engine.rope_positions)
            self.rope = np.zeros((3, spec.max_num_tokens), np.int64)
        shape = (1, spec.max_num_tokens, spec.kv_width)
        self.cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(spec.num_layers)]
        # Small inputs live in fixed buffers bound once; a call writes into them.
        self.inputs = {
            v: {"input_ids": np.zeros((1, s), np.int64), "position_ids": np.zeros((1, s), np.int64),
                "attend_until": np.zeros((1, s), np.int64),
                "embeddings": np.zeros((1, s, spec.hidden_size), np.float32),
                "logits_index": np.zeros(s, np.int64)}
            for v, s in (("group", spec.group_size), ("single", 1))
        }
        # M-RoPE: [3, rows] per call size, each its own array (a view of the first rows of a wider
        # one would not be contiguous, and ONNX Runtime would bind a copy made once)
        self.rope_inputs: dict[int, np.ndarray] = {}
        self.logits = {v: np.zeros((1, s, spec.vocab_size), np.float32)
                       for v, s in (("group", spec.group_size), ("single", 1))}
        self._bindings: dict[tuple[str, int, int], ort.IOBinding] = {}
        self.closed = False
        self.branch = engine.no_adapter  # the adapter's factors, bound as the branch inputs
        self.branch_scale = np.zeros(1, np.float32)

    def set_adapter(self, factors: dict[str, np.ndarray] | None, scale: float) -> None:
        if not self.engine.branch_inputs:
            raise EdgeLLMError(f"{self.engine.program_dir}: this build has no LoRA branches")
        factors = self.engine.no_adapter if factors is None else factors
        if factors is not self.branch:
            self.branch = factors
            self._bindings = {}  # bound again with the new arrays on the next call
        self.branch_scale[0] = scale

    def close(self) -> None:
        self.cache, self._bindings, self.closed = [], {}, True

    def _live(self) -> None:
        if self.closed:
            raise EdgeLLMError(f"{self.engine.program_dir}: this session was closed (or its model was)")

    def _save(self, length: int) -> list[np.ndarray]:
        parts = [self.tokens[:length].copy(), self.until[:length].copy()]
        if self.spec.rope_grid:
            parts.append(self.rope[:, :length].copy())
        return parts + [buf[0, :length].copy() for pair in self.cache for buf in pair]

    def _load(self, parts, held: int, length: int) -> None:
        self.tokens[:length], self.until[:length] = parts[0][:length], parts[1][:length]
        if self.spec.rope_grid:
            self.rope[:, :length] = parts[2][:, :length]
        for buf, part in zip((buf for pair in self.cache for buf in pair), parts[-2 * len(self.cache):], strict=True):
            buf[0, :length] = part[:length]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise EdgeLLMError(f"cannot truncate a session of {self.length} positions to {length}")
        self.length = length

    def _rope_input(self, size: int) -> np.ndarray:
        if size not in self.rope_inputs:
            self.rope_inputs[size] = np.zeros((3, size), np.int64)
        return self.rope_inputs[size]

    def _bucket(self, positions_end: int) -> int:
        buckets = self.spec.buckets
        i = bisect.bisect_left(buckets, positions_end)
        if i == len(buckets):
            raise EdgeLLMError(f"position {positions_end} beyond the context of {self.spec.max_num_tokens}")
        return buckets[i]

    def _binding(self, variant: str, bucket: int, size: int, rows: int) -> ort.IOBinding:
        key = (variant, bucket, size, rows)
        if key not in self._bindings:
            program = self.engine.programs[variant]
            io = program.io_binding()
            names = {i.name for i in program.get_inputs()}
            for name, buf in self.inputs[variant].items():
                if name in names:
                    view = buf[:rows] if name == "logits_index" else buf[:, :size]
                    io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(view))
            for i, (k, v) in enumerate(self.cache):
                for which, buf in (("k", k), ("v", v)):
                    view = ort.OrtValue.ortvalue_from_numpy(buf[:, :bucket])
                    io.bind_ortvalue_input(f"cache.{i}.{which}", view)
                    io.bind_ortvalue_output(f"present.{i}.{which}", view)
            if "rope_positions" in names:
                io.bind_ortvalue_input("rope_positions", ort.OrtValue.ortvalue_from_numpy(self._rope_input(size)))
            if self.engine.branch_inputs:
                for name, array in self.branch.items():
                    io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
                io.bind_ortvalue_input("lora.scale", ort.OrtValue.ortvalue_from_numpy(self.branch_scale))
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits[variant][:, :rows]))
            self._bindings[key] = io
        return self._bindings[key]

    def forward(self, ids, start: int, logits_from: int | None = None, embeddings: np.ndarray | None = None,
                until: np.ndarray | None = None) -> np.ndarray:
        self._live()
        n = len(ids)
        logits_from = n - 1 if logits_from is None else logits_from
        self._check(n, start, logits_from, embeddings)
        until = self._check_until(until, n, start)
        ids = np.asarray(ids, np.int64)
        if (ids >= self.spec.vocab_size).any():
            raise EdgeLLMError(f"token id outside the vocabulary of {self.spec.vocab_size}: {ids.tolist()}")
        if (ids < 0).any() and embeddings is None:
            raise EdgeLLMError("a row with a negative id takes an embedding vector, and no embeddings were given")
        ids = np.maximum(ids, -1)  # any negative id is an embedding row (and a valid Gather index)
        if 1 < n <= VERIFY_ROWS and until is None:
            # a few rows (a speculative verify call): one decode step each, so that every row's
            # logits are a decode step's, as on the native targets (the group program's differ
            # at int8 rounding); ONNX Runtime has no program that reads the weights once for them
            rows = [self.forward(ids[i : i + 1], start + i, 0, None if embeddings is None else embeddings[i : i + 1])
                    for i in range(n)]
            return np.concatenate(rows[logits_from:])
        variant = "single" if n == 1 else "group"
        size = self.engine.rows[variant] or n
        # a fixed-size call that would pass the context's end moves back over held positions
        first = min(start, self.spec.max_num_tokens - size)
        if first < 0 or (self.tokens[first:start] < 0).any():
            raise EdgeLLMError(f"bad call: {n} rows at position {start} cannot be padded to the group of {size} within "
                               f"the context of {self.spec.max_num_tokens}")
        self.tokens[start : start + n] = ids
        self.until[start : start + n] = np.arange(start + 1, start + n + 1) if until is None else until
        buf = self.inputs[variant]
        rows = np.concatenate([self.tokens[first:start], ids])
        buf["input_ids"][0, : len(rows)] = rows
        buf["input_ids"][0, len(rows) : size] = max(int(rows[-1]), 0)
        if embeddings is not None:
            buf["embeddings"][0, start - first : start - first + n] = embeddings
        buf["position_ids"][0, :size] = np.arange(first, first + size)
        if self.spec.rope_grid:
            rope_positions(self.tokens, self.rope, start, start + n, self.spec.rope_grid)
            rope = self._rope_input(size)
            rope[:, : start + n - first] = self.rope[:, first : start + n]
            rope[:, start + n - first :] = self.rope[:, start + n - 1 : start + n]  # padding: any position
        buf["attend_until"][0, : start + n - first] = self.until[first : start + n]  # held rows: as computed
        buf["attend_until"][0, start + n - first : size] = np.arange(start + n + 1, first + size + 1)  # padding
        count = n - logits_from
        buf["logits_index"][:count] = np.arange(logits_from, n) + (start - first)
        io = self._binding(variant, self._bucket(first + size), size, count if variant == "group" else 1)
        self.engine.programs[variant].run_with_iobinding(io)
        self.length = start + n
        return self.logits[variant][0, :count].copy()
