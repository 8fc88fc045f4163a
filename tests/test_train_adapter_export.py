"""`python -m train --export adapter|both` on the tiny model: what the exported PEFT folder and adapter.tar.gz hold,
that PEFT loads the folder on the base it was trained on, that the report of an adapter-only export scores the
adapter as the server answers with it, and that the export's self-check refuses adapters that change nothing."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from adapter_support import QUESTION
from train_support import greedy, load_weights

from train.adapter_export import AdapterExportError, export_adapter

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "base_model.json", "chat_template.jinja",
              "processor_config.json", "tokenizer.json", "tokenizer_config.json", "training_config.json"}


def test_an_adapter_export_holds_a_peft_folder_and_its_archive_and_no_merged_model(trained_adapters):
    from transformers import AutoConfig

    from serve.engine.adapter_files import base_facts

    out, folder = trained_adapters["one_out"], trained_adapters["one"]
    assert PEFT_FILES <= {p.name for p in folder.iterdir()}
    assert not (out / "model.safetensors").exists()  # --export adapter: no merged model
    with tarfile.open(out / "adapter.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(members) == {p.name for p in folder.iterdir()} - {"training_args.bin"}
    assert all(members[name] == (folder / name).read_bytes() for name in members)
    weights = load_weights(folder / "adapter_model.safetensors")
    assert any(".lora_A." in k for k in weights) and any("multi_modal_projector" in k for k in weights)
    facts = json.loads((folder / "base_model.json").read_text())
    assert facts == base_facts(AutoConfig.from_pretrained(trained_adapters["base"]))


def test_both_writes_the_merged_model_too(trained_adapters):
    out = trained_adapters["two_out"]
    assert (out / "model.safetensors").is_file() and (out / "adapter.tar.gz").is_file()
    assert PEFT_FILES <= {p.name for p in (out / "adapter").iterdir()}


def test_peft_loads_the_export_on_its_base_and_it_changes_the_answer(trained_adapters):
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder, image = trained_adapters["one"], trained_adapters["images"] / "img_0.png"
    processor = AutoProcessor.from_pretrained(folder)
    base = LlavaForConditionalGeneration.from_pretrained(trained_adapters["base"], dtype=torch.float32).eval()
    _, base_logits = greedy(base, processor, image, QUESTION)
    tuned = PeftModel.from_pretrained(base, folder).eval()
    _, tuned_logits = greedy(tuned, processor, image, QUESTION)
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)


def test_the_report_of_an_adapter_export_scores_what_the_server_answers_with_it(trained_adapters, tiny_loaded):
    from evaluation.questions import load_questions
    from serve.engine.adapter_files import SourcePolicy
    from serve.engine.adapters import AdapterLimits
    from serve.engine.images import decode_image
    from serve.engine.predictor import Predictor
    from serve.engine.types import GenerationRequest

    report = json.loads((trained_adapters["one_out"] / "eval_report.json").read_text())
    assert {"base", "fine_tuned"} <= set(report["runs"])
    questions = load_questions(trained_adapters["data"], trained_adapters["images"], limit=report["questions"])
    predictor = Predictor(tiny_loaded, adapters=AdapterLimits(
        sources=SourcePolicy(local_roots=(trained_adapters["one"],))))
    predictor.adapters.register("fine_tuned", str(trained_adapters["one"]))
    shrink = predictor.image_processor_for("fine_tuned")
    requests = [GenerationRequest(image=decode_image(Path(q["image"]).read_bytes(), 1 << 30, shrink_for=shrink),
                                  question=q["question"], temperature=0, max_new_tokens=report["max_new_tokens"],
                                  adapter="fine_tuned") for q in questions]
    served = [r.answer for r in predictor.predict(requests)]
    tuned = [p for p in report["predictions"] if p["run"] == "fine_tuned"]
    assert [p["id"] for p in tuned] == [q["id"] for q in questions]
    assert [p["prediction"] for p in tuned] == served


@pytest.fixture(scope="module")
def tiny_base():
    from demo.tiny import build_tiny_model_and_processor

    return build_tiny_model_and_processor("test")


def untrained_adapter(model, folder: Path, *, rename=None) -> Path:
    """A LoRA adapter as get_peft_model makes it (lora_B zero, the projector copied unchanged), saved; `rename`
    rewrites its weight names afterwards."""
    import copy

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from train.modeling import LORA_TARGET_REGEX, PROJECTOR

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=LORA_TARGET_REGEX,
                                                                 modules_to_save=[PROJECTOR]))
    peft_model.save_pretrained(folder)
    if rename is not None:
        path = folder / "adapter_model.safetensors"
        save_file({rename(k): v for k, v in load_file(str(path)).items()}, str(path))
    return folder


def test_the_self_check_refuses_an_untrained_adapter(tiny_base, tmp_path):
    model, processor = tiny_base
    folder = untrained_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterExportError, match="does not change the model"):
        export_adapter(model, processor, folder, tmp_path)
    assert not (tmp_path / "adapter.tar.gz").exists()


def test_the_self_check_refuses_weights_that_match_no_module(tiny_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model, processor = tiny_base
    folder = untrained_adapter(model, tmp_path / "adapter", rename=lambda k: k.replace("language_model", "lm"))
    path = folder / "adapter_model.safetensors"
    weights = load_file(str(path))  # trained-looking values, but under names PEFT matches to nothing
    save_file({k: torch.ones_like(v) if "lora_B" in k else v for k, v in weights.items()}, str(path))
    # PEFT only warns about them and loads the adapter anyway: the export stops.
    with pytest.raises(AdapterExportError), pytest.warns(UserWarning, match="missing adapter keys"):
        export_adapter(model, processor, folder, tmp_path)


def test_the_self_check_passes_a_real_change_and_leaves_the_base_as_it_was(tiny_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model, processor = tiny_base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = untrained_adapter(model, tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 0.05) if "lora_B" in k else v for k, v in load_file(str(path)).items()},
              str(path))
    archive = export_adapter(model, processor, folder, tmp_path)
    assert archive == tmp_path / "adapter.tar.gz" and archive.is_file()
    after = model.state_dict()
    assert set(after) == set(before) and all(after[k].equal(v) for k, v in before.items())


@pytest.mark.parametrize("flags, problem", [
    (["--export", "adapter"], "--export adapter needs --lora_enable True"),
    (["--export", "everything", "--lora_enable", "True"], "export must be one of merged, adapter, both"),
])
def test_export_flags_are_checked(tmp_path, flags, problem):
    from train.config import ConfigError, resolve_config
    from train.sagemaker_env import SageMakerPaths

    data = tmp_path / "data.json"
    data.write_text("[]")
    (tmp_path / "base").mkdir()
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--data_path", str(data), "--output_dir",
            str(tmp_path / "out"), *flags]
    with pytest.raises(ConfigError) as info:
        resolve_config(argv, SageMakerPaths(tmp_path / "no-sagemaker"))
    assert any(problem in p for p in info.value.problems), info.value.problems
