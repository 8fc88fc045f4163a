"""OpenAI-compatible chat (serve/http/openai.py, serve/http/openai_schema.py) on the real tiny model: the engine's
conversations (encode_messages) and per-request seeds; the official `openai` client against a real uvicorn (plain,
streamed with usage, images by URL and data URI, system message + multi-turn, every refusal in OpenAI's error
shape, /v1/models); greedy chat answers equal /invocations' answers; /invocations with `messages`, and
/invocations bodies that come without a usable Content-Type."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network

import openai
import pytest
import requests
from serve_support import RecordingPredictor, b64_png, png_bytes, running_server, serve_config, wait_ready

from serve.engine.errors import ApiError
from serve.engine.images import decode_image
from serve.engine.predictor import Predictor
from serve.engine.types import GenerationRequest, GenerationResult
from serve.http.app import create_app

IMAGE_HOST = "127.0.0.4"  # a loopback address of its own, so the allow-list names exactly it
PAYLOAD_CAP = 64 * 1024
QUESTION = "What type of chart is this?"
MODEL = "chart-llava"


CHART_SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["bar", "line", "pie"]},
                                                "bars": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["kind", "bars"], "additionalProperties": False}


def data_uri(image: bytes = b"") -> str:
    return "data:image/png;base64," + base64.b64encode(image or png_bytes()).decode()


def user(text: str, image: str | None = None, *, image_first: bool = True) -> dict:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        picture = {"type": "image_url", "image_url": {"url": image}}
        parts = [picture, *parts] if image_first else [*parts, picture]
    return {"role": "user", "content": parts}


# ------------------------------------------------------------------------------------------------ engine
def test_a_single_turn_conversation_encodes_exactly_as_a_question(tiny_predictor):
    encoder, image = tiny_predictor.encoder, decode_image(png_bytes(), 10**7)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    for picture, messages in ((image, turn), (None, [{"role": "user", "content": QUESTION}])):
        ours, reference = encoder.encode_messages(messages, picture), encoder.encode(QUESTION, picture)
        assert set(ours) == set(reference)
        assert all(bool((ours[k] == reference[k]).all()) for k in ours)


def test_a_conversation_renders_with_the_model_dirs_template(tiny_predictor):
    encoder = tiny_predictor.encoder
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which kind?"}]}]
    prompt = encoder.render_messages(messages)
    assert prompt == encoder.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.index("Answer in one word.") < prompt.index("What is it?") < prompt.index("A chart.") \
        < prompt.index("Which kind?") and prompt.count(encoder.image_token) == 1
    image = decode_image(png_bytes(), 10**7)
    ours, reference = encoder.encode_messages(messages, image), encoder.processor_encode(prompt, image)
    assert set(ours) == set(reference) and all(bool((ours[k] == reference[k]).all()) for k in ours)


@pytest.mark.parametrize("messages, image, words", [
    ([{"role": "user", "content": "what is <image>?"}], None, "image placeholder"),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], None, "exactly one image"),
    ([{"role": "user", "content": "q"}], "image", "exactly one image"),
])
def test_encode_messages_refusals(tiny_predictor, messages, image, words):
    picture = decode_image(png_bytes(), 10**7) if image else None
    with pytest.raises(ApiError, match=words):
        tiny_predictor.encoder.encode_messages(messages, picture)


def sampled(seed: int | None, question: str = QUESTION) -> GenerationRequest:
    return GenerationRequest(image=decode_image(png_bytes(), 10**7), question=question, temperature=1.0,
                             max_new_tokens=12, seed=seed)


def test_a_seed_repeats_a_sampled_answer_alone_or_batched(tiny_predictor):
    [alone] = tiny_predictor.predict([sampled(7)])
    [again] = tiny_predictor.predict([sampled(7)])
    _, batched, _ = tiny_predictor.predict([sampled(None), sampled(7), sampled(3, "Which category is largest?")])
    assert isinstance(alone, GenerationResult) and alone.answer == again.answer == batched.answer
    answers = {tiny_predictor.predict([sampled(seed)])[0].answer for seed in range(6)}
    assert len(answers) > 1  # the seed, not something fixed, decides the draws


def test_a_seed_does_not_change_a_greedy_answer(tiny_predictor):
    greedy = GenerationRequest(image=decode_image(png_bytes(), 10**7), question=QUESTION, temperature=0,
                               max_new_tokens=12)
    seeded = GenerationRequest(image=greedy.image, question=QUESTION, temperature=0, max_new_tokens=12, seed=5)
    assert tiny_predictor.predict([greedy])[0] == tiny_predictor.predict([seeded, sampled(1)])[0]


# ------------------------------------------------------------------------------------------------ server
class _Images(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = png_bytes()
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


@pytest.fixture(scope="module")
def server(tiny_loaded, tiny_artifact):
    cfg = serve_config(tiny_artifact, model_name=MODEL, max_new_tokens=64, max_payload_bytes=PAYLOAD_CAP,
                       max_image_pixels=40_000, fetch_allow_networks=(ip_network(IMAGE_HOST),))
    app = create_app(cfg, predictor_factory=lambda: Predictor(tiny_loaded, max_new_tokens_cap=64))
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def invocations_answer(server: str, **fields) -> dict:
    body = {"image": b64_png(), "question": QUESTION, "temperature": 0, "max_new_tokens": 16, **fields}
    response = requests.post(server + "/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_chat_answers_equal_invocations_answers(client, server):
    reference = invocations_answer(server)
    reply = client.chat.completions.create(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=0,
                                           max_tokens=16)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    assert reply.created > 0 and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reference["answer"]
    assert choice.finish_reason == reference["finish_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == tuple(reference["usage"].values())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # max_completion_tokens, a plain-string stop and response_format text are the same request
    same = client.chat.completions.create(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=0,
                                          max_completion_tokens=16, stop="zzzz", response_format={"type": "text"})
    assert same.choices[0].message.content == reference["answer"]


def test_response_format_json_schema_answers_follow_the_schema(client):
    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "chart", "strict": True, "schema": CHART_SCHEMA}}
    kwargs = dict(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=0, max_tokens=64,
                  response_format=response_format)
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), CHART_SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True))
    assert streamed == reply.choices[0].message.content


def test_response_format_json_object_answers_an_object(client):
    """Any JSON object: the tiny model may keep adding keys until max_tokens, so a complete answer must parse and a
    cut one must still be the start of an object."""
    reply = client.chat.completions.create(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=0,
                                           max_tokens=64, response_format={"type": "json_object"})
    text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text.startswith("{") and reason in ("stop", "length")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_an_image_by_url_answers_as_the_same_image_inline(client, server, image_url):
    by_url = client.chat.completions.create(model=MODEL, messages=[user(QUESTION, image_url)], temperature=0,
                                            max_tokens=16)
    assert by_url.choices[0].message.content == invocations_answer(server)["answer"]


def test_a_streamed_answer_comes_in_chunks_with_usage_at_the_end(client):
    kwargs = dict(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=0, max_tokens=16)
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *answer_chunks, usage_chunk = chunks
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    assert answer_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in answer_chunks) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in answer_chunks][-1] == plain.choices[0].finish_reason
    assert all(c.usage is None for c in answer_chunks) and usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == plain.usage.model_dump()
    without_usage = list(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.choices and c.usage is None for c in without_usage)


def test_the_stream_is_server_sent_events_ending_with_done(server):
    body = {"messages": [user(QUESTION, data_uri())], "temperature": 0, "max_tokens": 8, "stream": True}
    response = requests.post(server + "/v1/chat/completions", json=body, stream=True, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and all(line.startswith(b"data: ") for line in lines)


def test_a_system_message_and_earlier_turns_reach_the_prompt(client, tiny_predictor):
    history = [{"role": "system", "content": "Answer in one word."}, user(QUESTION, data_uri()),
               {"role": "assistant", "content": "Bar."}, user("And its colour?")]
    one = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=8)
    two = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=8)
    assert one.choices[0].message.content == two.choices[0].message.content
    template = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Bar."}]},
                {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
    encoded = tiny_predictor.encoder.encode_messages(template, decode_image(png_bytes(), 10**7))
    assert one.usage.prompt_tokens == encoded["input_ids"].shape[1]  # the whole conversation, as the template has it
    developer = client.chat.completions.create(model=MODEL, messages=[{**history[0], "role": "developer"},
                                                                      *history[1:]], temperature=0, max_tokens=8)
    assert developer.choices[0].message.content == one.choices[0].message.content
    after = client.chat.completions.create(model=MODEL, messages=[user(QUESTION, data_uri(), image_first=False)],
                                           temperature=0, max_tokens=8)
    assert after.choices[0].finish_reason in ("stop", "length")  # an image after the text: the template places it


def test_a_seed_repeats_a_sampled_chat_answer(client):
    kwargs = dict(model=MODEL, messages=[user(QUESTION, data_uri())], temperature=1.0, max_tokens=12)
    first, second = (client.chat.completions.create(**kwargs, seed=42).choices[0].message.content for _ in range(2))
    assert first == second


def test_models_lists_the_served_model_and_the_model_dir_path_names_it_too(client, server, tiny_artifact):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    reply = requests.post(server + "/v1/chat/completions", timeout=60,
                          json={"model": tiny_artifact, "messages": [user(QUESTION)], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["model"] == MODEL


def test_without_a_model_name_the_model_dirs_name_is_served(tiny_loaded, tiny_artifact):
    from fastapi.testclient import TestClient

    app = create_app(serve_config(tiny_artifact), predictor_factory=lambda: Predictor(tiny_loaded))
    with TestClient(app) as local:
        assert local.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[user(QUESTION)])
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model=MODEL, messages=[user(QUESTION, data_uri())], n=2)
    assert two.value.code == "invalid_request" and two.value.param == "n" and "n > 1" in two.value.message
    with pytest.raises(openai.BadRequestError) as streamed:  # refused before the stream starts: a plain 400
        list(client.chat.completions.create(model=MODEL, messages=[user(QUESTION)], stream=True, max_tokens=65))
    assert streamed.value.param == "max_tokens"


TWO_IMAGES = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri()}},
                                          {"type": "image_url", "image_url": {"url": data_uri()}},
                                          {"type": "text", "text": QUESTION}]}
AUDIO = {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
GOOD = {"model": MODEL, "messages": [user(QUESTION)]}
REFUSED = {  # body -> (status, code, param, words in the message)
    "two images": ({**GOOD, "messages": [TWO_IMAGES]}, 400, "invalid_request", "messages.0.content.1", "one image"),
    "images in two turns": ({**GOOD, "messages": [user("a", data_uri()), {"role": "assistant", "content": "b"},
                                                  user("c", data_uri())]}, 400, "invalid_request",
                            "messages.2.content.0", "one image"),
    "n": ({**GOOD, "n": 3}, 400, "invalid_request", "n", "n > 1"),
    "tools": ({**GOOD, "tools": [TOOL]}, 400, "invalid_request", "tools", "tool"),
    "tool_choice": ({**GOOD, "tool_choice": "auto"}, 400, "invalid_request", "tool_choice", "tool"),
    "functions": ({**GOOD, "functions": [TOOL["function"]]}, 400, "invalid_request", "functions", "function"),
    "tool message": ({**GOOD, "messages": [user(QUESTION), {"role": "tool", "content": "x", "tool_call_id": "1"}]},
                     400, "invalid_request", "messages.1.role", "tool"),
    "logprobs": ({**GOOD, "logprobs": True}, 400, "invalid_request", "logprobs", "logprobs"),
    "top_logprobs": ({**GOOD, "top_logprobs": 2}, 400, "invalid_request", "top_logprobs", "logprobs"),
    "penalty": ({**GOOD, "presence_penalty": 0.5}, 400, "invalid_request", "presence_penalty", "not supported"),
    "logit_bias": ({**GOOD, "logit_bias": {"5": 10}}, 400, "invalid_request", "logit_bias", "not supported"),
    "audio part": ({**GOOD, "messages": [AUDIO]}, 400, "invalid_request", "messages.0.content.1.type", "audio"),
    "audio output": ({**GOOD, "modalities": ["text", "audio"]}, 400, "invalid_request", "modalities", "text"),
    "unknown role": ({**GOOD, "messages": [{"role": "critic", "content": "x"}]}, 400, "invalid_request",
                     "messages.0.role", "critic"),
    "unknown part": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]},
                     400, "invalid_request", "messages.0.content.0.type", "video_url"),
    "response_format type": ({**GOOD, "response_format": {"type": "yaml"}}, 400, "invalid_request",
                             "response_format", "yaml"),
    "json_schema without a schema": ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
                                     400, "invalid_request", "response_format", "schema"),
    "invalid json_schema": ({**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}}},
        400, "invalid_json_schema", None, ""),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model_not_found", "model", "gpt-4o"),
    "unknown field": ({**GOOD, "reasoning_effort": "low"}, 400, "invalid_request", "reasoning_effort",
                      "not a field"),
    "participant name": ({**GOOD, "messages": [{**user(QUESTION), "name": "ann"}]}, 400, "invalid_request",
                         "messages.0.name", "names"),
    "no messages": ({**GOOD, "messages": []}, 400, "invalid_request", "messages", "at least 1"),
    "assistant last": ({**GOOD, "messages": [user(QUESTION), {"role": "assistant", "content": "x"}]}, 400,
                       "invalid_request", "messages.1.role", "last message"),
    "system not first": ({**GOOD, "messages": [user(QUESTION), {"role": "system", "content": "x"}, user("y")]}, 400,
                         "invalid_request", "messages.1.role", "first"),
    "image from the assistant": ({**GOOD, "messages": [
        user("a"), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_uri()}}]},
        user("b")]}, 400, "invalid_request", "messages.1.content.0", "user messages"),
    "empty content": ({**GOOD, "messages": [user("   ")]}, 400, "invalid_request", "messages.0.content", "empty"),
    "null content": ({**GOOD, "messages": [{"role": "user", "content": None}]}, 400, "invalid_request",
                     "messages.0.content", "required"),
    "image placeholder": ({**GOOD, "messages": [user("what is <image>?")]}, 400, "invalid_request", None,
                          "placeholder"),
    "temperature": ({**GOOD, "temperature": 2.5}, 400, "invalid_request", "temperature", "less than or equal"),
    "temperature a string": ({**GOOD, "temperature": "0"}, 400, "invalid_request", "temperature", "number"),
    "max_tokens over cap": ({**GOOD, "max_tokens": 65}, 400, "invalid_request", "max_tokens", "cap of 64"),
    "max tokens disagree": ({**GOOD, "max_tokens": 5, "max_completion_tokens": 6}, 400, "invalid_request",
                            "max_tokens", "differ"),
    "stream_options alone": ({**GOOD, "stream_options": {"include_usage": True}}, 400, "invalid_request",
                             "stream_options", "stream"),
    "bad image": ({**GOOD, "messages": [user(QUESTION, "data:image/png;base64,%%%")]}, 400, "invalid_image",
                  "messages.0.content.0.image_url", "base64"),
    "image too large": ({**GOOD, "messages": [user(QUESTION, data_uri(png_bytes((250, 200))))]}, 400,
                        "image_too_large", "messages.0.content.0.image_url", "pixels"),
    "loopback url": ({**GOOD, "messages": [user(QUESTION, "http://127.0.0.1:9/a.png")]}, 400, "url_not_allowed",
                     "messages.0.content.0.image_url", "non-public"),
    "file url": ({**GOOD, "messages": [user(QUESTION, "file:///etc/passwd")]}, 400, "url_not_allowed",
                 "messages.0.content.0.image_url", "scheme"),
    "not an object": ([GOOD], 400, "invalid_request", None, "JSON object"),
}


def assert_openai_error(response, status: int, code: str, param: str | None = None, words: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param and words in error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_llava_cannot_do_is_a_clear_error(server, case):
    body, status, code, param, words = REFUSED[case]
    assert_openai_error(requests.post(server + "/v1/chat/completions", json=body, timeout=60),
                        status, code, param, words)


@pytest.mark.parametrize("body, headers, status, code", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b'{"messages": [], "temperature": NaN}', {"Content-Type": "application/json"}, 400, "invalid_json"),
    (b"{" + b" " * PAYLOAD_CAP + b"}", {"Content-Type": "application/json"}, 413, "payload_too_large"),
    (json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (json.dumps(GOOD).encode(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
])
def test_body_errors_have_the_openai_shape(server, body, headers, status, code):
    response = requests.post(server + "/v1/chat/completions", data=body, headers=headers, timeout=60)
    assert_openai_error(response, status, code)


def test_a_json_body_without_a_content_type_is_read_as_json(server):
    response = requests.post(server + "/v1/chat/completions", data=json.dumps({**GOOD, "max_tokens": 4}),
                             timeout=60)
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


def test_not_ready_is_a_503_in_the_openai_shape(tiny_loaded, tiny_artifact):
    from fastapi.testclient import TestClient

    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return Predictor(tiny_loaded)

    with TestClient(create_app(serve_config(tiny_artifact), predictor_factory=slow_factory)) as local:
        assert_openai_error(local.post("/v1/chat/completions", json=GOOD), 503, "not_ready", None, "loading")
        release.set()
        wait_ready(local.get)


class SlowTokens(RecordingPredictor):
    """The real predictor, each streamed piece delayed on the generation thread (a slow GPU)."""

    def predict(self, requests, on_result=None):
        for r in requests:
            if r.on_text is not None:
                r.on_text = self._slowly(r.on_text)
        return super().predict(requests, on_result=on_result)

    @staticmethod
    def _slowly(on_text):
        def slow(text):
            time.sleep(0.2)
            on_text(text)
        return slow


def test_a_failure_after_the_stream_started_is_an_error_event_then_done(tiny_loaded, tiny_artifact):
    predictor = SlowTokens(Predictor(tiny_loaded, max_new_tokens_cap=64))
    app = create_app(serve_config(tiny_artifact, request_timeout_s=2.0), predictor_factory=lambda: predictor)
    body = {"messages": [user(QUESTION, data_uri())], "temperature": 0.8, "max_tokens": 32}

    def long_answer(seed: int) -> bool:  # unstreamed answers are not slowed
        reply = requests.post(base + "/v1/chat/completions", json={**body, "seed": seed}, timeout=30)
        return reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 15

    with running_server(app) as base:
        # a seed whose answer takes more than the budget at 0.2 s a piece
        body["seed"] = next(seed for seed in range(50) if long_answer(seed))
        body["stream"] = True
        response = requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=30)
        assert response.status_code == 200  # the first piece came within the budget
        *_, error, done = [line for line in response.iter_lines() if line]
        assert done == b"data: [DONE]" and json.loads(error[len(b"data: "):])["error"]["code"] == "timeout"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError) as failed:
            list(client.chat.completions.create(model="tiny", **{k: v for k, v in body.items() if k != "stream"},
                                                stream=True))
        assert failed.value.code == "timeout"


# ------------------------------------------------------------------------------------------------ /invocations
def test_invocations_with_messages_is_a_chat_completion(server):
    reference = invocations_answer(server)
    body = {"messages": [user(QUESTION, data_uri())], "temperature": 0, "max_tokens": 16}
    reply = requests.post(server + "/invocations", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
    assert reply.json()["choices"][0]["message"]["content"] == reference["answer"]
    streamed = requests.post(server + "/invocations", json={**body, "stream": True}, stream=True, timeout=60)
    lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]]
    assert "".join(deltas) == reference["answer"]
    assert_openai_error(requests.post(server + "/invocations", json={**body, "n": 2}, timeout=60),
                        400, "invalid_request", "n", "n > 1")
    assert_openai_error(requests.post(server + "/invocations", json={**body, "model": "other"}, timeout=60),
                        404, "model_not_found", "model")


def jpeg_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def webp_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


@pytest.mark.parametrize("content_type", [None, "application/octet-stream"])
def test_invocations_judges_a_body_without_a_content_type_by_its_bytes(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    reference = invocations_answer(server)
    as_json = requests.post(server + "/invocations", headers=headers, timeout=60,
                            data=json.dumps({"image": b64_png(), "question": QUESTION, "temperature": 0,
                                             "max_new_tokens": 16}))
    assert as_json.status_code == 200 and as_json.json()["answer"] == reference["answer"]
    chat = requests.post(server + "/invocations", headers=headers, timeout=60,
                         data=json.dumps({"messages": [user(QUESTION)], "max_tokens": 4}))
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    params = {"question": QUESTION, "temperature": "0", "max_new_tokens": "16"}
    for image in (png_bytes(), jpeg_bytes(), webp_bytes()):
        raw = requests.post(server + "/invocations", data=image, headers=headers, params=params, timeout=60)
        assert raw.status_code == 200, raw.text
    assert requests.post(server + "/invocations", data=png_bytes(), headers=headers, params=params,
                         timeout=60).json()["answer"] == reference["answer"]
    for junk in (b"hello", b"[1, 2]", b"GIF89a....", b""):
        refused = requests.post(server + "/invocations", data=junk, headers=headers, timeout=60)
        assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"
