"""Adapters for the adapter tests (tests/test_*adapter*.py): two LoRA adapters trained by our own job on the tiny
model, and broken copies of one for every way an adapter can be refused.

    trained_adapters["one"]     a PEFT folder from `python -m train ... --export adapter`
    trained_adapters["two"]     from `--export both` (its run also wrote the merged artifact and the report)
    bad_adapter(kind, trained_adapters["one"], tmp_path) -> folder

Nothing is faked: the adapters come out of `python -m train` on the tiny artifact, and each broken copy is the real
folder with exactly one thing wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_helpers import write_tiny_dataset
from train_support import FAST_ARGS, output_of, run_train

QUESTION = "What type of chart is this?"


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory, tiny_artifact) -> dict[str, Path]:
    """Two adapters from the training job on the tiny base: few steps, different seeds and learning rates, so they
    answer differently from each other and from the base."""
    root = tmp_path_factory.mktemp("adapters")
    data, images = write_tiny_dataset(root / "data", n=8)
    common = ["--model_name_or_path", tiny_artifact, "--data_path", str(data), "--image_folder", str(images),
              "--lora_enable", "True", "--max_steps", "2", "--save_steps", "100", *FAST_ARGS]
    runs = {"one": ["--export", "adapter", "--seed", "1", "--learning_rate", "2e-2", "--mm_projector_lr", "2e-2",
                    "--validation_data_path", str(data)],
            "two": ["--export", "both", "--seed", "2", "--learning_rate", "5e-2", "--eval_generation", "False"]}
    found = {"root": root, "data": data, "images": images, "base": Path(tiny_artifact)}
    for name, extra in runs.items():
        out = root / f"run-{name}"
        proc = run_train([*common, "--output_dir", str(out), *extra])
        assert proc.returncode == 0, output_of(proc)[-4000:]
        found[name] = out / "adapter"
        found[f"{name}_out"] = out
    return found


def copy_adapter(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(str(path))), str(path))


def other_hidden_size_adapter(dest: Path) -> Path:
    """A LoRA adapter (no base_model.json) for a LLaVA whose language model is twice as wide as the tiny one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from demo.tiny import build_tiny_model_and_processor
    from train.modeling import LORA_TARGET_REGEX

    small, _ = build_tiny_model_and_processor("test")
    config = LlavaConfig.from_dict(small.config.to_dict())
    config.text_config.hidden_size *= 2
    config.text_config.intermediate_size *= 2
    torch.manual_seed(0)
    wide = get_peft_model(LlavaForConditionalGeneration(config), LoraConfig(r=4, target_modules=LORA_TARGET_REGEX))
    for name, param in wide.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    wide.save_pretrained(dest)
    return dest


def bad_adapter(kind: str, good: Path, tmp_path: Path) -> Path:
    """A copy of the `good` adapter folder with one thing wrong (`kind`)."""
    if kind == "other_hidden_size":
        return other_hidden_size_adapter(tmp_path / kind)
    folder = copy_adapter(good, tmp_path / kind)
    weights = folder / "adapter_model.safetensors"
    if kind == "corrupt_weights":
        weights.write_bytes(b"\x00not safetensors" * 64)
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "pickled_weights":
        weights.rename(folder / "adapter_model.bin")
    elif kind == "other_base":
        facts = json.loads((folder / "base_model.json").read_text())
        (folder / "base_model.json").write_text(json.dumps({**facts, "text_layers": facts["text_layers"] + 30}))
    elif kind == "keys_match_nothing":  # the silent no-op: PEFT would load these without a word
        _rewrite_weights(folder, lambda t: {k.replace("language_model", "text_model"): v for k, v in t.items()})
    elif kind == "no_op":  # lora_B all zero, no projector: loads cleanly, changes nothing
        _rewrite_weights(folder, lambda t: {k: v.zero_() if "lora_B" in k else v for k, v in t.items()
                                            if "multi_modal_projector" not in k})
        _edit_config(folder, modules_to_save=None)
    elif kind == "rank_over_cap":
        _edit_config(folder, r=4096)
    elif kind == "not_lora":
        _edit_config(folder, peft_type="IA3")
    elif kind == "missing_lora_matrices":
        _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if "layers.1." not in k})
    else:
        raise ValueError(kind)
    return folder


# kind -> (status, code) the server answers for it
BAD_ADAPTERS = {
    "corrupt_weights": (400, "invalid_adapter"),
    "missing_weights": (400, "invalid_adapter"),
    "pickled_weights": (400, "invalid_adapter"),
    "other_base": (400, "adapter_mismatch"),
    "other_hidden_size": (400, "adapter_mismatch"),
    "keys_match_nothing": (400, "invalid_adapter"),
    "missing_lora_matrices": (400, "invalid_adapter"),
    "no_op": (400, "invalid_adapter"),
    "rank_over_cap": (400, "adapter_rank_too_large"),
    "not_lora": (400, "invalid_adapter"),
}
