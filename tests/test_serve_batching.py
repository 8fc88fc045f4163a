"""Dynamic batching through a real uvicorn on 127.0.0.1 with the real tiny model.

Concurrent greedy requests return exactly what each returns alone (and really were batched); a lone request does
not wait for a batch to fill, nor do queued ones when no other request is on its way; mixed parameters
share a batch; a bad request in a batch fails alone; a full queue answers 503 `overloaded` at once; a request over
its time budget answers 504 and the server goes on; /ping stays fast while long generations run.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image
from serve_support import RecordingPredictor, SlowPredictor, running_server, serve_config

from serve.engine.predictor import Predictor
from serve.http.app import create_app


def payload(i: int, **params) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (40 + 7 * i, 30 + 5 * (i % 3)), (37 * i % 256, 90, 200 - 11 * i)).save(buf, "PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "question": f"Question {i}: what is it? " * (1 + i % 3),
            "temperature": 0, "max_new_tokens": 24, **params}


def post(base: str, body: dict) -> requests.Response:
    return requests.post(base + "/invocations", json=body, timeout=60)


def concurrently(base: str, bodies: list[dict]) -> list[requests.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(base, b), bodies))


@pytest.fixture(scope="module")
def batched(tiny_loaded, tiny_artifact):
    recorder = RecordingPredictor(Predictor(tiny_loaded, max_new_tokens_cap=512))
    cfg = serve_config(tiny_artifact, max_batch_size=8, max_wait_ms=150, max_new_tokens=512)
    with running_server(create_app(cfg, predictor_factory=lambda: recorder)) as base:
        yield base, recorder


def test_concurrent_greedy_requests_equal_each_alone(batched):
    base, recorder = batched
    bodies = [payload(i) for i in range(8)]
    alone = [post(base, b).json() for b in bodies]  # one at a time: batches of one
    assert set(recorder.batch_sizes) == {1}
    recorder.batch_sizes.clear()
    together = concurrently(base, bodies)
    assert all(r.status_code == 200 for r in together)
    assert [r.json()["answer"] for r in together] == [a["answer"] for a in alone]
    assert [r.json()["usage"] for r in together] == [a["usage"] for a in alone]
    assert max(recorder.batch_sizes) > 1 and sum(recorder.batch_sizes) == 8


def test_mixed_parameters_share_a_batch(batched):
    base, recorder = batched
    greedy = {i: post(base, payload(i)).json()["answer"] for i in (0, 2, 4)}
    recorder.batch_sizes.clear()
    bodies = [payload(0), payload(1, temperature=1.2, top_p=0.9, max_new_tokens=4), payload(2),
              payload(3, temperature=0.7, stop=["a", "e"]), payload(4, max_new_tokens=3)]
    out = concurrently(base, bodies)
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    assert out[0].json()["answer"] == greedy[0] and out[2].json()["answer"] == greedy[2]
    assert out[1].json()["usage"]["completion_tokens"] <= 4
    assert out[4].json()["usage"]["completion_tokens"] == 3 and greedy[4].startswith(out[4].json()["answer"])
    assert not any(s in out[3].json()["answer"] for s in ("a", "e"))
    assert max(recorder.batch_sizes) > 1


def test_a_bad_request_in_a_batch_fails_alone(batched, tiny_loaded):
    base, recorder = batched
    good = [payload(i) for i in (5, 6, 7)]
    expected = [post(base, b).json()["answer"] for b in good]
    recorder.batch_sizes.clear()
    too_long = payload(1, question="word " * (tiny_loaded.max_positions + 5))  # fails in Predictor.prepare
    bad_image = payload(2, image="bm90IGFuIGltYWdl")  # fails while decoding
    out = concurrently(base, [good[0], too_long, good[1], bad_image, good[2]])
    assert [r.status_code for r in out] == [200, 400, 200, 400, 200]
    assert out[1].json()["error"]["code"] == "invalid_request" and out[3].json()["error"]["code"] == "invalid_image"
    assert [out[i].json()["answer"] for i in (0, 2, 4)] == expected
    assert max(recorder.batch_sizes) > 1  # the good ones still shared a batch


def test_a_lone_request_does_not_wait_for_a_batch_but_a_burst_still_shares_one(tiny_loaded, tiny_artifact):
    recorder = RecordingPredictor(Predictor(tiny_loaded))
    cfg = serve_config(tiny_artifact, max_batch_size=8, max_wait_ms=2000)
    with running_server(create_app(cfg, predictor_factory=lambda: recorder)) as base:
        assert post(base, payload(0, max_new_tokens=2)).status_code == 200  # warm-up
        started = time.monotonic()
        lone = post(base, payload(1, max_new_tokens=2))
        lone_s = time.monotonic() - started
        recorder.batch_sizes.clear()
        burst = concurrently(base, [payload(i, max_new_tokens=2) for i in range(4)])
    assert lone.status_code == 200 and lone_s < 1.0  # not the 2 s batch window
    assert [r.status_code for r in burst] == [200] * 4
    assert max(recorder.batch_sizes) > 1  # the first of the burst waited for the others on their way


def test_queued_requests_do_not_wait_out_the_window_when_no_other_is_on_its_way(tiny_loaded, tiny_artifact):
    """Two requests queue behind a slow batch; when it ends nothing else is being read or prepared, so they start
    at once, together, instead of waiting for the 6 s window."""
    slow = SlowPredictor(Predictor(tiny_loaded), delay_s=1.0)
    cfg = serve_config(tiny_artifact, max_batch_size=8, max_wait_ms=6000)
    with running_server(create_app(cfg, predictor_factory=lambda: slow)) as base:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, base, payload(0, max_new_tokens=2))
            time.sleep(0.2)  # the first is generating (1 s) when the next two arrive, with 0.8 s to be prepared
            started = time.monotonic()
            queued = [pool.submit(post, base, payload(i, max_new_tokens=2)) for i in (1, 2)]
            replies = [f.result() for f in queued]
            waited = time.monotonic() - started
        assert first.result().status_code == 200
    assert [r.status_code for r in replies] == [200, 200]
    assert slow.batch_sizes == [1, 2]
    assert waited < 4.0  # ~0.8 s for the first batch to end + 1 s for theirs, not 6 s of window


class ThreadRecordingPredictor(RecordingPredictor):
    """The real predictor, recording which thread prepared each request."""

    def __init__(self, inner):
        super().__init__(inner)
        self.prepare_threads: set[str] = set()

    def prepare(self, request):
        self.prepare_threads.add(threading.current_thread().name)
        return self.inner.prepare(request)


def test_inputs_are_prepared_on_the_small_prepare_pool(tiny_loaded, tiny_artifact):
    recorder = ThreadRecordingPredictor(Predictor(tiny_loaded))
    cfg = serve_config(tiny_artifact, prepare_threads=2)
    with running_server(create_app(cfg, predictor_factory=lambda: recorder)) as base:
        out = concurrently(base, [payload(i, max_new_tokens=2) for i in range(8)])
    assert [r.status_code for r in out] == [200] * 8
    assert recorder.prepare_threads and len(recorder.prepare_threads) <= 2
    assert all(name.startswith("prepare") for name in recorder.prepare_threads), recorder.prepare_threads


def test_full_queue_answers_503_quickly_and_ping_stays_up(tiny_loaded, tiny_artifact):
    slow = SlowPredictor(Predictor(tiny_loaded), delay_s=1.5)
    cfg = serve_config(tiny_artifact, max_batch_size=1, max_queue=2, max_wait_ms=0)
    with running_server(create_app(cfg, predictor_factory=lambda: slow)) as base:
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(post, base, payload(0))
            time.sleep(0.4)  # the first request is generating; the next two fill the queue
            queued = [pool.submit(post, base, payload(i)) for i in (1, 2)]
            time.sleep(0.4)
            started = time.monotonic()
            refused = post(base, payload(3))
            refused_s = time.monotonic() - started
            ping = requests.get(base + "/ping", timeout=2)
            results = [running.result()] + [f.result() for f in queued]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert refused_s < 0.5 and ping.status_code == 200
    assert [r.status_code for r in results] == [200, 200, 200]


def test_time_budget_gives_504_and_the_server_goes_on(tiny_loaded, tiny_artifact):
    slow = SlowPredictor(Predictor(tiny_loaded), delay_s=1.0)
    cfg = serve_config(tiny_artifact, request_timeout_s=0.5)
    with running_server(create_app(cfg, predictor_factory=lambda: slow)) as base:
        started = time.monotonic()
        late = post(base, payload(0))
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 1.0  # answered at the budget, not when generation ended
        slow.delay_s = 0.0
        time.sleep(1.0)  # the abandoned batch finishes (its row stops at its first token)
        assert post(base, payload(0)).status_code == 200


def test_ping_stays_fast_while_long_generations_run(tiny_loaded, tiny_artifact):
    cfg = serve_config(tiny_artifact, max_batch_size=8, max_new_tokens=512, max_wait_ms=50)
    bodies = [payload(i, max_new_tokens=300) for i in range(8)]
    with running_server(create_app(cfg, predictor_factory=lambda: Predictor(tiny_loaded, max_new_tokens_cap=512))) \
            as base:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, base, b) for b in bodies]
            time.sleep(0.3)
            latencies = []
            while not all(f.done() for f in futures) and len(latencies) < 200:
                started = time.perf_counter()
                assert requests.get(base + "/ping", timeout=2).status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
            results = [f.result() for f in futures]
    assert max(r.json()["usage"]["completion_tokens"] for r in results) >= 200  # generation really was long
    assert len(latencies) >= 5, "generation ended before /ping could be measured"
    assert max(latencies) < 0.5, latencies  # SageMaker allows 2 s
