"""The one error type and its stable codes: `ApiError(code, message)`, `{"error": {"code", "message"}}`.

`ApiError` is the only exception that becomes a 4xx/503/504; anything else that escapes is our bug, answered with a
generic 500 `internal_error` whose body says nothing about internals. The engine raises it; the HTTP layer
(serve/http/envelope.py) turns it into a response, so this module imports no web framework. Clients (client/,
`llava-sm`) map `code` to `ClientError.code`, so codes never change meaning.
"""

from __future__ import annotations

from typing import Any

# code -> HTTP status. Add codes, never rename them.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_image": 400,
    "image_too_large": 400,
    "url_not_allowed": 400,
    "image_fetch_failed": 400,
    "invalid_json_schema": 400,
    "invalid_adapter": 400,
    "invalid_adapter_name": 400,
    "adapter_mismatch": 400,
    "adapter_rank_too_large": 400,
    "adapter_source_not_allowed": 403,
    "not_found": 404,
    "model_not_found": 404,
    "adapter_not_found": 404,
    "method_not_allowed": 405,
    "adapter_exists": 409,
    "adapter_limit": 409,
    "payload_too_large": 413,
    "adapter_too_large": 413,
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


def internal_error() -> ApiError:
    return ApiError("internal_error", INTERNAL_MESSAGE)
