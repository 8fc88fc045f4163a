"""OpenAI-compatible chat, on the port, batcher, image policy and limits of /invocations.

    POST /v1/chat/completions   serve.http.openai_schema.ChatRequest -> a chat.completion; with "stream": true,
                                chat.completion.chunk events ending with `data: [DONE]` (with
                                "stream_options": {"include_usage": true}, a usage chunk before it)
    GET  /v1/models             the one model served: SERVE_MODEL_NAME, or the model dir's name

/invocations hands JSON bodies that hold `messages` to `answer_chat` too (serve/http/sagemaker.py), so
InvokeEndpoint callers may send this format. Images (one, in a user message) are fetched and decoded under the
same policy and on the same pools as /invocations' images; a system message and earlier turns are rendered with
the model dir's chat template (serve.engine.encoding). Errors come in OpenAI's shape
(serve.http.openai_schema.error_body) with the statuses and codes of /invocations, checked in the same order.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from serve.config import ServeConfig
from serve.engine.batching import Batcher
from serve.engine.errors import ApiError
from serve.engine.images import ImagePolicy, decode_image, image_bytes, is_remote
from serve.engine.stats import NO_STATS, Stats
from serve.engine.types import GenerationRequest, GenerationResult, PredictorLike
from serve.http import adapters
from serve.http.envelope import answered
from serve.http.openai_schema import (
    ChatCall,
    ChatError,
    chunk_body,
    completion_body,
    error_body,
    models_body,
    parse_chat,
    usage_body,
)
from serve.http.requests import read_body_capped, request_id_of
from serve.http.schema import load_json
from serve.http.sse import event, stream_answer

if TYPE_CHECKING:
    from serve.http.app import ServerState

log = logging.getLogger(__name__)

# What a JSON body may be declared as; with none (or octet-stream) the body has to parse as JSON.
ACCEPTED_TYPES = ("application/json", "", "application/octet-stream")
DONE = b"data: [DONE]\n\n"


def add_routes(app: FastAPI, state: ServerState) -> None:
    started_at = int(time.time())

    @app.get("/v1/models")
    async def models():
        registry = getattr(state.batcher.predictor, "adapters", None) if state.batcher else None
        names = [a["name"] for a in registry.list()] if registry is not None else []
        return models_body(state.cfg.served_model_name, started_at, names)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.monotonic()
        return await answered(request, lambda: _chat_route(state, request, started), error_response)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


async def _chat_route(state: ServerState, request: Request, started: float) -> Response:
    batcher = state.require_batcher()
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in ACCEPTED_TYPES:
        raise ApiError("unsupported_media_type", f"Content-Type {content_type!r} is not accepted; send "
                                                 "application/json")
    batcher.expect()  # a lone queued request waits for this one only while it is on its way
    try:
        payload = load_json(await read_body_capped(request, state.cfg.max_payload_bytes))
    except BaseException:
        batcher.withdraw()
        raise
    return await answer_chat(state, batcher, payload, request, started)


async def answer_chat(state: ServerState, batcher: Batcher, payload: Any, request: Request,
                      started: float) -> Response:
    """The chat completion for `payload` (a parsed JSON body), which the caller has announced to the batcher
    (`expect`). Every ApiError is answered in OpenAI's error shape."""
    deadline = started + state.cfg.request_timeout_s
    request_id = request_id_of(request)
    try:
        try:
            call = parse_chat(payload, max_new_tokens=state.cfg.max_new_tokens)
            model, adapter = served_model(call.model, state.cfg, batcher.predictor, adapters.header_adapter(request))
            batcher.check_room(1)
            prepared = await _prepare(state, batcher.predictor, call, deadline, adapter)
            prepared.arrival = started  # queue time counts from here (serve/http/metrics.py)
            lease = await adapters.lease_adapters(state, [prepared], deadline)
        except BaseException:
            batcher.withdraw()
            raise
        chunks = ChatChunks(f"chatcmpl-{request_id or uuid.uuid4().hex}", int(time.time()), model,
                            call.include_usage)
        streamed = None
        try:
            if call.stream:
                streamed = adapters.release_when_sent(
                    await stream_answer(batcher, prepared, deadline, started, request_id, chunks), lease)
                return streamed
            [outcome] = await batcher.submit([prepared], deadline, expected=True)
        finally:
            if streamed is None:
                lease.release()
        if isinstance(outcome, ApiError):
            raise outcome
        return JSONResponse(completion_body(outcome, reply_id=chunks.reply_id, created=chunks.created, model=model))
    except ApiError as e:
        return error_response(e)


def served_model(asked: str | None, cfg: ServeConfig, predictor: Any = None, header: str | None = None
                 ) -> tuple[str, str | None]:
    """(the model name the reply carries, the adapter to use or None). `model` may be absent, the served model's name
    (what /v1/models lists), the model dir's path (what vLLM-style SageMaker payloads send, e.g. "/opt/ml/model"),
    or a loaded LoRA adapter's name (listed by /v1/models too), as may SageMaker's adapter header."""
    name = cfg.served_model_name
    registry = getattr(predictor, "adapters", None)
    if header is not None:
        if asked is not None and asked not in (name, str(cfg.model_dir), header):
            raise ChatError("invalid_request", f"the request names two models: {asked!r} and the adapter {header!r} "
                                               "in its header", "model")
        return header, _adapter(registry, header)
    if asked is None or asked in (name, str(cfg.model_dir)):
        return name, None
    if registry is not None and asked in {a["name"] for a in registry.list()}:
        return asked, _adapter(registry, asked)
    raise ChatError("model_not_found", f"the model {asked!r} does not exist here; this endpoint serves "
                                       f"{name!r} and its adapters (GET /v1/models)", "model")


def _adapter(registry: Any, name: str) -> str:
    if registry is None:
        raise ChatError("adapter_not_found", f"this server serves no adapters; {name!r} is not one", "model")
    try:
        return registry.resolve(name)
    except ApiError as e:
        raise ChatError(e.code, e.message, "model") from None


async def _prepare(state: ServerState, predictor: PredictorLike, call: ChatCall, deadline: float,
                   adapter: str | None = None) -> GenerationRequest:
    """Fetch a remote image on Starlette's big thread pool; decode and encode on the prepare pool, as
    /invocations does."""
    data = None
    if call.image_url is not None and is_remote(call.image_url):
        data = await run_in_threadpool(_image_bytes, call, state.policy, deadline)
    return await state.in_prepare_pool(build_request, call, data, state.policy, deadline, predictor, state.metrics,
                                       adapter)


def build_request(call: ChatCall, data: bytes | None, policy: ImagePolicy, deadline: float,
                  predictor: PredictorLike, stats: Stats = NO_STATS, adapter: str | None = None) -> GenerationRequest:
    """The engine request for `call`, its image decoded (from `data`, or from a data:/base64 URL here) and its
    prompt encoded, on this thread; each step's time goes to `stats`."""
    image = None
    started = time.monotonic()
    if call.image_url is not None:
        data = data if data is not None else _image_bytes(call, policy, deadline)
        try:
            shrink_for = predictor.image_processor if adapter is None else predictor.image_processor_for(adapter)
            image = decode_image(data, policy.max_pixels, shrink_for=shrink_for)
        except ApiError as e:
            raise ChatError(e.code, e.message, call.image_param) from None
        stats.image_decoded(time.monotonic() - started)
    encode_started = time.monotonic()
    # A single user turn goes through encode(question, image), as on /invocations; anything else as a conversation.
    request = GenerationRequest(image=image, question=call.question or "",
                                messages=None if call.question is not None else call.messages,
                                temperature=call.temperature, top_p=call.top_p, max_new_tokens=call.max_new_tokens,
                                stop=call.stop, seed=call.seed, json_schema=call.json_schema,
                                adapter=adapter, deadline=deadline)
    predictor.prepare(request)
    stats.prepared(time.monotonic() - encode_started)
    return request


def _image_bytes(call: ChatCall, policy: ImagePolicy, deadline: float) -> bytes:
    try:
        return image_bytes(call.image_url, policy, deadline=deadline)
    except ApiError as e:
        raise ChatError(e.code, e.message, call.image_param) from None


@dataclass(frozen=True)
class ChatChunks:
    """OpenAI's stream format for serve.http.sse.stream_answer: a role chunk, content chunks, a chunk with the
    finish_reason, with include_usage a usage chunk (every other chunk then carries "usage": null), then [DONE].
    A failure after the stream started is an error event, then [DONE]."""
    reply_id: str
    created: int
    model: str
    include_usage: bool

    def _chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> bytes:
        body = chunk_body(reply_id=self.reply_id, created=self.created, model=self.model, delta=delta,
                          finish_reason=finish_reason)
        if self.include_usage:
            body["usage"] = usage
        return event(body)

    def opening(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def final(self, result: GenerationResult, latency_ms: float) -> list[bytes]:
        ending = [self._chunk({}, result.finish_reason)]
        if self.include_usage:
            ending.append(self._chunk(None, usage=usage_body(result)))
        return ending + [DONE]

    def failure(self, error: ApiError) -> list[bytes]:
        return [event(error_body(error)), DONE]
