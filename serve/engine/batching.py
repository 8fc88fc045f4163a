"""Dynamic batching: concurrent requests are gathered into one `Predictor.predict` call on one generation thread.

The event loop only enqueues and awaits; all generation runs on the `generation` thread, so `/ping` never waits on
the model. A batch starts when `max_batch_size` requests are waiting, when the oldest has waited `max_wait_ms`, or
as soon as no other request is announced (`expect`: still being read or prepared): the window is for requests
already on their way, and waiting for ones that have not started to arrive would only add latency. So a burst
(a wave of clients) is gathered into one batch while it is being prepared, and a lone request starts at once.
Each request gets its outcome the moment the predictor reports it (short answers do not wait for long ones);
a request past its deadline is answered 504 while the rest of its batch goes on; a request whose preparation fails
fails alone. The queue is bounded: beyond `max_queue` waiting requests, `submit` answers 503 `overloaded` at once.
A CUDA out-of-memory answers that batch 503 `overloaded`; any other predictor exception answers it 500 and is
logged. An unrecoverable CUDA error marks the batcher unhealthy, so `/ping` fails and SageMaker replaces the host.
Each step is reported to `stats` (serve.engine.stats: queue time, batch size, each outcome), and the `waiting`,
`running` and `preparing` counts are read by the metrics at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve.engine.errors import ApiError, internal_error
from serve.engine.stats import NO_STATS, Stats
from serve.engine.types import GenerationRequest, GenerationResult, Outcome

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Item:
    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    resolved: bool = False  # touched only by the generation thread

    def resolve(self, outcome: Outcome) -> bool:
        """Hand `outcome` to the waiting caller; False when it already had one."""
        if self.resolved:
            return False
        self.resolved = True
        self.loop.call_soon_threadsafe(_set_outcome, self.future, outcome)
        return True


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks it seen: no "exception was never retrieved" at garbage collection


def _set_outcome(future: asyncio.Future, outcome: Outcome) -> None:
    if not future.done():  # the caller may have timed out already
        future.set_result(outcome)


class Batcher:
    def __init__(self, predictor: Any, *, max_batch_size: int = 8, max_wait_ms: float = 50.0, max_queue: int = 64,
                 stats: Stats = NO_STATS):
        self.predictor = predictor
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.healthy = True
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._idle_since = 0.0  # when the generation thread last finished a batch
        self._expected = 0  # requests announced by `expect` that have not been submitted or withdrawn yet
        self._running = 0  # requests of the batch generating now that have no outcome yet (generation thread only)
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    # ------------------------------------------------------------------ load (serve.engine.stats.QueueLoad)
    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._running

    @property
    def preparing(self) -> int:
        return max(0, self._expected)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> Batcher:
        self._thread.start()
        return self

    def check_room(self, n: int = 1) -> None:
        """Fail fast (before any image is fetched) when `n` more requests would not fit in the queue."""
        if self._closing:
            raise ApiError("not_ready", "the server is shutting down")
        if len(self._queue) + n > self.max_queue:
            raise ApiError("overloaded", f"the server is at capacity ({self.max_queue} requests waiting); retry "
                                         "shortly")

    def expect(self) -> None:
        """Announce a request that is still being read/prepared, so a lone queued request waits for it to join its
        batch. Every `expect` is matched by `submit(..., expected=True)` or by `withdraw`."""
        with self._cond:
            self._expected += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted (it failed before reaching the queue)."""
        with self._cond:
            self._expected -= 1
            self._cond.notify()

    async def submit(self, requests: Sequence[GenerationRequest], deadline: float | None = None, *,
                     expected: bool = False) -> list[Outcome]:
        """Queue `requests` and wait for all their outcomes; raise ApiError timeout at `deadline`. `expected`: this
        is the request announced by `expect`."""
        loop = asyncio.get_running_loop()
        items = [_Item(r, loop.create_future(), loop) for r in requests]
        with self._cond:
            if expected:
                self._expected -= 1
                self._cond.notify()
            self.check_room(len(items))
            self._queue.extend(items)
            self._cond.notify()
        waiting = asyncio.gather(*(it.future for it in items))
        waiting.add_done_callback(_retrieve)  # a caller that gave up (a closed stream) leaves it unawaited
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(waiting, timeout)
        except BaseException as e:
            for it in items:  # rows still queued are skipped, rows generating stop at their next token
                it.request.cancelled = True
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError("timeout", "the request ran past its time budget") from None
            raise

    def close(self, timeout: float | None = None) -> None:
        """Stop after the current batch; whatever is still queued is answered 503."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left, self._queue = list(self._queue), deque()
        for it in left:
            self._resolve(it, ApiError("not_ready", "the server shut down before this request ran"))

    # ------------------------------------------------------------------ generation thread
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run_batch(batch)
            self._idle_since = time.monotonic()

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            # Gather until the batch is full or max_wait has passed since the oldest request arrived or, if it
            # arrived while the previous batch ran, since that batch ended: otherwise the one request that came
            # early would run alone while the rest of the next wave is still on its way.
            # Requests run now when no other is announced as on its way: nothing more could join within the window.
            # (Measured on 2 cores at concurrency 16: with a window long enough for a wave's preparation, the wave
            # then runs as one batch instead of two half-waves, 1.2x the throughput; docs/benchmarks.md.)
            window_end = max(self._queue[0].enqueued, self._idle_since) + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closing:
                if self._expected <= 0:
                    break
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            take = min(len(self._queue), self.max_batch_size)
            batch = [self._queue.popleft() for _ in range(take)]
        batch = [it for it in batch if not (it.request.cancelled or it.future.done())]
        now = time.monotonic()
        for it in batch:
            self.stats.scheduled(now - it.enqueued)
        return batch

    def _run_batch(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        self._running = len(items)  # back to 0 as _resolve answers each
        self.stats.batch(len(items))
        try:
            outcomes = self.predictor.predict([it.request for it in items],
                                              on_result=lambda i, outcome: self._resolve(items[i], outcome))
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting callers
            error = self._batch_error(e, len(items))
            for it in items:
                self._resolve(it, error)
            return
        for it, outcome in zip(items, outcomes, strict=False):
            self._resolve(it, outcome)
        for it in items:  # a predictor that returned too few outcomes is our bug, not the caller's
            self._resolve(it, internal_error())
        log.debug("batch of %d done in %.1f ms (%d queued)", len(items), 1000 * (time.perf_counter() - started),
                  len(self._queue))

    def _resolve(self, item: _Item, outcome: Outcome) -> None:
        """Answer `item` (once), then report its outcome to `stats`."""
        answered = time.monotonic()  # before the caller can be woken: its latency then includes this one
        if not item.resolve(outcome):
            return
        if isinstance(outcome, GenerationResult):
            self.stats.finished(outcome, answered - item.request.arrival)
        else:
            self.stats.failed(outcome.code)
        self._running = max(0, self._running - 1)  # last: `running` 0 means every outcome is in the stats

    def _batch_error(self, e: Exception, size: int) -> ApiError:
        if type(e).__name__ == "OutOfMemoryError":
            import torch

            torch.cuda.empty_cache()
            log.warning("CUDA out of memory on a batch of %d; answered 503 overloaded", size)
            return ApiError("overloaded", "the model ran out of GPU memory on this batch; retry, or send fewer or "
                                          "shorter requests")
        log.error("generation failed on a batch of %d", size, exc_info=e)
        if "CUDA error" in str(e) or type(e).__name__ == "AcceleratorError":
            self.healthy = False  # the CUDA context is unusable: /ping fails so SageMaker replaces the host
            log.error("unrecoverable CUDA error: /ping now answers 503")
        return internal_error()
