"""Streamed answers: the text a row may show so far, and the server-sent events that carry it.

A request with `"stream": true` is answered `text/event-stream`, one JSON object per event:

    data: {"delta": "The highest"}
    data: {"delta": " bar is 2021"}
    data: {"answer": "The highest bar is 2021", "usage": {...}, "finish_reason": "stop", "latency_ms": 412.0}

or, for a failure after the stream started, `data: {"error": {"code": "timeout", "message": "..."}}` as the last
event. The deltas concatenate to the final `answer`, which is the same answer a non-streamed request gets (the
tests hold both to it).

`TextStream` (on the generation thread) decides what may be shown after each token. A streamed prefix is never
taken back, so it holds back what could still change: the leading whitespace the final answer strips, trailing
whitespace (stripped if the answer ends there), an incomplete UTF-8 character (decoded as U+FFFD), and a tail that
could be the start of a stop string (the answer is cut before it). `stream_answer` (on the event loop) turns the
pieces into the HTTP response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.responses import Response, StreamingResponse

from serve.errors import ApiError, internal_error
from serve.schema import reply_body

if TYPE_CHECKING:  # at run time, serve.predictor imports this module (and serve.batching imports it)
    from serve.batching import Batcher
    from serve.predictor import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
MEDIA_TYPE = "text/event-stream"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextStream:
    """The part of a row's answer that is safe to show, fed the decoded text of its tokens after each step."""

    def __init__(self, stop: Sequence[str], emit: Callable[[str], None]):
        self.stop = tuple(stop)
        self.emit = emit
        self.sent = ""

    def update(self, text: str) -> None:
        """The decoded text generated so far: emit what newly became safe to show."""
        self._emit_up_to(self._safe(text))

    def finish(self, answer: str) -> None:
        """The final answer: emit whatever of it was held back."""
        self._emit_up_to(answer)

    def _safe(self, text: str) -> str:
        text, _ = cut_at_stop(text.lstrip(), self.stop)
        text = text.rstrip(REPLACEMENT_CHAR)
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold].rstrip()

    def _emit_up_to(self, text: str) -> None:
        # A decode that rewrote what was already sent (rare: tokenizer clean-up) sends nothing more; the final
        # event's answer is the authority.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            self.emit(delta)


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event holding `payload` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def stream_answer(batcher: Batcher, request: GenerationRequest, deadline: float, started: float,
                        request_id: str | None) -> Response:
    """The answer as server-sent events. The response starts with the first piece of text, so a request that fails
    before it (queue full, time budget, a prompt the context cannot hold) gets its status and error envelope like
    any other; a failure after it is the stream's last event."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None, last: the outcome is in
    request.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    outcome = asyncio.ensure_future(batcher.submit([request], deadline, expected=True))
    # After every piece: the generation thread queues a row's pieces before it resolves the row.
    outcome.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        first = await _next_piece(pieces)
        if first is None:
            _result_of(outcome)  # an error before any text: raised here, answered with its status
    except BaseException:
        request.cancelled = True
        outcome.cancel()
        raise
    # X-Accel-Buffering: a reverse proxy (nginx) in front of `docker run` would otherwise hold the events back.
    return StreamingResponse(_events(first, pieces, outcome, request, started, request_id), media_type=MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(first: str | None, pieces: asyncio.Queue, outcome: asyncio.Future, request: GenerationRequest,
                  started: float, request_id: str | None):
    """The events of one streamed answer. Its access log line says 200 (the status went out with the first piece),
    so an error event is logged here too, with the request id."""
    try:
        piece = first
        while piece is not None:
            yield event({"delta": piece})
            piece = await _next_piece(pieces)
        try:
            result = _result_of(outcome)
        except ApiError as e:
            log.warning("request %s: the stream ended with %s (%s)", request_id, e.code, e.message)
            yield event(e.body())
            return
        except Exception:  # noqa: BLE001 - our bug: logged, and the stream still ends with an error event
            log.exception("request %s: internal error while streaming an answer", request_id)
            yield event(internal_error().body())
            return
        yield event(reply_body(result, round(1000 * (time.monotonic() - started), 1)))
    finally:  # also when the client went away: its row stops at the next token
        request.cancelled = True
        outcome.cancel()


async def _next_piece(pieces: asyncio.Queue) -> str | None:
    """The answer's next text: every piece queued since the last call, joined (a busy server sends fewer, larger
    events); None once the outcome is in."""
    text = await pieces.get()
    while text is not None and not pieces.empty():
        more = pieces.get_nowait()
        if more is None:
            pieces.put_nowait(None)  # still the last item: the outcome comes after every piece
            break
        text += more
    return text


def _result_of(outcome: asyncio.Future) -> GenerationResult:
    [result] = outcome.result()
    if isinstance(result, ApiError):
        raise result
    return result
