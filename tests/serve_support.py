"""Helpers for the server tests (tests/test_serve_*.py): images, a real uvicorn on loopback, predictor wrappers.

Nothing here fakes the model: the wrappers delegate to the real tiny-model Predictor and only add what a test
needs to observe (batch sizes) or provoke (a slow or failing generation).
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from serve.config import ServeConfig


@pytest.fixture(scope="session")
def tiny_loaded(tiny_artifact):
    """The tiny artifact loaded once per session (fp32 on CPU), torch on one thread: 2 shared cores."""
    import torch

    from serve.engine.model import load_artifact

    torch.set_num_threads(1)
    return load_artifact(tiny_artifact)


@pytest.fixture
def tiny_predictor(tiny_loaded):
    from serve.engine.predictor import Predictor

    return Predictor(tiny_loaded)


def png_bytes(size=(48, 40), colour=(200, 30, 30), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64_png(size=(48, 40), colour=(200, 30, 30)) -> str:
    return base64.b64encode(png_bytes(size, colour)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(model_dir: str, **overrides) -> ServeConfig:
    """A config for in-process servers: loopback, short waits, one torch thread (2 shared cores)."""
    values = dict(model_dir=model_dir, host="127.0.0.1", port=0, max_wait_ms=20.0, torch_threads=1,
                  graceful_timeout_s=5.0)
    values.update(overrides)
    return ServeConfig(**values)


def wait_ready(get, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/ping").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


@contextmanager
def running_server(app, port: int | None = None, *, wait: bool = True):
    """Serve `app` with a real uvicorn on 127.0.0.1 in a thread; yields the base URL once the model is ready
    (`wait=False`: once the socket listens, the model maybe still loading)."""
    import requests
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    try:
        if wait:
            wait_ready(lambda path: requests.get(base + path, timeout=5))
        yield base
    finally:
        server.should_exit = True
        thread.join(15)


class RecordingPredictor:
    """The real predictor (its request-thread hooks `prepare` and `image_processor` included), recording the size
    of every batch it is given."""

    def __init__(self, inner):
        self.inner = inner
        self.batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, requests, on_result=None):
        self.batch_sizes.append(len(requests))
        return self.inner.predict(requests, on_result=on_result)


class SlowPredictor(RecordingPredictor):
    """The real predictor behind a fixed delay per batch: a stand-in for a big model on a busy GPU."""

    def __init__(self, inner, delay_s: float):
        super().__init__(inner)
        self.delay_s = delay_s

    def predict(self, requests, on_result=None):
        time.sleep(self.delay_s)
        return super().predict(requests, on_result=on_result)


class FailingPredictor(RecordingPredictor):
    """The real predictor with a bug in generation: every batch raises, with internals in the message that must not
    leak."""

    SECRET = "shape mismatch [3, 4] vs [4, 3] in /opt/secret/model_internals.py:42"

    def __init__(self, inner, message: str = SECRET):
        super().__init__(inner)
        self.message = message

    def predict(self, requests, on_result=None):
        raise RuntimeError(self.message)
