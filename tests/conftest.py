"""Shared fixtures: a tiny LLaVA artifact built offline, saved exactly as a training run saves one.

Also: `gpu` tests skip without CUDA; torch stays on few threads (2-core CI machines run several processes).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The server tests' fixtures (tiny_loaded, tiny_predictor) and helpers, registered here so pytest rewrites its asserts.
pytest_plugins = ["serve_support", "adapter_support"]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (bitsandbytes GPU kernels / NCCL); torch sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """Path of a tiny `test`-preset artifact (model dir) shared by the whole session. Treat it as read-only."""
    from demo.tiny import build_tiny_artifact

    return str(build_tiny_artifact(tmp_path_factory.mktemp("artifact") / "tiny"))


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real moto server on loopback for the AWS tests; yields its URL. Dummy credentials, region us-east-1, no
    profile files, so nothing can reach a real AWS account. Its request recorder (/moto-api/recorder/*) writes
    into a temp dir, not the working directory."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path_factory.mktemp("moto") / "recording.jsonl"))
        from moto.server import ThreadedMotoServer  # after the variable: moto reads it on import

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
            mp.delenv(key, raising=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()
