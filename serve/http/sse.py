"""Streamed answers on the wire: server-sent events, one JSON object per event.

A request with `"stream": true` is answered `text/event-stream`:

    data: {"delta": "The highest"}
    data: {"delta": " bar is 2021"}
    data: {"answer": "The highest bar is 2021", "usage": {...}, "finish_reason": "stop", "latency_ms": 412.0}

or, for a failure after the stream started, `data: {"error": {"code": "timeout", "message": "..."}}` as the last
event. The deltas concatenate to the final `answer`, which is the same answer a non-streamed request gets; what may
be shown after each token is decided on the generation thread (serve/engine/textstream.py). The last event also
carries "json", the parsed answer, when the request had a `json_schema`. Another wire format (OpenAI's
chat.completion.chunk events, serve/http/openai.py) passes its own `events` to `stream_answer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

from starlette.responses import Response, StreamingResponse

from serve.engine.batching import Batcher
from serve.engine.errors import ApiError, internal_error
from serve.engine.types import GenerationRequest, GenerationResult
from serve.http.schema import reply_body

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"


def event(payload: dict[str, Any]) -> bytes:
    """One server-sent event holding `payload` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class Events(Protocol):
    """A stream's wire format: the bytes for its start, each piece of text, its end, and a failure after it began."""

    def opening(self) -> list[bytes]: ...

    def delta(self, text: str) -> bytes: ...

    def final(self, result: GenerationResult, latency_ms: float) -> list[bytes]: ...

    def failure(self, error: ApiError) -> list[bytes]: ...


class AnswerEvents:
    """The /invocations format above; `structured`: the request had a json_schema, so the last event has "json"."""

    def __init__(self, structured: bool = False):
        self.structured = structured

    def opening(self) -> list[bytes]:
        return []

    def delta(self, text: str) -> bytes:
        return event({"delta": text})

    def final(self, result: GenerationResult, latency_ms: float) -> list[bytes]:
        return [event(reply_body(result, latency_ms, structured=self.structured))]

    def failure(self, error: ApiError) -> list[bytes]:
        return [event(error.body())]


async def stream_answer(batcher: Batcher, request: GenerationRequest, deadline: float, started: float,
                        request_id: str | None, events: Events | None = None) -> Response:
    """The answer as server-sent events (`events`: their format, AnswerEvents by default). The response starts with
    the first piece of text, so a request that fails before it (queue full, time budget, a prompt the context cannot
    hold) gets its status and error envelope like any other; a failure after it is the stream's last event."""
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
    events = events or AnswerEvents(structured=request.json_schema is not None)
    body = _events(first, pieces, outcome, request, started, request_id, events)
    return StreamingResponse(body, media_type=MEDIA_TYPE, headers={"Cache-Control": "no-cache",
                                                                  "X-Accel-Buffering": "no"})


async def _events(first: str | None, pieces: asyncio.Queue, outcome: asyncio.Future, request: GenerationRequest,
                  started: float, request_id: str | None, events: Events):
    """The events of one streamed answer. Its access log line says 200 (the status went out with the first piece),
    so an error event is logged here too, with the request id."""
    try:
        for chunk in events.opening():
            yield chunk
        piece = first
        while piece is not None:
            yield events.delta(piece)
            piece = await _next_piece(pieces)
        try:
            result = _result_of(outcome)
        except ApiError as e:
            log.warning("request %s: the stream ended with %s (%s)", request_id, e.code, e.message)
            ending = events.failure(e)
        except Exception:  # noqa: BLE001 - our bug: logged, and the stream still ends with an error event
            log.exception("request %s: internal error while streaming an answer", request_id)
            ending = events.failure(internal_error())
        else:
            ending = events.final(result, round(1000 * (time.monotonic() - started), 1))
        for chunk in ending:
            yield chunk
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
