"""`predict(image, question)`: ask a running server (HTTP) or a SageMaker endpoint (InvokeEndpoint) about an image.

    from client import predict, predict_full, ClientError
    predict("chart.png", "What is the highest value?", url="http://localhost:8080")
    predict("s3://bucket/chart.png", "...", endpoint_name="llava-chart", region="eu-west-1")
    predict("chart.png", "Title and type?", json_schema={"type": "object", ...})   # -> the parsed JSON object
    predict("chart.png", "...", endpoint_name="llava-chart", inference_component="charts-v2")   # a LoRA adapter

Standard library only (urllib), plus boto3 for the endpoint path, imported when first used: importing this module
never pulls in torch, transformers or PIL. Server errors (`{"error": {"code", "message"}}`) become
`ClientError(status, code, message)` with the server's stable code; a busy server (503 `overloaded` / `not_ready`) and
connection failures are retried with exponential backoff.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://localhost:8080"
# InvokeEndpoint's request body limit (BodyBlob max in the sagemaker-runtime API model): 6 MiB.
SAGEMAKER_MAX_BODY_BYTES = 6 * 1024 * 1024
RETRYABLE_CODES = frozenset({"overloaded", "not_ready"})
MAX_BACKOFF_S = 10.0
TIMEOUT_S, RETRIES, BACKOFF_S = 120.0, 3, 0.5  # predict's defaults
PASS_THROUGH_PREFIXES = ("http://", "https://", "s3://", "data:")


class ClientError(Exception):
    """A request that did not produce an answer.

    `status` is the HTTP status the server answered with (None when no answer came back: connection refused,
    client-side timeout); `code` is the server's stable error code (see docs/serving.md) or one of the client's own:
    `connection_error`, `timeout`, `payload_too_large` (checked before sending to an endpoint), `invalid_response`,
    `incomplete_json` (`predict` with a json_schema, when the answer's JSON was cut short).
    """

    def __init__(self, status: int | None, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(f"[{status} {code}] {message}" if status is not None else f"[{code}] {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # the server's Retry-After hint, seconds


def predict(image: Any, question: str, **kwargs: Any) -> Any:
    """The answer to `question` about `image`. Takes the same arguments as `predict_full`.

    With `json_schema`, the answer parsed (the server decodes it under the schema); a ClientError with the client's
    code `incomplete_json` when the answer ran out of tokens (or hit a stop string) before its JSON was complete."""
    reply = predict_full(image, question, **kwargs)
    if kwargs.get("json_schema") is None:
        return reply["answer"]
    return json_of(reply)


def json_of(reply: dict[str, Any]) -> Any:
    """The parsed answer of a reply to a request with a json_schema (its "json" field)."""
    if "json" not in reply:
        raise ClientError(200, "invalid_response", "the reply has no 'json' field: does the server support "
                                                   "json_schema?")
    if reply["json"] is None and reply["answer"].strip() != "null":
        raise ClientError(200, "incomplete_json",
                          f"the answer is not complete JSON (finish_reason {reply.get('finish_reason')!r}); raise "
                          f"max_new_tokens or drop stop strings: {reply['answer'][:200]!r}")
    return reply["json"]


def predict_full(
    image: Any,
    question: str,
    *,
    url: str | None = None,
    endpoint_name: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    stop: list[str] | None = None,
    json_schema: dict[str, Any] | None = None,
    adapter: str | None = None,
    inference_component: str | None = None,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    runtime_client: Any = None,
) -> dict[str, Any]:
    """The server's full reply: `{"answer", "usage": {"prompt_tokens", "completion_tokens"}, "finish_reason",
    "latency_ms"}`, plus `"json"` (the answer parsed, or None when it is not complete JSON) with a `json_schema`.

    image: a local path, bytes, a PIL image (sent as base64), or an http(s):// / s3:// URL (passed through for the
        server to fetch). Generation options left as None use the model's defaults.
    url: base URL of a running server (default http://localhost:8080); `endpoint_name`: a SageMaker endpoint,
        called through boto3 with `region` / `profile` / `endpoint_url` (or a ready `runtime_client`).
    inference_component: on an endpoint that serves through inference components, the component to ask (a LoRA
        adapter's, or the base's); adapter: the name of an adapter loaded on the server itself (the body's
        `adapter` field), for a server or an endpoint without components. See docs/adapters.md.
    timeout: seconds to wait for the answer; retries: extra attempts after a connection failure or a 503, waiting
        backoff * 2**attempt seconds (or the server's Retry-After, if longer; at most 10 s) before each.
    json_schema: a JSON Schema (a dict) the answer must follow; the server checks it (400 `invalid_json_schema`).
    """
    return ask(image, question, url=url, endpoint_name=endpoint_name, temperature=temperature, top_p=top_p,
               max_new_tokens=max_new_tokens, stop=stop, json_schema=json_schema, adapter=adapter,
               inference_component=inference_component, timeout=timeout, retries=retries, backoff=backoff,
               region=region, profile=profile, endpoint_url=endpoint_url, runtime_client=runtime_client)


def ask(image: Any, question: str, *, url: str | None = None, endpoint_name: str | None = None,
        temperature: float | None = None, top_p: float | None = None, max_new_tokens: int | None = None,
        stop: list[str] | None = None, json_schema: dict[str, Any] | None = None, adapter: str | None = None,
        inference_component: str | None = None, timeout: float = TIMEOUT_S, retries: int = RETRIES,
        backoff: float = BACKOFF_S, region: str | None = None, profile: str | None = None,
        endpoint_url: str | None = None, runtime_client: Any = None, stream: bool = False) -> Any:
    """One request to a server or an endpoint, with retries: the reply, or with `stream` an open
    client.stream.AnswerStream (retries then cover only the time before its first piece)."""
    if url and endpoint_name:
        raise ValueError("pass either url= or endpoint_name=, not both")
    if json_schema is not None and not isinstance(json_schema, dict):
        raise TypeError(f"json_schema must be a dict (a JSON Schema), not {type(json_schema).__name__}")
    if inference_component and not endpoint_name:
        raise ValueError("inference_component= names a component of a SageMaker endpoint: pass endpoint_name= too "
                         "(a server of your own takes adapter=)")
    body = json.dumps(build_payload(image, question, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, stop=stop, json_schema=json_schema, adapter=adapter,
                                    stream=stream or None)).encode()
    if stream:  # client.stream imports this module: imported here, when first needed
        from client.stream import open_endpoint_stream as via_endpoint
        from client.stream import open_url_stream as via_url
    else:
        via_endpoint, via_url = _invoke_endpoint, _post
    if endpoint_name:
        if runtime_client is None:
            runtime_client = _runtime_client(region, profile, endpoint_url, timeout)
        send = functools.partial(via_endpoint, runtime_client, endpoint_name, body,
                                 inference_component=inference_component)
    else:
        send = functools.partial(via_url, invocations_url(url or DEFAULT_URL), body, timeout)
    return _with_retries(send, retries, backoff)


def build_payload(image: Any, question: str, **options: Any) -> dict[str, Any]:
    """The /invocations JSON body; options that are None are left out so the server's defaults apply."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    payload: dict[str, Any] = {"image": encode_image(image), "question": question}
    payload.update({k: v for k, v in options.items() if v is not None})
    return payload


def encode_image(image: Any) -> str:
    """A URL passes through; a path, bytes or a PIL image becomes base64 of the file bytes (PNG for PIL images)."""
    if isinstance(image, str) and image[:8].lower().startswith(PASS_THROUGH_PREFIXES):  # schemes are case-blind
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {str(image)!r} is neither an existing file nor an http(s):// or s3:// URL")
        data = path.read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save") and type(image).__module__.startswith("PIL."):
        data = _pil_to_png(image)
    else:
        raise TypeError(f"image must be a path, bytes, a PIL image or a URL, not {type(image).__name__}")
    if not data:
        raise ValueError("image is empty (0 bytes)")
    return base64.b64encode(data).decode("ascii")


def invocations_url(url: str) -> str:
    """`http://host:8080` -> `http://host:8080/invocations`; a URL that already names a path is used as is."""
    base = url.rstrip("/")
    return base if base.split("://", 1)[-1].count("/") else base + "/invocations"


def _pil_to_png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _with_retries(send: Any, retries: int, backoff: float) -> Any:
    """Call `send()`; retry connection failures and 503s (overloaded / not ready) with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return send()
        except ClientError as e:
            retryable = e.code == "connection_error" or (e.status in (429, 503) and e.code in RETRYABLE_CODES)
            if not retryable or attempt == retries:
                raise
            time.sleep(min(max(backoff * 2**attempt, e.retry_after or 0.0), MAX_BACKOFF_S))
    raise AssertionError("unreachable")  # the loop always returns or raises


def _post(url: str, body: bytes, timeout: float) -> dict[str, Any]:
    with http_errors(url, timeout):
        with post_json(url, body, timeout, accept="application/json") as response:
            return _parse_answer(response.read())


def post_json(url: str, body: bytes, timeout: float, *, accept: str) -> Any:
    """POST `body` as JSON; the open response (urllib), or the server's error as a ClientError."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": accept})
    with http_errors(url, timeout):
        return urllib.request.urlopen(request, timeout=timeout)


@contextmanager
def http_errors(url: str, timeout: float) -> Iterator[None]:
    """urllib's failures as ClientErrors: the server's error body with its code (and Retry-After), a timeout, or a
    connection error (refused, reset, or the server vanished mid-answer)."""
    try:
        yield
    except urllib.error.HTTPError as e:
        error = error_from_body(e.code, e.read())
        error.retry_after = _seconds(e.headers.get("Retry-After"))
        raise error from None
    except TimeoutError as e:
        raise ClientError(None, "timeout", f"no answer from {url} within {timeout:g} s") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ClientError(None, "timeout", f"no answer from {url} within {timeout:g} s") from e
        raise ClientError(None, "connection_error", f"cannot reach {url}: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise ClientError(None, "connection_error", f"cannot reach {url}: {e!r}") from e


def _invoke_endpoint(client: Any, endpoint_name: str, body: bytes, *,
                     inference_component: str | None = None) -> dict[str, Any]:
    response = call_endpoint(client.invoke_endpoint, endpoint_name, body, accept="application/json",
                             inference_component=inference_component)
    return _parse_answer(response["Body"].read())


def call_endpoint(method: Any, endpoint_name: str, body: bytes, *, accept: str,
                  inference_component: str | None = None) -> dict[str, Any]:
    """`method` (a sagemaker-runtime InvokeEndpoint call) on `body`, checked against the 6 MiB limit before it is
    sent, to `inference_component` if given; botocore's errors become ClientErrors."""
    from botocore.exceptions import ClientError as BotoClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    if len(body) > SAGEMAKER_MAX_BODY_BYTES:
        raise ClientError(
            413, "payload_too_large",
            f"request body is {len(body):,} bytes; SageMaker's InvokeEndpoint accepts at most "
            f"{SAGEMAKER_MAX_BODY_BYTES:,} (6 MiB). Pass the image as an s3:// URI or send a smaller image.",
        )
    target = {"InferenceComponentName": inference_component} if inference_component else {}
    try:
        return method(EndpointName=endpoint_name, Body=body, ContentType="application/json", Accept=accept, **target)
    except BotoClientError as e:
        raise error_from_endpoint(e) from None
    except ReadTimeoutError as e:
        raise ClientError(None, "timeout", f"endpoint {endpoint_name!r} did not answer in time: {e}") from e
    except BotoConnectionError as e:
        raise ClientError(None, "connection_error", f"cannot reach SageMaker runtime: {e}") from e


def error_from_endpoint(e: Any) -> ClientError:
    """botocore's ModelError carries the container's status and body: turn them back into the server's error."""
    response = e.response
    code = response.get("Error", {}).get("Code", "")
    if code == "ModelError" and "OriginalStatusCode" in response:
        return error_from_body(int(response["OriginalStatusCode"]), response.get("OriginalMessage", "").encode())
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = response.get("Error", {}).get("Message", str(e))
    if code == "ModelNotReadyException":
        return ClientError(status, "not_ready", message)
    return ClientError(status, code or "aws_error", message)


def error_from_body(status: int, raw: bytes) -> ClientError:
    """The server's `{"error": {"code", "message"}}` as a ClientError; any other body is kept as the message."""
    try:
        err = json.loads(raw)["error"]
        return ClientError(status, str(err["code"]), str(err.get("message", "")))
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()[:500]
        return ClientError(status, "http_error", text or f"HTTP {status} with an empty body")


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff


def _parse_answer(raw: bytes) -> dict[str, Any]:
    try:
        result = json.loads(raw)
    except ValueError:
        raise ClientError(200, "invalid_response", f"server answered with non-JSON: {raw[:200]!r}") from None
    if not isinstance(result, dict) or not isinstance(result.get("answer"), str):
        raise ClientError(200, "invalid_response", f"server reply has no 'answer' string: {str(result)[:200]}")
    return result


@functools.lru_cache(maxsize=16)
def _runtime_client(region: str | None, profile: str | None, endpoint_url: str | None, timeout: float) -> Any:
    # Cached: building a boto3 client costs ~50 ms; botocore clients are thread-safe.
    from client.aws import make_client

    return make_client("sagemaker-runtime", region=region, profile=profile, endpoint_url=endpoint_url,
                       read_timeout=timeout)
