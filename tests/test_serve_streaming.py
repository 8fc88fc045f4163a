"""Streamed answers (serve/engine/textstream.py, serve/http/sse.py): what may be shown after each token, the same
answer as unstreamed, the events a real uvicorn sends, and the failures before and after the stream starts."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager

import pytest
import requests
from serve_support import RecordingPredictor, b64_png, free_port, png_bytes, running_server, serve_config

from serve.engine.predictor import Predictor
from serve.engine.textstream import TextStream
from serve.engine.types import GenerationRequest, GenerationResult
from serve.http.app import create_app
from serve.http.sse import event

QUESTION = "What type of chart is this?"


def stream_of(texts: list[str], stop=(), answer: str | None = None) -> list[str]:
    pieces: list[str] = []
    stream = TextStream(stop, pieces.append)
    for text in texts:
        stream.update(text)
    if answer is not None:
        stream.finish(answer)
    return pieces


def test_text_is_shown_once_it_cannot_change():
    # leading whitespace (stripped from the answer) and trailing whitespace (stripped if the answer ends there)
    assert stream_of([" The", " The bar ", " The bar is"], answer="The bar is") == ["The", " bar", " is"]
    # an incomplete UTF-8 character decodes as U+FFFD until its last byte arrives
    assert stream_of(["caf\ufffd", "café"], answer="café") == ["caf", "é"]
    # a tail that could begin a stop string waits; the stop string itself and what follows never show
    assert stream_of(["2021 E", "2021 EN", "2021 END and"], stop=("END",), answer="2021") == ["2021"]
    assert stream_of(["2021 E", "2021 Eh"], stop=("END",), answer="2021 Eh") == ["2021", " Eh"]


def test_a_rewritten_prefix_sends_nothing_more_and_the_answer_stays_the_authority():
    assert stream_of(["a ,", "a, b"], answer="a, b") == ["a ,"]  # the final event carries "a, b"


@pytest.mark.parametrize("stop", [(), ("a",)])
def test_streamed_pieces_are_the_unstreamed_answer(tiny_loaded, stop):
    predictor = Predictor(tiny_loaded)
    image = png_bytes()
    from serve.engine.images import decode_image

    def request(on_text=None):
        return GenerationRequest(image=decode_image(image, 10**7), question=QUESTION, temperature=0,
                                 max_new_tokens=16, stop=stop, on_text=on_text)

    pieces: list[str] = []
    plain = predictor.predict([request()])[0]
    # streamed next to an unstreamed row and a sampled one, in one batch
    streamed, alongside, _ = predictor.predict([request(pieces.append), request(),
                                                GenerationRequest(image=None, question="Hi", temperature=1.0)])
    assert isinstance(streamed, GenerationResult) and streamed == plain == alongside
    assert "".join(pieces) == plain.answer and (len(pieces) > 1 or len(plain.answer) < 4)


def events_of(response) -> list[dict]:
    from client.stream import parse_events

    return list(parse_events(response.iter_content(chunk_size=7)))  # small reads: events split across chunks


@pytest.fixture(scope="module")
def server(tiny_loaded, tiny_artifact):
    recorder = RecordingPredictor(Predictor(tiny_loaded, max_new_tokens_cap=64))
    app = create_app(serve_config(tiny_artifact, max_new_tokens=64), predictor_factory=lambda: recorder)
    with running_server(app) as base:
        yield base


def test_a_streamed_request_gets_server_sent_events_ending_with_the_usual_reply(server):
    body = {"image": b64_png(), "question": QUESTION, "temperature": 0, "max_new_tokens": 16}
    plain = requests.post(server + "/invocations", json=body, timeout=30).json()
    response = requests.post(server + "/invocations", json={**body, "stream": True}, stream=True, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    *deltas, final = events
    assert all(set(e) == {"delta"} for e in deltas) and len(deltas) >= 1
    assert "".join(e["delta"] for e in deltas) == final["answer"] == plain["answer"]
    assert final["usage"] == plain["usage"] and final["finish_reason"] == plain["finish_reason"]
    assert final["latency_ms"] > 0


def test_a_raw_image_body_streams_with_the_query_flag(server):
    response = requests.post(server + "/invocations", data=png_bytes(), stream=True, timeout=30,
                             headers={"Content-Type": "image/png"},
                             params={"question": QUESTION, "stream": "true", "max_new_tokens": "8"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "answer" in events_of(response)[-1]


@pytest.mark.parametrize("body, code", [
    ({"instances": [{"image": b64_png(), "question": QUESTION, "stream": True}]}, "invalid_request"),
    ({"image": b64_png(), "question": QUESTION, "stream": "yes"}, "invalid_request"),
    ({"image": "not an image", "question": QUESTION, "stream": True}, "invalid_image"),
    ({"image": b64_png(), "question": QUESTION, "stream": True, "max_new_tokens": 65}, "invalid_request"),
])
def test_errors_before_the_stream_starts_are_plain_json_with_their_status(server, body, code):
    response = requests.post(server + "/invocations", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == code


class SlowTokens(RecordingPredictor):
    """The real predictor, each streamed piece delayed on the generation thread (a slow GPU), recording requests."""

    def __init__(self, inner, delay_s: float):
        super().__init__(inner)
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []

    def predict(self, requests, on_result=None):
        for r in requests:
            self.requests.append(r)
            if r.on_text is not None:
                r.on_text = self._slowly(r.on_text)
        return super().predict(requests, on_result=on_result)

    def _slowly(self, on_text):
        def slow(text):
            time.sleep(self.delay_s)
            on_text(text)
        return slow


@pytest.fixture
def slow_server_factory(tiny_loaded, tiny_artifact):
    """Servers whose tokens take 0.2 s each, with a given request time budget."""

    @contextmanager
    def start(request_timeout_s: float):
        predictor = SlowTokens(Predictor(tiny_loaded, max_new_tokens_cap=64), delay_s=0.2)
        app = create_app(serve_config(tiny_artifact, request_timeout_s=request_timeout_s),
                         predictor_factory=lambda: predictor)
        with running_server(app) as base:
            yield base, predictor
    return start


@pytest.fixture
def slow_server(slow_server_factory, request):
    with slow_server_factory(request.param) as started:
        yield started


@pytest.mark.parametrize("slow_server", [1.0], indirect=True)
def test_a_time_budget_spent_mid_stream_ends_it_with_an_error_event(slow_server, caplog):
    base, _ = slow_server
    body = {"image": b64_png(), "question": QUESTION, "temperature": 0.8, "max_new_tokens": 64, "stream": True}
    caplog.set_level(logging.WARNING)
    response = requests.post(base + "/invocations", json=body, stream=True, timeout=30,
                             headers={"X-Request-Id": "stream-42"})
    assert response.status_code == 200  # the first piece came within the budget
    events = events_of(response)
    assert "delta" in events[0] and set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "timeout"
    assert not any("answer" in e for e in events)
    assert "request stream-42: the stream ended with timeout" in caplog.text  # the access log only says 200


@pytest.mark.parametrize("slow_server", [60.0], indirect=True)  # the budget is not what stops it
def test_a_client_that_goes_away_stops_its_row(slow_server):
    base, predictor = slow_server
    body = {"image": b64_png(), "question": QUESTION, "temperature": 0.8, "max_new_tokens": 64, "stream": True}
    with requests.post(base + "/invocations", json=body, stream=True, timeout=30) as response:
        next(response.iter_content(chunk_size=1))
    gone = time.monotonic()
    while not predictor.requests[-1].cancelled and time.monotonic() < gone + 5:
        time.sleep(0.05)
    assert predictor.requests[-1].cancelled  # 64 tokens at 0.2 s would take 13 s


def test_event_encoding_keeps_unicode_and_newlines_inside_one_event():
    raw = event({"delta": "a\n\nb é"})
    assert raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
    assert json.loads(raw[len(b"data: "):]) == {"delta": "a\n\nb é"}


def test_concurrent_streams_each_get_their_own_answer(server):
    bodies = [{"image": b64_png(colour=(i * 40, 10, 10)), "question": QUESTION, "temperature": 0,
               "max_new_tokens": 12} for i in range(4)]
    plain = [requests.post(server + "/invocations", json=b, timeout=30).json()["answer"] for b in bodies]
    streamed: list[str | None] = [None] * 4

    def ask(i):
        response = requests.post(server + "/invocations", json={**bodies[i], "stream": True}, stream=True,
                                 timeout=30)
        *deltas, final = events_of(response)
        assert "".join(d["delta"] for d in deltas) == final["answer"]
        streamed[i] = final["answer"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert streamed == plain


def test_the_client_streams_the_same_answer_as_predict(server):
    from client import predict_full, predict_stream

    image = png_bytes(colour=(10, 200, 10))
    plain = predict_full(image, QUESTION, url=server, temperature=0, max_new_tokens=16)
    stream = predict_stream(image, QUESTION, url=server, temperature=0, max_new_tokens=16)
    pieces = list(stream)
    assert "".join(pieces) == stream.answer == plain["answer"] and stream.reply["usage"] == plain["usage"]


def test_client_stream_errors(server, slow_server_factory):
    from client import ClientError, predict_stream

    with pytest.raises(ClientError) as before:  # refused before the stream starts: the server's status and code
        predict_stream(png_bytes(), QUESTION, url=server, max_new_tokens=65)
    assert (before.value.status, before.value.code) == (400, "invalid_request")
    with pytest.raises(ClientError) as refused:
        predict_stream(png_bytes(), QUESTION, url=f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01)
    assert refused.value.code == "connection_error"
    with slow_server_factory(1.0) as (base, _):
        stream = predict_stream(png_bytes(), QUESTION, url=base, temperature=0.8, max_new_tokens=64)
        pieces = []
        with pytest.raises(ClientError) as mid:
            for piece in stream:
                pieces.append(piece)
        assert mid.value.code == "timeout" and pieces and stream.reply is None


def test_events_split_anywhere_parse_the_same():
    from client.stream import parse_events

    raw = event({"delta": "a"}) + event({"delta": "b\n\nc"}) + event({"answer": "ab\n\nc"})
    for size in (1, 2, 5, len(raw)):
        chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
        assert list(parse_events(chunks)) == [{"delta": "a"}, {"delta": "b\n\nc"}, {"answer": "ab\n\nc"}]


def test_the_load_generator_times_the_first_piece_when_streamed(server, tmp_path):
    from bench import load

    assert load.main([server, "--concurrency", "1", "--requests", "6", "--max-new-tokens", "24", "--stream",
                      "--out", str(tmp_path)]) == 0
    [level] = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert level["ok"] == 6 and level["errors"] == 0 and level["output_tokens_per_s"] > 0
    assert level["ttft_p50_ms"] < level["latency_p50_ms"]  # headers came with the first piece, not the answer


def test_a_streaming_callback_that_raises_fails_its_row_only(tiny_loaded, caplog):
    from serve.engine.errors import ApiError

    def broken(_text):
        raise RuntimeError("event loop is closed")

    predictor = Predictor(tiny_loaded)
    rows = [GenerationRequest(image=None, question=QUESTION, temperature=0, max_new_tokens=8, on_text=broken),
            GenerationRequest(image=None, question=QUESTION, temperature=0, max_new_tokens=8)]
    failed, answered = predictor.predict(rows)
    assert isinstance(failed, ApiError) and failed.code == "internal_error"
    assert isinstance(answered, GenerationResult) and answered == predictor.predict(rows[1:])[0]
    assert "streaming callback failed" in caplog.text


# ---- InvokeEndpointWithResponseStream: moto has none, so a loopback stand-in for the SageMaker runtime forwards
# to the real server and answers in AWS's event-stream framing, which real botocore then parses ----


def event_stream_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One message of AWS's event-stream encoding: prelude (lengths + CRC), string headers, payload, CRC."""
    import struct
    import zlib

    raw_headers = b"".join(bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
                           for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(raw_headers) + len(payload) + 4, len(raw_headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


class StreamingRuntime:
    """POST /endpoints/NAME/invocations-response-stream -> the server's /invocations. A container error comes back
    as SageMaker's 424 ModelError; a 200 as PayloadPart events of the body's bytes as they arrive. The endpoint
    name `broken` ends the stream with SageMaker's own ModelStreamError after the first part."""

    def __init__(self, target: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.forward(self, self.path.split("/")[2], body)

        self.target = target
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, handler, endpoint: str, body: bytes) -> None:
        upstream = requests.post(self.target + "/invocations", data=body, stream=True, timeout=30,
                                 headers={"Content-Type": "application/json"})
        if upstream.status_code != 200:
            error = json.dumps({"Message": "Received client error", "OriginalStatusCode": upstream.status_code,
                                "OriginalMessage": upstream.text}).encode()
            handler.send_response(424)
            handler.send_header("x-amzn-ErrorType", "ModelError:http://internal.amazon.com/coral/")
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(error)))
            handler.end_headers()
            handler.wfile.write(error)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/vnd.amazon.eventstream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for chunk in upstream.iter_content(chunk_size=None):
            handler.wfile.write(event_stream_frame({":message-type": "event", ":event-type": "PayloadPart",
                                                    ":content-type": "application/octet-stream"}, chunk))
            handler.wfile.flush()
            if endpoint == "broken":
                handler.wfile.write(event_stream_frame(
                    {":message-type": "exception", ":exception-type": "ModelStreamError",
                     ":content-type": "application/json"},
                    json.dumps({"Message": "the model's stream broke", "ErrorCode": "StreamBroken"}).encode()))
                break
        handler.close_connection = True


@pytest.fixture
def runtime(server, moto_server):  # moto_server: for its dummy credentials and region
    stand_in = StreamingRuntime(server)
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def test_an_endpoint_streams_through_invoke_endpoint_with_response_stream(server, runtime):
    from client import ClientError, predict_full, predict_stream

    image = png_bytes(colour=(90, 90, 200))
    plain = predict_full(image, QUESTION, url=server, temperature=0, max_new_tokens=16)
    stream = predict_stream(image, QUESTION, endpoint_name="chart-qa", endpoint_url=runtime.url,
                            region="us-east-1", temperature=0, max_new_tokens=16)
    assert "".join(stream) == stream.answer == plain["answer"]

    with pytest.raises(ClientError) as refused:  # the container's 400, carried by SageMaker's ModelError
        predict_stream(image, QUESTION, endpoint_name="chart-qa", endpoint_url=runtime.url, region="us-east-1",
                       max_new_tokens=65)
    assert (refused.value.status, refused.value.code) == (400, "invalid_request")

    broken = predict_stream(image, QUESTION, endpoint_name="broken", endpoint_url=runtime.url, region="us-east-1",
                            max_new_tokens=16)
    with pytest.raises(ClientError) as mid:
        list(broken)
    assert mid.value.code == "ModelStreamError" and "stream broke" in mid.value.message
