"""Run a native build (targets/native): libmodel.so through ctypes, with the Engine's interface.

The compiled model keeps its KV cache and activations in its own memory, so a call passes only
token ids and a logits buffer. Prefill is chunked as in engine.py (prefill_chunks), and a call
runs exactly the tokens it is given: the generated code is generic in the tokens per call, so
nothing is padded.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .engine import EngineSpec, _physical_cores, prefill_chunks

_INT64_P = ctypes.POINTER(ctypes.c_int64)
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


_LOADED: set[Path] = set()


def _load(library: Path) -> ctypes.CDLL:
    """The compiled model keeps its KV cache in static memory, and loading one path twice gives
    the same copy of it. A second engine on the same build loads a private copy of the library
    (a temporary file, removed once loaded), so two engines never share a cache."""
    if library not in _LOADED:
        _LOADED.add(library)
        return ctypes.CDLL(str(library))
    handle, path = tempfile.mkstemp(suffix=".so", prefix="edgellm-model-")
    try:
        with os.fdopen(handle, "wb") as out, open(library, "rb") as src:
            shutil.copyfileobj(src, out)
        return ctypes.CDLL(path)
    finally:
        os.unlink(path)


class NativeEngine:
    def __init__(self, program_dir: Path, spec: EngineSpec, threads: int | None = None):
        self.spec = spec
        library = Path(program_dir) / "libmodel.so"
        if not library.is_file():
            raise EdgeLLMError(f"{program_dir}: no libmodel.so; run `edgellm compile ... --resume`")
        self.lib = _load(library.resolve())
        self.lib.em_init.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.em_forward.argtypes = [_INT64_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _FLOAT_P]
        self.lib.em_last_error.restype = ctypes.c_char_p
        if self.lib.em_init(str(Path(program_dir) / "weights.bin").encode(), threads or _physical_cores()) != 0:
            raise EdgeLLMError(self.lib.em_last_error().decode())
        self.ids = np.zeros(spec.group_size, np.int64)
        self.logits = np.zeros((spec.group_size if spec.return_logits else 1, spec.vocab_size), np.float32)

    def run(self, token_ids: list[int], start: int, logits_row: int = 0, rows: slice | None = None) -> np.ndarray:
        """Process token_ids at positions start..; return row logits_row's logits, or with `rows`
        (return_logits builds) those rows as [n, vocab]."""
        n = len(token_ids)
        if not 1 <= n <= len(self.ids):
            raise EdgeLLMError(f"bad call: {n} tokens (at most {len(self.ids)} per call)")
        self.ids[:n] = token_ids
        status = self.lib.em_forward(self.ids.ctypes.data_as(_INT64_P), n, start, logits_row,
                                     self.logits.ctypes.data_as(_FLOAT_P))
        if status != 0:
            raise EdgeLLMError(self.lib.em_last_error().decode())
        if rows is not None:
            return self.logits[rows].copy()
        return self.logits[logits_row if n > 1 and self.spec.return_logits else 0].copy()

    def prefill(self, tokens: list[int], cached: int) -> np.ndarray:
        logits = None
        for start, chunk, _ in prefill_chunks(tokens, cached, self.spec.group_size):
            logits = self.run(chunk, start, logits_row=len(chunk) - 1)
        return logits

    def prompt_logits(self, tokens: list[int]) -> np.ndarray:
        if not self.spec.return_logits:
            return np.concatenate([self.run([t], p)[None] for p, t in enumerate(tokens)])
        return np.concatenate([self.run(chunk, start, rows=slice(first, len(chunk)))
                               for start, chunk, first in prefill_chunks(tokens, 0, self.spec.group_size)])

    def decode(self, token: int, position: int) -> np.ndarray:
        return self.run([token], position)
