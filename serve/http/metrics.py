"""`GET /metrics`: the server's Prometheus metrics, with vLLM's names where the meaning is the same.

SageMaker scrapes `/metrics` on port 8080 (endpoint configurations with detailed observability, the default for
ones created after 2026-06-17) and its dashboards know vLLM's series, so those carry vLLM's names, labels
(`model_name`, `engine`) and histogram buckets; what vLLM has no series for is under `llava_sm:`. Every series and
its meaning: docs/serving.md, "Metrics".

    state.metrics = ServeMetrics(model_name="/opt/ml/model")  # the engine's Stats; a registry per app
    app.add_middleware(MetricsMiddleware, metrics=state.metrics); add_routes(app, state)   # serve/http/app.py

Labels take a handful of values each (finish reasons, HTTP statuses, error codes): nothing per request.
"""

from __future__ import annotations

import bisect
import json
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from starlette.responses import Response

from serve.engine.errors import STATUS_BY_CODE
from serve.engine.stats import QueueLoad, Stats
from serve.engine.types import GenerationResult

if TYPE_CHECKING:
    from serve.http.app import ServerState

# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
MAX_MODEL_LEN = 4096  # LLaVA-1.5's context: the top of the token-count buckets (vLLM: --max-model-len)
# Ours: CPU stages take milliseconds to seconds; batches are at most SERVE_MAX_BATCH_SIZE (<= 256).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FINISH_REASONS = ("stop", "length")  # GenerationResult.finish_reason; vLLM's words for the same
UNCOUNTED_PATHS = ("/ping", "/metrics")  # health checks and scrapes would drown the request counts


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class ServeMetrics(Stats):
    """The engine's hooks recorded as Prometheus series in a registry of this app's own (several apps in one
    process keep apart)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, vllm, ours = self.registry, ("model_name", "engine"), ("model_name",)
        v, o = (model_name, "0"), (model_name,)

        def hist(name, doc, buckets, labels=vllm, values=v):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", vllm,
                             registry=r).labels(*v)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", vllm,
                             registry=r).labels(*v)
        self.preparing = Gauge("llava_sm:num_requests_preparing", "Requests being read, fetched, decoded or "
                               "encoded, not yet queued.", ours, registry=r).labels(*o)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = _StepHistogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                  ITL_BUCKETS, dict(zip(vllm, v, strict=True)))
        r.register(self.itl)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for "
                               "request.", REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(MAX_MODEL_LEN)
        self.request_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                       token_buckets)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", vllm,
                                     registry=r).labels(*v)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", vllm,
                                         registry=r).labels(*v)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          vllm + ("finished_reason",), registry=r)
        self.success = {reason: success.labels(*v, reason) for reason in FINISH_REASONS}
        self.image_decode = hist("llava_sm:image_decode_seconds", "Seconds to decode an image (and shrink it for "
                                 "the model's processor).", STAGE_BUCKETS, ours, o)
        self.preprocess = hist("llava_sm:preprocess_seconds", "Seconds to encode a request: prompt, tokens and "
                               "pixel values.", STAGE_BUCKETS, ours, o)
        self.batch_size = hist("llava_sm:batch_size", "Requests in each batch the generation thread runs.",
                               BATCH_BUCKETS, ours, o)
        self._failures = Counter("llava_sm:generation_failures", "Requests that reached the engine and were "
                                 "answered with an error, by error code.", ours + ("code",), registry=r)
        self._requests = Counter("llava_sm:requests", "HTTP requests answered (all but /ping and /metrics), by "
                                 "status and error code (ok: none).", ours + ("status", "code"), registry=r)
        self.model_load = Gauge("llava_sm:model_load_seconds", "Seconds the model took to load and warm up.",
                                ours, registry=r).labels(*o)
        r.register(_GpuMemory(model_name))
        self.model_name = model_name

    def watch(self, load: QueueLoad) -> None:
        """Read the running/waiting/preparing gauges from `load` (the batcher) at every scrape."""
        self.running.set_function(lambda: load.running)
        self.waiting.set_function(lambda: load.waiting)
        self.preparing.set_function(lambda: load.preparing)

    def model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def count_response(self, status: int, code: str) -> None:
        self._requests.labels(self.model_name, str(status), code).inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the scraper asked for (Prometheus text, or OpenMetrics), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    # ------------------------------------------------------------------ serve.engine.stats.Stats
    def image_decoded(self, seconds: float) -> None:
        self.image_decode.observe(seconds)

    def prepared(self, seconds: float) -> None:
        self.preprocess.observe(seconds)

    def scheduled(self, queue_seconds: float) -> None:
        self.queue_time.observe(queue_seconds)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float, rows: int) -> None:
        self.itl.observe(seconds, rows)

    def finished(self, result: GenerationResult, e2e_seconds: float) -> None:
        self.success[result.finish_reason].inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        self.request_prompt.observe(result.prompt_tokens)
        self.request_generation.observe(result.completion_tokens)
        self.e2e.observe(e2e_seconds)

    def failed(self, code: str) -> None:
        self._failures.labels(self.model_name, code).inc()


class _StepHistogram:
    """A histogram that takes `n` equal observations at once: a decode step is one inter-token latency for every
    row still generating, and prometheus_client's `observe` one row at a time (~3 us each) would cost a batch of
    64 about 0.2 ms per step. One lock per step; scrapes copy under it."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: dict[str, str]):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = list(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative), the last one +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        if n <= 0:
            return
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value: Prometheus buckets are `le`
        with self._lock:
            self._counts[i] += n
            self._sum += value * n

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), cumulative, total)
        return [family]

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))]


class _GpuMemory:
    """CUDA memory per GPU from torch's caching allocator, read at scrape time (host-side counters: no device
    sync). Nothing until this process has initialised CUDA, so nothing on CPU hosts."""

    SERIES = (("llava_sm:gpu_memory_allocated_bytes", "Bytes of GPU memory held by tensors.", "memory_allocated"),
              ("llava_sm:gpu_memory_reserved_bytes", "Bytes of GPU memory reserved by torch's caching allocator.",
               "memory_reserved"),
              ("llava_sm:gpu_memory_max_allocated_bytes", "Peak bytes held by tensors since the process started.",
               "max_memory_allocated"))

    def __init__(self, model_name: str):
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        torch = sys.modules.get("torch")  # never imported here: a server that has not loaded torch has no GPU
        if torch is None or not torch.cuda.is_initialized():
            return []
        families = []
        for name, doc, reader in self.SERIES:
            family = GaugeMetricFamily(name, doc, labels=["model_name", "gpu"])
            for i in range(torch.cuda.device_count()):
                family.add_metric([self.model_name, str(i)], float(getattr(torch.cuda, reader)(i)))
            families.append(family)
        total = GaugeMetricFamily("llava_sm:gpu_memory_total_bytes", "Bytes of memory on the GPU.",
                                  labels=["model_name", "gpu"])
        for i in range(torch.cuda.device_count()):
            total.add_metric([self.model_name, str(i)], float(torch.cuda.get_device_properties(i).total_memory))
        return [*families, total]

    def describe(self) -> Iterable[Metric]:
        return []


class MetricsMiddleware:
    """Counts every HTTP response but /ping's and /metrics' in `llava_sm:requests_total{status, code}`. The code
    is read from the error envelope (serve/http/envelope.py), the one shape of every error body, so responses that
    starlette answers itself (404, 405) count too; a stream that ends in an error event counts with its 200 and
    that event's code."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        seen = _Response()

        async def observed(message):
            seen.see(message)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.count_response(seen.status, seen.code())


class _Response:
    """What the middleware learns of a response from its ASGI messages."""

    def __init__(self):
        self.status = 500  # no response started: the server error middleware answers 500
        self.stream = False
        self.error: str | None = None

    def see(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers") or [])
            self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and self.error is None:
            body = message.get("body", b"")
            if self.status >= 400 and body:
                self.error = _error_code(body) or "unknown"
            elif self.stream and body.startswith(b'data: {"error"'):  # serve/http/sse.py's last event
                self.error = _error_code(body[len(b"data: "):]) or "unknown"

    def code(self) -> str:
        if self.error is not None:
            return self.error
        return "ok" if self.status < 400 else "internal_error" if self.status >= 500 else "unknown"


def _error_code(body: bytes) -> str | None:
    """The envelope's `error.code` when it is one of ours (a bounded label), else None."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if code in STATUS_BY_CODE else None


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/metrics")
    async def scrape(request: Request):
        body, content_type = state.metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})
