"""The artifact's weights (train/artifact.py): saved under llava-hf's published checkpoint names whatever the model's
history, read back exactly, and saved transformers' own way for a model those names do not fit."""

from __future__ import annotations

import logging
import re

import pytest
from safetensors.torch import load_file, save_file

# The names in llava-hf/llava-1.5-7b-hf's model.safetensors.index.json (CLIP's `pre_layrnorm` spelling included).
LLAVA_HF_NAME = re.compile(r"^(language_model\.model\.(embed_tokens|layers\.\d+|norm)\."
                           r"|language_model\.lm_head\.weight$"
                           r"|multi_modal_projector\.linear_[12]\.(weight|bias)$"
                           r"|vision_tower\.vision_model\.(embeddings|encoder\.layers\.\d+|pre_layrnorm|post_layernorm)\.)")


@pytest.fixture
def tiny():
    from demo.tiny import build_tiny_model_and_processor

    return build_tiny_model_and_processor()


def reload(path):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_are_saved_under_llava_hf_names_and_reload_exactly(tiny, tmp_path):
    from train.artifact import save_artifact

    model, processor = tiny
    save_artifact(tmp_path / "a", model, processor, training_config={})
    saved = load_file(tmp_path / "a" / "model.safetensors")
    assert len(saved) == len(model.state_dict())
    assert [k for k in saved if not LLAVA_HF_NAME.match(k)] == []
    assert same_weights(reload(tmp_path / "a"), model)


def test_a_model_read_from_another_layout_is_saved_under_llava_hf_names(tiny, tmp_path):
    """transformers 5 saves a model by reversing the renaming that its load applied. A ZeRO-3 Trainer save wrote
    `language_model.model.model.*`, and a model read from there came back out under those names."""
    from train.artifact import save_artifact

    model, processor = tiny
    save_artifact(tmp_path / "a", model, processor, training_config={})
    odd = {k.replace("language_model.model.", "language_model.model.model.", 1): v
           for k, v in load_file(tmp_path / "a" / "model.safetensors").items()}
    save_file(odd, tmp_path / "a" / "model.safetensors", metadata={"format": "pt"})
    from_odd = reload(tmp_path / "a")
    assert same_weights(from_odd, model)

    save_artifact(tmp_path / "b", from_odd, processor, training_config={})
    saved = load_file(tmp_path / "b" / "model.safetensors")
    assert [k for k in saved if not LLAVA_HF_NAME.match(k)] == []
    assert same_weights(reload(tmp_path / "b"), model)


def test_tied_weights_and_other_architectures_are_saved_the_transformers_way(tiny, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from train.artifact import checkpoint_state_dict, save_artifact

    model, processor = tiny
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # one tensor under two names
    assert checkpoint_state_dict(model) is None

    text_only = LlamaForCausalLM(model.config.text_config)
    assert checkpoint_state_dict(text_only) is None
    caplog.set_level(logging.WARNING)
    save_artifact(tmp_path / "t", text_only, processor, training_config={})
    assert "outside the LLaVA layout" in caplog.text
    assert same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "t"), text_only)
