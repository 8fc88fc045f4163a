"""JSON-schema answers (serve/engine/constrained.py): every constrained answer parses and validates against its
schema (checked with the `jsonschema` package), on the tiny model, which never writes JSON by itself; constrained
rows leave the other rows of their batch untouched; bad and unsupported schemas are 400s; the wire field, the
stream, the client and the CLI. The grammar engine also runs on a Llama-style (SentencePiece, byte-fallback)
tokenizer like llava-hf's, with logits wider than the vocabulary as LLaVA's lm_head gives."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from PIL import Image
from serve_support import b64_png, png_bytes, running_server, serve_config

from serve.engine.accel import AccelConfig
from serve.engine.constrained import (
    ANY_JSON_OBJECT,
    MAX_SCHEMA_CHARS,
    JsonGrammars,
    mask_logits,
    parse_answer,
    schema_from_response_format,
)
from serve.engine.errors import ApiError
from serve.engine.predictor import Predictor
from serve.engine.types import GenerationRequest, GenerationResult
from serve.http.app import create_app

QUESTION = "What type of chart is this?"
# Schemas the tiny random model can finish within the token budget (strings have a maxLength: nothing else would
# end a random string).
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
SCHEMAS = {
    "object_with_required_props": PERSON,
    "enum": {"enum": ["pie", "bar", "line", "donut"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
              "maxItems": 4},
    "nested": {"type": "object", "additionalProperties": False, "required": ["chart", "ok"],
               "properties": {"chart": {"type": "object", "additionalProperties": False, "required": ["kind"],
                                        "properties": {"kind": {"enum": ["pie", "bar"]},
                                                       "bars": {"type": "integer", "minimum": 1, "maximum": 9}}},
                              "ok": {"type": "boolean"}}},
    "number_range": {"type": "number", "minimum": 0.5, "maximum": 2},
    "integer_range": {"type": "integer", "minimum": 10, "maximum": 20},
}
UNSUPPORTED = [{"not": {"type": "string"}}, {"type": "array", "uniqueItems": True},
               {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
               {"type": "string", "pattern": "(?<=a)b"}]
INVALID = [{"type": "nonsense"}, {"type": "object", "required": "name"}, {"$ref": "#/$defs/missing"},
           {"type": "array", "items": {"type": 7}}]


def image(i: int = 0) -> Image.Image:
    return Image.new("RGB", (40 + 10 * i, 30 + 3 * i), (40 * i % 256, 100, 200 - 30 * i))


def ask(schema=None, i: int = 0, **kw) -> GenerationRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_new_tokens", 64)
    return GenerationRequest(image=image(i), question=QUESTION, json_schema=schema, **kw)


def assert_valid(result, schema) -> object:
    assert isinstance(result, GenerationResult), result
    assert result.finish_reason == "stop", result
    value = json.loads(result.answer)
    jsonschema.validate(value, schema)
    return value


# ---------------------------------------------------------------------------------------------- engine
def test_the_tiny_model_writes_no_json_by_itself(tiny_predictor):
    answers = [r.answer for r in tiny_predictor.predict([ask(None, i) for i in range(3)])]
    assert all(parse_answer(a) is None for a in answers), answers


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_constrained_answers_validate(tiny_predictor, name):
    schema = SCHEMAS[name]
    for i in range(3):  # different images and prompt lengths
        assert_valid(tiny_predictor.predict([ask(schema, i)])[0], schema)


def test_a_batch_mixing_constrained_and_unconstrained_rows(tiny_predictor):
    plain = [ask(None, i) for i in range(3)]
    alone = [tiny_predictor.predict([r])[0] for r in plain]
    schemas = [SCHEMAS["nested"], PERSON, SCHEMAS["array"]]
    constrained_alone = [tiny_predictor.predict([ask(s, 3 + k)])[0] for k, s in enumerate(schemas)]
    rows = [plain[0], ask(schemas[0], 3), plain[1], ask(schemas[1], 4), ask(schemas[2], 5), plain[2]]
    out = tiny_predictor.predict(rows)
    assert [out[0], out[2], out[5]] == alone  # unconstrained rows: the same tokens as alone
    assert [out[1], out[3], out[4]] == constrained_alone  # and constrained rows are batch-independent too
    for result, schema in zip([out[1], out[3], out[4]], schemas, strict=True):
        assert_valid(result, schema)


def test_mask_leaves_unconstrained_rows_bit_for_bit(tiny_predictor):
    import torch

    grammar = tiny_predictor.grammars.compile(PERSON)
    vocab = grammar.vocab_size
    torch.manual_seed(0)
    scores = torch.randn(4, vocab + 64)  # an lm_head wider than the tokenizer, as LLaVA-1.5's 32064 vs 32002
    scores[1, 5] = float("nan")  # whatever an unconstrained row holds comes back as it was
    states = [grammar.start(), None, grammar.start(), None]
    out = mask_logits(scores, states)
    assert torch.equal(out[[1, 3]].view(torch.int32), scores[[1, 3]].view(torch.int32))  # bit patterns: nan too
    assert torch.isinf(out[0, vocab:]).all() and torch.isinf(out[2, vocab:]).all()  # past the vocabulary: never
    allowed = torch.isfinite(out[0])
    open_brace = tiny_predictor.loaded.processor.tokenizer.convert_tokens_to_ids("{")
    assert allowed.nonzero().flatten().tolist() == [open_brace]  # an object starts with "{" and nothing else
    assert int(out[0].argmax()) == open_brace  # greedy: the argmax among allowed tokens
    assert mask_logits(scores, [None] * 4) is scores  # nothing constrained: nothing done
    narrow = scores[:, : vocab - 10]  # a narrower head only keeps the columns it has
    assert mask_logits(narrow, states).shape == narrow.shape


def test_sampled_constrained_rows_validate_and_vary(tiny_predictor):
    import torch

    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        rows = [ask(PERSON, i, temperature=t, top_p=p) for i, (t, p) in enumerate([(1.0, 1.0), (1.5, 0.9),
                                                                                     (0.0, 1.0)])]
        out = tiny_predictor.predict(rows)
        for result in out:
            assert_valid(result, PERSON)
        answers.add(out[0].answer)
        assert out[2] == tiny_predictor.predict([ask(PERSON, 2)])[0]  # the greedy row stays greedy
    assert len(answers) > 1  # sampling samples (among the allowed tokens)


def test_length_cut_leaves_invalid_json_and_stop_strings_still_apply(tiny_predictor):
    cut = tiny_predictor.predict([ask(PERSON, max_new_tokens=4)])[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 4
    assert cut.answer.startswith("{") and parse_answer(cut.answer) is None
    full = tiny_predictor.predict([ask(PERSON)])[0]
    assert_valid(full, PERSON)
    stopped = tiny_predictor.predict([ask(PERSON, stop=['"age"'])])[0]
    assert stopped.finish_reason == "stop" and stopped.answer == full.answer[:full.answer.index('"age"')].strip()
    assert parse_answer(stopped.answer) is None


def test_any_json_object(tiny_predictor):
    result = tiny_predictor.predict([ask(ANY_JSON_OBJECT, max_new_tokens=6)])[0]
    assert result.answer.startswith('{"')  # a random model rarely closes a free-form key: cut by the budget
    assert result.finish_reason == "length"


def test_streamed_constrained_answer(tiny_predictor):
    pieces: list[str] = []
    streamed = tiny_predictor.predict([ask(SCHEMAS["nested"], on_text=pieces.append)])[0]
    assert_valid(streamed, SCHEMAS["nested"])
    assert "".join(pieces) == streamed.answer and len(pieces) > 1
    assert streamed == tiny_predictor.predict([ask(SCHEMAS["nested"])])[0]


@pytest.mark.parametrize("schema", UNSUPPORTED)
def test_unsupported_schema_is_refused(tiny_predictor, schema):
    with pytest.raises(ApiError) as e:
        tiny_predictor.prepare(ask(schema))
    assert e.value.code == "invalid_json_schema" and e.value.status == 400
    assert "cannot enforce" in e.value.message


@pytest.mark.parametrize("schema", [*INVALID, "not an object", ["a"], {"a": float("nan")},
                                    {"enum": ["x" * MAX_SCHEMA_CHARS]}])
def test_invalid_schema_is_refused(tiny_predictor, schema):
    with pytest.raises(ApiError) as e:
        tiny_predictor.prepare(ask(schema))
    assert e.value.code == "invalid_json_schema" and e.value.status == 400


def test_a_bad_schema_fails_its_row_only(tiny_predictor):
    out = tiny_predictor.predict([ask(PERSON), ask({"type": "nonsense"}), ask(None)])
    assert_valid(out[0], PERSON)
    assert isinstance(out[1], ApiError) and out[1].code == "invalid_json_schema"
    assert isinstance(out[2], GenerationResult)


def test_compiled_grammars_are_cached_lru(tiny_loaded):
    grammars = JsonGrammars(tiny_loaded.processor.tokenizer, tiny_loaded.eos_token_ids, cache_size=2)
    a = grammars.compile(PERSON)
    assert grammars.compile(json.loads(json.dumps(PERSON, sort_keys=True))) is a  # same schema, any key order
    b = grammars.compile(SCHEMAS["enum"])
    grammars.compile(PERSON)  # a is now the most recently used
    grammars.compile(SCHEMAS["array"])  # evicts b
    assert grammars.compile(PERSON) is a and grammars.compile(SCHEMAS["enum"]) is not b


def test_the_callers_x_guidance_cannot_loosen_the_grammar(tiny_predictor):
    loose = {**PERSON, "x-guidance": {"whitespace_flexible": True, "lenient": True}}
    assert tiny_predictor.predict([ask(loose)])[0] == tiny_predictor.predict([ask(PERSON)])[0]
    with pytest.raises(ApiError):
        tiny_predictor.prepare(ask({**UNSUPPORTED[0], "x-guidance": {"lenient": True}}))


def test_compiled_decode_path_with_padded_rows(tiny_loaded):
    """The accelerated path (static cache, compiled step; eager backend on CPU) pads 3 rows to a bucket of 4."""
    import torch

    config = AccelConfig(mode="on", compile_backend="eager", compile_mode=None, compile_on_cpu=True,
                         batch_buckets=(1, 4))
    torch._dynamo.reset()
    predictor = Predictor(tiny_loaded, accel=config)
    rows = [ask(PERSON, 0), ask(None, 1), ask(SCHEMAS["array"], 2)]
    out = predictor.predict(rows)
    assert_valid(out[0], PERSON) and assert_valid(out[2], SCHEMAS["array"])
    assert out[1] == Predictor(tiny_loaded).predict([ask(None, 1)])[0]


# ---------------------------------------------------------------------------------------------- OpenAI form
def test_response_format_to_engine_schema():
    assert schema_from_response_format(None) is None
    assert schema_from_response_format({"type": "text"}) is None
    assert schema_from_response_format({"type": "json_object"}) == ANY_JSON_OBJECT
    spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert schema_from_response_format(spec) == PERSON


@pytest.mark.parametrize("bad", ["json_object", {"type": "xml"}, {}, {"type": "json_schema"},
                                 {"type": "json_schema", "json_schema": {"name": "x"}},
                                 {"type": "json_schema", "json_schema": {"schema": "{}"}},
                                 {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}},
                                 {"type": "json_object", "json_schema": {"schema": {}}},
                                 {"type": "text", "other": 1}])
def test_bad_response_format_is_refused(bad):
    with pytest.raises(ApiError) as e:
        schema_from_response_format(bad)
    assert e.value.code == "invalid_request" and "response_format" in e.value.message


# ---------------------------------------------------------------------------------------------- Llama-style
def llama_style_tokenizer():
    """A tokenizer shaped like llava-hf's Llama one: SentencePiece BPE (`▁` word starts via a Prepend/Replace
    normalizer, no pre-tokenizer), byte-fallback tokens <0x00>..<0xFF>, the Replace/ByteFallback/Fuse/Strip decoder,
    special tokens first; trained on the tiny corpus (the real one cannot be downloaded here)."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from demo.tiny import DEFAULT_CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.train_from_iterator(DEFAULT_CORPUS + ['{"name": "Ann", "age": 12, "ok": true}'],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b
                                                            for b in range(256)}
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [dict(a, id=vocab[a["content"]]) for a in spec["added_tokens"]]
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_llama_style_tokenizer_with_a_wider_head(name):
    """Random logits (a stand-in for any model) through mask/sample/accept: the decoded text validates."""
    import torch

    tokenizer = llama_style_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" é", add_special_tokens=False)) == \
        ["\u2581", "\u2581", "<0xC3>", "<0xA9>"]  # byte fallback in use
    grammar = JsonGrammars(tokenizer, [tokenizer.eos_token_id]).compile(SCHEMAS[name])
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        state, tokens = grammar.start(), []
        for _step in range(64):
            scores = torch.randn(1, len(tokenizer) + 64, generator=generator)
            masked = mask_logits(scores, [state])
            token = int(torch.multinomial(masked.softmax(-1), 1, generator=generator))
            if token == tokenizer.eos_token_id:
                break
            assert token < len(tokenizer) and state.accept(token)
            tokens.append(token)
            if state.finished:
                break
        jsonschema.validate(json.loads(tokenizer.decode(tokens, skip_special_tokens=True)), SCHEMAS[name])


# ---------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(tiny_loaded, tiny_artifact):
    app = create_app(serve_config(tiny_artifact, max_new_tokens=64),
                     predictor_factory=lambda: Predictor(tiny_loaded, max_new_tokens_cap=64))
    with running_server(app) as base:
        yield base


def invoke(base, body, **kw):
    return requests.post(base + "/invocations", json=body, timeout=60, **kw)


def body(schema=None, colour=(200, 30, 30), **kw):
    payload = {"image": b64_png(colour=colour), "question": QUESTION, "temperature": 0, "max_new_tokens": 64, **kw}
    if schema is not None:
        payload["json_schema"] = schema
    return payload


@pytest.mark.parametrize("name", ["object_with_required_props", "nested", "enum"])
def test_http_answer_carries_the_parsed_json(server, name):
    schema = SCHEMAS[name]
    reply = invoke(server, body(schema)).json()
    assert reply["finish_reason"] == "stop" and reply["json"] == json.loads(reply["answer"])
    jsonschema.validate(reply["json"], schema)
    assert "json" not in invoke(server, body()).json()  # no schema, no "json"


def test_http_batch_mixes_constrained_and_unconstrained(server):
    alone = [invoke(server, body(colour=(10 * i, 90, 90))).json()["answer"] for i in range(2)]
    batch = invoke(server, {"instances": [body(colour=(0, 90, 90)), body(PERSON, colour=(5, 5, 5)),
                                          body(colour=(10, 90, 90)), body(SCHEMAS["array"], temperature=1.2)]})
    assert batch.status_code == 200, batch.text
    replies = batch.json()
    assert [replies[0]["answer"], replies[2]["answer"]] == alone
    assert "json" not in replies[0] and "json" not in replies[2]
    jsonschema.validate(replies[1]["json"], PERSON)
    jsonschema.validate(replies[3]["json"], SCHEMAS["array"])


def test_http_length_cut_gives_null_json(server):
    reply = invoke(server, body(PERSON, max_new_tokens=3)).json()
    assert reply["finish_reason"] == "length" and reply["json"] is None


def test_http_streamed_constrained_answer(server):
    from client.stream import parse_events

    with invoke(server, body(SCHEMAS["nested"], stream=True), stream=True) as response:
        assert response.status_code == 200
        events = list(parse_events(response.iter_content(chunk_size=7)))
    *deltas, final = events
    assert "".join(e["delta"] for e in deltas) == final["answer"]
    assert final["json"] == json.loads(final["answer"])
    jsonschema.validate(final["json"], SCHEMAS["nested"])


@pytest.mark.parametrize(("schema", "words"), [(UNSUPPORTED[0], "cannot enforce"),
                                               (INVALID[0], "not a valid JSON Schema")])
def test_http_bad_schemas_are_400(server, schema, words):
    response = invoke(server, body(schema))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_json_schema" and words in error["message"]
    batch = invoke(server, {"instances": [body(PERSON), body(schema)]})
    assert batch.status_code == 400 and batch.json()["error"]["message"].startswith("instances.1.json_schema: ")


@pytest.mark.parametrize("schema", ["{}", ["a"], 3])
def test_http_json_schema_must_be_an_object(server, schema):
    response = invoke(server, body(schema))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    assert "json_schema" in response.json()["error"]["message"]


@pytest.mark.parametrize("where", ["query", "custom_attributes"])
def test_http_json_schema_on_a_raw_image_body_is_400(server, where):
    schema = json.dumps(PERSON)
    params = {"question": QUESTION} | ({"json_schema": schema} if where == "query" else {})
    headers = {"Content-Type": "image/png"}
    if where == "custom_attributes":
        from urllib.parse import urlencode

        headers["X-Amzn-SageMaker-Custom-Attributes"] = urlencode({"json_schema": schema})
    response = requests.post(server + "/invocations", data=png_bytes(), params=params, headers=headers, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "JSON bodies only" in error["message"]


# ---------------------------------------------------------------------------------------------- client, CLI
def test_client_predict_returns_the_parsed_object(server):
    from client import predict, predict_full
    from client.invoke import ClientError

    value = predict(png_bytes(), QUESTION, url=server, json_schema=PERSON, temperature=0, max_new_tokens=64)
    jsonschema.validate(value, PERSON)
    full = predict_full(png_bytes(), QUESTION, url=server, json_schema=PERSON, temperature=0, max_new_tokens=64)
    assert full["json"] == value and json.loads(full["answer"]) == value
    assert isinstance(predict(png_bytes(), QUESTION, url=server, max_new_tokens=4), str)
    with pytest.raises(ClientError) as cut:
        predict(png_bytes(), QUESTION, url=server, json_schema=PERSON, max_new_tokens=3)
    assert cut.value.code == "incomplete_json"
    with pytest.raises(ClientError) as bad:
        predict(png_bytes(), QUESTION, url=server, json_schema={"type": "nonsense"}, retries=0)
    assert (bad.value.status, bad.value.code) == (400, "invalid_json_schema")
    with pytest.raises(TypeError):
        predict(png_bytes(), QUESTION, url=server, json_schema='{"type": "object"}')


def test_cli_json_schema_file(server, tmp_path, capsys):
    from client.cli import main

    image_file, schema_file = tmp_path / "chart.png", tmp_path / "person.json"
    image_file.write_bytes(png_bytes())
    schema_file.write_text(json.dumps(PERSON))
    common = ["predict", str(image_file), QUESTION, "--url", server, "--temperature", "0"]
    assert main([*common, "--json-schema", str(schema_file), "--max-new-tokens", "64"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert main([*common, "--json-schema", str(schema_file), "--max-new-tokens", "3"]) == 1
    assert "incomplete_json" in capsys.readouterr().err
    schema_file.write_text("[1, 2]")
    assert main([*common, "--json-schema", str(schema_file)]) == 2  # refused before any request
    assert "must hold a JSON object" in capsys.readouterr().err
    assert main([*common, "--json-schema", str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_constrained_rows_in_a_mixed_batch(tiny_artifact):
    """NF4 on CUDA with the default (compiled, CUDA-graph) decode: constrained rows validate, greedy and sampled,
    and the unconstrained row answers exactly as in the same batch without any schema (same shapes, same kernels:
    only the masks differ)."""
    import torch

    from serve.engine.model import load_artifact

    loaded = load_artifact(tiny_artifact)
    assert loaded.device == "cuda"
    predictor = Predictor(loaded)
    schemas = [PERSON, None, SCHEMAS["nested"], SCHEMAS["array"]]

    def batch(with_schemas: bool):
        torch.manual_seed(0)
        return predictor.predict([ask(s if with_schemas else None, i, temperature=1.0 if i == 2 else 0.0)
                                  for i, s in enumerate(schemas)])

    plain, out = batch(False), batch(True)
    assert out[1] == plain[1]
    for k in (0, 2, 3):
        assert_valid(out[k], schemas[k])
    scores = torch.randn(2, loaded.model.config.text_config.vocab_size + 64, device="cuda")
    masked = mask_logits(scores, [predictor.grammars.compile(PERSON).start(), None])
    assert masked.is_cuda and torch.equal(masked[1], scores[1]) and int(torch.isfinite(masked[0]).sum()) == 1
