"""The SageMaker-facing HTTP app: `create_app(cfg) -> FastAPI` with the endpoints SageMaker calls.

    GET  /ping                  200 once the model is loaded and healthy, else 503 `not_ready`; never waits on
                                generation (it runs on the batcher's thread)
    POST /invocations           application/json: {"image", "question", "temperature", "top_p", "max_new_tokens",
                                "stop"} or {"instances": [...]}; or a raw image body (image/png, image/jpeg,
                                image/webp, application/x-image) with the question in ?question= or in
                                X-Amzn-SageMaker-Custom-Attributes
                                -> {"answer", "usage": {"prompt_tokens", "completion_tokens"}, "finish_reason",
                                    "latency_ms"} (serve.schema.reply_body; a list of those for "instances");
                                with "stream": true (or ?stream=true), text/event-stream: the answer's pieces,
                                then that object (serve.streaming.stream_answer)
    GET  /execution-parameters  what batch transform should send (SINGLE_RECORD, our payload cap)

The model loads on a background thread after the socket is listening (SageMaker wants the socket within 250 ms and
/ping within 2 s). Limits, checked in this order: 503 while loading; 415 content type; 413 body over
`max_payload_bytes`, counted while the body streams in; 400 for bad JSON, schema, images and URLs; 503 when the
queue is full; 504 past `request_timeout_s`. Every error has the envelope of serve/errors.py. Each request logs one
line (id, method, path, status, latency; never payload content) and returns its id in `X-Request-Id`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from serve.batching import Batcher
from serve.config import MiB, ServeConfig
from serve.errors import ApiError, error_response, internal_error, register_error_handlers
from serve.images import ImagePolicy, decode_image, image_bytes, is_remote
from serve.predictor import GenerationRequest
from serve.schema import GenerationParams, parse_json_body, parse_raw_params, reply_body
from serve.streaming import stream_answer

log = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/x-image")
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class ServerState:
    """What the endpoints share: the config, the image policy, the request-preparation executor, and the batcher
    once the model is loaded."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.policy = ImagePolicy.from_config(cfg)
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        # Image decode and Predictor.prepare hold the GIL for much of their time. On Starlette's 40-thread pool,
        # dozens of them at once take turns with the generation thread and the event loop, and /ping waits behind
        # all of them (p99 38 ms at concurrency 16 on 2 cores; docs/benchmarks.md). One thread per core, less the
        # core the generation thread keeps busy, does the same work as fast; but at least 2: while a burst is
        # prepared the generation thread waits for it (serve.batching), and Pillow's decoding releases the GIL.
        self.prepare_pool = ThreadPoolExecutor(cfg.prepare_threads or default_prepare_threads(),
                                               thread_name_prefix="prepare")

    async def in_prepare_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, functools.partial(fn, *args))

    def require_batcher(self) -> Batcher:
        if self.batcher is None or not self.batcher.healthy:
            message = "the model failed to load" if self.load_error else "the model is still loading"
            raise ApiError("not_ready", message)
        return self.batcher


def default_predictor_factory(cfg: ServeConfig) -> Callable[[], Any]:
    def build():
        from serve.model import load_artifact
        from serve.predictor import Predictor

        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        loaded = load_artifact(cfg.model_dir, quantization=cfg.quantization, device=cfg.device)
        return Predictor(loaded, max_new_tokens_cap=cfg.max_new_tokens, accel=cfg.accel_config())
    return build


def create_app(cfg: ServeConfig, *, predictor_factory: Callable[[], Any] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`predictor_factory()` returns an object with `predict(requests, on_result=None)` (serve.predictor.Predictor
    by default, built from `cfg.model_dir`); it runs on a background thread when the app starts."""
    state = ServerState(cfg)
    factory = predictor_factory or default_predictor_factory(cfg)

    def load() -> None:
        started = time.perf_counter()
        try:
            predictor = factory()
            freeze_startup_heap()
            state.batcher = Batcher(predictor, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                                    max_queue=cfg.max_queue).start()
        except BaseException as e:  # noqa: BLE001 - reported to the operator and to /ping
            state.load_error = e
            log.error("model load failed; /ping answers 503", exc_info=e)
            if on_load_failure is not None:
                on_load_failure(e)
            return
        log.info("model ready in %.1f s", time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield
        if state.batcher is not None:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(state.batcher.close, cfg.graceful_timeout_s)
        state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llava-sagemaker serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serve = state
    register_error_handlers(app)
    app.add_middleware(RequestLogMiddleware)

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
        try:
            return await _invoke(state, request, started)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return error_response(ApiError("invalid_request", "the client disconnected while sending the body"))
        except Exception:  # noqa: BLE001 - our bug: logged with traceback, nothing internal in the body
            log.exception("internal error on /invocations (request id %s)", request.scope["state"].get("request_id"))
            return error_response(internal_error())

    return app


async def _invoke(state: ServerState, request: Request, started: float) -> Response:
    deadline = started + state.cfg.request_timeout_s
    batcher = state.require_batcher()
    batcher.expect()  # a lone queued request waits for this one only while it is on its way
    try:
        requests, is_batch, stream = await _read_and_prepare(state, batcher, request, deadline)
    except BaseException:
        batcher.withdraw()
        raise
    if stream:
        return await stream_answer(batcher, requests[0], deadline, started,
                                   request.scope["state"].get("request_id"))
    outcomes = await batcher.submit(requests, deadline, expected=True)
    for outcome in outcomes:
        if isinstance(outcome, ApiError):
            raise outcome
    latency_ms = round(1000 * (time.monotonic() - started), 1)
    replies = [reply_body(o, latency_ms) for o in outcomes]
    return JSONResponse(replies if is_batch else replies[0])


async def _read_and_prepare(state: ServerState, batcher: Batcher, request: Request, deadline: float
                            ) -> tuple[list[GenerationRequest], bool, bool]:
    """Check the content type, read the body and turn it into prepared GenerationRequests (+ whether it was a
    batch, and whether the answer streams), on the prepare pool."""
    cfg = state.cfg
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in JSON_TYPES + IMAGE_TYPES:
        raise ApiError("unsupported_media_type", f"Content-Type {content_type or '(none)'!r} is not accepted; send "
                                                 f"{', '.join(JSON_TYPES + IMAGE_TYPES)}")
    body = await read_body_capped(request, cfg.max_payload_bytes)
    if content_type in JSON_TYPES:
        items, is_batch = parse_json_body(body, max_instances=cfg.max_instances, max_new_tokens=cfg.max_new_tokens)
        batcher.check_room(len(items))
        fetched = None
        if any(is_remote(item.image) for item in items):
            from starlette.concurrency import run_in_threadpool

            fetched = await run_in_threadpool(_fetch_all, items, state.policy, deadline, is_batch)
        requests = await state.in_prepare_pool(_requests_from_json, items, state.policy, deadline, is_batch,
                                               batcher.predictor, fetched)
        stream = not is_batch and items[0].stream
    else:
        attributes = parse_qsl(request.headers.get(CUSTOM_ATTRIBUTES, ""), keep_blank_values=True)
        params = parse_raw_params(request.query_params.multi_items(), attributes,
                                  max_new_tokens=cfg.max_new_tokens)
        batcher.check_room(1)
        if not body:
            raise ApiError("invalid_image", "the body is empty; send the image bytes")
        prepared = await state.in_prepare_pool(_request_from_image, body, params, cfg.max_image_pixels, deadline,
                                               batcher.predictor)
        requests, is_batch, stream = [prepared], False, params.stream
    return requests, is_batch, stream


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


def default_prepare_threads() -> int:
    return max(2, (os.cpu_count() or 2) - 1)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after the load and warm-up (libraries, the model, compiled
    graphs) to CPython's permanent generation. They live as long as the process. A full collection would
    otherwise walk all of them with the GIL held (190 ms for the tiny CPU server's 420k objects, more after
    torch.compile). Now it walks only what requests created. vLLM does the same after capturing CUDA graphs."""
    gc.collect()
    gc.freeze()


# The request-thread half of the work: fetch/decode the image, shrink it for the model's image processor
# (serve.preshrink), then render + tokenize + preprocess (Predictor.prepare), so the generation thread only
# generates. Predictors without these hooks (e.g. test doubles) get the image as decoded.
def _fetch_all(items: list, policy: ImagePolicy, deadline: float, is_batch: bool) -> list[bytes]:
    """Every item's encoded image; network waits, so this runs on Starlette's big pool, not the prepare pool."""
    fetched = []
    for i, item in enumerate(items):
        with _instance_errors(i, is_batch):
            fetched.append(image_bytes(item.image, policy, deadline=deadline))
    return fetched


def _requests_from_json(items: list, policy: ImagePolicy, deadline: float, is_batch: bool, predictor: Any,
                        fetched: list[bytes] | None = None) -> list[GenerationRequest]:
    requests = []
    for i, item in enumerate(items):
        with _instance_errors(i, is_batch):
            data = fetched[i] if fetched is not None else image_bytes(item.image, policy, deadline=deadline)
            requests.append(_request_from_image(data, item, policy.max_pixels, deadline, predictor))
    return requests


@contextmanager
def _instance_errors(i: int, is_batch: bool):
    """Name the instance (and its image) in an error of a batch request."""
    try:
        yield
    except ApiError as e:
        where = f"instances.{i}" + (".image" if e.code != "invalid_request" else "")
        raise ApiError(e.code, f"{where}: {e.message}" if is_batch else e.message) from None


def _request_from_image(body: bytes, params: GenerationParams, max_pixels: int, deadline: float,
                        predictor: Any) -> GenerationRequest:
    image = decode_image(body, max_pixels, shrink_for=getattr(predictor, "image_processor", None))
    return _prepared(predictor, _generation_request(params, image, deadline))


def _prepared(predictor: Any, request: GenerationRequest) -> GenerationRequest:
    prepare = getattr(predictor, "prepare", None)
    if prepare is not None:
        prepare(request)
    return request


def _generation_request(params: GenerationParams, image: Any, deadline: float) -> GenerationRequest:
    return GenerationRequest(image=image, question=params.question, temperature=params.temperature,
                             top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                             stop=tuple(params.stop or ()), deadline=deadline)


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
            quiet = scope["path"] == "/ping" and status == 200  # SageMaker pings every few seconds
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
