"""serve/http/app.py through TestClient AND a real uvicorn on 127.0.0.1, on the real tiny model.

The table of bad inputs -> (status, code) in the one error envelope; JSON, batch, data: URI, URL (the blog's own
payload shape), raw image bytes with the question in the query or in SageMaker custom attributes; request ids;
/ping before, during and after loading; a predictor that raises -> 500 without internals while /ping stays 200;
an unrecoverable CUDA error -> /ping 503.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network

import pytest
import requests
from fastapi.testclient import TestClient
from serve_support import FailingPredictor, b64_png, png_bytes, running_server, serve_config, wait_ready

from serve.engine.predictor import Predictor
from serve.http.app import create_app

IMAGE_HOST = "127.0.0.3"  # a loopback address of its own, so the allow-list can name exactly it
PIXEL_CAP = 40_000
PAYLOAD_CAP = 64 * 1024
QUESTION = "What type of chart is this?"


class _Images(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = png_bytes((48, 40), (200, 30, 30))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_url():
    server = ThreadingHTTPServer((IMAGE_HOST, 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{IMAGE_HOST}:{server.server_address[1]}/chart.png"
    server.shutdown()
    server.server_close()


class Transport:
    """The same calls through TestClient or through requests against a real uvicorn."""

    def __init__(self, kind: str, target):
        self.kind, self.target = kind, target

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                params: dict | None = None):
        if self.kind == "testclient":
            return self.target.request(method, path, content=body, headers=headers, params=params)
        return requests.request(method, self.target + path, data=body, headers=headers, params=params, timeout=60)

    def post_json(self, payload, **kw):
        return self.request("POST", "/invocations", json.dumps(payload).encode(),
                            {"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


@pytest.fixture(scope="module", params=["testclient", "uvicorn"])
def api(request, tiny_loaded, tiny_artifact):
    cfg = serve_config(tiny_artifact, max_image_pixels=PIXEL_CAP, max_payload_bytes=PAYLOAD_CAP, max_new_tokens=64,
                       max_instances=3, fetch_allow_networks=(ip_network(IMAGE_HOST), ip_network("127.0.0.2")))
    app = create_app(cfg, predictor_factory=lambda: Predictor(tiny_loaded, max_new_tokens_cap=64))
    if request.param == "testclient":
        with TestClient(app) as client:
            wait_ready(client.get)
            yield Transport("testclient", client)
    else:
        with running_server(app) as base:
            yield Transport("uvicorn", base)


def _json(payload) -> tuple[bytes, dict]:
    return json.dumps(payload).encode(), {"Content-Type": "application/json"}


GOOD = {"image": b64_png(), "question": QUESTION}
BAD_INPUTS = {
    "text/plain": (b"hello", {"Content-Type": "text/plain"}, None, 415, "unsupported_media_type"),
    "no content type, not JSON or an image": (b"hello", {}, None, 415, "unsupported_media_type"),
    "octet-stream, not JSON or an image": (b"hello", {"Content-Type": "application/octet-stream"}, None, 415,
                                           "unsupported_media_type"),
    "no content type, a JSON object": (b"{}", {}, None, 400, "invalid_request"),
    "multipart": (b"--x--", {"Content-Type": "multipart/form-data; boundary=x"}, None, 415,
                  "unsupported_media_type"),
    "declared over cap": (b"{" + b" " * PAYLOAD_CAP + b"}", {"Content-Type": "application/json"}, None, 413,
                          "payload_too_large"),
    "malformed json": (b"{not json", {"Content-Type": "application/json"}, None, 400, "invalid_json"),
    "empty json body": (b"", {"Content-Type": "application/json"}, None, 400, "invalid_json"),
    "not utf-8": (b"\xff\xfe\x00", {"Content-Type": "application/json"}, None, 400, "invalid_json"),
    "json array": (*_json([GOOD]), None, 400, "invalid_request"),
    "missing fields": (*_json({}), None, 400, "invalid_request"),
    "missing question": (*_json({"image": GOOD["image"]}), None, 400, "invalid_request"),
    "blank question": (*_json({**GOOD, "question": "   "}), None, 400, "invalid_request"),
    "image placeholder in question": (*_json({**GOOD, "question": "what is <image>?"}), None, 400,
                                      "invalid_request"),
    "image placeholder in a batch": (*_json({"instances": [GOOD, {**GOOD, "question": "<image>"}]}), None, 400,
                                     "invalid_request"),
    "question not a string": (*_json({**GOOD, "question": 5}), None, 400, "invalid_request"),
    "negative temperature": (*_json({**GOOD, "temperature": -0.1}), None, 400, "invalid_request"),
    "temperature not a number": (*_json({**GOOD, "temperature": "hot"}), None, 400, "invalid_request"),
    "temperature a boolean": (*_json({**GOOD, "temperature": True}), None, 400, "invalid_request"),
    "temperature NaN": (b'{"image": "%s", "question": "q", "temperature": NaN}' % GOOD["image"].encode(),
                        {"Content-Type": "application/json"}, None, 400, "invalid_json"),
    "max_new_tokens a string": (*_json({**GOOD, "max_new_tokens": "3"}), None, 400, "invalid_request"),
    "top_p zero": (*_json({**GOOD, "top_p": 0}), None, 400, "invalid_request"),
    "top_p above one": (*_json({**GOOD, "top_p": 1.5}), None, 400, "invalid_request"),
    "max_new_tokens zero": (*_json({**GOOD, "max_new_tokens": 0}), None, 400, "invalid_request"),
    "max_new_tokens over cap": (*_json({**GOOD, "max_new_tokens": 65}), None, 400, "invalid_request"),
    "too many stops": (*_json({**GOOD, "stop": list("abcdefghi")}), None, 400, "invalid_request"),
    "empty stop": (*_json({**GOOD, "stop": [""]}), None, 400, "invalid_request"),
    "unknown field": (*_json({**GOOD, "max_tokens": 5}), None, 400, "invalid_request"),
    "empty instances": (*_json({"instances": []}), None, 400, "invalid_request"),
    "too many instances": (*_json({"instances": [GOOD] * 4}), None, 400, "invalid_request"),
    "bad instance": (*_json({"instances": [GOOD, {"image": GOOD["image"]}]}), None, 400, "invalid_request"),
    "bad base64": (*_json({**GOOD, "image": "%%% not base64 %%%"}), None, 400, "invalid_image"),
    "not an image": (*_json({**GOOD, "image": base64.b64encode(b"hello world").decode()}), None, 400,
                     "invalid_image"),
    "bad image in a batch": (*_json({"instances": [GOOD, {**GOOD, "image": "AAAA"}]}), None, 400, "invalid_image"),
    "too many pixels": (*_json({**GOOD, "image": b64_png((250, 200))}), None, 400, "image_too_large"),
    "loopback url": (*_json({**GOOD, "image": "http://127.0.0.1:9/a.png"}), None, 400, "url_not_allowed"),
    "metadata url": (*_json({**GOOD, "image": "http://169.254.169.254/latest/meta-data/"}), None, 400,
                     "url_not_allowed"),
    "file url": (*_json({**GOOD, "image": "file:///etc/passwd"}), None, 400, "url_not_allowed"),
    "local path": (*_json({**GOOD, "image": "/etc/passwd"}), None, 400, "invalid_image"),
    "unreachable url": (*_json({**GOOD, "image": "http://127.0.0.2:9/a.png"}), None, 400, "image_fetch_failed"),
    "raw without question": (png_bytes(), {"Content-Type": "image/png"}, None, 400, "invalid_request"),
    "raw bad bytes": (b"\x89PNG garbage", {"Content-Type": "image/png"}, {"question": "q"}, 400, "invalid_image"),
    "raw empty": (b"", {"Content-Type": "image/jpeg"}, {"question": "q"}, 400, "invalid_image"),
    "raw bad temperature": (png_bytes(), {"Content-Type": "image/webp"}, {"question": "q", "temperature": "x"}, 400,
                            "invalid_request"),
    "raw too many pixels": (png_bytes((250, 200)), {"Content-Type": "image/png"}, {"question": "q"}, 400,
                            "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_their_status_and_code(api, case):
    body, headers, params, status, code = BAD_INPUTS[case]
    response = api.request("POST", "/invocations", body, headers, params)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert set(response.json()) == {"error"} and set(response.json()["error"]) == {"code", "message"}
    assert response.json()["error"]["message"] and response.headers["x-request-id"]


def test_wrong_method_and_path_use_the_envelope(api):
    assert api.request("GET", "/invocations").json()["error"]["code"] == "method_not_allowed"
    response = api.request("GET", "/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_body_cap_is_enforced_while_streaming(api):
    """A chunked body declares no length: the cap must be counted as the bytes arrive."""
    if api.kind != "uvicorn":
        pytest.skip("needs a real socket to send a chunked body")
    chunks = (b"{" + b" " * 8192 for _ in range(20))  # 160 kB in 8 kB chunks, no Content-Length
    response = requests.post(api.target + "/invocations", data=chunks, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("chunked", [False, True])
def test_body_far_over_the_cap_still_gets_413_not_a_reset(api, chunked):
    """A client that sends its whole body before reading (urllib, so client.predict) must read the 413: answering
    before the body is read and closing makes the kernel reset the connection, and the client sees 'Connection
    reset by peer' (and retries it) instead of payload_too_large."""
    import urllib.error
    import urllib.request

    if api.kind != "uvicorn":
        pytest.skip("needs a real socket")
    body = b"{" + b" " * (64 * PAYLOAD_CAP) + b"}"  # 4 MiB: far more than the socket buffers hold
    for _ in range(3):  # a reset is a race the client usually, not always, loses
        data = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
        request = urllib.request.Request(api.target + "/invocations", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == 413 and json.loads(e.value.read())["error"]["code"] == "payload_too_large"


def test_answers_end_to_end(api, image_url):
    one = api.post_json({**GOOD, "temperature": 0})
    assert one.status_code == 200, one.text
    body = one.json()
    assert set(body) == {"answer", "usage", "finish_reason", "latency_ms"}
    assert isinstance(body["answer"], str) and body["usage"]["prompt_tokens"] > 16
    assert 1 <= body["usage"]["completion_tokens"] <= 16 and body["latency_ms"] > 0
    again = api.post_json({**GOOD, "temperature": 0}).json()
    assert again["answer"] == body["answer"]  # greedy is deterministic

    data_uri = api.post_json({**GOOD, "image": "data:image/png;base64," + GOOD["image"]}).json()
    blog = api.post_json({"image": image_url, "question": QUESTION, "temperature": 0.1})  # the blog's payload
    assert blog.status_code == 200 and isinstance(blog.json()["answer"], str)
    greedy_url = api.post_json({"image": image_url, "question": QUESTION, "temperature": 0}).json()
    assert data_uri["answer"] == greedy_url["answer"] == body["answer"]  # same pixels, same answer

    raw_query = api.request("POST", "/invocations", png_bytes(), {"Content-Type": "image/png"},
                            {"question": QUESTION, "temperature": "0"})
    attrs = "question=" + requests.utils.quote(QUESTION) + "&max_new_tokens=16&stop=zzzz"
    raw_attrs = api.request("POST", "/invocations", png_bytes(), {"Content-Type": "application/x-image",
                                                                 "X-Amzn-SageMaker-Custom-Attributes": attrs})
    assert raw_query.json()["answer"] == raw_attrs.json()["answer"] == body["answer"]

    sampled = api.post_json({**GOOD, "temperature": 0.9, "top_p": 0.8, "max_new_tokens": 5, "stop": "\n"})
    assert sampled.status_code == 200 and sampled.json()["usage"]["completion_tokens"] <= 5


def test_batch_payload_answers_in_order(api):
    other = {"image": b64_png((30, 60), (0, 0, 255)), "question": "Which category is the largest?", "temperature": 0}
    batch = api.post_json({"instances": [{**GOOD, "temperature": 0}, other]})
    assert batch.status_code == 200
    alone = [api.post_json(body).json()["answer"] for body in ({**GOOD, "temperature": 0}, other)]
    assert [r["answer"] for r in batch.json()] == alone


def test_request_ids(api):
    given = api.post_json(GOOD, headers={"X-Amzn-SageMaker-Inference-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = api.post_json(GOOD, headers={"X-Request-Id": "bad id with spaces"}).headers["x-request-id"]
    assert len(made) == 32 and " " not in made


def test_ping_and_execution_parameters(api):
    assert api.request("GET", "/ping").status_code == 200
    params = api.request("GET", "/execution-parameters").json()
    assert params == {"MaxConcurrentTransforms": 8, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}


# ------------------------------------------------------------------------------------------------ lifecycle
def test_ping_is_503_until_the_model_is_loaded(tiny_loaded, tiny_artifact):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return Predictor(tiny_loaded)

    with TestClient(create_app(serve_config(tiny_artifact), predictor_factory=slow_factory)) as client:
        ping = client.get("/ping")
        assert ping.status_code == 503 and ping.json()["error"]["code"] == "not_ready"
        early = client.post("/invocations", json=GOOD)
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        release.set()
        wait_ready(client.get)
        assert client.post("/invocations", json=GOOD).status_code == 200


def test_the_heap_left_by_the_load_is_frozen_before_ping_turns_200(tiny_loaded, tiny_artifact):
    """Objects alive after the load move to the permanent generation, so a full collection during traffic walks
    only what requests created."""
    import gc

    gc.unfreeze()  # whatever an earlier test froze
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(serve_config(tiny_artifact),
                               predictor_factory=lambda: Predictor(tiny_loaded))) as client:
        wait_ready(client.get)
        assert gc.get_freeze_count() > 10_000  # torch, transformers, the model: hundreds of thousands here
        assert client.post("/invocations", json=GOOD).status_code == 200


def test_failed_load_keeps_ping_503_and_reports_it(tiny_artifact, caplog):
    failures = []

    def broken():
        raise OSError("disk on fire")

    with caplog.at_level(logging.ERROR, logger="serve.http.app"):
        app = create_app(serve_config(tiny_artifact), predictor_factory=broken, on_load_failure=failures.append)
        with TestClient(app) as client:
            for _ in range(200):
                if failures:
                    break
                threading.Event().wait(0.02)
            ping = client.get("/ping")
    assert ping.status_code == 503 and "failed to load" in ping.json()["error"]["message"]
    assert isinstance(failures[0], OSError) and "disk on fire" in caplog.text


@pytest.mark.parametrize("transport", ["testclient", "uvicorn"])
def test_a_predictor_that_raises_gives_500_without_internals(tiny_artifact, tiny_loaded, caplog, transport):
    app = create_app(serve_config(tiny_artifact), predictor_factory=lambda: FailingPredictor(Predictor(tiny_loaded)))
    with caplog.at_level(logging.ERROR):
        if transport == "testclient":
            with TestClient(app) as client:
                wait_ready(client.get)
                responses = [client.post("/invocations", json=GOOD) for _ in range(2)]
                ping = client.get("/ping")
        else:
            with running_server(app) as base:
                responses = [requests.post(base + "/invocations", json=GOOD, timeout=30) for _ in range(2)]
                ping = requests.get(base + "/ping", timeout=5)
    for response in responses:
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert "secret" not in response.text and "shape" not in response.text and "Traceback" not in response.text
    assert ping.status_code == 200
    assert FailingPredictor.SECRET in caplog.text  # the operator gets the traceback


def test_unrecoverable_cuda_error_fails_ping(tiny_artifact, tiny_loaded):
    def cuda_broken():
        return FailingPredictor(Predictor(tiny_loaded), "CUDA error: an illegal memory access was encountered")

    with TestClient(create_app(serve_config(tiny_artifact), predictor_factory=cuda_broken)) as client:
        wait_ready(client.get)
        assert client.post("/invocations", json=GOOD).status_code == 500
        assert client.get("/ping").status_code == 503
        assert client.post("/invocations", json=GOOD).json()["error"]["code"] == "not_ready"

