"""The error envelope on the wire: every non-2xx response the server sends is built here.

`error_response(ApiError)` is the JSON body `{"error": {"code", "message"}}` with the code's status;
`register_error_handlers(app)` makes every error FastAPI/starlette can raise (validation, 404/405, our own bugs) come
out in the same envelope, never FastAPI's 422 `detail` shape and never a traceback. The error type and its codes
live in the engine (serve/engine/errors.py), which knows nothing of HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from serve.engine.errors import INTERNAL_MESSAGE, ApiError, error_body, internal_error
from serve.http.requests import request_id_of

log = logging.getLogger(__name__)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)




def describe_validation_errors(errors: list[dict[str, Any]], prefix: str = "") -> str:
    """Pydantic/FastAPI validation errors as one readable line: `question: Field required; temperature: ...`."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query")]
        where = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or "body")
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def register_error_handlers(app: Any) -> None:
    """Make every error a FastAPI app can produce come out in the envelope (never FastAPI's 422 `detail` shape)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def on_api_error(request, exc: ApiError):
        return error_response(exc)

    async def on_validation_error(request, exc: RequestValidationError):
        return error_response(ApiError("invalid_request", describe_validation_errors(list(exc.errors()))))

    async def on_http_exception(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(exc.status_code)
        if code is None:
            code = "invalid_request" if exc.status_code < 500 else "internal_error"
        message = INTERNAL_MESSAGE if code == "internal_error" else str(exc.detail)
        return JSONResponse(error_body(code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_unexpected(request, exc: Exception):
        log.error("unhandled error on %s %s (request id %s)", request.method, request.url.path,
                  request.scope.get("state", {}).get("request_id", "-"), exc_info=exc)
        return error_response(internal_error())

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


async def answered(request: Request, handle: Callable[[], Awaitable[Response]],
                   respond: Callable[[ApiError], Response] = error_response) -> Response:
    """A route's response, or its error through `respond` (the envelope, or a protocol's own shape): an ApiError as
    it is, a client gone while sending the body as 400, anything else our bug: logged with its traceback, answered
    500 with nothing internal in the body."""
    try:
        return await handle()
    except ApiError as e:
        return respond(e)
    except ClientDisconnect:
        return respond(ApiError("invalid_request", "the client disconnected while sending the body"))
    except Exception:  # noqa: BLE001 - our bug: logged with traceback, nothing internal in the body
        log.exception("internal error on %s (request id %s)", request.url.path, request_id_of(request))
        return respond(internal_error())
