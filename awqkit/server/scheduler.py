"""Continuous batching: one background thread owns the engine and drives it one step at a time.

The event loop never touches the engine. HTTP handlers hand :class:`Sequence` objects to :meth:`Scheduler.submit`
and read :class:`SeqEvent` lists from their :class:`RequestSink`; the thread does the rest, every iteration:

1. take aborts (client disconnects, shutdown) and drop those sequences from the waiting queue or the engine;
2. admit waiting sequences, first come first served, while the engine has a free slot (and KV room) — so a new
   request joins the running decode batch at the next step instead of waiting for the batch to drain;
3. run one ``engine.step()`` and route each output to its request's sink on the event loop.

A finished or aborted sequence leaves the engine in the same iteration, so its slot is free for step 2 of the next.
An ``n > 1`` request is ``n`` independent sequences that share one sink.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from awqkit.errors import AwqkitError
from awqkit.server.metrics import ServerMetrics

log = logging.getLogger("awqkit.server")


class QueueFullError(Exception):
    """The waiting queue has no room for the request's sequences (HTTP 503 with Retry-After)."""


class ShuttingDownError(Exception):
    """The server is draining for shutdown and admits no new requests (HTTP 503)."""


@dataclass
class SeqEvent:
    """What one engine step produced for one sequence, as the HTTP side sees it."""

    index: int  # the choice index inside its request
    text: str
    num_new_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    completion_tokens: int = 0
    error: BaseException | None = None  # set when the engine failed this sequence


class RequestSink:
    """Delivers a request's events from the scheduler thread to the event loop that serves the request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[list[SeqEvent]] = asyncio.Queue()

    def deliver(self, events: list[SeqEvent]) -> None:
        """Thread-safe: enqueue ``events`` on the sink's loop (dropped if that loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, events)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def deliver_all(batches: dict[RequestSink, list[SeqEvent]]) -> None:
    """Deliver one step's events with one wake-up per event loop (not one per request)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestSink, list[SeqEvent]]]] = {}
    for sink, events in batches.items():
        by_loop.setdefault(sink.loop, []).append((sink, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[RequestSink, list[SeqEvent]]]) -> None:
    for sink, events in items:
        sink.queue.put_nowait(events)


@dataclass(eq=False)
class Sequence:
    """One sequence to generate: a prompt, its sampling params and where its tokens go."""

    request_id: str  # unique engine id
    index: int  # choice index inside the HTTP request
    prompt_token_ids: list[int]
    params: Any  # awqkit.engine.SamplingParams
    sink: RequestSink
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0


def normalize_finish_reason(reason: str | None) -> str:
    """Map the engine's finish reasons onto OpenAI's (``stop``/``length``) plus ``abort``."""
    if reason is None:
        return "stop"
    r = reason.lower()
    if r in ("length", "max_tokens", "max_new_tokens", "max_model_len"):
        return "length"
    if r in ("abort", "aborted", "cancelled", "canceled"):
        return "abort"
    return "stop"  # eos, stop string, stop token


class Scheduler:
    """Owns ``engine`` on a background thread; see the module docstring for the loop."""

    def __init__(self, engine: Any, *, max_queue: int = 256, metrics: ServerMetrics | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # guarded by _cond
        self._aborts: set[str] = set()  # guarded by _cond
        self._running: dict[str, Sequence] = {}  # owned by the thread; read (len) elsewhere
        self._stop = False
        self._draining = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None

    # -- the event loop's side -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="awqkit-scheduler", daemon=True)
            self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` (all of one request) for admission; all or none.

        Raises :class:`ShuttingDownError` while draining and :class:`QueueFullError` when the waiting queue would
        grow past ``max_queue`` sequences while the engine's slots are taken.
        """
        with self._cond:
            if self._draining or self._stop:
                raise ShuttingDownError("the server is shutting down")
            free = self._free_slots_estimate()
            if len(self._waiting) + len(seqs) > self.max_queue + free:
                raise QueueFullError(
                    f"{len(self._waiting)} sequences are waiting (limit {self.max_queue}) and no slot is free"
                )
            self._waiting.extend(seqs)
            self._cond.notify()
        self._update_gauges()

    def abort(self, request_ids: Iterable[str]) -> None:
        """Cancel these sequences wherever they are (waiting or running); unknown ids are ignored."""
        ids = set(request_ids)
        if not ids:
            return
        with self._cond:
            self._aborts |= ids
            self._cond.notify()

    def drain(self, grace_s: float) -> None:
        """Stop admitting requests; sequences still unfinished after ``grace_s`` seconds are aborted."""
        with self._cond:
            if not self._draining:
                self._draining = True
                self._drain_deadline = time.monotonic() + max(0.0, grace_s)
                log.info("draining: %d running, %d waiting, grace %.1fs", self.num_running, len(self._waiting), grace_s)
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything, stop the thread and wait for it."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called."""
        return self._draining

    @property
    def alive(self) -> bool:
        """True while the engine thread runs and has not died."""
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    @property
    def num_running(self) -> int:
        """Sequences in the engine's batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    # -- the engine thread ---------------------------------------------------------------------------------------------

    def _free_slots_estimate(self) -> int:
        try:
            return max(0, int(self.engine.max_num_seqs) - len(self._running))
        except Exception:  # an engine without the attribute: assume no free slot
            return 0

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._aborts or self._waiting or self._running or self._drain_due()):
                        self._cond.wait(self._wait_timeout())
                    if self._stop:
                        break
                    aborts, self._aborts = self._aborts, set()
                    if self._drain_due():
                        aborts |= {s.request_id for s in self._waiting} | set(self._running)
                self._apply_aborts(aborts)
                self._admit()
                if self._running or self._engine_busy():
                    self._step()
                self._update_gauges()
        except BaseException as exc:
            self._fatal = exc
            log.exception("scheduler thread died")
        finally:
            self._abort_all("the server is shutting down" if self._fatal is None else f"engine failure: {self._fatal}")
            self._update_gauges()

    def _drain_due(self) -> bool:
        return (
            self._draining
            and self._drain_deadline is not None
            and time.monotonic() >= self._drain_deadline
            and (bool(self._waiting) or bool(self._running))
        )

    def _wait_timeout(self) -> float | None:
        if self._draining and self._drain_deadline is not None:
            left = self._drain_deadline - time.monotonic()
            return left if left > 0 else None
        return None

    def _engine_busy(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:
            return False

    def _apply_aborts(self, ids: set[str]) -> None:
        if not ids:
            return
        with self._cond:
            dropped = [s for s in self._waiting if s.request_id in ids]
            if dropped:
                self._waiting = deque(s for s in self._waiting if s.request_id not in ids)
        for seq in dropped:
            self._finish(seq, "abort", deliver=True)
        for rid in ids:
            seq = self._running.pop(rid, None)
            if seq is None:
                continue
            try:
                self.engine.abort(rid)
            except Exception:
                log.debug("engine.abort(%s) failed", rid, exc_info=True)
            self._finish(seq, "abort", deliver=True)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or self._stop:
                    return
                seq = self._waiting[0]
                if not self._has_room(seq):
                    return
                self._waiting.popleft()
            try:
                self.engine.add_request(seq.request_id, seq.prompt_token_ids, seq.params)
            except AwqkitError as exc:  # e.g. prompt + max tokens too long: this request's fault only
                self._fail(seq, exc)
                continue
            except Exception as exc:
                log.exception("engine.add_request failed")
                self._fail(seq, exc)
                continue
            self._running[seq.request_id] = seq
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(seq.prompt_token_ids))

    def _has_room(self, seq: Sequence) -> bool:
        if self.engine.num_free_slots() <= 0:
            return False
        # A paged engine may also limit KV memory; ask it when it can tell.
        can_admit = getattr(self.engine, "can_admit", None)
        if callable(can_admit):
            return bool(can_admit(len(seq.prompt_token_ids), getattr(seq.params, "max_new_tokens", 0)))
        return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine.step failed; failing %d running sequences", len(self._running))
            for rid, seq in list(self._running.items()):
                try:
                    self.engine.abort(rid)
                except Exception:
                    log.debug("engine.abort(%s) failed", rid, exc_info=True)
                self._fail(seq, exc)
            self._running.clear()
            return
        now = time.monotonic()
        batches: dict[RequestSink, list[SeqEvent]] = {}
        for out in outputs:
            seq = self._running.get(out.request_id)
            if seq is None:  # aborted while the step ran
                continue
            n_new = len(out.new_token_ids)
            if n_new:
                self._observe_tokens(seq, n_new, now)
            event = SeqEvent(seq.index, out.text_delta or "", n_new)
            if out.finished:
                del self._running[out.request_id]
                event.finished = True
                event.finish_reason = normalize_finish_reason(out.finish_reason)
                event.completion_tokens = int(out.completion_tokens)
                self._count_finish(seq, event.finish_reason)
            batches.setdefault(seq.sink, []).append(event)
        deliver_all(batches)

    def _observe_tokens(self, seq: Sequence, n_new: int, now: float) -> None:
        seq.completion_tokens += n_new
        m = self.metrics
        if m is not None:
            m.generation_tokens.inc(n_new)
            if seq.first_token_at is None:
                m.ttft.observe(now - seq.arrival)
            elif seq.last_token_at is not None:
                gap = (now - seq.last_token_at) / n_new
                for _ in range(n_new):
                    m.itl.observe(gap)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now

    def _count_finish(self, seq: Sequence, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_finish(reason)
            self.metrics.e2e.observe(time.monotonic() - seq.arrival)

    def _finish(self, seq: Sequence, reason: str, deliver: bool) -> None:
        self._count_finish(seq, reason)
        if deliver:
            seq.sink.deliver([SeqEvent(seq.index, "", 0, True, reason, completion_tokens=seq.completion_tokens)])

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._count_finish(seq, "error")
        seq.sink.deliver([SeqEvent(seq.index, "", 0, True, "error", seq.completion_tokens, error=exc)])

    def _abort_all(self, why: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            self._finish(seq, "abort", deliver=True)
        for rid, seq in list(self._running.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                log.debug("engine.abort(%s) failed", rid, exc_info=True)
            self._finish(seq, "abort", deliver=True)
        if waiting or self._running:
            log.info("aborted %d sequences: %s", len(waiting) + len(self._running), why)
        self._running.clear()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self._running))
            self.metrics.waiting.set(len(self._waiting))
