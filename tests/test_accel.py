"""serve.engine.accel: the env switch (eager fallback), buckets, and the compiled static-cache path giving the
same tokens.

The compiled path runs on CPU here with torch.compile's "eager" backend (dynamo capture, no codegen) so the test is
fast; on CUDA the same code uses inductor + CUDA graphs (tests marked gpu).
"""

from __future__ import annotations

import logging

import pytest
import torch

from serve.config import ConfigError, ServeConfig
from serve.engine.accel import AccelConfig, Accelerator, bucket_batch, bucket_length, pad_rows

CPU_COMPILED = AccelConfig(mode="on", compile_backend="eager", compile_mode=None, compile_on_cpu=True)
QUESTIONS = ["What is shown?", "What type of chart is this? Answer briefly please", "Title?"]


class PerRowStop:
    """Like serve.engine.predictor's tracker: one flag per row, a row stops after its own token budget."""

    def __init__(self, width: int, budgets: list[int]):
        self.width, self.budgets = width, budgets
        self.batch_sizes: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.batch_sizes.append(input_ids.shape[0])
        steps = input_ids.shape[1] - self.width
        return torch.tensor([steps >= b for b in self.budgets], dtype=torch.bool)


class BanToken:
    """A per-row logits processor (shape-checked like serve.engine.predictor's per-row sampling)."""

    def __init__(self, rows: int, token: int):
        self.rows, self.token = rows, token

    def __call__(self, input_ids, scores):
        assert scores.shape[0] == self.rows
        scores = scores.clone()
        scores[:, self.token] = float("-inf")
        return scores


def _batch(loaded, n: int):
    from bench.samples import chart_image

    p = loaded.processor
    prompts = [p.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                     add_generation_prompt=True, tokenize=False) for q in QUESTIONS[:n]]
    images = [chart_image(64, 48, seed=i) for i in range(n)]
    return dict(p(images=images, text=prompts, return_tensors="pt", padding=True))


def _gen(loaded, max_new_tokens: int):
    import copy

    gen = copy.deepcopy(loaded.generation_config)
    gen.max_new_tokens, gen.do_sample, gen.eos_token_id = max_new_tokens, False, None  # fixed length: compare all
    return gen


@pytest.fixture(scope="module")
def fp32(tiny_artifact):
    from serve.engine.model import load_artifact

    return load_artifact(tiny_artifact, quantization="none", device="cpu")


def test_settings_from_the_environment_and_the_switch():
    """The server reads SERVE_ACCEL* with its other variables (serve.config); the engine reads no environment."""
    def accel(env):
        return ServeConfig.from_env({"SERVE_MAX_BATCH_SIZE": "256", **env}).accel_config()

    assert accel({}) == AccelConfig() and not hasattr(AccelConfig, "from_env")
    assert AccelConfig().enabled_for("cuda") and not AccelConfig().enabled_for("cpu")
    off = accel({"SERVE_ACCEL": "off"})
    assert not off.enabled_for("cuda") and not off.enabled_for("cuda:0")
    assert accel({"SERVE_ACCEL": "0"}).mode == "off"
    assert accel({"SERVE_ACCEL": "ON"}).enabled_for("cpu")
    cfg = accel({"SERVE_ACCEL_BATCH_BUCKETS": "8, 1,4", "SERVE_ACCEL_CACHE_BUCKET": "128",
                 "SERVE_ACCEL_CACHE_GIB": "2.5"})
    assert cfg.batch_buckets == (1, 4, 8) and cfg.cache_bucket == 128 and cfg.cache_gib == 2.5


def test_bad_settings_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_env({"SERVE_ACCEL": "fast", "SERVE_ACCEL_BATCH_BUCKETS": "1,x",
                              "SERVE_ACCEL_CACHE_BUCKET": "0", "SERVE_ACCEL_CACHE_GIB": "inf"})
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    for var in ("SERVE_ACCEL:", "SERVE_ACCEL_BATCH_BUCKETS", "SERVE_ACCEL_CACHE_BUCKET", "SERVE_ACCEL_CACHE_GIB"):
        assert var in text


def test_buckets_and_row_padding():
    assert [bucket_batch(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert [bucket_length(n, 256) for n in (1, 256, 257)] == [256, 256, 512]
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4], [5, 6]]), "pixel_values": torch.zeros(3, 3, 2, 2),
             "flag": True}
    padded = pad_rows(batch, 4)
    assert padded["input_ids"].tolist() == [[1, 2], [3, 4], [5, 6], [5, 6]]
    assert padded["pixel_values"].shape[0] == 4 and padded["flag"] is True
    assert pad_rows(batch, 3)["input_ids"] is batch["input_ids"]


def test_off_is_plain_eager_generate(fp32):
    model = fp32.model
    accel = Accelerator(model, AccelConfig(mode="off"), device="cpu")
    assert not accel.enabled and "_valid_auto_compile_criteria" not in vars(model)
    batch, gen = _batch(fp32, 2), _gen(fp32, 5)
    torch._dynamo.utils.counters.clear()
    out = accel.generate(model, batch, generation_config=gen)
    assert torch.equal(out, model.generate(**batch, generation_config=gen))
    assert accel.cached_shapes == [] and not torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_static_cache_path_matches_eager_with_padded_batch(fp32):
    model, batch, gen = fp32.model, _batch(fp32, 3), _gen(fp32, 6)
    width = batch["input_ids"].shape[1]
    eager = model.generate(**batch, generation_config=gen, logits_processor=[BanToken(3, 7)],
                           stopping_criteria=[PerRowStop(width, [2, 6, 4])])
    accel = Accelerator(model, CPU_COMPILED, device="cpu")
    torch._dynamo.reset()  # a graph compiled by an earlier test (bench.gpu --tiny) must not be reused here
    torch._dynamo.utils.counters.clear()
    stop = PerRowStop(width, [2, 6, 4])
    out = accel.generate(model, batch, generation_config=gen, logits_processor=[BanToken(3, 7)],
                         stopping_criteria=[stop])
    assert torch.equal(out, eager)  # same tokens, dummy 4th row dropped
    assert set(stop.batch_sizes) == {3}  # the caller's criterion only ever saw its own rows
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    assert accel.cached_shapes == [(4, 256)]  # 3 rows -> bucket 4; prompt + 6 tokens -> 256
    cache = accel._caches[(4, 256)]
    again = accel.generate(model, batch, generation_config=gen, logits_processor=[BanToken(3, 7)],
                           stopping_criteria=[PerRowStop(width, [2, 6, 4])])
    assert torch.equal(again, eager) and accel._caches[(4, 256)] is cache  # reset and reused, not reallocated


def test_cache_pool_is_bounded(fp32):
    model = fp32.model
    one = 2 * 2 * 1 * 2 * 256 * 16 * 4  # layers * k/v * batch * kv heads * length * head dim * fp32 bytes
    accel = Accelerator(model, AccelConfig(**{**CPU_COMPILED.__dict__, "cache_gib": 1.5 * one / 2**30}),
                        device="cpu")
    for n in (1, 2):
        accel.generate(model, _batch(fp32, n), generation_config=_gen(fp32, 2))
    assert accel.cached_shapes == [(2, 256)]  # the batch-1 cache was evicted to stay under the cap


def test_nf4_model_compiles_and_matches_eager(tiny_artifact):
    from serve.engine.model import load_artifact

    loaded = load_artifact(tiny_artifact, quantization="nf4", device="cpu")
    model, batch, gen = loaded.model, _batch(loaded, 1), _gen(loaded, 3)
    eager = model.generate(**batch, generation_config=gen)
    accel = Accelerator(model, CPU_COMPILED, device="cpu")
    assert "nf4_compute=bfloat16" in accel.describe(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert torch.equal(accel.generate(model, batch, generation_config=gen), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.gpu
def test_cuda_nf4_inductor_matches_eager(tiny_artifact):
    from serve.engine.model import load_artifact

    loaded = load_artifact(tiny_artifact, quantization="nf4", device="cuda")
    model, gen = loaded.model, _gen(loaded, 8)
    batch = {k: v.to("cuda") for k, v in _batch(loaded, 3).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    eager = model.generate(**batch, generation_config=gen)
    width = batch["input_ids"].shape[1]
    accel = Accelerator(model, AccelConfig(mode="on"), device="cuda")
    for _ in range(2):  # second call replays the captured graphs
        out = accel.generate(model, batch, generation_config=gen)
        assert out.shape == eager.shape
        # The prefill is eager in both, so the first token is identical; fused bf16 kernels may round a near-tie
        # differently later on a random model, so the rest must agree on most tokens, not all.
        assert torch.equal(out[:, : width + 1], eager[:, : width + 1])
        assert (out[:, width:] == eager[:, width:]).float().mean() >= 0.75


class ThreadsSeen:
    """A logits processor that notes which thread each decode step runs on (and changes nothing)."""

    def __init__(self):
        self.threads: set[int] = set()

    def __call__(self, input_ids, scores):
        import threading

        self.threads.add(threading.get_ident())
        return scores


def test_compiled_generation_runs_on_one_thread_whoever_calls(fp32):
    """CUDA graphs are thread-local: a graph captured while warming up on one thread failed when the batcher's
    thread replayed it (seen on an H100). Every compiled call must run on one thread, the same for every Accelerator."""
    import threading

    model = fp32.model
    config = AccelConfig(**{**CPU_COMPILED.__dict__, "batch_buckets": (1, 2)})
    accel = Accelerator(model, config, device="cpu")
    row = {k: v[:1] for k, v in _batch(fp32, 1).items()}
    accel.warm_up(model, row, fp32.generation_config, max_new_tokens=4)  # the server warms up on its loading thread
    seen, outputs = ThreadsSeen(), []

    def call():
        outputs.append(accel.generate(model, _batch(fp32, 2), generation_config=_gen(fp32, 4), logits_processor=[seen]))

    call()
    other = threading.Thread(target=call)  # the batcher's thread
    other.start()
    other.join()
    assert len(outputs) == 2 and torch.equal(outputs[0], outputs[1])
    assert len(seen.threads) == 1 and threading.get_ident() not in seen.threads and other.ident not in seen.threads
    # A second accelerator (the GPU benchmark makes several) must use the same thread: the graphs live there.
    second = Accelerator(model, config, device="cpu")
    second.generate(model, _batch(fp32, 1), generation_config=_gen(fp32, 2), logits_processor=[seen])
    assert len(seen.threads) == 1
    eager = Accelerator(model, AccelConfig(mode="off"), device="cpu")  # the eager fallback runs where it is called
    eager_seen = ThreadsSeen()
    eager.generate(model, _batch(fp32, 1), generation_config=_gen(fp32, 2), logits_processor=[eager_seen])
    assert eager_seen.threads == {threading.get_ident()}


def test_warm_up_compiles_every_bucket_before_traffic(fp32):
    model = fp32.model
    accel = Accelerator(model, AccelConfig(**{**CPU_COMPILED.__dict__, "batch_buckets": (1, 2)}), device="cpu")
    row = {k: v[:1] for k, v in _batch(fp32, 1).items()}
    assert accel.warm_up(model, row, fp32.generation_config, max_new_tokens=6) > 0
    assert accel.cached_shapes == [(1, 256), (2, 256)]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = accel.generate(model, _batch(fp32, 2), generation_config=_gen(fp32, 6))
    assert out.shape[0] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # replayed, nothing new compiled
    assert Accelerator(model, AccelConfig(mode="off"), device="cpu").warm_up(model, row, fp32.generation_config,
                                                                            max_new_tokens=6) == 0.0


def test_a_shorter_request_reuses_a_longer_compiled_cache_and_a_longer_one_is_logged(fp32, caplog):
    model = fp32.model
    accel = Accelerator(model, AccelConfig(**{**CPU_COMPILED.__dict__, "batch_buckets": (1, 2), "cache_bucket": 64}),
                        device="cpu")
    row = {k: v[:1] for k, v in _batch(fp32, 1).items()}
    width = row["input_ids"].shape[1]
    warmed = -(-(width + 100) // 64) * 64
    accel.warm_up(model, row, fp32.generation_config, max_new_tokens=100)
    assert accel.cached_shapes == [(1, warmed), (2, warmed)] and warmed > width + 6 + 64  # 6 tokens: a shorter bucket
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    caplog.set_level(logging.INFO)
    short = accel.generate(model, _batch(fp32, 2), generation_config=_gen(fp32, 6))
    assert torch.equal(short, model.generate(**_batch(fp32, 2), generation_config=_gen(fp32, 6)))
    assert accel.cached_shapes == [(1, warmed), (2, warmed)]  # the warmed-up cache, not a 64-token one of its own
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs and "request time" not in caplog.text
    accel.generate(model, _batch(fp32, 1), generation_config=_gen(fp32, warmed))  # needs more than was warmed up
    longer = -(-(width + warmed) // 64) * 64
    assert (1, longer) in accel.cached_shapes
    assert f"compiling a new shape at request time (batch=1, cache length={longer})" in caplog.text


def test_a_failed_warm_up_falls_back_to_eager_under_auto_and_stops_start_up_under_on(tiny_artifact, caplog):
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    loaded = load_artifact(tiny_artifact, quantization="none", device="cpu")
    broken = {**CPU_COMPILED.__dict__, "batch_buckets": (1, 2), "compile_backend": "no-such-backend"}
    with pytest.raises(Exception, match="no-such-backend"):
        Predictor(loaded, accel=AccelConfig(**broken))  # SERVE_ACCEL=on: the failure is the user's to see
    caplog.set_level(logging.INFO)
    predictor = Predictor(loaded, accel=AccelConfig(**{**broken, "mode": "auto"}))
    assert "failed while warming up: serving with eager generate" in caplog.text and "Traceback" in caplog.text
    assert not predictor.accel.enabled and predictor.accel.cached_shapes == []
    eager = Predictor(loaded, accel=AccelConfig(mode="off"))
    request = GenerationRequest(image=None, question="Title?", temperature=0, max_new_tokens=4)
    [fell_back], [plain] = predictor.predict([request]), eager.predict([request])
    assert fell_back == plain


def test_predictor_warms_up_only_when_accelerated(tiny_artifact):
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    loaded = load_artifact(tiny_artifact, quantization="none", device="cpu")
    assert Predictor(loaded).accel.cached_shapes == []  # auto on CPU: off, nothing compiled
    fast = Predictor(loaded, accel=AccelConfig(**{**CPU_COMPILED.__dict__, "batch_buckets": (1, 2)}))
    assert [b for b, _ in fast.accel.cached_shapes] == [1, 2]
    from bench.samples import chart_image

    [result] = fast.predict([GenerationRequest(image=chart_image(64, 48), question="Title?", temperature=0,
                                               max_new_tokens=3)])
    assert result.completion_tokens <= 3
