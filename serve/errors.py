"""The server's one error envelope: `{"error": {"code": "...", "message": "..."}}` with stable codes.

Every non-2xx response is built here. `ApiError` is the only exception that becomes a 4xx/503/504; anything else
that escapes a handler is our bug: it is logged with its traceback and answered with a generic 500
`internal_error` whose body says nothing about internals. Clients (client/, `llava-sm`) map `code` to
`ClientError.code`, so codes never change meaning.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

# code -> HTTP status. Add codes, never rename them.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_image": 400,
    "image_too_large": 400,
    "url_not_allowed": 400,
    "image_fetch_failed": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "internal_error": 500,
    "not_ready": 503,
    "overloaded": 503,
    "timeout": 504,
}

INTERNAL_MESSAGE = "internal server error; the request id in the X-Request-Id header identifies it in the logs"


class ApiError(Exception):
    """An error the caller should see: a stable `code` (its HTTP status follows from it) and a safe message."""

    def __init__(self, code: str, message: str):
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)

    def __repr__(self) -> str:
        return f"ApiError({self.code!r}, {self.message!r})"


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def internal_error() -> ApiError:
    return ApiError("internal_error", INTERNAL_MESSAGE)


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
