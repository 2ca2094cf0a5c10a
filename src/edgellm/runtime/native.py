"""Run a native build (targets/native): libmodel.so through ctypes, with the Engine's interface.

The compiled model keeps its KV cache and activations in its own memory, so a call passes only
token ids and a logits buffer. Prefill is chunked as in engine.py (prefill_chunks), and a call
runs exactly the tokens it is given: the generated code is generic in the tokens per call, so
nothing is padded.
"""

from __future__ import annotations

import _ctypes
import ctypes
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .engine import EngineSpec, _physical_cores, prefill_chunks

_INT64_P = ctypes.POINTER(ctypes.c_int64)
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


_IN_USE: set[Path] = set()  # libraries loaded from their own path by a live engine
_LOADED: dict[Path, tuple] = {}  # library path -> its file's identity when this process loaded it


def _identity(library: Path) -> tuple:
    st = library.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _load(library: Path) -> tuple[ctypes.CDLL, bool]:
    """The compiled model keeps its KV cache and weights in the library's static memory, and
    loading one path twice gives the same copy of it. So the first engine on a build loads the
    library itself; another one, while the first lives, loads a private copy (returns True),
    which it unloads when it is released. The copy is written next to the library (loadable, as
    the library is), else to the temporary directory. A path stays loaded once loaded (libgomp's
    threads live under it), so a library rebuilt since then is also run from a copy: loading
    the path again would give the old code."""
    identity = _identity(library)
    if library not in _IN_USE and _LOADED.get(library, identity) == identity:
        _IN_USE.add(library)
        _LOADED[library] = identity
        return ctypes.CDLL(str(library)), False
    for folder in (library.parent, None):
        try:
            handle, path = tempfile.mkstemp(suffix=".so", prefix=".edgellm-model-", dir=folder)
        except OSError:
            continue
        try:
            with os.fdopen(handle, "wb") as out, open(library, "rb") as src:
                shutil.copyfileobj(src, out)
            return ctypes.CDLL(path), True
        except OSError as e:
            if folder is None:
                raise EdgeLLMError(f"{library}: this engine needs a private copy of libmodel.so (another engine "
                                   f"holds the library, or it was rebuilt since it was loaded), and "
                                   f"{os.path.dirname(path)} would not load one ({e}); set TMPDIR to a directory "
                                   "that allows programs") from None
        finally:
            os.unlink(path)
    raise EdgeLLMError(f"{library}: cannot write a private copy of libmodel.so next to it or in the temporary directory")


def _release(lib: ctypes.CDLL, library: Path, private: bool) -> None:
    """Free the engine's weights mapping and cache; unload a private copy."""
    lib.em_close()
    if private:
        _ctypes.dlclose(lib._handle)
    else:
        _IN_USE.discard(library)


class NativeEngine:
    def __init__(self, program_dir: Path, spec: EngineSpec, threads: int | None = None):
        self.spec = spec
        self.program_dir = Path(program_dir)
        library = self.program_dir / "libmodel.so"
        if not library.is_file():
            raise EdgeLLMError(f"{program_dir}: no libmodel.so; run `edgellm compile ... --resume`")
        self.lib, private = _load(library.resolve())
        self.close = weakref.finalize(self, _release, self.lib, library.resolve(), private)
        self.lib.em_init.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.lib.em_forward.argtypes = [_INT64_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _FLOAT_P]
        self.lib.em_last_error.restype = ctypes.c_char_p
        if self.lib.em_init(str(Path(program_dir) / "weights.bin").encode(), threads or _physical_cores()) != 0:
            message = self.lib.em_last_error().decode()
            self.close()
            raise EdgeLLMError(message)
        self.ids = np.zeros(spec.group_size, np.int64)
        self.logits = np.zeros((spec.group_size if spec.return_logits else 1, spec.vocab_size), np.float32)
        self._pointers = self.ids.ctypes.data_as(_INT64_P), self.logits.ctypes.data_as(_FLOAT_P)  # once, not per token

    def run(self, token_ids: list[int], start: int, logits_row: int = 0, rows: slice | None = None) -> np.ndarray:
        """Process token_ids at positions start..; return row logits_row's logits, or with `rows`
        (return_logits builds) those rows as [n, vocab]."""
        if not self.close.alive:
            raise EdgeLLMError(f"{self.program_dir}: this engine was closed")
        n = len(token_ids)
        if not 1 <= n <= len(self.ids):
            raise EdgeLLMError(f"bad call: {n} tokens (at most {len(self.ids)} per call)")
        self.ids[:n] = token_ids
        ids, logits = self._pointers
        status = self.lib.em_forward(ids, n, start, logits_row, logits)
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
