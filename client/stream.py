"""`predict_stream(image, question)`: the answer piece by piece, from a server or a SageMaker endpoint.

    from client import predict_stream
    stream = predict_stream("chart.png", "Describe the trend.", url="http://localhost:8080")
    for piece in stream:
        print(piece, end="", flush=True)
    stream.reply            # the usual reply: {"answer", "usage", "finish_reason", "latency_ms"}

The request asks the server for `"stream": true`, which answers with server-sent events (serve/http/sse.py): the
pieces, then the reply. Against an endpoint the call is InvokeEndpointWithResponseStream, whose PayloadPart bytes
carry the same events. Retries (connection failures, 503) happen only before the first piece; an error after it
(say, the server's time budget) raises ClientError from the loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from client.invoke import ClientError, ask, call_endpoint, http_errors, post_json

READ_CHUNK = 8192


class AnswerStream:
    """Iterate for the answer's pieces (str); afterwards `reply` holds the server's final reply."""

    def __init__(self, events: Iterator[dict[str, Any]], close: Any = None):
        self._events = events
        self._close = close
        self.reply: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for payload in self._events:
                if "delta" in payload:
                    yield str(payload["delta"])
                elif "error" in payload:
                    err = payload["error"]
                    raise ClientError(200, str(err.get("code", "stream_error")), str(err.get("message", "")))
                elif isinstance(payload.get("answer"), str):
                    self.reply = payload
                    return
            raise ClientError(200, "invalid_response", "the stream ended before the answer did")
        finally:
            if self._close is not None:
                self._close()

    @property
    def answer(self) -> str | None:
        return None if self.reply is None else self.reply["answer"]


def parse_events(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, from byte chunks split anywhere (an HTTP body read in
    pieces, or SageMaker's PayloadPart bytes)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            data = b"".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:"))
            if data:
                try:
                    yield json.loads(data)
                except ValueError:
                    raise ClientError(200, "invalid_response", f"not a JSON event: {data[:200]!r}") from None


def predict_stream(image: Any, question: str, **kwargs: Any) -> AnswerStream:
    """The answer to `question` about `image` as it is generated. Takes the same arguments as
    `client.predict_full`; `timeout` bounds each wait for the next bytes."""
    return ask(image, question, **kwargs, stream=True)


def open_url_stream(url: str, body: bytes, timeout: float) -> AnswerStream:
    response = post_json(url, body, timeout, accept="text/event-stream")
    return AnswerStream(parse_events(_url_chunks(response, url, timeout)), close=response.close)


def _url_chunks(response: Any, url: str, timeout: float) -> Iterator[bytes]:
    with http_errors(url, timeout):
        while chunk := response.read1(READ_CHUNK):
            yield chunk


def open_endpoint_stream(client: Any, endpoint_name: str, body: bytes, *,
                         inference_component: str | None = None) -> AnswerStream:
    """InvokeEndpointWithResponseStream (to `inference_component`, if given): its PayloadPart bytes carry the
    server's events. (moto has no response streaming; tests/test_serve_streaming.py puts a loopback stand-in for the
    runtime in front of a real server.)"""
    response = call_endpoint(client.invoke_endpoint_with_response_stream, endpoint_name, body,
                             accept="text/event-stream", inference_component=inference_component)
    return AnswerStream(parse_events(_payload_parts(response["Body"], endpoint_name)))


def _payload_parts(stream: Any, endpoint_name: str) -> Iterator[bytes]:
    from botocore.exceptions import EventStreamError

    try:
        for part in stream:
            if "PayloadPart" in part:
                yield part["PayloadPart"]["Bytes"]
    except EventStreamError as e:  # ModelStreamError, InternalStreamFailure
        code = e.response.get("Error", {}).get("Code", "stream_error")
        raise ClientError(None, code, f"endpoint {endpoint_name!r}: {e}") from e
