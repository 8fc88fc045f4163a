"""`client.predict` transport behaviour: image encodings, retries and backoff, connection failures and timeouts over
real loopback HTTP, and the SageMaker endpoint path against a real moto server (queued results) and a loopback
server that answers InvokeEndpoint the way SageMaker does when the container fails (HTTP 424 `ModelError` carrying
the container's status and body), parsed by real botocore. The real model server is in test_client_server.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from client import ClientError, predict, predict_full
from client.invoke import SAGEMAKER_MAX_BODY_BYTES, invocations_url

ANSWER = {"answer": "42", "usage": {"prompt_tokens": 10, "completion_tokens": 1}, "latency_ms": 5.0}
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


class Scripted:
    """A loopback HTTP server answering each POST with the next scripted (status, body, headers, delay)."""

    def __init__(self):
        self.script: list[tuple[int, bytes, dict, float]] = []
        self.received: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append((self.path, dict(self.headers), body))
                status, payload, headers, delay = outer.script.pop(0) if outer.script else (200, b"{}", {}, 0)
                time.sleep(delay)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def answer(self, status=200, body=ANSWER, headers=None, delay=0.0):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.script.append((status, raw, headers or {}, delay))

    def payload(self, i=-1) -> dict:
        return json.loads(self.received[i][2])


@pytest.fixture
def server():
    s = Scripted()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _error(code, message="m"):
    return {"error": {"code": code, "message": message}}


# ---- request building ----


def test_every_image_kind_is_sent(server, tmp_path):
    from PIL import Image

    path = tmp_path / "dot.png"
    path.write_bytes(PNG_1PX)
    pil = Image.open(io.BytesIO(PNG_1PX))
    for image in (str(path), path, PNG_1PX, bytearray(PNG_1PX), pil):
        server.answer()
        assert predict(image, "What?", url=server.url) == "42"
        sent = base64.b64decode(server.payload()["image"])
        assert Image.open(io.BytesIO(sent)).size == (1, 1)
    assert base64.b64decode(server.payload(0)["image"]) == PNG_1PX  # files are sent byte for byte
    for uri in ("https://example.com/c.png", "s3://bucket/c.png", "data:image/png;base64,AAAA",
                "HTTPS://example.com/C.png"):
        server.answer()
        predict(uri, "What?", url=server.url)
        assert server.payload()["image"] == uri  # passed through for the server to fetch


def test_generation_options_and_defaults(server):
    server.answer()
    server.answer()
    predict(PNG_1PX, "Q1", url=server.url)
    predict(PNG_1PX, "Q2", url=server.url, temperature=0.0, top_p=0.9, max_new_tokens=8, stop=["\n"])
    assert set(server.payload(0)) == {"image", "question"}  # None options are left to the server's defaults
    assert {k: v for k, v in server.payload(1).items() if k != "image"} == {
        "question": "Q2", "temperature": 0.0, "top_p": 0.9, "max_new_tokens": 8, "stop": ["\n"]}
    path, headers, _ = server.received[1]
    assert path == "/invocations" and headers["Content-Type"] == "application/json"


def test_predict_full_returns_the_whole_reply(server):
    server.answer()
    assert predict_full(PNG_1PX, "Q", url=server.url) == ANSWER


@pytest.mark.parametrize("url, expected", [
    ("http://h:8080", "http://h:8080/invocations"), ("http://h:8080/", "http://h:8080/invocations"),
    ("https://h/proxy/invocations", "https://h/proxy/invocations"),
])
def test_invocations_url(url, expected):
    assert invocations_url(url) == expected


@pytest.mark.parametrize("image, question, error", [
    ("/no/such/file.png", "Q", FileNotFoundError),
    (12345, "Q", TypeError),
    (b"", "Q", ValueError),
    (PNG_1PX, "   ", ValueError),
])
def test_bad_arguments_fail_before_sending(server, image, question, error):
    with pytest.raises(error):
        predict(image, question, url=server.url)
    assert server.received == []


def test_url_and_endpoint_together():
    with pytest.raises(ValueError, match="not both"):
        predict(PNG_1PX, "Q", url="http://h", endpoint_name="e")


# ---- errors and retries over HTTP ----


def test_server_error_becomes_client_error(server):
    server.answer(400, _error("invalid_image", "not an image"))
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", url=server.url)
    assert (e.value.status, e.value.code, e.value.message) == (400, "invalid_image", "not an image")
    assert len(server.received) == 1  # a 400 is never retried


@pytest.mark.parametrize("code", ["overloaded", "not_ready"])
def test_busy_server_is_retried_with_backoff(server, code):
    server.answer(503, _error(code), headers={"Retry-After": "0"})
    server.answer(503, _error(code))
    server.answer()
    started = time.monotonic()
    assert predict(PNG_1PX, "Q", url=server.url, retries=2, backoff=0.05) == "42"
    assert len(server.received) == 3
    assert time.monotonic() - started >= 0.05 + 0.1  # waited backoff, then 2x backoff


def test_retries_run_out(server):
    for _ in range(2):
        server.answer(503, _error("overloaded", "at capacity"))
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", url=server.url, retries=1, backoff=0.01)
    assert (e.value.status, e.value.code) == (503, "overloaded")
    assert len(server.received) == 2


def test_retry_after_is_honoured(server):
    server.answer(503, _error("overloaded"), headers={"Retry-After": "0.3"})
    server.answer()
    started = time.monotonic()
    predict(PNG_1PX, "Q", url=server.url, retries=1, backoff=0.01)
    assert time.monotonic() - started >= 0.3


def test_internal_error_and_timeout_codes_are_not_retried(server):
    server.answer(500, _error("internal_error"))
    server.answer(504, _error("timeout"))
    for code in ("internal_error", "timeout"):
        with pytest.raises(ClientError, match=code):
            predict(PNG_1PX, "Q", url=server.url, retries=3, backoff=0.01)
    assert len(server.received) == 2


def test_non_json_error_and_non_json_answer(server):
    server.answer(502, b"<html>Bad gateway</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", url=server.url)
    assert (e.value.status, e.value.code) == (502, "http_error") and "Bad gateway" in e.value.message
    server.answer(200, b"not json")
    with pytest.raises(ClientError, match="invalid_response"):
        predict(PNG_1PX, "Q", url=server.url)
    server.answer(200, {"text": "no answer field"})
    with pytest.raises(ClientError, match="no 'answer'"):
        predict(PNG_1PX, "Q", url=server.url)


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", url=f"http://127.0.0.1:{port}", retries=2, backoff=0.05)
    assert (e.value.status, e.value.code) == (None, "connection_error")
    assert time.monotonic() - started >= 0.15  # two backoffs: it did retry


def test_client_timeout(server):
    server.answer(delay=1.0)
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", url=server.url, timeout=0.2, retries=2)
    assert (e.value.status, e.value.code) == (None, "timeout")
    assert len(server.received) == 1  # a slow answer is not retried: the server may still be generating it


# ---- the SageMaker endpoint path ----


def _queue_result(moto_server, body, account="123456789012"):
    results = {"account_id": account, "region": "us-east-1",
               "results": [{"Body": json.dumps(body), "ContentType": "application/json"}]}
    requests.post(f"{moto_server}/moto-api/static/sagemaker/endpoint-results", json=results).raise_for_status()


def test_endpoint_returns_the_queued_result(moto_server, tmp_path):
    _queue_result(moto_server, ANSWER)
    image = tmp_path / "c.png"
    image.write_bytes(PNG_1PX)
    # moto answers queued results in order and caches them per request body: unique endpoint + question
    result = predict_full(image, f"Q {uuid.uuid4()}", endpoint_name=f"ep-{uuid.uuid4().hex[:8]}",
                          endpoint_url=moto_server, region="us-east-1")
    assert result == ANSWER


def test_endpoint_payload_limit_is_checked_before_sending(moto_server):
    big = b"\x89PNG" + b"\0" * (SAGEMAKER_MAX_BODY_BYTES * 3 // 4)  # base64 makes it > 6 MiB
    with pytest.raises(ClientError) as e:
        predict(big, "Q", endpoint_name="ep", endpoint_url="http://127.0.0.1:9", region="us-east-1", retries=0)
    assert (e.value.status, e.value.code) == (413, "payload_too_large")
    assert "s3://" in e.value.message  # tells the user what to do instead


class FakeRuntime(Scripted):
    """Answers InvokeEndpoint as SageMaker does when the container returned an error: HTTP 424 ModelError."""

    def model_error(self, status, container_body):
        body = {"Message": f"Received client error ({status}) from primary with message \"{container_body}\".",
                "OriginalStatusCode": status, "OriginalMessage": container_body,
                "LogStreamArn": "arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/ep"}
        self.answer(424, body, headers={"x-amzn-ErrorType": "ModelError:http://internal.amazon.com/coral/"})


@pytest.fixture
def runtime(moto_server):  # moto_server: for its dummy credentials and region
    s = FakeRuntime()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_endpoint_container_error_becomes_client_error(runtime):
    runtime.model_error(400, json.dumps(_error("invalid_image", "image bytes are not a decodable PNG")))
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", endpoint_name="ep", endpoint_url=runtime.url, region="us-east-1")
    assert (e.value.status, e.value.code) == (400, "invalid_image")
    assert e.value.message == "image bytes are not a decodable PNG"
    path, headers, body = runtime.received[0]
    assert path == "/endpoints/ep/invocations" and json.loads(body)["question"] == "Q"


def test_endpoint_overloaded_is_retried(runtime):
    runtime.model_error(503, json.dumps(_error("overloaded", "at capacity")))
    runtime.answer(200, ANSWER)
    assert predict(PNG_1PX, "Q", endpoint_name="ep", endpoint_url=runtime.url, region="us-east-1",
                   backoff=0.01) == "42"
    assert len(runtime.received) == 2


def test_endpoint_error_without_container_json(runtime):
    runtime.model_error(502, "upstream died")
    runtime.answer(400, {"message": "Endpoint ep of account 123 not found."},
                   headers={"x-amzn-ErrorType": "ValidationError:http://internal.amazon.com/coral/"})
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q", endpoint_name="ep", endpoint_url=runtime.url, region="us-east-1")
    assert (e.value.status, e.value.code, e.value.message) == (502, "http_error", "upstream died")
    with pytest.raises(ClientError) as e:
        predict(PNG_1PX, "Q2", endpoint_name="ep", endpoint_url=runtime.url, region="us-east-1")
    assert (e.value.status, e.value.code) == (400, "ValidationError") and "not found" in e.value.message


def test_predict_cli_against_an_endpoint(moto_server, capsys):
    from client.cli import main

    _queue_result(moto_server, {**ANSWER, "answer": "seven"})
    question = f"How many? {uuid.uuid4()}"
    rc = main(["predict", "s3://bucket/dot.png", question, "--endpoint-name", "cli-ep", "--endpoint-url",
               moto_server, "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "seven"
