"""Run a native build (targets/native): libmodel.so through ctypes.

The library holds no state of its own (kernels/edgellm_model.h): em_open maps the weights once
and returns a model, em_session_open gives each session its own KV cache and activation arena. A
call passes only row ids (and embedding rows), a logits buffer and positions; the generated code
is generic in the rows per call, so nothing is padded.
"""

from __future__ import annotations

import _ctypes
import ctypes
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .engine import VERIFY_ROWS, Engine, EngineSession, EngineSpec, physical_cores, rope_positions

_INT64_P = ctypes.POINTER(ctypes.c_int64)
_FLOAT_P = ctypes.POINTER(ctypes.c_float)

_LOADED: dict[Path, tuple] = {}  # library path -> its file's identity when this process loaded it


def _identity(library: Path) -> tuple:
    st = library.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _load(library: Path) -> tuple[ctypes.CDLL, bool]:
    """The library, and whether it was loaded from a private copy. A path stays loaded once loaded
    (libgomp's threads live under it) and loading it again gives the code it had then, so a library
    rebuilt since is loaded from a private copy (returns True), unloaded when its engine is
    released. The copy is written next to the library (loadable, as the library is), else to the
    temporary directory."""
    identity = _identity(library)
    if _LOADED.setdefault(library, identity) == identity:
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
                raise EdgeLLMError(f"{library}: it was rebuilt since this process loaded it, so this engine needs a "
                                   f"private copy, and {os.path.dirname(path)} would not load one ({e}); set TMPDIR to "
                                   "a directory that allows programs") from None
        finally:
            os.unlink(path)
    raise EdgeLLMError(f"{library}: cannot write a private copy of libmodel.so next to it or in the temporary directory")


def _declare(lib: ctypes.CDLL) -> None:
    lib.em_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.em_open.restype = ctypes.c_void_p
    lib.em_close.argtypes = [ctypes.c_void_p]
    lib.em_session_open.argtypes = [ctypes.c_void_p]
    lib.em_session_open.restype = ctypes.c_void_p
    lib.em_session_close.argtypes = [ctypes.c_void_p]
    # (rope last: a library built before M-RoPE ignores it)
    lib.em_forward.argtypes = [ctypes.c_void_p, _INT64_P, _FLOAT_P, _INT64_P, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               _FLOAT_P, _INT64_P]
    if hasattr(lib, "em_forward_rows"):  # builds before batched rows lack it (forward_batch then loops)
        lib.em_forward_rows.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), _INT64_P,
                                        ctypes.c_int, _FLOAT_P, _INT64_P]
    if hasattr(lib, "em_set_lora"):  # builds before LoRA branches lack it
        lib.em_set_lora.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Lora)]
    lib.em_truncate.argtypes = [ctypes.c_void_p, ctypes.c_int]
    if hasattr(lib, "em_cache_save"):  # builds before cache copies lack them
        lib.em_cache_bytes.argtypes = [ctypes.c_int]
        lib.em_cache_bytes.restype = ctypes.c_size_t
        lib.em_cache_save.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.em_cache_load.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.em_last_error.restype = ctypes.c_char_p


class _Lora(ctypes.Structure):  # em_lora (kernels/edgellm_kernels.h)
    _fields_ = [("columns", ctypes.c_int), ("int8", ctypes.c_int), ("a", ctypes.c_void_p), ("b", ctypes.c_void_p),
                ("a_scale", _FLOAT_P), ("b_scale", _FLOAT_P), ("scale", ctypes.c_float),
                ("panel_columns", ctypes.c_int), ("panel_offset", ctypes.POINTER(ctypes.c_int)),
                ("a_quads", ctypes.c_void_p), ("b_pairs", ctypes.c_void_p)]


class _LoraSite(ctypes.Structure):  # em_lora_site
    _fields_ = [("name", ctypes.c_char_p), ("k", ctypes.c_int), ("n", ctypes.c_int), ("columns", ctypes.c_int)]


class NativeBranches:
    """One adapter as the sessions' branch table takes it: an em_lora per site over the factors
    (int8 as stored, or float; B regrouped in panels of 16 outputs, kernels/edgellm_kernels.h),
    which this object keeps alive."""

    def __init__(self, sites: list[str], factors: dict, quads_sites: frozenset[str]):
        self.arrays = []
        self.branches = []
        for site in sites:
            f = factors[site]
            int8 = f.a_scale is not None
            columns, n = f.b.shape
            panels = np.zeros(((n + 15) // 16 * 16, columns), f.b.dtype)
            panels[:n] = f.b.T
            b = panels.reshape(-1, 16, columns).transpose(0, 2, 1)  # [N / 16][C][16]
            offsets = None
            rank = columns // max(len(f.blocks), 1)
            if len(f.blocks) > 1 and all(first % 16 == 0 for first, _ in f.blocks):
                # every panel in one part: keep only that part's components (the rest of B is zero)
                part = np.searchsorted([first for first, _ in f.blocks], np.arange(len(b)) * 16, side="right") - 1
                offsets = np.ascontiguousarray(part * rank, np.int32)
                b = np.stack([b[p, o : o + rank] for p, o in enumerate(offsets)])
            # where the matmul quantizes its activations, int8 factors go laid out for integer dot
            # products (their only copy), up to the 512 columns whose sums int32 holds (edgellm_integer.c)
            quads = int8 and site in quads_sites and columns <= 512
            a, b, quads_a, pairs_b = ((None, None, a_quads(f.a), b_pairs(b)) if quads else
                                      (np.ascontiguousarray(f.a), np.ascontiguousarray(b), None, None))
            self.arrays.append((a, b, f.a_scale, f.b_scale, offsets, quads_a, pairs_b))
            self.branches.append(_Lora(columns, int(int8), *(None if x is None else x.ctypes.data for x in (a, b)),
                                       f.a_scale.ctypes.data_as(_FLOAT_P) if int8 else None,
                                       f.b_scale.ctypes.data_as(_FLOAT_P) if int8 else None, 1.0,
                                       rank if offsets is not None else 0,
                                       offsets.ctypes.data_as(ctypes.POINTER(ctypes.c_int)) if offsets is not None else None,
                                       *(None if x is None else x.ctypes.data for x in (quads_a, pairs_b))))


def a_quads(a: np.ndarray) -> np.ndarray:
    """int8 A [C, K] as em_lora.a_quads: groups of 8 components, [C / 8][K / 4][8][4] bytes of A + 128
    (components past C: 128, i.e. zero)."""
    columns, k = a.shape
    shifted = np.full(((columns + 7) // 8 * 8, k), 128, np.uint8)
    shifted[:columns] = (a.astype(np.int16) + 128).astype(np.uint8)
    return np.ascontiguousarray(shifted.reshape(-1, 8, k // 4, 4).transpose(0, 2, 1, 3))


def b_pairs(panels: np.ndarray) -> np.ndarray:
    """int8 B in panels [N / 16][C][16] as em_lora.b_pairs: [N / 16][C / 2][16][2] (components past C: 0)."""
    count, columns, _ = panels.shape
    padded = np.zeros((count, (columns + 1) // 2 * 2, 16), np.int8)
    padded[:, :columns] = panels
    return np.ascontiguousarray(padded.reshape(count, -1, 2, 16).transpose(0, 1, 3, 2))


class _EncoderInfo(ctypes.Structure):  # em_encoder_info (kernels/edgellm_model.h)
    _fields_ = [("patches", ctypes.c_int), ("patch_values", ctypes.c_int), ("tokens", ctypes.c_int),
                ("hidden", ctypes.c_int), ("arena_bytes", ctypes.c_size_t), ("run", ctypes.c_void_p)]


class _Info(ctypes.Structure):
    _fields_ = [("vocab_size", ctypes.c_int), ("hidden_size", ctypes.c_int), ("max_tokens", ctypes.c_int),
                ("group_size", ctypes.c_int), ("weights_size", ctypes.c_ulonglong), ("weights_digest", ctypes.c_char_p),
                ("arena_bytes", ctypes.c_size_t), ("cache_bytes", ctypes.c_size_t)]


def _release_model(lib: ctypes.CDLL, handle: int, private: bool, sessions: set) -> None:
    """Close the sessions still open, then the model, then unload a private copy: garbage
    collection may release a model before its sessions, and a session's own release must not
    call into an unloaded library afterwards (_release_session finds its handle gone)."""
    for session in list(sessions):
        lib.em_session_close(session)
    sessions.clear()
    lib.em_close(handle)
    if private:
        _ctypes.dlclose(lib._handle)


def _release_session(lib: ctypes.CDLL, handle: int, sessions: set) -> None:
    if handle in sessions:
        sessions.discard(handle)
        lib.em_session_close(handle)


class NativeEngine(Engine):
    def __init__(self, program_dir: Path, spec: EngineSpec, threads: int | None = None):
        self.spec = spec
        self.program_dir = Path(program_dir)
        library = self.program_dir / "libmodel.so"
        if not library.is_file():
            raise EdgeLLMError(f"{program_dir}: no libmodel.so; run `edgellm compile ... --resume`")
        lib, private = _load(library.resolve())
        _declare(lib)
        handle = lib.em_open(str(self.program_dir / "weights.bin").encode(), threads or physical_cores())
        if not handle:
            message = lib.em_last_error().decode()
            if private:
                _ctypes.dlclose(lib._handle)
            raise EdgeLLMError(message)
        self.lib, self.handle = lib, handle
        lib.em_info.restype = ctypes.POINTER(_Info)
        self.info = lib.em_info().contents
        self.sites = self._read_sites()
        self.quads_sites = self._read_quads_sites()
        self.encoder = None  # a vision-language build's image encoder (builds before it lack em_encode)
        if hasattr(lib, "em_encode"):
            lib.em_encoder.restype = ctypes.POINTER(_EncoderInfo)
            lib.em_encode.argtypes = [ctypes.c_void_p, _FLOAT_P, _FLOAT_P]
            info = lib.em_encoder().contents
            self.encoder = info if info.run else None
        # bfloat16 weights against many rows (prefill, the encoder) on AMX tiles, activations rounded
        # to bfloat16 (kernels/edgellm_amx.c); builds before it lack the function
        self.bf16_tiles = hasattr(lib, "em_bf16_tiles") and bool(lib.em_bf16_tiles())
        self.copies_cache = hasattr(lib, "em_cache_save")
        self.sessions: weakref.WeakSet[NativeSession] = weakref.WeakSet()
        self.session_handles: set[int] = set()  # open in C: closed with the model at the latest
        self._release = weakref.finalize(self, _release_model, lib, handle, private, self.session_handles)

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def branch_sites(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.sites)

    def _read_sites(self) -> dict[str, tuple[int, int, int]]:
        """The library's LoRA branch sites (EM_LORA_SITE_INFO), in the order of a session's table."""
        if not hasattr(self.lib, "em_set_lora"):
            return {}
        count = ctypes.c_int.in_dll(self.lib, "EM_LORA_SITE_COUNT").value
        table = (_LoraSite * max(count, 1)).in_dll(self.lib, "EM_LORA_SITE_INFO")
        return {table[i].name.decode(): (table[i].k, table[i].n, table[i].columns) for i in range(count)}

    def _read_quads_sites(self) -> frozenset[str]:
        """The sites whose int8 adapters the kernels take as a_quads and b_pairs (EM_LORA_SITE_QUADS;
        none in a library built before it)."""
        if not self.sites or not hasattr(self.lib, "EM_LORA_SITE_QUADS"):
            return frozenset()
        flags = (ctypes.c_ubyte * len(self.sites)).in_dll(self.lib, "EM_LORA_SITE_QUADS")
        return frozenset(name for name, flag in zip(self.sites, flags, strict=True) if flag)

    def encode_patches(self, patches: np.ndarray) -> np.ndarray:
        """An image's patches [patches, values per patch] -> its prompt rows (em_encode)."""
        info = self.encoder
        if self.closed:
            raise EdgeLLMError(f"{self.program_dir}: the model is closed")
        if patches.shape != (info.patches, info.patch_values):
            raise EdgeLLMError(f"image patches of shape {patches.shape}, the encoder takes ({info.patches}, {info.patch_values})")
        rows = np.ascontiguousarray(patches, np.float32)
        features = np.empty((info.tokens, info.hidden), np.float32)
        if self.lib.em_encode(self.handle, rows.ctypes.data_as(_FLOAT_P), features.ctypes.data_as(_FLOAT_P)) != 0:
            raise EdgeLLMError(self.lib.em_last_error().decode())
        return features

    def branch_arrays(self, factors) -> NativeBranches:
        return NativeBranches(list(self.sites), factors, self.quads_sites)

    def forward_batch(self, calls):
        """Every call's rows through em_forward_rows, up to the verify function's rows at a time:
        the weights are read once per call for all the sessions' rows, each row computed as a
        decode step computes it."""
        per_call = min(VERIFY_ROWS, self.spec.group_size)
        if per_call < 2 or not hasattr(self.lib, "em_forward_rows") or len(calls) < 2:
            return super().forward_batch(calls)
        for session, ids, start in calls:
            session._live()
            session._check(len(ids), start, 0, None)
        # one call per LoRA adapter: a call's rows share their branches (em_forward_rows)
        order = sorted(range(len(calls)), key=lambda i: calls[i][0].adapter_key)
        rows = [(calls[i][0], calls[i][2] + j, token, i) for i in order for j, token in enumerate(calls[i][1])]
        logits = np.empty((len(rows), self.spec.vocab_size), np.float32)
        chunks, first = [], 0
        while first < len(rows):
            key = rows[first][0].adapter_key
            end = first
            while end < len(rows) and end - first < per_call and rows[end][0].adapter_key == key:
                end += 1
            chunks.append((first, end))
            first = end
        for first, end in chunks:
            chunk = rows[first:end]
            n = len(chunk)
            handles = (ctypes.c_void_p * n)(*(row[0].handle for row in chunk))
            positions = (ctypes.c_int * n)(*(row[1] for row in chunk))
            ids = np.array([row[2] for row in chunk], np.int64)
            out = logits[first : first + n]
            rope = np.stack([row[0].rope_rows([row[2]], row[1])[0] for row in chunk]) if self.spec.rope_grid else None
            if self.lib.em_forward_rows(handles, positions, ids.ctypes.data_as(_INT64_P), n, out.ctypes.data_as(_FLOAT_P),
                                        None if rope is None else rope.ctypes.data_as(_INT64_P)) != 0:
                raise EdgeLLMError(self.lib.em_last_error().decode())
            for row in chunk:
                row[0].length = row[1] + 1
        where = {}  # call index -> its rows in logits
        for r, row in enumerate(rows):
            where.setdefault(row[3], []).append(r)
        return [logits[where[i][0] : where[i][-1] + 1] for i in range(len(calls))]

    def _new_session(self) -> "NativeSession":
        return NativeSession(self)

    def session_bytes(self) -> int:
        return self.info.cache_bytes + self.info.arena_bytes

    def _free(self) -> None:
        self._release()


class NativeSession(EngineSession):
    full_group_calls = False  # the generated code runs any number of rows: nothing to pad
    def __init__(self, engine: NativeEngine):
        self.engine, self.spec = engine, engine.spec
        handle = engine.lib.em_session_open(engine.handle)
        if not handle:
            raise EdgeLLMError(f"{engine.program_dir}: {engine.lib.em_last_error().decode()}")
        self.handle = handle
        self.length = 0
        self.ids = np.zeros(self.spec.group_size, np.int64)
        self.logits = np.zeros((self.spec.group_size, self.spec.vocab_size), np.float32)
        self._pointers = self.ids.ctypes.data_as(_INT64_P), self.logits.ctypes.data_as(_FLOAT_P)  # once, not per token
        if self.spec.rope_grid:  # M-RoPE: the ids and three positions of every held row (engine.rope_positions)
            self.tokens = np.zeros(self.spec.max_num_tokens, np.int64)
            self.rope = np.zeros((3, self.spec.max_num_tokens), np.int64)
        self.adapter_key = (0, 0.0)  # which branches the session runs (forward_batch groups rows by it)
        self.branches: NativeBranches | None = None
        engine.session_handles.add(handle)
        self._release = weakref.finalize(self, _release_session, engine.lib, handle, engine.session_handles)

    def close(self) -> None:
        self._release()

    def set_adapter(self, factors: NativeBranches | None, scale: float) -> None:
        self._live()
        sites = self.engine.sites
        if not sites:
            raise EdgeLLMError(f"{self.engine.program_dir}: this build has no LoRA branches")
        for i in range(len(sites)):
            branch = _Lora() if factors is None else factors.branches[i]  # columns 0: none
            chosen = _Lora(branch.columns, branch.int8, branch.a, branch.b, branch.a_scale, branch.b_scale, scale,
                           branch.panel_columns, branch.panel_offset, branch.a_quads, branch.b_pairs)
            if self.engine.lib.em_set_lora(self.handle, i, ctypes.byref(chosen)) != 0:
                raise EdgeLLMError(self.engine.lib.em_last_error().decode())
        self.branches = factors  # kept alive while the session's branches point into it
        self.adapter_key = (0, 0.0) if factors is None else (id(factors), float(scale))

    def rope_rows(self, ids, start: int) -> np.ndarray:
        """M-RoPE: the rows' three positions each, [n, 3], as the program takes them (the held rows'
        positions kept for the next call)."""
        end = start + len(ids)
        self.tokens[start:end] = ids
        rope_positions(self.tokens, self.rope, start, end, self.spec.rope_grid)
        return np.ascontiguousarray(self.rope[:, start:end].T)

    def _live(self) -> None:
        if not self._release.alive or self.engine.closed:
            raise EdgeLLMError(f"{self.engine.program_dir}: this session was closed (or its model was)")

    def _save(self, length: int) -> list[np.ndarray]:
        lib = self.engine.lib
        size = lib.em_cache_bytes(length)
        # an anonymous mapping of its own, not np.empty: numpy asks for transparent huge pages for
        # large arrays, and on this project's VM a 22 MB copy then took 50-70 ms instead of 15
        # (the kernel making 2 MB pages on the first touches; docs/BENCHMARKS.md)
        cache = np.frombuffer(mmap.mmap(-1, size), np.uint8) if size else np.empty(0, np.uint8)
        if lib.em_cache_save(self.handle, length, cache.ctypes.data) != 0:
            raise EdgeLLMError(lib.em_last_error().decode())
        if self.spec.rope_grid:
            return [cache, self.tokens[:length].copy(), self.rope[:, :length].copy()]
        return [cache]

    def _load(self, parts, held: int, length: int) -> None:
        lib = self.engine.lib
        if lib.em_cache_load(self.handle, parts[0].ctypes.data, held, length) != 0:
            raise EdgeLLMError(lib.em_last_error().decode())
        if self.spec.rope_grid:
            self.tokens[:length] = parts[1][:length]
            self.rope[:, :length] = parts[2][:, :length]

    def truncate(self, length: int) -> None:
        self._live()
        if self.engine.lib.em_truncate(self.handle, length) != 0:
            raise EdgeLLMError(self.engine.lib.em_last_error().decode())
        self.length = length

    def forward(self, ids, start: int, logits_from: int | None = None, embeddings: np.ndarray | None = None,
                until: np.ndarray | None = None) -> np.ndarray:
        self._live()
        n = len(ids)
        logits_from = n - 1 if logits_from is None else logits_from
        self._check(n, start, logits_from, embeddings)
        until = self._check_until(until, n, start)
        if until is not None:
            until = np.ascontiguousarray(until, np.int64)
        self.ids[:n] = ids
        ids_p, logits_p = self._pointers
        rows = None
        if embeddings is not None:
            rows = np.ascontiguousarray(embeddings, np.float32)
        rope = self.rope_rows(ids, start) if self.spec.rope_grid else None
        status = self.engine.lib.em_forward(self.handle, ids_p, None if rows is None else rows.ctypes.data_as(_FLOAT_P),
                                            None if until is None else until.ctypes.data_as(_INT64_P),
                                            n, start, logits_from, logits_p,
                                            None if rope is None else rope.ctypes.data_as(_INT64_P))
        if status != 0:
            raise EdgeLLMError(self.engine.lib.em_last_error().decode())
        self.length = start + n
        return self.logits[: n - logits_from].copy()
