"""The `/invocations` wire contract: request models and their parsing into ApiErrors with readable messages,
and the reply (`reply_body`).

    {"image": "<url | s3:// | data: | base64>", "question": "...", "temperature": 0.1, "top_p": 0.9,
     "max_new_tokens": 64, "stop": ["\\n"], "stream": false, "json_schema": {"type": "object", ...},
     "adapter": "charts"}
    {"instances": [<the object above, without "stream">, ...]}

Only `image` and `question` are required; unknown fields are refused (a misspelt "max_tokens" would otherwise be
silently ignored). For raw image bodies the same generation fields come from the query string or from
`X-Amzn-SageMaker-Custom-Attributes` written as a query string (`question=What%20is%20this%3F&temperature=0`);
`json_schema` is JSON-body only. The reply to a request with a `json_schema` carries the parsed answer as "json".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from serve.engine.constrained import parse_answer
from serve.engine.errors import ApiError
from serve.engine.types import GenerationResult
from serve.http.envelope import describe_validation_errors

MAX_QUESTION_CHARS = 20_000
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
PARAM_FIELDS = ("question", "temperature", "top_p", "max_new_tokens", "stop", "stream", "adapter")



def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _stop_lengths(value: list[str] | None) -> list[str] | None:
    if value is not None and any(not s or len(s) > MAX_STOP_CHARS for s in value):
        raise ValueError(f"each stop string must be 1 to {MAX_STOP_CHARS} characters")
    return value


# `stop` on every route: one string or a list, each 1 to MAX_STOP_CHARS characters (the count is each field's).
StopStrings = Annotated[list[str] | None, BeforeValidator(_one_or_many), AfterValidator(_stop_lengths)]

class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    temperature: float | None = Field(default=None, ge=0, le=5, description="0 means greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    stop: StopStrings = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool = Field(default=False, description="answer as server-sent events (serve.http.sse)")
    json_schema: dict[str, Any] | None = Field(default=None, description="a JSON Schema the answer follows "
                                                                         "(serve.engine.constrained)")
    adapter: str | None = Field(default=None, min_length=1, max_length=63,
                                description="a loaded LoRA adapter's name (serve.http.adapters); none: the base model")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class InvocationRequest(GenerationParams):
    image: str = Field(min_length=1)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[InvocationRequest] = Field(min_length=1)


def parse_json_body(body: bytes, *, max_instances: int, max_new_tokens: int) -> tuple[list[InvocationRequest], bool]:
    """JSON bytes -> (requests, is_batch). Raises ApiError invalid_json / invalid_request."""
    return parse_invocation(load_json(body), max_instances=max_instances, max_new_tokens=max_new_tokens)


def load_json(body: bytes) -> Any:
    """JSON bytes -> the value, or ApiError invalid_json (also for NaN and Infinity, which are not JSON)."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError("invalid_json", f"body is not valid JSON ({type(e).__name__})") from None
    except ValueError as e:
        raise ApiError("invalid_json", f"body is not valid JSON: {e}") from None


def parse_invocation(obj: Any, *, max_instances: int, max_new_tokens: int
                     ) -> tuple[list[InvocationRequest], bool]:
    """A JSON value -> (requests, is_batch). Raises ApiError invalid_request."""
    if not isinstance(obj, dict):
        raise ApiError("invalid_request", "body must be a JSON object: {\"image\": ..., \"question\": ...} or "
                                          "{\"instances\": [...]}")
    is_batch = "instances" in obj
    if is_batch and isinstance(obj["instances"], list) and len(obj["instances"]) > max_instances:
        raise ApiError("invalid_request", f"instances: at most {max_instances} per request, got "
                                          f"{len(obj['instances'])}")
    try:
        # Strict: JSON already has types, so `"temperature": true` or `"max_new_tokens": "64"` is the caller's
        # mistake, not something to convert silently (raw-image parameters arrive as strings and stay lax).
        requests = (BatchRequest.model_validate(obj, strict=True).instances if is_batch
                    else [InvocationRequest.model_validate(obj, strict=True)])
    except ValidationError as e:
        raise ApiError("invalid_request", describe_validation_errors(list(e.errors()))) from None
    check_max_new_tokens(requests, max_new_tokens, batch=is_batch)
    if is_batch and any(r.stream for r in requests):
        raise ApiError("invalid_request", "stream: a streamed answer is for one request; send it without "
                                          "\"instances\"")
    return requests, is_batch


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser accepts them); refuse them instead of a confusing range error."""
    raise ValueError(f"{name} is not a JSON number")


def parse_raw_params(query: Iterable[tuple[str, str]], custom_attributes: Iterable[tuple[str, str]],
                     *, max_new_tokens: int) -> GenerationParams:
    """Generation fields for a raw image body: custom attributes first, the query string overriding them."""
    values: dict[str, Any] = {}
    custom_attributes, query = list(custom_attributes), list(query)
    if any(k == "json_schema" for k, _ in custom_attributes + query):
        raise ApiError("invalid_request", "json_schema is for JSON bodies only: send {\"image\": \"<base64>\", "
                                          "\"question\": ..., \"json_schema\": {...}} as application/json")
    for source in (custom_attributes, query):
        stops = [v for k, v in source if k == "stop"]
        values.update({k: v for k, v in source if k in PARAM_FIELDS and k != "stop"})
        if stops:
            values["stop"] = stops
    if "question" not in values:
        raise ApiError("invalid_request", "a raw image body needs the question in the query string (?question=...) "
                                          "or in X-Amzn-SageMaker-Custom-Attributes (question=...)")
    try:
        params = GenerationParams.model_validate(values)
    except ValidationError as e:
        raise ApiError("invalid_request", describe_validation_errors(list(e.errors()))) from None
    check_max_new_tokens([params], max_new_tokens)
    return params


def check_max_new_tokens(requests: list[Any], cap: int, *, batch: bool = False) -> None:
    for i, req in enumerate(requests):
        if req.max_new_tokens is not None and req.max_new_tokens > cap:
            where = f"instances.{i}.max_new_tokens" if batch else "max_new_tokens"
            raise ApiError("invalid_request", f"{where}: {req.max_new_tokens} is over this server's cap of {cap}")


def reply_body(result: GenerationResult, latency_ms: float, *, structured: bool = False) -> dict[str, Any]:
    """One answer as the client gets it (alone, in a list for "instances", or as a stream's last event).
    `structured` (the request had a json_schema): "json" is the answer parsed, or null when it is not complete JSON
    (finish_reason "length", or a stop string cut it)."""
    reply = {"answer": result.answer,
             "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
             "finish_reason": result.finish_reason, "latency_ms": latency_ms}
    if structured:
        reply["json"] = parse_answer(result.answer)
    return reply
