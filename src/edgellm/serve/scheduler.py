"""Continuous batching: `parallel` sessions of one loaded model, stepped together by one thread.

Each turn of the loop takes at most one queued request into a free session (the one whose cache
holds the longest prefix of its prompt: the history of a conversation that came back; else the
one unused longest). The conversation that session held goes to the prefix store
(prefix_store.py) first, and the request starts from a stored copy instead where that reuses
more. The loop then runs one prefill chunk (up to the group size) of the oldest request still
prefilling, then one decode step of every request that is decoding, as one batched call
(Engine.forward_batch: the rows of all sessions, the weights read once where the target can). So
a long prompt delays the running answers by a chunk per step, not by its whole prefill.
Tokens go back to each request's asyncio queue as they are decided. A request whose client left
is dropped before the next step, or never started if it was still queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EdgeLLMError
from ..runtime.sampling import SamplingParams
from ..runtime.session import Decoding, Generation, Session, attention_blocks, cache_reuse
from .metrics import Metrics
from .prefix_store import PrefixStore
from .protocol import ApiError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: what to generate, and where its events go (("text", piece), then ("done",
    Generation) or ("error", ApiError)), read by the HTTP handler on its event loop."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    constraint: Callable | None = None  # makes the answer's Constraint (serve/structured.py)
    adapter: tuple[str, float] | None = None  # the LoRA adapter and scale (None: the base model)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    _pending: list[str] = field(default_factory=list)
    _sent_at: float = 0.0

    FLUSH_S = 0.01  # text goes out at most this often after the first piece: each send wakes the event loop,
    # whose Python then competes with the decode steps for the GIL and the cores

    def send(self, kind: str, value) -> None:
        if kind != "text":
            self._flush()
        self._post(kind, value)

    def text(self, piece: str) -> None:
        """A piece of the answer: sent at once if it is the first, else gathered for up to FLUSH_S."""
        self._pending.append(piece)
        now = time.perf_counter()
        if now - self._sent_at >= self.FLUSH_S:
            self._flush(now)

    def _flush(self, now: float | None = None) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._sent_at = now or time.perf_counter()
            self._post("text", text)

    def _post(self, kind: str, value) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Slot:
    session: Session
    drafter: object = None
    job: Job | None = None
    decoding: Decoding | None = None
    prefilled: bool = False  # the job's prompt is in the cache: it takes part in decode steps
    last_used: float = 0.0


class Scheduler:
    def __init__(self, model, parallel: int, metrics: Metrics, drafters: Callable | None = None, draft_max: int = 4,
                 store_bytes: int = 0):
        if parallel < 1:
            raise EdgeLLMError(f"--parallel {parallel}: serve at least 1 session")
        self.model, self.metrics, self.draft_max = model, metrics, draft_max
        engine = model.engine
        self.store = None
        if store_bytes > 0 and not engine.copies_cache:
            log.warning("%s: built before sessions could copy their caches: no prefix store (compile it again)",
                        engine.program_dir)
        elif store_bytes > 0:
            self.store = PrefixStore(store_bytes, engine.spec.group_size, metrics)
        self.slots: list[Slot] = []
        try:  # every session up front: a server that cannot hold `parallel` of them says so at start
            for _ in range(parallel):
                self.slots.append(Slot(model.session(), drafters() if drafters else None))
        except EdgeLLMError as e:
            self._close_slots()
            raise EdgeLLMError(f"--parallel {parallel}: {e}") from None
        self.queue: deque[Job] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="edgellm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.queue.append(job)
            self.metrics.queued.set(len(self.queue))
            self.wake.notify()

    def nudge(self) -> None:
        """Look at the queue and the running requests now (a client left)."""
        with self.wake:
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()
        gone = ApiError(503, "the server is shutting down", kind="unavailable_error")
        for job in self.queue:
            job.send("error", gone)
        for slot in self.slots:
            if slot.job:
                slot.job.send("error", gone)
        if self.store is not None:
            self.store.clear()
        self._close_slots()

    def _close_slots(self) -> None:
        # (a drafter's session belongs to the draft model, which the server closes with all its sessions)
        for slot in self.slots:
            slot.session.close()

    # ---- the loop (its own thread) -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self._running() and not self.queue:
                    self.wake.wait()
                if self.stopping:
                    return
                job = self._next_job()
            try:
                self._drop_cancelled()
                if job is not None:
                    self._start(job)
                self._prefill()
                self._step()
            except Exception:  # a bug: fail the requests in flight, keep serving
                log.exception("scheduler step failed")
                for slot in self._running():
                    slot.session.reset()  # what its cache holds is no longer known
                    self._finish(slot, error="internal error in the decode step (see the server log)")

    def _running(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def _next_job(self) -> Job | None:
        """The next queued request still wanted, if a session is free (called holding wake)."""
        while self.queue and any(s.job is None for s in self.slots):
            job = self.queue.popleft()
            self.metrics.queued.set(len(self.queue))
            if job.cancelled.is_set():
                self.metrics.abandoned.labels("queued").inc()
                continue
            return job
        return None

    def _slot_for(self, job: Job, blocks: list[tuple[int, int]]) -> Slot:
        """The free session that reuses the most of its cache for this prompt (in whole prefill
        chunks, as Decoding will), else the one unused longest: a never-used one before a
        conversation worth keeping."""
        free = [s for s in self.slots if s.job is None]
        return max(free, key=lambda s: (self._reuse(s.session, job, blocks), -s.last_used))

    def _reuse(self, session: Session, job: Job, blocks: list[tuple[int, int]]) -> int:
        """How many positions of the session's cache the job's prompt (whose attention blocks are
        `blocks`) keeps, in whole prefill chunks."""
        if session.adapter != job.adapter:  # K/V computed under another adapter
            return 0
        return cache_reuse(session, job.prompt_ids, blocks, self.model.engine.spec.group_size)

    def _start(self, job: Job) -> None:
        blocks = attention_blocks(self.model.config.vision, job.prompt_ids)
        slot = self._slot_for(job, blocks)
        slot.job, slot.last_used, slot.prefilled = job, time.perf_counter(), False
        self.metrics.running.set(len(self._running()))
        try:
            own = self._reuse(slot.session, job, blocks)
            group = self.model.engine.spec.group_size
            if self.store is not None and own < len(slot.session.tokens) // group * group:
                self.store.keep(slot.session)  # the conversation it held, before the job overwrites it
            slot.session.set_adapter(*(job.adapter or (None,)))
            if self.store is not None:
                stored, reuse = self.store.best(job.prompt_ids, blocks, job.adapter)
                if reuse > own:
                    self.store.load(stored, slot.session, reuse)
            constraint = job.constraint() if job.constraint else None
            slot.decoding = Decoding(slot.session, job.prompt_ids, max_new_tokens=job.max_new_tokens,
                                     sampling=job.sampling, stop=job.stop, ignore_eos=job.ignore_eos,
                                     on_text=job.text,
                                     # (a drafter reads token ids: not a prompt with image rows)
                                     drafter=None if constraint or min(job.prompt_ids) < 0 else slot.drafter,
                                     draft_max=self.draft_max,
                                     constraint=constraint, whole_chunks=True)
        except EdgeLLMError as e:
            self._finish(slot, error=str(e))

    def _prefill(self) -> None:
        waiting = [s for s in self._running() if not s.prefilled]
        if not waiting:
            return
        slot = min(waiting, key=lambda s: s.job.queued_at)
        if self.store is not None:
            self.store.relieve()  # the prefill fills more of a session's cache
        t = time.perf_counter()
        try:
            slot.prefilled = slot.decoding.prefill_chunk()
        except EdgeLLMError as e:
            slot.session.reset()  # its cache holds part of a prompt
            return self._finish(slot, error=str(e))
        finally:
            self.metrics.prompt_seconds.inc(time.perf_counter() - t)
        if slot.decoding.finished:
            self._finish(slot)

    def _step(self) -> None:
        running = [s for s in self._running() if s.prefilled and not s.decoding.finished]
        if not running:
            return
        t = time.perf_counter()
        calls = []
        for slot in running:
            ids, position = slot.decoding.next_call()
            calls.append((slot.session.engine_session, ids, position))
        rows = self.model.engine.forward_batch(calls)
        for slot, logits in zip(running, rows):
            try:
                slot.decoding.take(logits)
            except EdgeLLMError as e:
                self._finish(slot, error=str(e))
                continue
            if slot.decoding.finished:
                self._finish(slot)
        self.metrics.decode_seconds.inc(time.perf_counter() - t)
        self.metrics.batch_rows.observe(sum(len(ids) for _, ids, _ in calls))

    def _drop_cancelled(self) -> None:
        for slot in self._running():
            if slot.job.cancelled.is_set():
                if slot.decoding is not None:
                    slot.decoding.cancel()
                self.metrics.abandoned.labels("running").inc()
                self._finish(slot, cancelled=True)

    def _finish(self, slot: Slot, error: str | None = None, cancelled: bool = False) -> None:
        job, decoding = slot.job, slot.decoding
        slot.job, slot.decoding, slot.last_used = None, None, time.perf_counter()
        self.metrics.running.set(len(self._running()))
        if error is not None:
            self.metrics.requests.labels("error").inc()
            job.send("error", ApiError(500, error, kind="server_error"))
            return
        result: Generation = decoding.result() if decoding.t_first is not None else None
        if result is not None:
            self.metrics.count(result)
        if cancelled:
            return
        self.metrics.requests.labels("ok").inc()
        job.send("done", result)
