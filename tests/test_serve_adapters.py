"""LoRA adapters on one server, through a real uvicorn on the real tiny model, with two adapters that our own training
job made: loaded at start-up (`<model dir>/adapters/one/`) and at run time (`POST /adapters`); chosen per request by
SageMaker's header or the body's `adapter` field; answers that differ from each other and from the base; a mixed
batch (instances, concurrent requests) that answers each row as its adapter alone does; every bad adapter refused
with its code, leaving the server as it was; unload while requests are in flight; eviction (count, memory, pins);
/ping while a load waits for a running batch. Engine-level checks (the registry on the shared tiny model) at the end.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from adapter_support import BAD_ADAPTERS, QUESTION, bad_adapter, copy_adapter
from serve_support import RecordingPredictor, SlowPredictor, b64_png, png_bytes, running_server, serve_config

from serve.engine.errors import ApiError
from serve.http.app import create_app, default_predictor_factory

IDENTIFIER = "X-Amzn-SageMaker-Adapter-Identifier"
ALIAS = "X-Amzn-SageMaker-Adapter-Alias"
IMAGE = b64_png((48, 40), (40, 160, 90))
OTHER_IMAGE = b64_png((30, 60), (230, 200, 20))


def ask(base: str, adapter: str | None = None, *, via: str = "body", image: str = IMAGE, **extra):
    payload = {"image": image, "question": QUESTION, "temperature": 0, "max_new_tokens": 12, **extra}
    headers = {"Content-Type": "application/json"}
    if adapter is not None and via == "body":
        payload["adapter"] = adapter
    elif adapter is not None:
        headers[IDENTIFIER if via == "header" else ALIAS] = adapter
    return requests.post(base + "/invocations", data=json.dumps(payload), headers=headers, timeout=120)


def answer(base: str, adapter: str | None = None, **kw) -> str:
    reply = ask(base, adapter, **kw)
    assert reply.status_code == 200, reply.text
    return reply.json()["answer"]


def listed(base: str) -> dict[str, dict]:
    reply = requests.get(base + "/adapters", timeout=30)
    assert reply.status_code == 200, reply.text
    return {a["name"]: a for a in reply.json()["adapters"]}


def register(base: str, name: str, src, **extra) -> requests.Response:
    return requests.post(base + "/adapters", json={"name": name, "src": str(src), **extra}, timeout=120)


def served_dir(tmp_path_factory, tiny_artifact, trained_adapters, *start_up: str) -> Path:
    """A copy of the tiny base with the named adapters in its adapters/ folder."""
    model_dir = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_artifact, model_dir)
    for name in start_up:
        copy_adapter(trained_adapters[name], model_dir / "adapters" / name)
    return model_dir


def start(model_dir: Path, trained_adapters, wrap=RecordingPredictor, **overrides):
    cfg = serve_config(str(model_dir), adapter_roots=(model_dir, trained_adapters["root"]), max_new_tokens=64,
                       adapter_s3_buckets=("lora-adapters",), adapter_cache_dir=model_dir.parent / "cache",
                       **overrides)
    build = default_predictor_factory(cfg)
    holder = {}

    def factory():
        holder["predictor"] = wrap(build())
        return holder["predictor"]

    return create_app(cfg, predictor_factory=factory), holder


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_artifact, trained_adapters):
    """One server: adapter `one` from its model dir at start-up, `two` registered at run time; the reference answers
    of the base and of each adapter alone."""
    model_dir = served_dir(tmp_path_factory, tiny_artifact, trained_adapters, "one")
    app, holder = start(model_dir, trained_adapters)
    with running_server(app) as base:
        assert set(listed(base)) == {"one"} and listed(base)["one"]["resident"]
        reply = register(base, "two", trained_adapters["two"])
        assert reply.status_code == 200, reply.text
        answers = {name: answer(base, name) for name in (None, "one", "two")}
        other = {name: answer(base, name, image=OTHER_IMAGE) for name in (None, "one", "two")}
        yield {"base": base, "answers": answers, "other_image": other, "predictor": holder["predictor"],
               "registry": holder["predictor"].adapters, "model_dir": model_dir}


def test_adapters_answer_differently_from_each_other_and_from_the_base(served):
    both = {name: (served["answers"][name], served["other_image"][name]) for name in (None, "one", "two")}
    assert len(set(both.values())) == 3, both  # on one image or the other, each pair answers differently
    assert listed(served["base"])["two"]["resident"] and listed(served["base"])["two"]["rank"] == 8


def test_the_header_the_alias_and_the_body_field_pick_the_same_adapter(served):
    base, answers = served["base"], served["answers"]
    assert answer(base, "one", via="header") == answer(base, "one", via="alias") == answers["one"]
    raw = requests.post(base + "/invocations", params={"question": QUESTION, "temperature": "0",
                                                       "max_new_tokens": "12"},
                        data=png_bytes((48, 40), (40, 160, 90)), headers={"Content-Type": "image/png",
                                                                           IDENTIFIER: "two"}, timeout=60)
    assert raw.status_code == 200 and raw.json()["answer"] == answers["two"]


def test_a_mixed_batch_answers_each_row_as_its_adapter_alone(served):
    base, answers, other = served["base"], served["answers"], served["other_image"]
    rows = ["one", None, "two", "one", None, "two"]
    instances = [{"image": IMAGE, "question": QUESTION, "temperature": 0, "max_new_tokens": 12,
                  **({"adapter": a} if a else {})} for a in rows]
    sizes_before = len(served["predictor"].batch_sizes)
    reply = requests.post(base + "/invocations", json={"instances": instances}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert [r["answer"] for r in reply.json()] == [answers[a] for a in rows]
    assert 6 in served["predictor"].batch_sizes[sizes_before:]  # one generate call for all six rows
    asked = [(a, image) for a in ("one", None, "two") for image in (IMAGE, OTHER_IMAGE)]
    sizes_before = len(served["predictor"].batch_sizes)
    with ThreadPoolExecutor(6) as pool:  # separate requests, batched together by the server
        got = list(pool.map(lambda a: answer(base, a[0], image=a[1]), asked))
    assert got == [(answers if image == IMAGE else other)[a] for a, image in asked]
    assert max(served["predictor"].batch_sizes[sizes_before:]) > 1


def test_a_streamed_answer_uses_its_adapter(served):
    reply = requests.post(served["base"] + "/invocations", stream=True, timeout=60,
                          json={"image": IMAGE, "question": QUESTION, "temperature": 0, "max_new_tokens": 12,
                                "stream": True}, headers={IDENTIFIER: "two"})
    events = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["answer"] == "".join(e.get("delta", "") for e in events[:-1]) == served["answers"]["two"]


@pytest.mark.parametrize("body, headers, status, code", [
    ({"adapter": "nope"}, {}, 404, "adapter_not_found"),
    ({}, {IDENTIFIER: "nope"}, 404, "adapter_not_found"),
    ({"adapter": "one"}, {IDENTIFIER: "two"}, 400, "invalid_request"),
    ({"adapter": ""}, {}, 400, "invalid_request"),
    ({"instances": [{"image": IMAGE, "question": QUESTION}, {"image": IMAGE, "question": QUESTION,
                                                             "adapter": "nope"}]}, {}, 404, "adapter_not_found"),
])
def test_requests_naming_no_loaded_adapter(served, body, headers, status, code):
    payload = body if "instances" in body else {"image": IMAGE, "question": QUESTION, **body}
    reply = requests.post(served["base"] + "/invocations", json=payload, headers=headers, timeout=60)
    assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text


@pytest.mark.parametrize("kind", sorted(BAD_ADAPTERS))
def test_a_bad_adapter_is_refused_and_changes_nothing(served, trained_adapters, tmp_path, kind):
    base = served["base"]
    before = listed(base)
    folder = bad_adapter(kind, trained_adapters["one"], tmp_path)
    inside = copy_adapter(folder, trained_adapters["root"] / f"bad-{kind}-{time.monotonic_ns()}")
    reply = register(base, "bad", inside)
    assert (reply.status_code, reply.json()["error"]["code"]) == BAD_ADAPTERS[kind], reply.text
    assert listed(base) == before
    assert {a: answer(base, a) for a in (None, "one", "two")} == served["answers"]


@pytest.mark.parametrize("name, src, status, code", [
    ("../evil", "ONE", 400, "invalid_adapter_name"),
    ("has space", "ONE", 400, "invalid_adapter_name"),
    ("a" * 64, "ONE", 400, "invalid_adapter_name"),
    ("one", "TWO", 409, "adapter_exists"),
    ("fresh", "/etc", 403, "adapter_source_not_allowed"),
    ("fresh", "ESCAPE", 403, "adapter_source_not_allowed"),
    ("fresh", "relative/path", 400, "invalid_adapter"),
    ("fresh", "file:///etc/passwd", 403, "adapter_source_not_allowed"),
    ("fresh", "s3://not-this-bucket/adapters/one.tar.gz", 403, "adapter_source_not_allowed"),
    ("fresh", "MISSING", 400, "invalid_adapter"),
])
def test_names_and_sources_are_checked(served, trained_adapters, tmp_path, name, src, status, code):
    root = trained_adapters["root"]
    escape = root / f"escape-{time.monotonic_ns()}"
    escape.symlink_to(tmp_path)  # inside an allowed root, pointing outside it
    copy_adapter(trained_adapters["one"], tmp_path / "adapter")
    src = {"ONE": trained_adapters["one"], "TWO": trained_adapters["two"], "ESCAPE": escape / "adapter",
           "MISSING": root / "no-such-adapter"}.get(src, src)
    before = listed(served["base"])
    reply = register(served["base"], name, src)
    assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
    assert listed(served["base"]) == before


def test_register_and_unregister_requests(served, trained_adapters):
    base = served["base"]
    for bad in ({"src": "x"}, {"name": "x"}, {"name": "", "src": "x"}, ["x"]):
        reply = requests.post(base + "/adapters", json=bad, timeout=30)
        assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_request"), reply.text
    missing = requests.delete(base + "/adapters/nope", timeout=30)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "adapter_not_found")
    # model-hosting-container-standards' fallback: the fields as query parameters when there is no JSON body
    reply = requests.post(base + "/adapters", params={"name": "three", "src": str(trained_adapters["two"]),
                                                      "preload": "false"}, timeout=60)
    assert reply.status_code == 200 and not reply.json()["adapter"]["resident"]
    assert answer(base, "three") == served["answers"]["two"]  # loaded on first use
    assert requests.delete(base + "/adapters/three", timeout=60).json() == {"unloaded": "three"}
    assert "three" not in listed(base)
    assert ask(base, "three").json()["error"]["code"] == "adapter_not_found"


# ---- unload while requests are in flight ----


@pytest.fixture(scope="module")
def slow(tmp_path_factory, tiny_artifact, trained_adapters):
    """A server whose every batch takes 0.4 s longer: requests stay in flight long enough to unload under them."""
    model_dir = served_dir(tmp_path_factory, tiny_artifact, trained_adapters, "one", "two")
    app, holder = start(model_dir, trained_adapters, wrap=lambda p: SlowPredictor(p, 0.4), max_batch_size=2)
    with running_server(app) as base:
        yield {"base": base, "registry": holder["predictor"].adapters,
               "answers": {name: answer(base, name) for name in (None, "one", "two")}}


def test_unload_waits_for_the_requests_in_flight_and_disturbs_no_other_adapter(slow):
    base, registry, answers = slow["base"], slow["registry"], slow["answers"]
    finished: dict[str, float] = {}

    def timed(i: int, adapter: str):
        got = answer(base, adapter)
        finished[f"{adapter}-{i}"] = time.monotonic()
        return adapter, got

    with ThreadPoolExecutor(8) as pool:
        inflight = [pool.submit(timed, i, a) for i in range(3) for a in ("two", "one")]
        deadline = time.monotonic() + 30
        while registry.list()[1]["in_flight"] < 3:  # all three requests on `two` accepted
            assert time.monotonic() < deadline
            time.sleep(0.005)
        unloading = pool.submit(requests.delete, base + "/adapters/two", timeout=120)
        while True:  # as soon as the unload has begun, new requests on `two` are refused
            try:
                registry.resolve("two")
            except ApiError:
                break
            time.sleep(0.005)
        refused = ask(base, "two")
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, "adapter_not_found")
        results = [f.result() for f in inflight]
        deleted = unloading.result()
        deleted_at = time.monotonic()
    assert deleted.status_code == 200, deleted.text
    assert all(got == answers[adapter] for adapter, got in results)  # accepted requests kept their adapter
    assert deleted_at >= max(t for k, t in finished.items() if k.startswith("two"))
    assert set(listed(base)) == {"one"}
    assert answer(base, "one") == answers["one"] and answer(base) == answers[None]


# ---- eviction and pins ----


def test_least_recently_used_adapters_are_evicted_and_come_back_on_demand(tmp_path_factory, tiny_artifact,
                                                                           trained_adapters, served):
    model_dir = served_dir(tmp_path_factory, tiny_artifact, trained_adapters, "one")
    app, _ = start(model_dir, trained_adapters, max_adapters=1)
    with running_server(app) as base:
        assert register(base, "two", trained_adapters["two"]).status_code == 200
        state = listed(base)
        assert (state["one"]["resident"], state["two"]["resident"]) == (False, True)  # `one` was evicted
        assert answer(base, "one") == served["answers"]["one"]  # loaded again, evicting `two`
        assert (listed(base)["one"]["resident"], listed(base)["two"]["resident"]) == (True, False)
        pinned = register(base, "pinned", trained_adapters["two"], pin=True)
        assert pinned.status_code == 200 and listed(base)["pinned"]["resident"]
        refused = register(base, "pinned-too", trained_adapters["one"], pin=True)
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "adapter_limit")
        busy = ask(base, "one")  # the only slot is pinned
        assert (busy.status_code, busy.json()["error"]["code"]) == (503, "overloaded")
        assert answer(base, "pinned") == served["answers"]["two"]


# ---- /ping while a load waits for a running adapter batch ----


def slow_decode_factory(cfg):
    """The real predictor whose per-token detokenizing (for rows with stop strings) takes 0.1 s, on a model whose
    end-of-sequence id is one it never generates: every answer runs to max_new_tokens, a generation that holds the
    adapter tree for a while, as a long answer from a big model does."""
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor

    class SlowDecode(Predictor):
        def decode(self, token_ids):
            time.sleep(0.1)
            return super().decode(token_ids)

    def build():
        import torch

        torch.set_num_threads(cfg.torch_threads)  # as the server's own factory does
        loaded = load_artifact(cfg.model_dir)
        loaded.generation_config.eos_token_id = loaded.model.config.get_text_config().vocab_size + 1
        return SlowDecode(loaded, adapters=cfg.adapter_limits())

    return build


def test_a_load_waits_for_the_running_batch_while_ping_answers(tmp_path_factory, tiny_artifact, trained_adapters):
    model_dir = served_dir(tmp_path_factory, tiny_artifact, trained_adapters, "two")
    cfg = serve_config(str(model_dir), adapter_roots=(model_dir, trained_adapters["root"]))
    app = create_app(cfg, predictor_factory=slow_decode_factory(cfg))
    with running_server(app) as base, ThreadPoolExecutor(2) as pool:
        long_answer = pool.submit(ask, base, "two", stop=["never in this answer"])
        time.sleep(0.4)  # generating, holding the adapter tree
        loading = pool.submit(register, base, "one", trained_adapters["one"])
        pings = []
        while not loading.done():
            started = time.monotonic()
            assert requests.get(base + "/ping", timeout=5).status_code == 200
            pings.append(time.monotonic() - started)
            time.sleep(0.05)
        assert loading.result().status_code == 200
        assert long_answer.result().json()["usage"]["completion_tokens"] == 12
    assert len(pings) >= 3 and max(pings) < 0.5, pings


# ---- the registry on its own (engine level, the shared tiny model) ----


def make_predictor(tiny_loaded, root: Path, **limits):
    from serve.engine.adapter_files import SourcePolicy
    from serve.engine.adapters import AdapterLimits
    from serve.engine.predictor import Predictor

    return Predictor(tiny_loaded, adapters=AdapterLimits(sources=SourcePolicy(local_roots=(root,)), **limits))


def engine_answer(predictor, adapter=None) -> str:
    from serve.engine.images import decode_image
    from serve.engine.types import GenerationRequest

    image = decode_image(png_bytes((48, 40), (40, 160, 90)), 10**6, shrink_for=predictor.image_processor)
    [result] = predictor.predict([GenerationRequest(image=image, question=QUESTION, temperature=0,
                                                    max_new_tokens=12, adapter=adapter)])
    return result.answer


def test_the_served_model_is_never_modified(tiny_loaded, trained_adapters, served):
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    modules = [type(m) for m in tiny_loaded.model.modules()]
    predictor = make_predictor(tiny_loaded, trained_adapters["root"])
    predictor.adapters.register("one", str(trained_adapters["one"]))
    assert engine_answer(predictor, "one") == served["answers"]["one"]
    assert engine_answer(predictor) == served["answers"][None]
    predictor.adapters.unregister("one")
    predictor.adapters.register("two", str(trained_adapters["two"]))  # on a tree that had none left
    assert engine_answer(predictor, "two") == served["answers"]["two"]
    predictor.adapters.unregister("two")
    assert [type(m) for m in tiny_loaded.model.modules()] == modules
    assert all(v.equal(before[k]) for k, v in tiny_loaded.model.state_dict().items())


@pytest.mark.parametrize("first", [True, False])
def test_a_refused_injection_rolls_back_with_or_without_other_adapters(tiny_loaded, trained_adapters, served,
                                                                       tmp_path, first):
    predictor = make_predictor(tiny_loaded, tmp_path)
    for name in ("one", "two"):
        copy_adapter(trained_adapters[name], tmp_path / name)
    if not first:
        predictor.adapters.register("one", str(tmp_path / "one"))
    for kind in ("other_hidden_size", "keys_match_nothing", "missing_lora_matrices"):
        with pytest.raises(ApiError) as refused:
            predictor.adapters.register("bad", str(bad_adapter(kind, trained_adapters["one"], tmp_path)))
        assert refused.value.code == BAD_ADAPTERS[kind][1]
        assert predictor.adapters.tree.keys == ([] if first else [predictor.adapters.key("one")])
    predictor.adapters.register("two", str(tmp_path / "two"))
    assert engine_answer(predictor, "two") == served["answers"]["two"]
    if not first:
        assert engine_answer(predictor, "one") == served["answers"]["one"]


def test_the_memory_budget_evicts_and_refuses(tiny_loaded, trained_adapters, served):
    probe = make_predictor(tiny_loaded, trained_adapters["root"])
    size = probe.adapters.register("one", str(trained_adapters["one"]))["bytes"]
    budgeted = make_predictor(tiny_loaded, trained_adapters["root"], memory_bytes=int(size * 1.5))
    budgeted.adapters.register("one", str(trained_adapters["one"]))
    budgeted.adapters.register("two", str(trained_adapters["two"]))
    assert [(a["name"], a["resident"]) for a in budgeted.adapters.list()] == [("one", False), ("two", True)]
    assert engine_answer(budgeted, "one") == served["answers"]["one"]
    tiny = make_predictor(tiny_loaded, trained_adapters["root"], memory_bytes=size // 2)
    with pytest.raises(ApiError) as refused:
        tiny.adapters.register("one", str(trained_adapters["one"]))
    assert refused.value.code == "adapter_too_large" and tiny.adapters.list() == []


def test_a_bad_adapter_folder_stops_the_start_up_naming_it(tiny_loaded, trained_adapters, tmp_path):
    from serve.http.adapters import load_startup_adapters

    model_dir = tmp_path / "model"
    bad_adapter("missing_weights", trained_adapters["one"], tmp_path)
    copy_adapter(tmp_path / "missing_weights", model_dir / "adapters" / "broken")
    predictor = make_predictor(tiny_loaded, model_dir)
    with pytest.raises(ApiError, match="adapters/broken") as refused:
        load_startup_adapters(predictor, model_dir)
    assert refused.value.code == "invalid_adapter"


def test_adapters_from_s3_archives_and_prefixes(tiny_loaded, trained_adapters, served, moto_server, monkeypatch,
                                                tmp_path):
    import boto3

    from serve.engine.adapter_files import SourcePolicy
    from serve.engine.adapters import AdapterLimits
    from serve.engine.predictor import Predictor

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="lora-adapters")
    s3.upload_file(str(trained_adapters["one_out"] / "adapter.tar.gz"), "lora-adapters", "one/adapter.tar.gz")
    for path in trained_adapters["two"].iterdir():
        s3.upload_file(str(path), "lora-adapters", f"two/{path.name}")
    policy = SourcePolicy(s3_buckets=("lora-adapters",), cache_dir=tmp_path / "cache")
    predictor = Predictor(tiny_loaded, adapters=AdapterLimits(sources=policy))
    predictor.adapters.register("one", "s3://lora-adapters/one/adapter.tar.gz")
    predictor.adapters.register("two", "s3://lora-adapters/two/")
    assert (engine_answer(predictor, "one"), engine_answer(predictor, "two")) == (served["answers"]["one"],
                                                                                  served["answers"]["two"])
    with pytest.raises(ApiError) as missing:
        predictor.adapters.register("three", "s3://lora-adapters/three.tar.gz")
    assert missing.value.code == "invalid_adapter" and "NoSuchKey" in missing.value.message
    predictor.adapters.unregister("one")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the unloaded adapter's download is gone


def test_unregister_gives_up_on_an_adapter_that_stays_busy(tiny_loaded, trained_adapters):
    predictor = make_predictor(tiny_loaded, trained_adapters["root"])
    predictor.adapters.register("one", str(trained_adapters["one"]))
    lease = predictor.adapters.checkout(["one"], expires_at=time.monotonic() + 60)
    with pytest.raises(ApiError) as busy:
        predictor.adapters.unregister("one", timeout_s=0.1)
    assert busy.value.code == "overloaded"
    with pytest.raises(ApiError):  # still being unregistered: new requests are refused
        predictor.adapters.resolve("one")
    released = threading.Timer(0.1, lease.release)
    released.start()
    predictor.adapters.unregister("one", timeout_s=5)
    assert predictor.adapters.list() == []


# ---- with the compiled decode path (SERVE_ACCEL): base rows keep it, adapter rows run eager ----


def mixed_batch_checks(loaded, accel, trained_adapters):
    """Register both adapters on a predictor with `accel`; every row of a mixed batch answers as it does alone, and
    the base rows ran on the compiled path (a batch of exactly the base rows was generated there)."""
    from serve.engine.adapter_files import SourcePolicy
    from serve.engine.adapters import AdapterLimits
    from serve.engine.images import decode_image
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    predictor = Predictor(loaded, accel=accel, adapters=AdapterLimits(
        sources=SourcePolicy(local_roots=(trained_adapters["root"],))))
    assert predictor.accel.enabled
    for name in ("one", "two"):  # the adapter tree is built after the warm-up compiled the served model
        predictor.adapters.register(name, str(trained_adapters[name]))
    image = decode_image(png_bytes((48, 40), (40, 160, 90)), 10**6, shrink_for=predictor.image_processor)

    def row(adapter):
        return GenerationRequest(image=image, question=QUESTION, temperature=0, max_new_tokens=8, adapter=adapter)

    alone = {a: predictor.predict([row(a)])[0].answer for a in (None, "one", "two")}
    compiled_rows = []  # the batch sizes the compiled path generates (observed, passed through unchanged)
    generate = predictor.accel.generate
    predictor.accel.generate = lambda model, batch, **kw: (compiled_rows.append(len(batch["input_ids"])),
                                                           generate(model, batch, **kw))[1]
    mixed = ["one", None, "two", None, "one"]
    assert [r.answer for r in predictor.predict([row(a) for a in mixed])] == [alone[a] for a in mixed]
    assert compiled_rows == [2]  # the two base rows, on the served model's compiled path; the rest on the tree
    return alone


def test_with_compiled_decode_base_rows_stay_compiled_and_every_row_answers_as_alone(tiny_artifact,
                                                                                     trained_adapters):
    from serve.engine.accel import AccelConfig
    from serve.engine.model import load_artifact

    compiled_on_cpu = AccelConfig(mode="on", compile_backend="eager", compile_mode=None, compile_on_cpu=True,
                                  batch_buckets=(1, 2, 4))
    mixed_batch_checks(load_artifact(tiny_artifact, device="cpu"), compiled_on_cpu, trained_adapters)


@pytest.mark.gpu
def test_nf4_on_cuda_with_compiled_decode_serves_mixed_adapter_batches(tiny_artifact, trained_adapters):
    from serve.engine.accel import AccelConfig
    from serve.engine.model import load_artifact

    loaded = load_artifact(tiny_artifact)  # NF4 on CUDA
    assert loaded.quantization == "nf4" and loaded.device.startswith("cuda")
    alone = mixed_batch_checks(loaded, AccelConfig(batch_buckets=(1, 2, 4)), trained_adapters)
    assert len(set(alone.values())) >= 2  # the adapters change the NF4 model's answers too


# ---- an adapter's own processor ----


def test_an_adapter_with_its_own_chat_template_is_prompted_with_it(tiny_loaded, trained_adapters, tmp_path):
    from train.templates import chat_template

    own = copy_adapter(trained_adapters["one"], tmp_path / "own-template")
    (own / "chat_template.jinja").write_text(chat_template("llava_llama_2"))  # trained with another --version
    predictor = make_predictor(tiny_loaded, tmp_path)
    described = predictor.adapters.register("own", str(own))
    predictor.adapters.register("one", str(copy_adapter(trained_adapters["one"], tmp_path / "one")))
    assert described["own_processor"] and not {a["name"]: a for a in predictor.adapters.list()}["one"]["own_processor"]
    encoded = {name: predictor.adapters.encoder(name).render_prompt(QUESTION) for name in ("own", "one")}
    assert encoded["one"] == predictor.encoder.render_prompt(QUESTION) != encoded["own"]
    assert "[INST]" in encoded["own"]  # llava_llama_2's template


def test_an_adapter_with_another_tokenizer_is_refused(tiny_loaded, trained_adapters, tmp_path):
    from demo.tiny import build_tiny_model_and_processor

    folder = copy_adapter(trained_adapters["one"], tmp_path / "other-tokenizer")
    _, processor = build_tiny_model_and_processor("test", corpus=["zebra quokka narwhal axolotl " * 20])
    processor.save_pretrained(folder)
    with pytest.raises(ApiError) as refused:
        make_predictor(tiny_loaded, tmp_path).adapters.register("other", str(folder))
    assert refused.value.code == "adapter_mismatch" and "tokenizer" in refused.value.message
