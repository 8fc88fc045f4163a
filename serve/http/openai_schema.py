"""The OpenAI chat-completions wire contract (`POST /v1/chat/completions`, and `/invocations` bodies that hold
`messages`): the request model, its checks, its conversion into an engine conversation, and the reply bodies.

    {"model": "llava", "messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/chart.png"}},
                                     {"type": "text", "text": "What type of chart is this?"}]}],
     "temperature": 0, "max_tokens": 64, "stop": ["\\n"], "seed": 7,
     "stream": true, "stream_options": {"include_usage": true}}

What LLaVA-1.5 cannot do is a 400 that names the field (`param`), never silently ignored: more than one image,
`n` > 1, tools and functions, logprobs, penalties and `logit_bias`, audio, roles other than
system/developer/user/assistant, content parts other than text and image_url. Unknown fields are refused too.
`response_format` json_object / json_schema is decoded under the schema's grammar (serve.engine.constrained).
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the server's stable codes
(serve/engine/errors.py) in `code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.engine.constrained import schema_from_response_format
from serve.engine.errors import ApiError
from serve.engine.types import GenerationResult
from serve.http.envelope import describe_validation_errors
from serve.http.schema import MAX_QUESTION_CHARS, MAX_STOP_STRINGS, StopStrings

MAX_MESSAGES = 64
# OpenAI's roles -> the chat template's; "developer" is OpenAI's newer name for the system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_PARTS = ("input_audio", "audio_url", "audio")
NO_TOOLS = "tool and function calling is not supported: LLaVA-1.5 was not trained for it"


class ChatError(ApiError):
    """An ApiError that names the request field it is about (OpenAI's `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(code, message)
        self.param = param


def error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error shape; `code` is the server's stable code, the same one /invocations answers with."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": getattr(error, "param", None),
                      "code": error.code}}


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Closed):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted: LLaVA-1.5 sees every image at one resolution


class TextPart(_Closed):
    type: Literal["text"]
    text: str = Field(max_length=MAX_QUESTION_CHARS)


class ImagePart(_Closed):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Closed):
    role: str
    content: str | list[dict[str, Any]] | None = None
    # Defined by OpenAI, refused here when set (_refused_in_message): the template has no names, no tool calls.
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None


class StreamOptions(_Closed):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema's body, read by _json_schema

    type: str


class ChatRequest(_Closed):
    model: str | None = None  # None: the served model
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 means greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: StopStrings = Field(default=None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # the caller's end-user id, for its own records: it does not change the answer
    # Defined by OpenAI, accepted only at the value that asks for nothing (_refusals).
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None


@dataclass(frozen=True)
class ChatCall:
    """A checked chat request, in the engine's terms."""
    model: str | None
    question: str | None  # one user turn of [image,] text: encoded exactly as /invocations encodes a question
    messages: list[dict[str, Any]] | None  # otherwise the conversation, in the chat template's content format
    image_url: str | None
    image_param: str | None  # where the image part is, for errors about it
    temperature: float | None
    top_p: float | None
    max_new_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    json_schema: dict[str, Any] | None = None  # response_format json_schema / json_object, in the engine's form


def parse_chat(payload: Any, *, max_new_tokens: int) -> ChatCall:
    """A JSON value -> ChatCall, or ChatError invalid_request naming the field."""
    if not isinstance(payload, dict):
        raise ChatError("invalid_request", "body must be a JSON object: {\"messages\": [...], ...}")
    try:
        # Strict, as /invocations: JSON has types, so "temperature": "0.5" is the caller's mistake.
        req = ChatRequest.model_validate(payload, strict=True)
    except ValidationError as e:
        raise _validation_error(e) from None
    _refusals(req)
    json_schema = _json_schema(req)
    messages, image_url, image_param = _conversation(req.messages)
    return ChatCall(model=req.model, question=_single_question(messages), messages=messages,
                    image_url=image_url, image_param=image_param, temperature=req.temperature, top_p=req.top_p,
                    max_new_tokens=_max_new_tokens(req, max_new_tokens), stop=tuple(req.stop or ()),
                    seed=None if req.seed is None else req.seed % 2**64, stream=req.stream,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    json_schema=json_schema)


def _validation_error(e: ValidationError, prefix: str = "") -> ChatError:
    errors = [dict(err, msg="not a field this server knows") if err.get("type") == "extra_forbidden" else err
              for err in e.errors()]
    first = errors[0].get("loc", ()) if errors else ()
    param = prefix + ".".join(str(p) for p in first) if first else prefix.rstrip(".") or None
    return ChatError("invalid_request", describe_validation_errors(errors, prefix), param)


def _refusals(req: ChatRequest) -> None:
    """Fields OpenAI defines that ask for what this server cannot do: a 400 each, naming it."""
    refused = [
        ("n", req.n not in (None, 1), "n > 1 is not supported: one answer per request (send several requests; "
                                      "they are batched together)"),
        ("tools", bool(req.tools), NO_TOOLS),
        ("tool_choice", req.tool_choice not in (None, "none"), NO_TOOLS),
        ("functions", bool(req.functions), NO_TOOLS),
        ("function_call", req.function_call not in (None, "none"), NO_TOOLS),
        ("logprobs", bool(req.logprobs), "logprobs are not supported"),
        ("top_logprobs", bool(req.top_logprobs), "top_logprobs are not supported (logprobs are not)"),
        ("presence_penalty", bool(req.presence_penalty), "presence_penalty is not supported; leave it at 0"),
        ("frequency_penalty", bool(req.frequency_penalty), "frequency_penalty is not supported; leave it at 0"),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("modalities", req.modalities not in (None, ["text"]), "the model answers in text only"),
        ("audio", req.audio is not None, "audio output is not supported: the model answers in text only"),
        ("stream_options", req.stream_options is not None and not req.stream,
         "stream_options is only for streamed requests (\"stream\": true)"),
    ]
    for param, asked, message in refused:
        if asked:
            raise ChatError("invalid_request", message, param)


def _json_schema(req: ChatRequest) -> dict[str, Any] | None:
    """JSON answers: the one place `response_format` is read. json_schema / json_object map to the engine's
    constrained decoding (GenerationRequest.json_schema; the schema itself is checked when it is compiled)."""
    if req.response_format is None:
        return None
    try:
        return schema_from_response_format(req.response_format.model_dump())
    except ApiError as e:
        raise ChatError(e.code, e.message, "response_format") from None


def _max_new_tokens(req: ChatRequest, cap: int) -> int | None:
    given = {k: v for k, v in (("max_completion_tokens", req.max_completion_tokens),
                               ("max_tokens", req.max_tokens)) if v is not None}
    if len(set(given.values())) > 1:
        raise ChatError("invalid_request", "max_tokens and max_completion_tokens differ; send one of them",
                        "max_tokens")
    for param, value in given.items():
        if value > cap:
            raise ChatError("invalid_request", f"{param}: {value} is over this server's cap of {cap}", param)
    return next(iter(given.values()), None)


def _conversation(messages: list[Message]) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """OpenAI messages -> (the chat template's messages, the image's URL, where the image part is)."""
    out: list[dict[str, Any]] = []
    image_url = image_param = None
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = _role(message, i)
        content: list[dict[str, Any]] = []
        for k, part in enumerate(_parts(message, where)):
            if isinstance(part, ImagePart):
                if role != "user":
                    raise ChatError("invalid_request", f"{where}: images go in user messages", f"{where}.content.{k}")
                if image_url is not None:
                    raise ChatError("invalid_request", f"{where}.content.{k}: a second image; LLaVA-1.5 reads one "
                                                       "image per conversation", f"{where}.content.{k}")
                image_url, image_param = part.image_url.url, f"{where}.content.{k}.image_url"
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": part.text})
        if not any(p["type"] == "image" or p["text"].strip() for p in content):
            raise ChatError("invalid_request", f"{where}.content is empty", f"{where}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ChatError("invalid_request", "the last message must be the user's: the model answers it",
                        f"messages.{len(out) - 1}.role")
    return out, image_url, image_param


def _role(message: Message, i: int) -> str:
    where = f"messages.{i}"
    if message.role in ("tool", "function"):
        raise ChatError("invalid_request", f"{where}.role: {message.role!r} messages are not supported ({NO_TOOLS})",
                        f"{where}.role")
    if message.role not in ROLES:
        raise ChatError("invalid_request", f"{where}.role: {message.role!r} is not one of "
                                           f"{', '.join(ROLES)}", f"{where}.role")
    for field, value in (("name", message.name), ("tool_calls", message.tool_calls),
                         ("tool_call_id", message.tool_call_id), ("function_call", message.function_call)):
        if value is not None:
            why = "the chat template has no participant names" if field == "name" else NO_TOOLS
            raise ChatError("invalid_request", f"{where}.{field} is not supported: {why}", f"{where}.{field}")
    role = ROLES[message.role]
    if role == "system" and i != 0:
        raise ChatError("invalid_request", f"{where}: a system message may only come first", f"{where}.role")
    return role


def _parts(message: Message, where: str) -> list[TextPart | ImagePart]:
    content = message.content
    if content is None:
        raise ChatError("invalid_request", f"{where}.content is required", f"{where}.content")
    if isinstance(content, str):
        return [TextPart.model_validate({"type": "text", "text": content})]
    parts: list[TextPart | ImagePart] = []
    for k, raw in enumerate(content):
        at = f"{where}.content.{k}"
        kind = raw.get("type")
        model = {"text": TextPart, "image_url": ImagePart}.get(kind)
        if model is None:
            why = ("audio is not supported: LLaVA-1.5 reads text and one image" if kind in AUDIO_PARTS
                   else f"content part type {kind!r} is not supported; use text or image_url")
            raise ChatError("invalid_request", f"{at}: {why}", f"{at}.type")
        try:
            parts.append(model.model_validate(raw, strict=True))
        except ValidationError as e:
            raise _validation_error(e, f"{at}.") from None
    return parts


def _single_question(messages: list[dict[str, Any]]) -> str | None:
    """The question of a conversation that is one user turn of [image,] text, which /invocations would encode the
    same way; None for anything else."""
    if len(messages) != 1:
        return None
    kinds = [p["type"] for p in messages[0]["content"]]
    return messages[0]["content"][-1]["text"] if kinds in (["text"], ["image", "text"]) else None


# ---------------------------------------------------------------------------------------------- replies
def usage_body(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion_body(result: GenerationResult, *, reply_id: str, created: int, model: str) -> dict[str, Any]:
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage_body(result)}


def chunk_body(*, reply_id: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk; `delta` None: the usage chunk, which has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}


def models_body(name: str, created: int, adapters: list[str] = ()) -> dict[str, Any]:
    """The served model, then each loaded LoRA adapter (with `parent`, as vLLM lists LoRA modules)."""
    base = {"id": name, "object": "model", "created": created, "owned_by": "llava-sagemaker"}
    return {"object": "list", "data": [base, *({**base, "id": a, "parent": name} for a in adapters)]}
