"""The server's store of finished conversations: copies of their KV caches (Engine copy_cache)
kept apart from the `--parallel` sessions, so that a conversation that comes back finds its
history cached even after its session answered other requests, and requests that begin alike
(a long system prompt) share it.

A session's conversation is copied in when the session is about to be given a request that would
overwrite it; a request takes the copy that reuses the most of its prompt when that is more than
its session's own cache holds. Only whole prefill chunks are kept (the server reuses nothing
finer). The least recently used copies go first: past `limit_bytes`, and whenever the machine's
available memory falls below `reserve_bytes` (the sessions' own caches grow as they fill; a copy
is only a saving of time)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from ..runtime.engine import CacheCopy, available_memory, total_memory
from ..runtime.session import HALF_SWITCHED, Session, cache_reuse
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Stored:
    """One conversation's first positions: their ids, the attention blocks they were computed
    with, the adapter they were computed under, and the copy of their cache. (tokens and blocks
    as a Session has them, so that cache_reuse reads either.)"""

    tokens: list[int]
    blocks: list[tuple[int, int]]
    adapter: tuple[str, float] | None
    copy: CacheCopy


def memory_reserve() -> int:
    """What the store leaves available: a tenth of the machine's memory, at least 256 MiB."""
    return max(256 << 20, (total_memory() or 0) // 10)


class PrefixStore:
    def __init__(self, limit_bytes: int, group: int, metrics: Metrics, reserve_bytes: int | None = None,
                 available=available_memory):
        self.limit_bytes, self.group, self.metrics = limit_bytes, group, metrics
        self.reserve_bytes = memory_reserve() if reserve_bytes is None else reserve_bytes
        self.available = available  # () -> bytes the machine has available, or None where unknown
        self.entries: OrderedDict[int, Stored] = OrderedDict()  # least recently used first
        self.bytes = 0

    def keep(self, session: Session) -> None:
        """Copy in the conversation the session holds (its whole chunks), unless a copy holds it
        already; copies it extends are dropped."""
        length = len(session.tokens) // self.group * self.group
        if self.limit_bytes <= 0 or length == 0 or session.adapter == HALF_SWITCHED:
            return
        tokens = session.tokens[:length]
        for key, stored in list(self.entries.items()):
            if stored.adapter != session.adapter:
                continue
            if stored.tokens[:length] == tokens:  # it holds this conversation already
                self.entries.move_to_end(key)
                return
            if tokens[: len(stored.tokens)] == stored.tokens:  # this conversation goes on from it
                self._drop(key)
        try:
            copy = session.engine_session.copy_cache(length)
        except MemoryError:  # a copy only saves time: the request goes on without it
            log.warning("prefix store: no memory for a copy of %d positions", length)
            return
        if copy.nbytes > self.limit_bytes:
            return
        stored = Stored(tokens, [b for b in session.blocks if b[0] < length], session.adapter, copy)
        self.entries[id(stored)] = stored
        self.bytes += copy.nbytes
        self._evict()
        self._count()

    def best(self, ids: list[int], blocks: list[tuple[int, int]], adapter) -> tuple[Stored | None, int]:
        """The copy that reuses the most of a prompt (ids whose attention blocks are `blocks`),
        computed under `adapter`, and how many of its positions it reuses (0: none)."""
        found, most = None, 0
        for stored in self.entries.values():
            if stored.adapter == adapter:
                reuse = cache_reuse(stored, ids, blocks, self.group)
                if reuse > most:
                    found, most = stored, reuse
        return found, most

    def load(self, stored: Stored, session: Session, length: int) -> None:
        """Make the session hold the copy's first `length` positions."""
        session.tokens = []  # forgotten first: a failed load leaves no stale prefix
        session.engine_session.load_cache(stored.copy, length)
        session.tokens = stored.tokens[:length]
        session.blocks = [b for b in stored.blocks if b[0] < length]
        self.entries.move_to_end(id(stored))
        self.metrics.prefix_loads.inc()

    def relieve(self) -> None:
        """Drop the least recently used copies while available memory is below the reserve."""
        self._evict()
        self._count()

    def clear(self) -> None:
        for key in list(self.entries):
            self._drop(key)
        self._count()

    def _evict(self) -> None:
        while self.entries and self.bytes > self.limit_bytes:
            self._drop(next(iter(self.entries)), "limit")
        while self.entries:
            available = self.available()
            if available is None or available >= self.reserve_bytes:
                break
            self._drop(next(iter(self.entries)), "memory")

    def _drop(self, key: int, reason: str | None = None) -> None:
        stored = self.entries.pop(key)
        self.bytes -= stored.copy.nbytes
        if reason:
            self.metrics.prefix_evictions.labels(reason).inc()
            log.info("prefix store: dropped %d positions (%s)", stored.copy.length, reason)

    def _count(self) -> None:
        self.metrics.prefix_bytes.set(self.bytes)
        self.metrics.prefix_entries.set(len(self.entries))
