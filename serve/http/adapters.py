"""LoRA adapters over HTTP: SageMaker's adapter routes, and how an /invocations request names its adapter.

    POST   /adapters         {"name": "charts", "src": "s3://bucket/adapters/charts.tar.gz", "preload": true,
                             "pin": false} (or the same as query parameters) -> 200 {"adapter": {...}}
    DELETE /adapters/{name}  -> 200 {"unloaded": name}, once the requests it is answering are answered
    GET    /adapters         -> 200 {"adapters": [{"name", "src", "rank", "resident", "pinned", "bytes",
                             "in_flight", "own_processor"}, ...], "limits": {...}}
    POST   /invocations      X-Amzn-SageMaker-Adapter-Identifier: charts (or X-Amzn-SageMaker-Adapter-Alias), or
                             "adapter": "charts" in the body (per instance in {"instances": [...]}); none: the base

SageMaker drives these when adapter inference components are created and deleted on a base component. The contract
is the one AWS's model-hosting-container-standards package defines (`sagemaker/lora`: the register request model with
its fields and defaults, the query-parameter fallback, the routes, the header names) and vLLM's SageMaker router
implements. The package itself is not used here: its transforms answer errors as FastAPI's `{"detail": ...}` and
successes as plain text instead of our envelope, its adapter-id injection rewrites JSON bodies only (an /invocations
body may be raw image bytes), its handler registries are process-global and filled by decorators at import time, and
it would add supervisor and jmespath to the serving image. Loads and unloads run off the event loop: /ping and
requests on other adapters go on meanwhile (serve/engine/adapters.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from serve.engine.adapters import DRAIN_POLL_S, NO_LEASE, AdapterRegistry, Lease, still_busy
from serve.engine.errors import ApiError
from serve.engine.types import GenerationRequest
from serve.http.envelope import describe_validation_errors
from serve.http.requests import read_body_capped

if TYPE_CHECKING:
    from serve.http.app import ServerState

log = logging.getLogger(__name__)

ADAPTER_HEADERS = ("x-amzn-sagemaker-adapter-identifier", "x-amzn-sagemaker-adapter-alias")
MAX_REGISTER_BODY = 64 * 1024
LEASE_GRACE_S = 5.0  # a request's lease outlives its deadline by this much: its row stops at the next token
STARTUP_FOLDER = "adapters"  # $SM_MODEL_DIR/adapters/<name>/ load at start-up


class RegisterAdapter(BaseModel):
    """model-hosting-container-standards' SageMakerRegisterLoRAAdapterRequest: same fields, defaults, and leniency
    (unknown fields are ignored, as there)."""
    name: str = Field(min_length=1)
    src: str = Field(min_length=1, max_length=2048)
    preload: bool = True
    pin: bool = False


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/adapters")
    async def register_adapter(request: Request):
        registry = registry_of(state)
        params = _register_params(await read_body_capped(request, MAX_REGISTER_BODY), request)
        described = await run_in_threadpool(registry.register, params.name, params.src, preload=params.preload,
                                            pin=params.pin)
        return {"adapter": described}

    @app.delete("/adapters/{name}")
    async def unregister_adapter(name: str):
        registry = registry_of(state)
        await unload(registry, name, timeout_s=state.cfg.request_timeout_s + LEASE_GRACE_S)
        return {"unloaded": name}

    @app.get("/adapters")
    async def list_adapters():
        registry = registry_of(state)
        limits = registry.limits
        return {"adapters": registry.list(),
                "limits": {"max_resident": limits.max_resident, "max_rank": limits.max_rank,
                           "memory_bytes": limits.memory_bytes}}


def registry_of(state: ServerState) -> AdapterRegistry:
    """The loaded model's adapter registry (503 while the model loads; refused when adapters are off)."""
    registry = getattr(state.require_batcher().predictor, "adapters", None)
    if registry is None:
        raise ApiError("adapter_limit", "this server serves no adapters (SERVE_MAX_ADAPTERS=0)")
    return registry


def _register_params(body: bytes, request: Request) -> RegisterAdapter:
    """The JSON body, or (as model-hosting-container-standards accepts) the query parameters without one."""
    if body.strip():
        try:
            data: Any = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError("invalid_json", f"body is not valid JSON ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise ApiError("invalid_request", 'body must be a JSON object: {"name": ..., "src": ...}')
    else:
        data = dict(request.query_params)
    try:
        return RegisterAdapter.model_validate(data)
    except ValidationError as e:
        raise ApiError("invalid_request", describe_validation_errors(list(e.errors()))) from None


async def unload(registry: AdapterRegistry, name: str, *, timeout_s: float) -> None:
    """Refuse new requests on `name`, wait (on the event loop, without blocking it) for the ones it is answering,
    then unload it off the loop."""
    registry.retire(name)
    deadline = time.monotonic() + timeout_s
    while registry.busy(name):
        if time.monotonic() > deadline:
            raise still_busy(name)
        await asyncio.sleep(DRAIN_POLL_S)
    await run_in_threadpool(registry.remove, name)


# ---------------------------------------------------------------------------------------------- /invocations
def header_adapter(request: Request) -> str | None:
    """The adapter SageMaker names in the request's headers (an adapter inference component's invocation)."""
    for header in ADAPTER_HEADERS:
        value = request.headers.get(header, "").strip()
        if value:
            return value
    return None


def pick_adapter(header: str | None, field: str | None) -> str | None:
    """The adapter a request uses: the header's or the body's `adapter`; both, if they differ, is an error."""
    if header and field and header != field:
        raise ApiError("invalid_request", f"the request names two adapters: {header!r} in its header and {field!r} "
                                          "in its body")
    return header or field


async def lease_adapters(state: ServerState, requests: list[GenerationRequest], deadline: float) -> Lease:
    """Lease the requests' adapters until they are answered (loading one that is not resident, off the event loop),
    so an unload waits for them and eviction leaves them alone."""
    names = [r.adapter for r in requests if r.adapter is not None]
    if not names:
        return NO_LEASE
    return await run_in_threadpool(registry_of(state).checkout, names, expires_at=deadline + LEASE_GRACE_S)


def release_when_sent(response: Response, lease: Lease) -> Response:
    """A streamed answer keeps its lease until its last event is sent (or the lease's expiry, if it never is)."""
    if lease is not NO_LEASE:
        response.background = BackgroundTask(lease.release)
    return response


def load_startup_adapters(predictor: Any, model_dir: Any) -> list[str]:
    """Register every `<model dir>/adapters/<name>/` (a bad one stops the start-up, like a bad model)."""
    folder = Path(model_dir) / STARTUP_FOLDER
    if not folder.is_dir():
        return []
    registry = getattr(predictor, "adapters", None)
    if registry is None:
        log.warning("%s holds adapters, but adapters are off (SERVE_MAX_ADAPTERS=0): not loaded", folder)
        return []
    names = registry.register_folder(folder)
    log.info("adapters loaded at start-up from %s: %s", folder, ", ".join(names) or "none")
    return names
