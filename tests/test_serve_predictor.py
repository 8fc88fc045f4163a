"""serve/engine/model.py + serve/engine/predictor.py on the real tiny LLaVA: loading (fp32, NF4 forced on CPU, a PEFT
adapter dir merged at load, NF4 on CUDA), greedy determinism, batched == alone, per-row parameters inside one batch,
stop strings, early delivery, deadlines and per-row failures."""

from __future__ import annotations

import json
import logging
import time

import pytest
from PIL import Image

from serve.engine.errors import ApiError
from serve.engine.model import NF4_SKIP_MODULES, ModelLoadError, half_dtype, load_artifact
from serve.engine.predictor import Predictor
from serve.engine.types import GenerationRequest, GenerationResult

QUESTIONS = ["What is shown?", "What type of chart is this? pie donut funnel", "Which?",
             "How many categories are there in the chart, tell me", "red", "The quick brown fox jumps over the dog"]


def image(i: int) -> Image.Image:
    return Image.new("RGB", (40 + 10 * i, 30 + 3 * i), (40 * i % 256, 100, 200 - 30 * i))


def greedy(i: int, **kw) -> GenerationRequest:
    return GenerationRequest(image=image(i), question=QUESTIONS[i], temperature=0.0,
                             max_new_tokens=kw.pop("max_new_tokens", 24), **kw)


def test_greedy_is_deterministic_across_predictors(tiny_loaded):
    first = Predictor(tiny_loaded).predict([greedy(1)])[0]
    second = Predictor(tiny_loaded).predict([greedy(1)])[0]
    assert isinstance(first, GenerationResult) and first == second
    assert first.prompt_tokens > 16 and 1 <= first.completion_tokens <= 24


def test_batched_greedy_equals_alone(tiny_predictor):
    alone = [tiny_predictor.predict([greedy(i)])[0] for i in range(len(QUESTIONS))]
    batched = tiny_predictor.predict([greedy(i) for i in range(len(QUESTIONS))])
    assert batched == alone
    assert len({r.prompt_tokens for r in alone}) > 1  # prompts of different lengths were left-padded


def test_mixed_parameters_in_one_batch(tiny_predictor):
    import torch

    alone = {i: tiny_predictor.predict([greedy(i)])[0] for i in (0, 2, 4)}
    torch.manual_seed(0)
    rows = [greedy(0), GenerationRequest(image=image(1), question=QUESTIONS[1], temperature=1.3, top_p=0.9,
                                         max_new_tokens=5),
            greedy(2), GenerationRequest(image=image(3), question=QUESTIONS[3], temperature=0.7, max_new_tokens=40),
            greedy(4, max_new_tokens=3)]
    out = tiny_predictor.predict(rows)
    assert out[0] == alone[0] and out[2] == alone[2]  # greedy rows stay exactly greedy inside a sampled batch
    assert out[1].completion_tokens <= 5 and out[3].completion_tokens <= 40
    assert out[4].completion_tokens == 3 and out[4].finish_reason == "length"
    assert alone[4].answer.startswith(out[4].answer)


def test_sampling_samples_and_top_p_narrows_it(tiny_predictor):
    import torch

    def sample(seed: int, **kw) -> str:
        torch.manual_seed(seed)
        req = GenerationRequest(image=image(1), question=QUESTIONS[1], max_new_tokens=12, **kw)
        return tiny_predictor.predict([req])[0].answer

    assert len({sample(s, temperature=1.5) for s in range(4)}) > 1
    # A tiny top_p keeps only the most likely token: sampling then equals greedy, whatever the seed.
    assert sample(1, temperature=1.0, top_p=1e-6) == sample(2, temperature=0.0) == sample(3, temperature=2, top_p=1e-6)


def test_artifact_generation_defaults_apply(tiny_predictor, tiny_loaded):
    assert tiny_predictor.default_temperature == 0.0  # the artifact says do_sample=False
    assert tiny_predictor.default_max_new_tokens == tiny_loaded.generation_config.max_new_tokens
    out = tiny_predictor.predict([GenerationRequest(image=image(1), question=QUESTIONS[1])])[0]
    assert out == tiny_predictor.predict([greedy(1, max_new_tokens=tiny_predictor.default_max_new_tokens)])[0]


def test_stop_strings_cut_the_answer(tiny_predictor):
    full = tiny_predictor.predict([greedy(1, max_new_tokens=30)])[0]
    stop = full.answer[6:9]
    assert len(stop) == 3 and full.answer.find(stop) >= 3
    out = tiny_predictor.predict([greedy(1, max_new_tokens=30, stop=("zzzz-never", stop))])[0]
    assert out.answer == full.answer[:full.answer.find(stop)].strip()
    assert out.finish_reason == "stop" and out.completion_tokens < full.completion_tokens


def test_finished_rows_are_delivered_before_the_batch_ends(tiny_predictor):
    seen: list[tuple[int, float]] = []
    rows = [greedy(1, max_new_tokens=60), greedy(2, max_new_tokens=2)]
    out = tiny_predictor.predict(rows, on_result=lambda i, o: seen.append((i, time.monotonic())))
    assert [i for i, _ in seen] == [1, 0]
    assert out[1].completion_tokens == 2 and out[0].completion_tokens > 2


def test_deadlines_are_per_row(tiny_predictor):
    rows = [greedy(1, max_new_tokens=60, deadline=time.monotonic() + 0.002), greedy(2, max_new_tokens=8),
            greedy(3, deadline=time.monotonic() - 1)]
    out = tiny_predictor.predict(rows)
    assert isinstance(out[0], ApiError) and out[0].code == "timeout"
    assert isinstance(out[1], GenerationResult)
    assert isinstance(out[2], ApiError) and out[2].code == "timeout"


def test_a_row_that_cannot_be_prepared_fails_alone(tiny_predictor, tiny_loaded):
    long_question = "word " * (tiny_loaded.max_positions + 10)
    rows = [greedy(0), GenerationRequest(image=image(1), question=long_question), greedy(2, max_new_tokens=10**6)]
    out = tiny_predictor.predict(rows)
    assert out[0] == tiny_predictor.predict([greedy(0)])[0]
    assert out[1].code == "invalid_request" and "context" in out[1].message
    assert out[2].code == "invalid_request" and "cap" in out[2].message


def test_a_question_holding_the_image_placeholder_fails_alone(tiny_predictor):
    """The processor would raise on a second image token for the whole batch; the row gets a clear 400."""
    for row in (GenerationRequest(image=image(1), question="what is <image> here?"),
                GenerationRequest(image=None, question="<image>")):
        out = tiny_predictor.predict([greedy(0), row])
        assert out[0] == tiny_predictor.predict([greedy(0)])[0]
        assert out[1].code == "invalid_request" and "'<image>'" in out[1].message


def test_text_only_and_image_rows_mix(tiny_predictor):
    out = tiny_predictor.predict([GenerationRequest(image=None, question="hello", temperature=0), greedy(0)])
    assert all(isinstance(o, GenerationResult) for o in out)
    assert out[1] == tiny_predictor.predict([greedy(0)])[0]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="neither a model"):
        load_artifact(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match="base_model_name_or_path"):
        load_artifact(tmp_path)
    with pytest.raises(ModelLoadError, match="quantization"):
        load_artifact(tmp_path, quantization="int3")


def _check_nf4(loaded) -> None:
    import bitsandbytes as bnb

    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    assert not any(n.startswith(tuple(NF4_SKIP_MODULES)) for n in quantized)
    half = half_dtype(loaded.device)
    model = loaded.model  # the modules left unquantized are in the compute dtype
    for module in (model.model.vision_tower, model.model.multi_modal_projector, model.lm_head):
        assert {p.dtype for p in module.parameters()} == {half}
    qc = loaded.model.config.quantization_config
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    assert str(qc.bnb_4bit_compute_dtype).replace("torch.", "") == str(half).replace("torch.", "")
    out = Predictor(loaded).predict([greedy(1, max_new_tokens=6), greedy(2, max_new_tokens=6)])
    assert all(isinstance(o, GenerationResult) and o.completion_tokens >= 1 for o in out)


def test_nf4_computes_in_bf16_from_ampere_on_and_in_fp16_before():
    import torch

    assert half_dtype("cpu") == torch.bfloat16
    assert half_dtype("cuda", capability=(8, 6)) == half_dtype("cuda:0", capability=(9, 0)) == torch.bfloat16
    assert half_dtype("cuda", capability=(7, 5)) == half_dtype("cuda", capability=(7, 0)) == torch.float16  # T4, V100


def test_nf4_load_path_runs_on_cpu_when_forced(tiny_artifact):
    loaded = load_artifact(tiny_artifact, quantization="nf4", device="cpu")
    assert loaded.quantization == "nf4" and loaded.device == "cpu"
    _check_nf4(loaded)


@pytest.mark.gpu
def test_nf4_is_the_default_on_cuda(tiny_artifact):
    loaded = load_artifact(tiny_artifact)
    assert loaded.quantization == "nf4" and loaded.device == "cuda"
    assert next(loaded.model.model.language_model.parameters()).is_cuda
    _check_nf4(loaded)


def test_adapter_dir_is_merged_at_load(tiny_artifact, tmp_path, caplog):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_artifact, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # random B: the adapter changes the answers
                      target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)")
    torch.manual_seed(1)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = tiny_artifact
    config_file.write_text(json.dumps(config))

    with caplog.at_level(logging.WARNING, logger="serve.engine.model"):
        loaded = load_artifact(tmp_path / "adapter")
    assert "PEFT adapter" in caplog.text and loaded.adapter_base == tiny_artifact
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())

    expected = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(tiny_artifact, dtype=torch.float32),
        str(tmp_path / "adapter")).merge_and_unload()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    plain = Predictor(load_artifact(tiny_artifact)).predict([greedy(1)])[0]
    assert Predictor(loaded).predict([greedy(1)])[0] != plain


def test_prepare_on_other_threads_changes_nothing(tiny_predictor, tiny_loaded):
    from concurrent.futures import ThreadPoolExecutor

    rows = [greedy(i) for i in range(len(QUESTIONS))]
    with ThreadPoolExecutor(4) as pool:  # the request threads prepare concurrently
        list(pool.map(tiny_predictor.prepare, rows))
    assert all(r.inputs is not None for r in rows)
    assert tiny_predictor.predict(rows) == tiny_predictor.predict([greedy(i) for i in range(len(QUESTIONS))])
    with pytest.raises(ApiError, match="context"):
        tiny_predictor.prepare(GenerationRequest(image=image(0), question="word " * tiny_loaded.max_positions))
