"""Run a compiled program pair (group = prefill, single = decode) over a persistent KV cache.

The KV cache is one position-major buffer per layer and K/V, sized max_num_tokens. Each call
binds a view of its first `bucket` positions (the smallest bucket covering the positions the call
writes), so attention costs grow with the bucket, not with the context limit, and the cache is
updated in place through I/O binding (the program's present.* outputs alias the cache inputs).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass
class EngineSpec:
    num_layers: int
    kv_width: int  # kv_heads * head_dim
    vocab_size: int
    group_size: int
    max_num_tokens: int
    buckets: list[int]
    int8_activations: bool = False
    return_logits: bool = False  # the group program returns logits for every position


class Engine:
    def __init__(self, program_dir: Path, spec: EngineSpec, threads: int | None = None):
        self.spec = spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or _physical_cores()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Integer weights run in MatMulNBits; its accuracy level picks float activations (1) or
        # activations quantized to int8 per block inside the kernel (4, ONNX Runtime's default).
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4" if spec.int8_activations else "1")
        if (program_dir / "shared.onnx").is_file():  # filter sharing: one program serves both
            shared = ort.InferenceSession(str(program_dir / "shared.onnx"), opts, providers=["CPUExecutionProvider"])
            self.sessions = {"group": shared, "single": shared}
        else:
            self.sessions = {
                v: ort.InferenceSession(str(program_dir / f"{v}.onnx"), opts, providers=["CPUExecutionProvider"])
                for v in ("group", "single")
            }
        shape = (1, spec.max_num_tokens, spec.kv_width)
        self.cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(spec.num_layers)]
        # Small inputs live in fixed buffers bound once; a call only writes into them.
        self.inputs = {
            v: {
                "input_ids": np.zeros((1, s), np.int64),
                "position_ids": np.zeros((1, s), np.int64),
                "logits_index": np.zeros((1,), np.int64),
            }
            for v, s in (("group", spec.group_size), ("single", 1))
        }
        self.logits = {
            "group": np.zeros((1, spec.group_size if spec.return_logits else 1, spec.vocab_size), np.float32),
            "single": np.zeros((1, 1, spec.vocab_size), np.float32),
        }
        self._bindings: dict[tuple[str, int], ort.IOBinding] = {}

    def bucket(self, positions_end: int) -> int:
        i = bisect.bisect_left(self.spec.buckets, positions_end)
        if i == len(self.spec.buckets):
            raise ValueError(f"position {positions_end} beyond the context of {self.spec.max_num_tokens}")
        return self.spec.buckets[i]

    def _binding(self, variant: str, bucket: int) -> ort.IOBinding:
        key = (variant, bucket)
        if key not in self._bindings:
            session = self.sessions[variant]
            io = session.io_binding()
            names = {i.name for i in session.get_inputs()}
            for name, buf in self.inputs[variant].items():
                if name in names:
                    io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
            for i, (k, v) in enumerate(self.cache):
                for which, buf in (("k", k), ("v", v)):
                    view = ort.OrtValue.ortvalue_from_numpy(buf[:, :bucket])
                    io.bind_ortvalue_input(f"cache.{i}.{which}", view)
                    io.bind_ortvalue_output(f"present.{i}.{which}", view)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits[variant]))
            self._bindings[key] = io
        return self._bindings[key]

    def run(self, variant: str, token_ids: list[int], start: int, logits_row: int = 0, rows: slice | None = None) -> np.ndarray:
        """Process token_ids at positions start.. (padded to the variant's size); return logits
        of row logits_row as a fresh [vocab] array, or with `rows` (return_logits builds) those
        rows as [n, vocab]."""
        buf = self.inputs[variant]
        size = buf["input_ids"].shape[1]
        n = len(token_ids)
        buf["input_ids"][0, :n] = token_ids
        buf["input_ids"][0, n:] = token_ids[-1] if n else 0
        buf["position_ids"][0] = np.arange(start, start + size)
        buf["logits_index"][0] = logits_row
        io = self._binding(variant, self.bucket(start + size))
        self.sessions[variant].run_with_iobinding(io)
        logits = self.logits[variant][0]
        if rows is not None:
            return logits[rows].copy()
        return logits[logits_row if logits.shape[0] > 1 else 0].copy()

    def prefill(self, tokens: list[int], cached: int) -> np.ndarray:
        """Fill the cache for tokens[cached:], given tokens[:cached] are already in it; return the
        logits after the last token.

        Chunks are language_group_size tokens. A short last chunk is moved back to end at the last
        token (recomputing a few cached positions, which rewrites the same K/V) instead of padding
        past the end, so no chunk ever writes beyond max(len(tokens), group_size).
        """
        logits = None
        for start, chunk, _ in prefill_chunks(tokens, cached, self.spec.group_size):
            logits = self.run("group", chunk, start, logits_row=len(chunk) - 1)
        return logits

    def prompt_logits(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), vocab]: the logits after every token, from an empty cache. Needs a
        return_logits build for prefill; otherwise the tokens go one decode step at a time."""
        if self.spec.return_logits:
            rows = [self.run("group", chunk, start, rows=slice(first, len(chunk)))
                    for start, chunk, first in prefill_chunks(tokens, 0, self.spec.group_size)]
        else:
            rows = [self.run("single", [t], p)[None] for p, t in enumerate(tokens)]
        return np.concatenate(rows)

    def decode(self, token: int, position: int) -> np.ndarray:
        return self.run("single", [token], position)


def prefill_chunks(tokens: list[int], cached: int, group: int):
    """(start position, chunk of at most `group` tokens, index of its first new token) covering
    tokens[cached:]. A short last chunk is moved back to end at the last token instead of padded
    past it (Engine.prefill)."""
    end, pos = len(tokens), cached
    while pos < end:
        start = pos if end - pos >= group else max(0, end - group)
        chunk = tokens[start : min(start + group, end)]
        yield start, chunk, pos - start
        pos = start + len(chunk)


def _physical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
