"""GET /metrics through a real uvicorn on the real tiny model: the scraped counts equal what was sent.

Requests go in (concurrent JSON, a batch, a raw image, a stream, bad inputs of each kind, a stream that runs out of
time, a failing model); the scrape is parsed with prometheus_client's own parser, and every count is checked against
the replies: successes by finish reason, failures by status and code, token totals equal the sum of the replies'
usage, each histogram counts what it should, and the running/waiting gauges are back to 0.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from serve_support import FailingPredictor, RecordingPredictor, b64_png, png_bytes, running_server, serve_config

from serve.engine.predictor import Predictor
from serve.http.app import create_app
from serve.http.metrics import ITL_BUCKETS, _StepHistogram, build_1_2_5_buckets

QUESTION = "What type of chart is this?"
PAYLOAD_CAP = 64 * 1024


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items (model_name left out): value}} from GET /metrics."""
    response = requests.get(base + "/metrics", timeout=10)
    assert response.status_code == 200
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples.setdefault(s.name, {})[labels] = s.value
    return samples


def settled(base: str, timeout_s: float = 10.0) -> dict[str, dict[tuple, float]]:
    """A scrape once nothing runs. A caller is answered before its outcome is recorded, and a row whose caller
    already got its error stops only at its next token."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(base)
        if total(m, "vllm:num_requests_running") == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def value(samples, name: str, **labels) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def total(samples, name: str) -> float:
    return sum(samples.get(name, {}).values())


@pytest.fixture
def server(tiny_loaded, tiny_artifact):
    cfg = serve_config(tiny_artifact, max_new_tokens=64, max_payload_bytes=PAYLOAD_CAP)
    app = create_app(cfg, predictor_factory=lambda: Predictor(tiny_loaded, max_new_tokens_cap=64,
                                                              stats=app.state.serve.metrics))
    with running_server(app) as base:
        yield base


def post(base: str, body, **kw) -> requests.Response:
    return requests.post(base + "/invocations", json=body, timeout=60, **kw)


def sse_final(response: requests.Response) -> dict:
    events = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    return events[-1]


def test_scraped_counts_equal_the_requests_sent(server):
    replies: list[dict] = []  # every answer the engine gave, as the client saw it

    def ask(i: int) -> None:
        body = {"image": b64_png(colour=(i * 20, 40, 90)), "question": QUESTION, "temperature": 0,
                "max_new_tokens": 2 + i % 5}
        response = post(server, body)
        assert response.status_code == 200
        replies.append(response.json())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]  # concurrent: they share batches
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch = post(server, {"instances": [{"image": b64_png(), "question": QUESTION, "max_new_tokens": 3}] * 2})
    replies += batch.json()
    raw = requests.post(server + "/invocations", data=png_bytes(), params={"question": QUESTION, "max_new_tokens": 4},
                        headers={"Content-Type": "image/png"}, timeout=60)
    replies.append(raw.json())
    streamed = post(server, {"image": b64_png(), "question": QUESTION, "max_new_tokens": 6, "stream": True})
    assert streamed.status_code == 200
    replies.append(sse_final(streamed))
    failures = {  # (status, code) -> the response
        (400, "invalid_json"): requests.post(server + "/invocations", data=b"{nope",
                                             headers={"Content-Type": "application/json"}, timeout=10),
        (400, "invalid_image"): post(server, {"image": "AAAA", "question": QUESTION}),
        (400, "invalid_request"): post(server, {"image": b64_png(), "question": QUESTION, "max_new_tokens": 65}),
        (413, "payload_too_large"): requests.post(server + "/invocations", data=b"x" * (PAYLOAD_CAP + 1),
                                                  headers={"Content-Type": "application/json"}, timeout=10),
        (415, "unsupported_media_type"): requests.post(server + "/invocations", data=b"hi", timeout=10,
                                                       headers={"Content-Type": "text/plain"}),
        (404, "not_found"): requests.get(server + "/nowhere", timeout=10),
        (405, "method_not_allowed"): requests.get(server + "/invocations", timeout=10),
    }
    for (status, code), response in failures.items():
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    for _ in range(3):  # neither health checks nor scrapes are counted as requests
        assert requests.get(server + "/ping", timeout=10).status_code == 200
        scrape(server)

    m = settled(server)
    answered = 8 + 1 + 1 + 1  # HTTP 200s: 8 concurrent, the batch, the raw image, the stream
    assert value(m, "llava_sm:requests_total", status="200", code="ok") == answered
    for (status, code) in failures:
        assert value(m, "llava_sm:requests_total", status=str(status), code=code) == 1
    assert total(m, "llava_sm:requests_total") == answered + len(failures)

    n = len(replies)  # 12 engine requests: the batch's two instances are two
    assert n == 12
    for reason in ("stop", "length"):
        assert value(m, "vllm:request_success_total", engine="0", finished_reason=reason) == sum(
            r["finish_reason"] == reason for r in replies)
    prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
    generated = sum(r["usage"]["completion_tokens"] for r in replies)
    assert value(m, "vllm:prompt_tokens_total", engine="0") == prompt
    assert value(m, "vllm:generation_tokens_total", engine="0") == generated
    assert value(m, "vllm:request_prompt_tokens_sum", engine="0") == prompt
    assert value(m, "vllm:request_generation_tokens_sum", engine="0") == generated
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert value(m, name + "_count", engine="0") == n, name
        assert value(m, name + "_bucket", engine="0", le="+Inf") == n, name
    # One inter-token latency per token after each request's first; one decode step serves every row it holds.
    assert value(m, "vllm:inter_token_latency_seconds_count", engine="0") == generated - n
    assert value(m, "vllm:inter_token_latency_seconds_bucket", engine="0", le="+Inf") == generated - n
    # The engine's end-to-end latency counts from when the HTTP layer got the request: after the first token,
    # before the reply left.
    e2e = value(m, "vllm:e2e_request_latency_seconds_sum", engine="0")
    assert value(m, "vllm:time_to_first_token_seconds_sum", engine="0") < e2e
    assert e2e <= sum(r["latency_ms"] for r in replies) / 1000
    # Every engine request's image was decoded and encoded once; the invalid image failed before it counted.
    assert value(m, "llava_sm:image_decode_seconds_count") == value(m, "llava_sm:preprocess_seconds_count") == n
    assert value(m, "llava_sm:batch_size_sum") == n
    assert value(m, "llava_sm:batch_size_count") < n  # the concurrent requests shared batches
    assert value(m, "llava_sm:model_load_seconds") > 0
    assert total(m, "llava_sm:generation_failures_total") == 0
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "llava_sm:num_requests_preparing"):
        assert total(m, gauge) == 0, gauge
    assert not any(name.startswith("llava_sm:gpu_") for name in m)  # no CUDA here


def test_every_series_carries_the_model_name_and_openmetrics_is_offered(server, tiny_artifact):
    response = requests.get(server + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    assert len(families) >= 15
    names = {s.labels.get("model_name") for f in families for s in f.samples}
    assert names == {Path(tiny_artifact).name}  # the name /v1/models lists
    openmetrics = requests.get(server + "/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF") and "vllm:num_requests_running" in openmetrics.text


class SlowStream(RecordingPredictor):
    """The real predictor, each streamed piece delayed on the generation thread (a slow GPU)."""

    def predict(self, requests, on_result=None):
        for r in requests:
            if r.on_text is not None:
                r.on_text = self._slowly(r.on_text)
        return super().predict(requests, on_result=on_result)

    @staticmethod
    def _slowly(on_text):
        def slow(text):
            time.sleep(0.2)
            on_text(text)
        return slow


def test_failures_in_the_engine_count_by_code(tiny_loaded, tiny_artifact):
    cfg = serve_config(tiny_artifact, max_new_tokens=64, request_timeout_s=1.0)
    app = create_app(cfg, predictor_factory=lambda: SlowStream(
        Predictor(tiny_loaded, max_new_tokens_cap=64, stats=app.state.serve.metrics)))
    with running_server(app) as base:
        body = {"image": b64_png(), "question": QUESTION, "temperature": 0.8, "max_new_tokens": 64, "stream": True}
        response = post(base, body)
        assert response.status_code == 200 and sse_final(response)["error"]["code"] == "timeout"
        m = settled(base)
    # The status went out with the first piece; the stream's last event says how it ended.
    assert value(m, "llava_sm:requests_total", status="200", code="timeout") == 1
    assert value(m, "llava_sm:generation_failures_total", code="timeout") == 1
    assert total(m, "vllm:request_success_total") == 0 and value(m, "vllm:e2e_request_latency_seconds_count",
                                                                  engine="0") == 0
    assert value(m, "vllm:time_to_first_token_seconds_count", engine="0") == 1
    assert value(m, "vllm:request_queue_time_seconds_count", engine="0") == 1


def test_a_failing_model_counts_500s_and_the_scrape_still_answers(tiny_loaded, tiny_artifact):
    app = create_app(serve_config(tiny_artifact), predictor_factory=lambda: FailingPredictor(Predictor(tiny_loaded)))
    with running_server(app) as base:
        for _ in range(3):
            assert post(base, {"image": b64_png(), "question": QUESTION}).status_code == 500
        m = settled(base)
    assert value(m, "llava_sm:requests_total", status="500", code="internal_error") == 3
    assert value(m, "llava_sm:generation_failures_total", code="internal_error") == 3
    assert total(m, "vllm:request_success_total") == 0
    assert total(m, "vllm:num_requests_running") == total(m, "vllm:num_requests_waiting") == 0


def test_metrics_answer_while_the_model_loads_and_apps_keep_their_own_registries(tiny_loaded, tiny_artifact):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return Predictor(tiny_loaded)

    loading = create_app(serve_config(tiny_artifact), predictor_factory=slow_load)
    other = create_app(serve_config(tiny_artifact))  # a second app in this process: no duplicate-series error
    assert other.state.serve.metrics.registry is not loading.state.serve.metrics.registry
    with running_server(loading, wait=False) as base:
        assert post(base, {"image": b64_png(), "question": QUESTION}).status_code == 503
        m = scrape(base)
        release.set()
    assert value(m, "llava_sm:requests_total", status="503", code="not_ready") == 1
    assert "llava_sm:model_load_seconds" in m and value(m, "llava_sm:model_load_seconds") == 0
    assert total(m, "vllm:num_requests_running") == total(m, "vllm:num_requests_waiting") == 0


def test_step_histogram_equals_one_observation_per_row():
    """n rows at once must expose exactly what n calls of prometheus_client's observe would."""
    registry = CollectorRegistry()
    reference = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                          ["model_name", "engine"], buckets=ITL_BUCKETS, registry=registry).labels("m", "0")
    ours = _StepHistogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                          ITL_BUCKETS, {"model_name": "m", "engine": "0"})
    for seconds, rows in [(0.004, 3), (0.01, 2), (0.0100001, 1), (0.5, 64), (99.0, 1), (0.2, 0)]:
        for _ in range(rows):
            reference.observe(seconds)
        ours.observe(seconds, rows)
    mine = CollectorRegistry()
    mine.register(ours)

    def samples(reg):
        [family] = [f for f in text_string_to_metric_families(generate_latest(reg).decode())
                    if f.name == "vllm:inter_token_latency_seconds"]
        return {(s.name, tuple(sorted(s.labels.items()))): round(s.value, 9) for s in family.samples
                if not s.name.endswith("_created")}

    assert samples(mine) == samples(registry)


def test_token_buckets_are_vllms_1_2_5_series():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(4096) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
