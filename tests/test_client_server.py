"""`client.predict` and `llava-sm predict` against the real server: `python -m serve` (uvicorn) on loopback,
answering from the tiny artifact, with small limits so that each error code can be provoked; each becomes a
`ClientError` with the server's code. An image host on 127.0.0.2 (the only address the server may fetch from)
serves a good image and a slow one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from client import ClientError, predict, predict_full
from client.cli import main
from client.invoke import error_from_body

MAX_PIXELS = 100_000
MAX_PAYLOAD = 300_000
MAX_NEW_TOKENS = 16
BUDGET_S = 4.0  # SERVE_REQUEST_TIMEOUT_S; the slow image takes longer than this


def _png(size=(32, 32), color="red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ImageHost:
    """/good.png answers at once; /slow.png trickles 64 KiB chunks for longer than the server's budget."""

    def __init__(self):
        good = _png()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                slow = self.path == "/slow.png"
                chunks = 40 if slow else 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(chunks * 65536 if slow else len(good)))
                self.end_headers()
                try:
                    if not slow:
                        self.wfile.write(good)
                    for _ in range(chunks if slow else 0):
                        self.wfile.write(b"\0" * 65536)
                        self.wfile.flush()
                        time.sleep(0.25)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server gave up on it: that is the point

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.base = f"http://127.0.0.2:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.server.shutdown()
    host.server.server_close()


@pytest.fixture(scope="module")
def server_url(tiny_artifact, tmp_path_factory):
    """The real `python -m serve` on the tiny model, started the way the demo starts it (demo.pipeline)."""
    from demo.pipeline import running_server

    env = {"SERVE_TORCH_THREADS": "1", "SERVE_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
           "SERVE_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD), "SERVE_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
           "SERVE_FETCH_ALLOW_NETWORKS": "127.0.0.2/32", "SERVE_REQUEST_TIMEOUT_S": str(BUDGET_S),
           "SERVE_FETCH_TIMEOUT_S": "30"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(tiny_artifact, log_path=log, timeout_s=120, env=env) as url:
        yield url


def test_answers_for_every_image_kind(server_url, image_host, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    path.write_bytes(_png())
    result = predict_full(path, "What color is it?", url=server_url, max_new_tokens=4, temperature=0)
    assert isinstance(result["answer"], str)
    assert 1 <= result["usage"]["completion_tokens"] <= 4 and result["usage"]["prompt_tokens"] > 0
    assert result["latency_ms"] > 0
    for image in (str(path), _png(), Image.new("RGB", (20, 30), "blue"), f"{image_host.base}/good.png"):
        assert isinstance(predict(image, "What color is it?", url=server_url, max_new_tokens=2), str)
    # greedy decoding: the same request gives the same answer
    again = predict_full(path, "What color is it?", url=server_url, max_new_tokens=4, temperature=0)
    assert again["answer"] == result["answer"]


@pytest.mark.parametrize(
    "image, options, status, code",
    [
        (b"definitely not an image", {}, 400, "invalid_image"),
        ("big", {}, 400, "image_too_large"),
        ("huge", {}, 413, "payload_too_large"),
        ("http://127.0.0.1:1/loopback.png", {}, 400, "url_not_allowed"),
        ("closed", {}, 400, "image_fetch_failed"),
        ("small", {"max_new_tokens": MAX_NEW_TOKENS + 1}, 400, "invalid_request"),
        ("small", {"temperature": 99.0}, 400, "invalid_request"),
        ("slow", {}, 504, "timeout"),
    ],
)
def test_each_error_code_becomes_client_error(server_url, image_host, image, options, status, code):
    image = {
        "big": _png((400, 400)),  # 160,000 pixels > SERVE_MAX_IMAGE_PIXELS
        "huge": os.urandom(MAX_PAYLOAD),  # base64 of it is over SERVE_MAX_PAYLOAD_BYTES
        "closed": f"http://127.0.0.2:{_free_port('127.0.0.2')}/nothing-listens.png",
        "small": _png(),
        "slow": f"{image_host.base}/slow.png",
    }.get(image, image) if isinstance(image, str) else image
    with pytest.raises(ClientError) as e:
        predict(image, "What is it?", url=server_url, retries=0, timeout=60, **options)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    assert e.value.message


@pytest.mark.parametrize(
    "body, content_type, status, code",
    [(b"{not json", "application/json", 400, "invalid_json"), (b"hello", "text/plain", 415, "unsupported_media_type")],
)
def test_codes_the_client_cannot_cause_still_map(server_url, body, content_type, status, code):
    # predict always sends valid JSON; other callers' bodies still map through the same parser.
    request = urllib.request.Request(f"{server_url}/invocations", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    error = error_from_body(raised.value.code, raised.value.read())
    assert (error.status, error.code) == (status, code)


def test_the_server_keeps_answering_after_errors(server_url):
    with pytest.raises(ClientError):
        predict(b"junk", "Q", url=server_url, retries=0)
    assert isinstance(predict(_png(), "Q", url=server_url, max_new_tokens=2), str)


def test_llava_sm_predict_cli(server_url, tmp_path, capsys):
    image = tmp_path / "c.png"
    image.write_bytes(_png(color="green"))
    assert main(["predict", str(image), "What color?", "--url", server_url, "--max-new-tokens", "3",
                 "--temperature", "0", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert set(reply) >= {"answer", "usage", "latency_ms"}
    assert main(["predict", str(image), "What color?", "--url", server_url, "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == reply["answer"]
    assert main(["predict", str(image), "What color?", "--url", server_url, "--max-new-tokens", "3",
                 "--temperature", "0", "--stream"]) == 0
    assert capsys.readouterr().out == reply["answer"] + "\n"  # printed piece by piece, then the line ends
    assert main(["predict", str(image), "What color?", "--url", server_url, "--max-new-tokens", "3",
                 "--temperature", "0", "--stream", "--json"]) == 0
    streamed_out = capsys.readouterr().out
    assert streamed_out.startswith(reply["answer"] + "\n")
    assert json.loads(streamed_out[len(reply["answer"]) + 1:])["answer"] == reply["answer"]

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(bad), "What?", "--url", server_url, "--retries", "0"]) == 1
    err = capsys.readouterr().err
    assert "400 invalid_image" in err


def test_base64_is_what_the_server_decodes(server_url, tmp_path):
    # the same image as a file and as base64 inside a data: URI must give the same greedy answer
    png = _png(color="purple")
    path = tmp_path / "p.png"
    path.write_bytes(png)
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    kwargs = {"url": server_url, "max_new_tokens": 4, "temperature": 0}
    assert predict(path, "Which color?", **kwargs) == predict(data_uri, "Which color?", **kwargs)
