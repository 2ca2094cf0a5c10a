"""The engine interface both targets implement: a loaded program (weights in memory once) and its
sessions (one conversation's KV cache each).

    engine = OrtEngine(...) | NativeEngine(...)      runtime/ort.py, runtime/native.py
    session = engine.open_session()                  an empty KV cache of its own
    session.forward(ids, start, logits_from)         n rows at positions start.., one call; returns the
                                                     logits of rows logits_from..n-1 ([rows, vocab])
    session.truncate(n)                              keep the first n positions (O(1))
    copy = session.copy_cache(n)                     the first n positions, kept apart from the session
    other.load_cache(copy, m)                        another session of the engine holds copy's first m

A row is a token id or, where the id is negative, an embedding vector of the hidden size (the
hidden state entering layer 0, as transformers' inputs_embeds), given in `embeddings`. A call runs
1 to group-size rows; prefill() splits a prompt into such calls.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import MutableSet
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError

# A call of 2..VERIFY_ROWS rows computes each row exactly as a decode step does (the native targets'
# verify function; the cpu target runs them as decode steps), so speculative greedy decoding keeps
# the plain tokens; more rows run the prefill program.
VERIFY_ROWS = 8


@dataclass(frozen=True)
class EngineSpec:
    num_layers: int
    kv_width: int  # kv_heads * head_dim
    vocab_size: int
    hidden_size: int
    group_size: int
    max_num_tokens: int
    buckets: list[int]
    int8_activations: bool = False
    # M-RoPE (Qwen2-VL): an image's rows per column and per row of its grid; None: one position per row
    rope_grid: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class CacheCopy:
    """A session's first `length` positions (KV cache and what the session keeps per position),
    apart from any session: the server keeps finished conversations this way (serve/prefix_store.py)."""

    engine: "Engine"
    length: int
    parts: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


class EngineSession(ABC):
    """One conversation in a loaded program: its KV cache and how many positions it holds."""

    spec: EngineSpec
    engine: "Engine"
    length: int
    full_group_calls = True  # a call of fewer rows than the group costs a whole group (prefill_chunks)

    @abstractmethod
    def forward(self, ids, start: int, logits_from: int | None = None, embeddings: np.ndarray | None = None,
                until: np.ndarray | None = None) -> np.ndarray:
        """Run len(ids) rows at positions start.. (start <= length); return the logits of rows
        logits_from (default: the last)..n-1 as a fresh [rows, vocab] array. The session then
        holds start + n positions. until: per row, the position before which it sees the keys
        (default position + 1: causal); a row may see later rows of the same call (the rows of one
        image, in Gemma 3), never rows past the call."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (at most what the session holds)."""

    @abstractmethod
    def close(self) -> None:
        """Free the cache; using the session afterwards raises EdgeLLMError."""

    @abstractmethod
    def _live(self) -> None:
        """Raise EdgeLLMError if the session or its model was closed."""

    def copy_cache(self, length: int) -> CacheCopy:
        """The first `length` positions (at most what the session holds) as a CacheCopy."""
        self._live()
        if not self.engine.copies_cache:
            raise EdgeLLMError(f"{self.engine.program_dir}: this build cannot copy its KV cache (compile it again)")
        if not 0 <= length <= self.length:
            raise EdgeLLMError(f"cannot copy {length} positions of a session holding {self.length}")
        return CacheCopy(self.engine, length, tuple(self._save(length)))

    def load_cache(self, copy: CacheCopy, length: int) -> None:
        """Hold the first `length` positions of `copy` (made by a session of the same engine),
        whatever the session held before."""
        self._live()
        if copy.engine is not self.engine:
            raise EdgeLLMError(f"{self.engine.program_dir}: a cache copy made by another model")
        if not 0 <= length <= copy.length:
            raise EdgeLLMError(f"cannot load {length} positions of a cache copy holding {copy.length}")
        self._load(copy.parts, copy.length, length)
        self.length = length

    @abstractmethod
    def _save(self, length: int) -> list[np.ndarray]:
        """The parts of a CacheCopy of the first `length` positions."""

    @abstractmethod
    def _load(self, parts: tuple[np.ndarray, ...], held: int, length: int) -> None:
        """Hold the first `length` positions of a copy's parts, which hold `held`."""

    def set_adapter(self, factors: dict[str, np.ndarray] | None, scale: float) -> None:
        """Run the next calls with these LoRA factors (runtime/adapters.py; the cache keeps what
        earlier calls computed: the caller decides whether it still holds)."""
        raise EdgeLLMError("this build has no LoRA branches")

    def _check(self, n: int, start: int, logits_from: int, embeddings) -> None:
        if not 1 <= n <= self.spec.group_size:
            raise EdgeLLMError(f"bad call: {n} rows (1 to {self.spec.group_size} per call)")
        if not 0 <= start <= self.length or start + n > self.spec.max_num_tokens:
            raise EdgeLLMError(f"bad call: {n} rows at position {start} of a session holding {self.length} "
                               f"({self.spec.max_num_tokens} positions in all)")
        if not 0 <= logits_from < n:
            raise EdgeLLMError(f"bad call: logits from row {logits_from} of {n}")
        if embeddings is not None and np.shape(embeddings) != (n, self.spec.hidden_size):
            raise EdgeLLMError(f"bad call: embeddings of shape {np.shape(embeddings)}, expected ({n}, "
                               f"{self.spec.hidden_size})")

    def _check_until(self, until, n: int, start: int) -> np.ndarray | None:
        """until as int64, checked: within this call, never before a row's own position + 1."""
        if until is None:
            return None
        until = np.asarray(until, np.int64)
        own = np.arange(start + 1, start + n + 1)
        if until.shape != (n,) or (until < own).any() or (until > start + n).any():
            raise EdgeLLMError(f"bad call: attend_until {until.tolist()} for {n} rows at position {start}")
        return None if (until == own).all() else until

    def prefill(self, tokens: list[int], cached: int) -> np.ndarray:
        """Fill the cache for tokens[cached:], given tokens[:cached] are in it; return the logits
        after the last token ([vocab]). Chunks of the group size; a short last chunk is moved back
        to end at the last token (recomputing a few cached positions, which rewrites the same
        K/V) rather than padded past it."""
        logits = None
        for start, chunk, _ in prefill_chunks(tokens, cached, self.spec.group_size, self.full_group_calls):
            logits = self.forward(chunk, start)[-1]
        return logits

    def prompt_logits(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens), vocab]: the logits after every token, from position 0."""
        return np.concatenate([self.forward(chunk, start, logits_from=first)
                               for start, chunk, first in prefill_chunks(tokens, 0, self.spec.group_size)])

    def decode(self, token: int, position: int) -> np.ndarray:
        return self.forward([token], position)[0]


class Engine(ABC):
    """A loaded program: its weights, once, for every session opened on it. A target sets spec,
    program_dir and sessions (a WeakSet) and says how to make a session and free the weights."""

    spec: EngineSpec
    program_dir: object
    sessions: MutableSet[EngineSession]  # a WeakSet: a session the caller dropped is not kept alive
    # bfloat16 weights multiply activation rows rounded to bfloat16 where many rows meet (prefill,
    # the image encoder): the native targets on AMX tiles. Elsewhere activations stay float32.
    bf16_tiles = False
    copies_cache = True  # its sessions' copy_cache and load_cache work (a native build from before them: no)

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @abstractmethod
    def _new_session(self) -> EngineSession: ...

    @abstractmethod
    def _free(self) -> None:
        """Free the weights (the sessions are closed already)."""

    @abstractmethod
    def session_bytes(self) -> int:
        """Memory one more session takes (its KV cache and buffers)."""

    def open_session(self) -> EngineSession:
        if self.closed:
            raise EdgeLLMError(f"{self.program_dir}: this model was closed")
        available = available_memory()  # refuse what memory cannot hold, before allocating it
        if available is not None and self.session_bytes() > available:
            raise EdgeLLMError(f"a new session needs {self.session_bytes() / 2**20:.0f} MB (KV cache and buffers); "
                               f"{available / 2**20:.0f} MB are available")
        session = self._new_session()
        self.sessions.add(session)
        return session

    def branch_sites(self) -> dict[str, tuple[int, int, int]]:
        """LoRA branch sites of the program ("layer007.qkv_proj" -> K, N, columns); none by default."""
        return {}

    def branch_arrays(self, factors):
        """One adapter's factors (runtime/adapters.py SiteFactors per site) in the form this
        target's sessions bind (EngineSession.set_adapter)."""
        raise EdgeLLMError(f"{self.program_dir}: this build has no LoRA branches")

    def forward_batch(self, calls: list[tuple[EngineSession, list[int], int]]) -> list[np.ndarray]:
        """One step of several sessions: for each (session, ids, start), the logits of all its rows,
        as session.forward(ids, start, logits_from=0) gives them. A target that can run the rows of
        different sessions in one call (reading the weights once for all) overrides this."""
        return [session.forward(ids, start, logits_from=0) for session, ids, start in calls]

    def close(self) -> None:
        """Close every session, then free the weights; twice is harmless."""
        for session in list(self.sessions):
            session.close()
        self._free()


def prefill_chunks(tokens: list[int], cached: int, group: int, move_back: bool = True, blocks=()):
    """(start position, chunk of at most `group` tokens, index of its first new token) covering
    tokens[cached:]. With move_back (a target whose group call costs as much for fewer rows), a
    short last chunk is moved back to end at the last token instead of padded past it. blocks:
    (first, end) of rows that see each other (an image's, in Gemma 3): no chunk ends inside one,
    so each such row's call holds the rest of its block (PaliGemma's: the whole prompt)."""
    end, pos = len(tokens), cached
    while pos < end:
        start = pos if end - pos >= group or not move_back else max(0, end - group)
        stop = min(start + group, end)
        inside = next(((a, b) for a, b in blocks if a < stop < b), None)
        if inside is not None:
            if inside[0] <= pos:  # from here the block's end does not fit one call
                what = "the prompt's" if inside[0] == 0 and inside[1] == end else "an image's"  # (a prefix-LM: the prompt)
                raise EdgeLLMError(f"{what} {inside[1] - inside[0]} rows, which see each other, do not fit one prefill "
                                   f"call of {group} rows; compile with a --language_group_size of "
                                   f"{inside[1] - inside[0]} or more")
            stop = inside[0]
        chunk = tokens[start:stop]
        yield start, chunk, pos - start
        pos = stop


def rope_positions(tokens: np.ndarray, rope: np.ndarray, start: int, end: int, grid: tuple[int, int]) -> None:
    """M-RoPE: fill rope[:, start:end] (each row's time, height and width positions) from the ids
    tokens[:end] and the positions before start, as transformers' get_rope_index counts them:
    a token's three positions are one past the largest position before it; an image's rows
    (negative ids, grid[0] x grid[1] in a run) share the time position of its first row, and count
    their row and column from it; so the row after an image is max(grid) past its first row."""
    rows, cols = grid
    for p in range(start, end):
        following = int(rope[:, p - 1].max()) + 1 if p else 0
        if tokens[p] >= 0:
            rope[:, p] = following
            continue
        k, base = 0, following
        if p and tokens[p - 1] < 0:  # within an image: the next cell of its grid, or the next image's first
            t, h, w = rope[:, p - 1]
            k = (h - t) * cols + (w - t) + 1
            base = t if k < rows * cols else following
            k %= rows * cols
        rope[:, p] = (base, base + k // cols, base + k % cols)


def physical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the machine can still give (MemAvailable), or None where unknown."""
    return _meminfo("MemAvailable")


def total_memory() -> int | None:
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
