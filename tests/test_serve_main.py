"""`python -m serve` as SageMaker runs it: env-only config, /ping 503 then 200, a JSON answer, and SIGTERM:
in-flight requests finish, new connections are refused, the process exits within the graceful timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from serve_support import b64_png, free_port

from client.stream import parse_events

REPO = Path(__file__).resolve().parents[1]


def test_python_m_serve_answers_and_shuts_down_gracefully(tiny_artifact, tmp_path):
    with python_m_serve(tiny_artifact, tmp_path / "serve.log", SERVE_TORCH_THREADS="1", SERVE_MAX_NEW_TOKENS="512",
                        SERVE_GRACEFUL_TIMEOUT_S="20") as (base, proc):
        statuses = _wait_for_ping(base, proc)
        assert statuses[-1] == 200
        answer = requests.post(base + "/invocations", timeout=30,
                               json={"image": b64_png(), "question": "What is shown?", "temperature": 0})
        assert answer.status_code == 200 and isinstance(answer.json()["answer"], str)

        long = {"instances": [{"image": b64_png((40, 30 + i)), "question": f"Question {i}?", "temperature": 0,
                               "max_new_tokens": 400} for i in range(8)]}
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(requests.post, base + "/invocations", json=long, timeout=60)
            time.sleep(0.5)
            assert not in_flight.done(), "the long request finished before SIGTERM: make it longer"
            proc.send_signal(signal.SIGTERM)
            term_sent = time.monotonic()
            time.sleep(0.3)
            refused = _connection_refused(base)
            response = in_flight.result()
        assert response.status_code == 200 and len(response.json()) == 8
        assert refused, "new connections were accepted after SIGTERM"
        # A graceful stop on request is a clean exit.
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - term_sent < 25
    text = (tmp_path / "serve.log").read_text()
    assert "config: model_dir=" in text and "model ready" in text and "Application shutdown complete" in text
    assert "path=/invocations status=200" in text and "What is shown" not in text  # no payload content in logs


@pytest.mark.gpu
def test_python_m_serve_on_cuda_loads_nf4_and_compiles(tiny_artifact, tmp_path):
    """The GPU defaults as `docker run --gpus all IMAGE serve` gets them: NF4 on CUDA, accelerated decode warmed
    up before /ping turns 200, and answers, alone and batched; the same with the eager fallback (SERVE_ACCEL=off)."""
    answers = {}
    for accel in ("auto", "off"):
        log_path = tmp_path / f"serve-{accel}.log"
        with python_m_serve(tiny_artifact, log_path, SERVE_ACCEL=accel, SERVE_ACCEL_BATCH_BUCKETS="1,2",
                            SERVE_MAX_NEW_TOKENS="16") as (base, proc):
            _wait_for_ping(base, proc, timeout=300)
            one = requests.post(base + "/invocations", timeout=60, json={
                "image": b64_png(), "question": "What is shown?", "temperature": 0, "max_new_tokens": 8})
            two = requests.post(base + "/invocations", timeout=60, json={"instances": [
                {"image": b64_png((40, 30 + i)), "question": f"Question {i}?", "temperature": 0,
                 "max_new_tokens": 8} for i in range(2)]})
            assert one.status_code == two.status_code == 200, (one.text, two.text)
            answers[accel] = [one.json()["answer"]] + [r["answer"] for r in two.json()]
            # Streamed: its pieces come from the compiled path's thread, through the event loop.
            streamed = requests.post(base + "/invocations", timeout=60, stream=True, json={
                "image": b64_png(), "question": "What is shown?", "temperature": 0, "max_new_tokens": 8,
                "stream": True})
            *deltas, final = list(parse_events(streamed.iter_content(chunk_size=None)))
            assert final["answer"] == answers[accel][0] == "".join(d["delta"] for d in deltas), final
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        text = log_path.read_text()
        assert "on cuda" in text and "quantization=nf4" in text, text[-3000:]
        assert ("decode acceleration: on" in text) == (accel == "auto"), text[-3000:]
    # Token-level agreement of the compiled path with eager is tests/test_accel.py's job; here: both paths serve.
    assert all(len(a) == 3 and all(isinstance(x, str) for x in a) for a in answers.values())


@contextmanager
def python_m_serve(model_dir: str, log_path: Path, **env: str):
    """`python -m serve` on a free loopback port as SageMaker starts it (env only, none of this shell's SERVE_/SM_
    variables), its output in `log_path`; yields (base URL, process); killed on the way out if still running."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SM_", "SAGEMAKER_"))}
    clean.update({"SM_MODEL_DIR": model_dir, "SAGEMAKER_BIND_TO_PORT": str(port), "SERVE_HOST": "127.0.0.1", **env})
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serve"], cwd=REPO, env=clean, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}", proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_for_ping(base: str, proc: subprocess.Popen, timeout: float = 90) -> list[int]:
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "python -m serve exited during start-up"
        try:
            started = time.monotonic()
            statuses.append(requests.get(base + "/ping", timeout=2).status_code)
            assert time.monotonic() - started < 2
        except requests.ConnectionError:
            pass
        if statuses and statuses[-1] == 200:
            return statuses
        time.sleep(0.1)
    raise AssertionError(f"no 200 from /ping in {timeout} s: {statuses[-5:]}")


def _connection_refused(base: str) -> bool:
    try:
        requests.get(base + "/ping", timeout=2)
    except requests.ConnectionError:
        return True
    return False
