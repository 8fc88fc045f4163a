"""SageMaker's inference contract: `GET /ping`, `POST /invocations`, `GET /execution-parameters`.

    GET  /ping                  200 once the model is loaded and healthy, else 503 `not_ready`; never waits on
                                generation (it runs on the batcher's thread)
    POST /invocations           application/json: {"image", "question", "temperature", "top_p", "max_new_tokens",
                                "stop", "stream", "json_schema", "adapter"} or {"instances": [...]}; or a raw image body
                                (image/png, image/jpeg, image/webp, application/x-image) with the question in
                                ?question= or in X-Amzn-SageMaker-Custom-Attributes
                                -> {"answer", "usage": {"prompt_tokens", "completion_tokens"}, "finish_reason",
                                    "latency_ms"} (+ "json" with a json_schema; serve.http.schema.reply_body;
                                    a list of those for "instances");
                                with "stream": true (or ?stream=true), text/event-stream (serve.http.sse).
                                A JSON object with "messages" is an OpenAI chat completion, answered as
                                /v1/chat/completions answers it (serve.http.openai). No Content-Type, or
                                application/octet-stream: the body says what it is (a JSON object, or PNG/JPEG/WebP
                                bytes)
    GET  /execution-parameters  what batch transform should send (SINGLE_RECORD, our payload cap)

Limits, checked in this order: 503 while loading; 415 content type (judged from the body, after the 413, when it
has none); 413 body over `max_payload_bytes`, counted while the body streams in; 400 for bad JSON, schema, images
and URLs; 503 when the queue is full; 504 past `request_timeout_s`.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from serve.engine.batching import Batcher
from serve.engine.errors import ApiError
from serve.engine.images import ImagePolicy, decode_image, image_bytes, is_remote
from serve.engine.stats import NO_STATS, Stats
from serve.engine.types import GenerationRequest, PredictorLike
from serve.http import adapters, openai
from serve.http.envelope import answered, error_response
from serve.http.requests import MiB, read_body_capped, request_id_of
from serve.http.schema import GenerationParams, load_json, parse_invocation, parse_raw_params, reply_body
from serve.http.sse import stream_answer

if TYPE_CHECKING:
    from serve.http.app import ServerState

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/x-image")
# InvokeEndpoint callers often send no content type, or boto3's default for bytes: the body says what it is.
SNIFFED_TYPES = ("", "application/octet-stream")
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
# The instance field an error of a batch request names (every other code is about the image).
FIELD_OF_ERROR = {"invalid_request": "", "invalid_json_schema": ".json_schema"}


def add_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.cfg

    @app.get("/ping")
    async def ping():
        try:
            state.require_batcher()
        except ApiError as e:
            return error_response(e)
        return {"status": "ready"}

    @app.get("/execution-parameters")
    async def execution_parameters():
        return {"MaxConcurrentTransforms": cfg.max_batch_size, "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, cfg.max_payload_bytes // MiB)}

    @app.post("/invocations")
    async def invocations(request: Request):
        started = time.monotonic()
        return await answered(request, lambda: _invoke(state, request, started))


@dataclass
class Decoded:
    """An /invocations body turned into engine requests, prepared on the request threads."""
    requests: list[GenerationRequest]
    is_batch: bool  # {"instances": [...]}: the reply is a list
    stream: bool


@dataclass
class Body:
    """An /invocations body read under the cap, with the content type it has (declared, or sniffed from it)."""
    content_type: str
    data: bytes
    json: Any = None  # the value of a JSON body


async def _invoke(state: ServerState, request: Request, started: float) -> Response:
    deadline = started + state.cfg.request_timeout_s
    batcher = state.require_batcher()
    batcher.expect()  # a lone queued request waits for this one only while it is on its way
    try:
        body = await read_invocation(state, request)
    except BaseException:
        batcher.withdraw()
        raise
    if isinstance(body.json, dict) and "messages" in body.json:  # as vLLM's SageMaker router: a chat completion
        return await openai.answer_chat(state, batcher, body.json, request, started)
    try:
        decoded = await decode_request(state, batcher, request, body, deadline)
        lease = await adapters.lease_adapters(state, decoded.requests, deadline)
    except BaseException:
        batcher.withdraw()
        raise
    for r in decoded.requests:  # the engine's time to first token and latency count from here
        r.arrival = started
    streamed = None
    try:
        if decoded.stream:
            response = await stream_answer(batcher, decoded.requests[0], deadline, started, request_id_of(request))
            streamed = adapters.release_when_sent(response, lease)
            return streamed
        outcomes = await batcher.submit(decoded.requests, deadline, expected=True)
    finally:
        if streamed is None:
            lease.release()
    for outcome in outcomes:
        if isinstance(outcome, ApiError):
            raise outcome
    latency_ms = round(1000 * (time.monotonic() - started), 1)
    replies = [reply_body(o, latency_ms, structured=r.json_schema is not None)
               for r, o in zip(decoded.requests, outcomes, strict=True)]
    return JSONResponse(replies if decoded.is_batch else replies[0])


async def read_invocation(state: ServerState, request: Request) -> Body:
    """Content type -> body under the cap -> its JSON value (for a JSON body)."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in JSON_TYPES + IMAGE_TYPES + SNIFFED_TYPES:
        raise _unsupported(content_type)
    data = await read_body_capped(request, state.cfg.max_payload_bytes)
    if content_type in SNIFFED_TYPES:
        content_type = sniff_content_type(data) or ""
        if not content_type:
            raise _unsupported(request.headers.get("content-type", ""), sniffed=True)
    return Body(content_type, data, load_json(data) if content_type in JSON_TYPES else None)


def _unsupported(content_type: str, *, sniffed: bool = False) -> ApiError:
    what = f"Content-Type {content_type or '(none)'!r}"
    if sniffed:
        what += " with a body that is neither a JSON object nor PNG/JPEG/WebP bytes"
    return ApiError("unsupported_media_type", f"{what} is not accepted; send {', '.join(JSON_TYPES + IMAGE_TYPES)}")


_JSON_OBJECT = re.compile(rb"\s*\{")
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def sniff_content_type(body: bytes) -> str | None:
    """What a body without a usable Content-Type is: a JSON object, a PNG, JPEG or WebP image, or None."""
    if _JSON_OBJECT.match(body):
        return "application/json"
    for magic, content_type in _IMAGE_MAGIC:
        if body.startswith(magic):
            return content_type
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "image/webp"
    return None


async def decode_request(state: ServerState, batcher: Batcher, request: Request, body: Body,
                         deadline: float) -> Decoded:
    """Parameters -> images fetched and decoded -> prompts encoded.

    Network fetches wait on Starlette's big thread pool; decoding and encoding hold the GIL for much of their time,
    so they run on the small prepare pool and the generation thread only generates."""
    cfg, predictor = state.cfg, batcher.predictor
    adapter = adapters.header_adapter(request)
    if body.content_type in JSON_TYPES:
        items, is_batch = parse_invocation(body.json, max_instances=cfg.max_instances,
                                           max_new_tokens=cfg.max_new_tokens)
        batcher.check_room(len(items))
        images = None
        if any(is_remote(item.image) for item in items):
            images = await run_in_threadpool(_fetch_all, items, state.policy, deadline, is_batch)
        requests = await state.in_prepare_pool(_prepare_all, items, images, state.policy, deadline, is_batch,
                                               predictor, state.metrics, adapter)
        return Decoded(requests, is_batch, stream=not is_batch and items[0].stream)
    attributes = parse_qsl(request.headers.get(CUSTOM_ATTRIBUTES, ""), keep_blank_values=True)
    params = parse_raw_params(request.query_params.multi_items(), attributes, max_new_tokens=cfg.max_new_tokens)
    batcher.check_room(1)
    if not body.data:
        raise ApiError("invalid_image", "the body is empty; send the image bytes")
    prepared = await state.in_prepare_pool(prepare_request, body.data, params, cfg.max_image_pixels, deadline,
                                           predictor, state.metrics, adapter)
    return Decoded([prepared], is_batch=False, stream=params.stream)


def _fetch_all(items: list, policy: ImagePolicy, deadline: float, is_batch: bool) -> list[bytes]:
    fetched = []
    for i, item in enumerate(items):
        with _instance_errors(i, is_batch):
            fetched.append(image_bytes(item.image, policy, deadline=deadline))
    return fetched


def _prepare_all(items: list, images: list[bytes] | None, policy: ImagePolicy, deadline: float, is_batch: bool,
                 predictor: PredictorLike, stats: Stats, adapter: str | None = None) -> list[GenerationRequest]:
    requests = []
    for i, item in enumerate(items):
        with _instance_errors(i, is_batch):
            data = images[i] if images is not None else image_bytes(item.image, policy, deadline=deadline)
            requests.append(prepare_request(data, item, policy.max_pixels, deadline, predictor, stats, adapter))
    return requests


@contextmanager
def _instance_errors(i: int, is_batch: bool):
    """Name the instance (and its image) in an error of a batch request."""
    try:
        yield
    except ApiError as e:
        where = f"instances.{i}" + FIELD_OF_ERROR.get(e.code, ".image")
        raise ApiError(e.code, f"{where}: {e.message}" if is_batch else e.message) from None


def prepare_request(image: bytes, params: GenerationParams, max_pixels: int, deadline: float,
                    predictor: PredictorLike, stats: Stats = NO_STATS, adapter: str | None = None
                    ) -> GenerationRequest:
    """Decode the image (shrunk for the processor of the model or of the adapter the request names: `adapter`, its
    header's, or its body's), build the engine request and encode it, on this thread; each step's time goes to
    `stats`."""
    adapter = adapters.pick_adapter(adapter, params.adapter)
    shrink_for = predictor.image_processor if adapter is None else predictor.image_processor_for(adapter)
    started = time.monotonic()
    decoded: Any = decode_image(image, max_pixels, shrink_for=shrink_for)
    decoded_at = time.monotonic()
    stats.image_decoded(decoded_at - started)
    request = GenerationRequest(image=decoded, question=params.question, temperature=params.temperature,
                                top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                                stop=tuple(params.stop or ()), json_schema=params.json_schema, deadline=deadline,
                                adapter=adapter)
    predictor.prepare(request)
    stats.prepared(time.monotonic() - decoded_at)
    return request
