"""End to end through `python -m train` on the tiny model and tiny data (CPU): one LoRA run shared by several
checks (what trained, merged == base + adapter, the server's loader, the artifact, metric regexes on the real log),
`python -m train.merge` on its checkpoint, and a full fine-tune inside a fake /opt/ml tree."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
from data_helpers import write_tiny_dataset
from train_support import FAST_ARGS, changed, greedy, load_weights, output_of, run_train, trainer_state

from train.logs import parse_metrics

QUESTION = "What type of chart is this?"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_artifact):
    """A LoRA run: 4 steps, checkpoints at 2 and 4, validation loss at 2 and 4, generation report on 4 rows."""
    root = tmp_path_factory.mktemp("lora")
    data, images = write_tiny_dataset(root / "data", n=8)
    out = root / "out"
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", str(data), "--image_folder", str(images),
                      "--validation_data_path", str(data), "--lora_enable", "True", "--output_dir", str(out),
                      "--max_steps", "4", "--save_steps", "2", "--evaluation_strategy", "steps", "--eval_steps", "2",
                      "--learning_rate", "5e-5", "--mm_projector_lr", "2e-3", "--group_by_modality_length", "True",
                      "--log_sample_ids", "True", *FAST_ARGS])
    assert proc.returncode == 0, output_of(proc)[-4000:]
    return {"out": out, "data": data, "images": images, "stdout": proc.stdout, "base": tiny_artifact}


def test_lora_trains_adapter_and_projector_and_leaves_the_base_alone(lora_run):
    out = lora_run["out"]
    base = load_weights(Path(lora_run["base"]) / "model.safetensors")
    merged = load_weights(out / "model.safetensors")
    adapter = load_weights(out / "adapter" / "adapter_model.safetensors")

    lora_keys = [k for k in adapter if "lora_" in k]
    assert lora_keys and all(".language_model." in k for k in lora_keys)  # never the vision tower or lm_head
    assert all(adapter[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # lora_B starts at zero
    assert any("multi_modal_projector" in k for k in adapter)  # the projector is saved with the adapter

    assert set(merged) == set(base)
    tower = [k for k in base if "vision_tower" in k]
    frozen = tower + [k for k in base if "embed_tokens" in k or "lm_head" in k or "norm" in k]
    assert tower and not any(changed(base, merged, k) for k in frozen)
    assert changed(base, merged, "language_model.model.layers.0.self_attn.q_proj.weight")  # LoRA delta merged
    assert changed(base, merged, "multi_modal_projector.linear_1.weight")  # trained fully


def test_projector_has_its_own_learning_rate(lora_run):
    import torch

    optimizer = torch.load(lora_run["out"] / "checkpoint-4" / "optimizer.pt", weights_only=False)
    sizes: dict[float, int] = {}
    for group in optimizer["param_groups"]:
        sizes[group["initial_lr"]] = sizes.get(group["initial_lr"], 0) + len(group["params"])
    assert set(sizes) == {5e-5, 2e-3}
    assert sizes[2e-3] == 4  # the projector's two weights and two biases; everything else (LoRA) at 5e-5


def test_merged_greedy_output_equals_base_plus_adapter(lora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out, image = lora_run["out"], lora_run["images"] / "img_0.png"
    processor = AutoProcessor.from_pretrained(out)
    base = LlavaForConditionalGeneration.from_pretrained(lora_run["base"], dtype=torch.float32).eval()
    base_ids, base_logits = greedy(base, processor, image, QUESTION)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    adapter_ids, adapter_logits = greedy(with_adapter, processor, image, QUESTION)
    merged = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    merged_ids, merged_logits = greedy(merged, processor, image, QUESTION)

    assert merged_ids == adapter_ids
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # the fine-tune changed the answer


def test_merged_dir_loads_and_answers_in_the_server(lora_run):
    from PIL import Image

    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest, GenerationResult

    loaded = load_artifact(lora_run["out"], quantization="none", device="cpu")
    image = Image.open(lora_run["images"] / "img_0.png").convert("RGB")
    [result] = Predictor(loaded).predict([GenerationRequest(image=image, question=QUESTION, temperature=0,
                                                            max_new_tokens=4)])
    assert isinstance(result, GenerationResult), result
    assert result.completion_tokens > 0 and result.prompt_tokens > 16  # 16 image tokens + the question


def test_the_report_scores_what_the_server_answers(lora_run):
    """eval_report.json's fine-tuned answers are the served artifact's answers to the same single-turn questions,
    and llava-sm eval --model-dir on the same file scores the same."""
    from client.evaluate import EvalOptions, evaluate
    from evaluation.questions import load_questions
    from serve.engine.images import decode_image
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    report = json.loads((lora_run["out"] / "eval_report.json").read_text())
    questions = load_questions(lora_run["data"], lora_run["images"], limit=report["questions"])
    predictor = Predictor(load_artifact(lora_run["out"], quantization="auto", device="cpu"))
    requests = [GenerationRequest(image=decode_image(Path(q["image"]).read_bytes(), 1 << 30,
                                                     shrink_for=predictor.image_processor),
                                  question=q["question"], temperature=0, max_new_tokens=report["max_new_tokens"])
                for q in questions]
    served = [r.answer for r in predictor.predict(requests)]
    tuned = [p for p in report["predictions"] if p["run"] == "fine_tuned"]
    assert [p["id"] for p in tuned] == [q["id"] for q in questions]
    assert [p["prediction"] for p in tuned] == served
    cli_report = evaluate(EvalOptions(data=str(lora_run["data"]), image_folder=str(lora_run["images"]),
                                      limit=report["questions"],
                                      model_dir=str(lora_run["out"]), max_new_tokens=report["max_new_tokens"],
                                      out_dir=str(lora_run["out"].parent / "cli-eval"), name="fine_tuned"))
    assert cli_report["runs"]["fine_tuned"] == report["runs"]["fine_tuned"]
    assert cli_report["runs"]["fine_tuned (blank image)"] == report["runs"]["fine_tuned (blank image)"]


def test_artifact_holds_template_config_report_and_curve(lora_run):
    from train.templates import CHAT_TEMPLATES

    out = lora_run["out"]
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["v1"]
    assert json.loads((out / "processor_config.json").read_text())["image_processor"]["do_pad"] is True
    config = json.loads((out / "training_config.json").read_text())
    assert config["made_by"] == "train" and config["lora_enable"] is True and config["global_step"] == 4
    report = json.loads((out / "eval_report.json").read_text())
    assert report["questions"] == 4 and list(report["runs"]) == ["base", "fine_tuned", "fine_tuned (blank image)"]
    assert all(run["overall"]["n"] == 4 for run in report["runs"].values())
    assert {"id", "question", "answer", "run", "prediction", "correct"} <= set(report["predictions"][0])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert trainer_state(checkpoint)["global_step"] == step
        assert json.loads((checkpoint / "training_config.json").read_text())["lora_r"] == 8


def test_metric_regexes_read_the_real_log(lora_run):
    metrics = parse_metrics(lora_run["stdout"])
    history = trainer_state(lora_run["out"] / "checkpoint-4")["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(metrics["loss"]) == len(steps) == 4
    for name in ("loss", "learning_rate", "grad_norm", "epoch"):
        pairs = zip(metrics[name], steps, strict=True)
        assert all(math.isclose(m, h[name], rel_tol=1e-5, abs_tol=1e-12) for m, h in pairs), name
    assert any(0 < lr < 1e-4 for lr in metrics["learning_rate"])  # written as e.g. 3.75e-05 and read in full
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(metrics["eval_loss"]) == len(evals)  # 6 significant digits in the log: compare as the others
    assert all(math.isclose(m, h, rel_tol=1e-5) for m, h in zip(metrics["eval_loss"], evals, strict=True))
    for name in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"):
        assert len(metrics[name]) == 1, name
    report = json.loads((lora_run["out"] / "eval_report.json").read_text())
    assert metrics["eval_accuracy"] == [report["runs"]["fine_tuned"]["overall"]["accuracy"]]
    assert metrics["base_eval_accuracy"] == [report["runs"]["base"]["overall"]["accuracy"]]


def test_group_by_modality_length_drives_the_training_order(lora_run):
    from transformers import AutoProcessor

    from train.data import load_examples
    from train.labels import ExampleDataset
    from train.sampler import grouped_indices

    examples = load_examples(lora_run["data"], lora_run["images"])
    dataset = ExampleDataset(examples, AutoProcessor.from_pretrained(lora_run["base"]), max_length=2048)
    expected = [dataset[i].id for i in grouped_indices(dataset.modality_lengths, 2, 1, seed=42)]
    batches = [ids.split(",") for ids in re.findall(r"\[data\] rank=0 ids=(\S+)", lora_run["stdout"])]
    seen = [i for b in batches if len(b) == 2 for i in b]  # evaluation batches hold 4
    assert seen == expected
    text_only = {e.id for e in examples if e.image is None}
    assert all(len({i in text_only for i in expected[k:k + 2]}) == 1 for k in range(0, 8, 2))  # never mixed


def test_merge_cli_reproduces_the_artifact_from_a_checkpoint(lora_run, tmp_path):
    import torch

    from train.merge import main as merge_main

    out = lora_run["out"]
    assert merge_main(["--adapter", str(out / "checkpoint-4"), "--output_dir", str(tmp_path / "m")]) == 0
    again, merged = load_weights(tmp_path / "m" / "model.safetensors"), load_weights(out / "model.safetensors")
    assert set(again) == set(merged) and all(torch.equal(again[k], merged[k]) for k in merged)
    assert (tmp_path / "m" / "chat_template.jinja").is_file()
    record = json.loads((tmp_path / "m" / "training_config.json").read_text())
    assert record["made_by"] == "train.merge" and record["version"] == "v1"


def test_merge_cli_errors_are_clear(lora_run, tmp_path, caplog):
    from train.merge import main as merge_main

    caplog.set_level(logging.ERROR)
    assert merge_main(["--adapter", lora_run["base"], "--output_dir", str(tmp_path / "a")]) == 2
    assert "not a LoRA checkpoint" in caplog.text
    assert merge_main(["--adapter", str(lora_run["out"] / "adapter"), "--output_dir", str(tmp_path / "b"),
                       "--base_model", str(tmp_path / "nowhere")]) == 2
    assert "is not available here; pass --base_model" in caplog.text
    (tmp_path / "empty").mkdir()
    assert merge_main(["--adapter", str(lora_run["out"] / "adapter"), "--output_dir", str(tmp_path / "d"),
                       "--base_model", str(tmp_path / "empty")]) == 2
    assert "(given by --base_model) has no config.json: not a model dir" in caplog.text


def test_merge_cli_refuses_an_unknown_version_before_loading_anything(lora_run, tmp_path, capsys):
    from train.merge import main as merge_main

    with pytest.raises(SystemExit) as exc:
        merge_main(["--adapter", str(lora_run["out"] / "adapter"), "--output_dir", str(tmp_path / "c"),
                    "--version", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_full_finetune_in_a_fake_sagemaker_tree(tmp_path, tiny_artifact, monkeypatch, caplog):
    """String hyperparameters, channels, /opt/ml/model and /opt/ml/checkpoints, all under one overridable base."""
    from train.__main__ import main

    base = tmp_path / "ml"
    channel = base / "input" / "data" / "train"
    data, images = write_tiny_dataset(channel, n=4, fmt="jsonl")
    (base / "input" / "data" / "model").parent.mkdir(parents=True, exist_ok=True)
    (base / "input" / "data" / "model").symlink_to(tiny_artifact)
    (base / "input" / "config").mkdir(parents=True)
    hyper = {"lora_enable": "false", "max_steps": "2", "save_steps": "2", "logging_steps": "1",
             "per_device_train_batch_size": "2", "learning_rate": "1e-3", "gradient_checkpointing": "false",
             "image_folder": str(images), "eval_generation": "false", "warmup_ratio": "0"}
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyper))
    monkeypatch.setenv("SM_BASE_DIR", str(base))
    caplog.set_level(logging.INFO)

    assert main([]) == 0, caplog.text
    model_dir, checkpoints = base / "model", base / "checkpoints"
    assert trainer_state(checkpoints / "checkpoint-2")["global_step"] == 2
    assert not (model_dir / ".full-weights").exists() and not (base / "output" / "failure").exists()
    before = load_weights(Path(tiny_artifact) / "model.safetensors")
    after = load_weights(model_dir / "model.safetensors")
    assert not any(changed(before, after, k) for k in before if "vision_tower" in k)
    assert changed(before, after, "language_model.model.layers.1.mlp.down_proj.weight")
    assert changed(before, after, "multi_modal_projector.linear_2.weight")
    config = json.loads((model_dir / "training_config.json").read_text())
    assert config["lora_enable"] is False and config["data_path"] == str(data)
