"""What every route shares about a request: the body read under a byte cap, and one log line with a request id.

    body = await read_body_capped(request, cfg.max_payload_bytes)    # 413 payload_too_large past the cap
    app.add_middleware(RequestLogMiddleware)                          # id, method, path, status, latency; X-Request-Id
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.requests import Request

from serve.engine.errors import ApiError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# A body over the cap is still read, and thrown away, up to this size before the 413 goes out: a socket closed with
# unread data is reset by the kernel, and a client that sends its whole body before reading the answer (urllib, so
# client.predict) then sees "connection reset" (and retries) instead of payload_too_large.
DRAIN_MAX_BYTES = 64 * MiB


async def read_body_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once the declared length or the bytes received pass `limit` (nothing past the
    limit is kept)."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > limit
    message = f"body is {declared} bytes; the limit is {limit}" if over else f"body is over the {limit}-byte limit"
    if over and int(declared) > DRAIN_MAX_BYTES:
        raise ApiError("payload_too_large", message)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if over:
            if size > DRAIN_MAX_BYTES:
                break
            continue
        chunks.append(chunk)
    if over:
        raise ApiError("payload_too_large", message)
    return b"".join(chunks)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


class RequestLogMiddleware:
    """One log line per request (id, method, path, status, latency) and the id in `X-Request-Id`. The id is the
    caller's `X-Amzn-SageMaker-Inference-Id` or `X-Request-Id` when well-formed, else a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # SageMaker pings every few seconds and scrapes /metrics every minute
            quiet = scope["path"] in ("/ping", "/metrics") and status == 200
            log.log(logging.DEBUG if quiet else logging.INFO, "request id=%s method=%s path=%s status=%d "
                    "latency_ms=%.1f", request_id, scope["method"], scope["path"], status,
                    1000 * (time.perf_counter() - started))


def _request_id(scope) -> str:
    headers = dict(scope.get("headers") or [])
    for name in (b"x-amzn-sagemaker-inference-id", b"x-request-id"):
        value = headers.get(name, b"").decode("latin-1")
        if _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex
