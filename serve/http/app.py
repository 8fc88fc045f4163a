"""The server's FastAPI app: `create_app(cfg) -> FastAPI`, one module per protocol mounted on it.

The model loads on a background thread after the socket is listening (SageMaker wants the socket within 250 ms and
/ping within 2 s); until then, and after a failed load, the routes answer 503 `not_ready`. The routes live in their
protocol's module (serve/http/sagemaker.py: /ping, /invocations, /execution-parameters; serve/http/openai.py:
/v1/chat/completions, /v1/models; serve/http/adapters.py: /adapters, loaded at start-up from `<model dir>/adapters/`).
Every error has the envelope of serve/http/envelope.py; each request logs one line (id, method, path, status,
latency; never payload content) and returns its id in `X-Request-Id` (serve/http/requests.py). `GET /metrics` serves
Prometheus metrics (serve/http/metrics.py), fed by the engine's stats hooks.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from serve.config import ServeConfig
from serve.engine.batching import Batcher
from serve.engine.errors import ApiError
from serve.engine.images import ImagePolicy
from serve.engine.stats import NO_STATS, Stats
from serve.engine.types import PredictorLike
from serve.http import adapters, metrics, openai, sagemaker
from serve.http.envelope import register_error_handlers
from serve.http.requests import RequestLogMiddleware

log = logging.getLogger(__name__)


class ServerState:
    """What the routes share: the config, the image policy, the request-preparation executor, the metrics, and
    the batcher once the model is loaded."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.policy = ImagePolicy.from_config(cfg)
        # model_name: vLLM's default served model name is the model path it was given
        self.metrics = metrics.ServeMetrics(model_name=cfg.served_model_name)
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        # Image decode and Predictor.prepare hold the GIL for much of their time. On Starlette's 40-thread pool,
        # dozens of them at once take turns with the generation thread and the event loop, and /ping waits behind
        # all of them. One thread per core, less the core the generation thread keeps busy, does the same work as
        # fast; but at least 2: while a burst is prepared the generation thread waits for it (serve.engine.batching),
        # and Pillow's decoding releases the GIL.
        self.prepare_pool = ThreadPoolExecutor(cfg.prepare_threads or default_prepare_threads(),
                                               thread_name_prefix="prepare")

    async def in_prepare_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, functools.partial(fn, *args))

    def require_batcher(self) -> Batcher:
        if self.batcher is None or not self.batcher.healthy:
            message = "the model failed to load" if self.load_error else "the model is still loading"
            raise ApiError("not_ready", message)
        return self.batcher


def default_predictor_factory(cfg: ServeConfig, stats: Stats = NO_STATS) -> Callable[[], PredictorLike]:
    def build():
        from serve.engine.model import load_artifact
        from serve.engine.predictor import Predictor

        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        loaded = load_artifact(cfg.model_dir, quantization=cfg.quantization, device=cfg.device)
        return Predictor(loaded, max_new_tokens_cap=cfg.max_new_tokens, accel=cfg.accel_config(), stats=stats,
                         adapters=cfg.adapter_limits())
    return build


def create_app(cfg: ServeConfig, *, predictor_factory: Callable[[], PredictorLike] | None = None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`predictor_factory()` returns the engine's Predictor (built from `cfg.model_dir` by default) or a wrapper
    around one; it runs on a background thread when the app starts. A factory's Predictor reports its tokens to
    the metrics when built with `stats=app.state.serve.metrics` (the default factory's does)."""
    state = ServerState(cfg)
    factory = predictor_factory or default_predictor_factory(cfg, state.metrics)

    def load() -> None:
        started = time.perf_counter()
        try:
            predictor = factory()
            adapters.load_startup_adapters(predictor, cfg.model_dir)
            freeze_startup_heap()
            state.batcher = Batcher(predictor, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                                    max_queue=cfg.max_queue, stats=state.metrics).start()
            state.metrics.watch(state.batcher)
        except BaseException as e:  # noqa: BLE001 - reported to the operator and to /ping
            state.load_error = e
            log.error("model load failed; /ping answers 503", exc_info=e)
            if on_load_failure is not None:
                on_load_failure(e)
            return
        state.metrics.model_loaded(time.perf_counter() - started)
        log.info("model ready in %.1f s", time.perf_counter() - started)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield
        if state.batcher is not None:
            await run_in_threadpool(state.batcher.close, cfg.graceful_timeout_s)
        state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llava-sagemaker serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serve = state
    register_error_handlers(app)
    app.add_middleware(metrics.MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestLogMiddleware)
    sagemaker.add_routes(app, state)
    metrics.add_routes(app, state)
    openai.add_routes(app, state)
    adapters.add_routes(app, state)
    return app


def default_prepare_threads() -> int:
    return max(2, (os.cpu_count() or 2) - 1)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after the load and warm-up (libraries, the model, compiled
    graphs) to CPython's permanent generation. They live as long as the process. A full collection would
    otherwise walk all of them with the GIL held (190 ms for the tiny CPU server's 420k objects, more after
    torch.compile). Now it walks only what requests created. vLLM does the same after capturing CUDA graphs."""
    gc.collect()
    gc.freeze()
