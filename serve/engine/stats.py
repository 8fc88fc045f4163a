"""The engine's observer: hooks called as a request moves through preparation, the queue and generation.

    stats = Stats()                                    # every hook does nothing: the default everywhere
    predictor = Predictor(loaded, stats=stats)         # first_token, inter_token
    batcher = Batcher(predictor, stats=stats)          # scheduled, batch, finished, failed; waiting/running/preparing
    prepare_request(..., stats=stats)                  # image_decoded, prepared (serve/http/sagemaker.py)

serve/http/metrics.py implements it with Prometheus series, so the engine imports no metrics library. A scheduler
that replaces the batcher (or a predictor that replaces Predictor) calls the same hooks with the same meaning, and
exposes the same `QueueLoad` properties for the gauges. Hooks run on the thread doing the work (request threads for
`image_decoded`/`prepared`, the generation thread for the rest), so they must be fast: no I/O, no device reads, no
locks held across calls, and they must not raise. Times are seconds, from `time.monotonic()`.

Per request, in order: image_decoded -> prepared -> scheduled -> first_token -> inter_token (per further token)
-> finished or failed. A request cancelled (timed out, or its caller gone) while still queued is dropped without a
hook: the HTTP layer already answered it.
"""

from __future__ import annotations

from typing import Protocol

from serve.engine.types import GenerationResult


class Stats:
    """No-op hooks; a metrics backend subclasses this and overrides what it records."""

    def image_decoded(self, seconds: float) -> None:
        """An image was decoded (and shrunk for the model's processor) in `seconds`."""

    def prepared(self, seconds: float) -> None:
        """A request's inputs were encoded (prompt rendered, tokenized, pixels preprocessed) in `seconds`."""

    def scheduled(self, queue_seconds: float) -> None:
        """A request left the queue for a batch after waiting `queue_seconds` in it."""

    def batch(self, size: int) -> None:
        """A batch of `size` requests starts generating (one `Predictor.predict` call)."""

    def first_token(self, seconds: float) -> None:
        """A request's first token was generated, `seconds` after it arrived (`GenerationRequest.arrival`)."""

    def inter_token(self, seconds: float, rows: int) -> None:
        """One decode step took `seconds` and gave one more token to each of `rows` requests still generating
        (their inter-token latency; one call per step, not per row, so the hot loop stays cheap)."""

    def finished(self, result: GenerationResult, e2e_seconds: float) -> None:
        """A request was answered, `e2e_seconds` after it arrived."""

    def failed(self, code: str) -> None:
        """A request that reached the engine was answered with an `ApiError` of this code instead."""


class QueueLoad(Protocol):
    """What the gauges read at scrape time from the batcher (or the scheduler that replaces it)."""

    @property
    def waiting(self) -> int:
        """Requests queued, not yet generating."""

    @property
    def running(self) -> int:
        """Requests in the batch generating now whose outcome is not yet reported (`finished`/`failed`)."""

    @property
    def preparing(self) -> int:
        """Requests announced (`expect`) that are still being read, fetched, decoded or encoded."""


NO_STATS = Stats()
