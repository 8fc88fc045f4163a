"""The artifact: the one contract between training and serving.

A model dir that `serve` answers from holds:
    config.json, model.safetensors        merged weights (16-bit or fp32; never a 4-bit checkpoint), under
                                          llava-hf's published checkpoint names (`checkpoint_state_dict`)
    tokenizer.json, tokenizer_config.json
    processor_config.json                 image processing, including pad-to-square and its colour
    chat_template.jinja                   the prompt template of the `--version` it was trained with
    generation_config.json                generation defaults (max_new_tokens, temperature, ...)
    training_config.json                  the resolved training config (or how the artifact was made)
and, after a training run, eval_report.json and loss_curve.png.

`configure_processor` is the single place where the image preprocessing is decided (pad-to-square with the image
processor's mean colour, then resize and crop); serving never re-implements it, it loads the processor from here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
EVAL_REPORT_FILE = "eval_report.json"

# Generation defaults written into every artifact; a request can override each of them.
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False}

# In-memory parameter name prefix (transformers 5) -> the name in llava-hf's published checkpoints (e.g.
# llava-hf/llava-1.5-7b-hf), which transformers 4 and 5, vLLM and TGI all read. The vision tower's own prefix
# (`vision_model.`) is added by `checkpoint_state_dict` only where the loaded class dropped it.
LLAVA_HF_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
)
VISION_MODEL_PREFIX = "vision_model."


def configure_processor(processor: Any, *, version: str, image_aspect_ratio: str = "pad") -> Any:
    """Give a LlavaProcessor the chat template of `version` and the image handling of `image_aspect_ratio`.

    `pad` (LLaVA-1.5's recipe) pads to a square with the mean colour before resizing, so wide charts are not
    cropped; `crop` keeps the checkpoint's resize + centre crop. The PIL backend is pinned so that a machine with
    torchvision does not silently get different pixel values than the one that trained.
    """
    from transformers import LlavaImageProcessorPil

    from train.templates import chat_template

    if image_aspect_ratio not in ("pad", "crop"):
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
    old = processor.image_processor
    processor.image_processor = LlavaImageProcessorPil(
        do_pad=image_aspect_ratio == "pad",
        size=dict(old.size),
        crop_size=dict(old.crop_size),
        do_center_crop=getattr(old, "do_center_crop", True),
        image_mean=list(old.image_mean),
        image_std=list(old.image_std),
        resample=old.resample,
        do_convert_rgb=True,
    )
    template = chat_template(version)
    processor.chat_template = template
    processor.tokenizer.chat_template = template
    return processor


def write_training_config(folder: Path, config: dict[str, Any]) -> None:
    """The resolved training config into a checkpoint or adapter dir (resume and `python -m train.merge` read it)."""
    (folder / TRAINING_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_training_config(folder: Path) -> dict[str, Any]:
    """A checkpoint's, adapter's or artifact's training config; {} when it has none."""
    path = folder / TRAINING_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_state_dict(model: Any) -> dict[str, Any] | None:
    """The model's weights under llava-hf's checkpoint names, or None for a model whose names do not all map (or
    whose tensors share storage, i.e. tied weights): transformers then saves it its own way.

    Why not `save_pretrained`'s own renaming: transformers 5 saves by reversing whatever renaming the *load* applied,
    so the layout of a saved model depended on its history. A model built from a config came out with the vision
    tower under `vision_tower.*` (transformers 4 drops it as unexpected keys); a ZeRO-3 full fine-tune came out as
    `language_model.model.model.*` (the language model is then lost to every reader but transformers 5).
    """
    renamed: dict[str, Any] = {}
    storages: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        new = _llava_hf_name(name)
        if new is None:
            return None
        storages.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        renamed[new] = tensor
    return renamed if len(storages) == len(renamed) else None


def _llava_hf_name(name: str) -> str | None:
    for ours, theirs in LLAVA_HF_NAMES:
        if name.startswith(ours):
            rest = name[len(ours):]
            if theirs == "vision_tower." and not rest.startswith(VISION_MODEL_PREFIX):
                rest = VISION_MODEL_PREFIX + rest
            return theirs + rest
    return None


def save_artifact(
    out_dir: str | Path,
    model: Any,
    processor: Any,
    *,
    training_config: dict[str, Any],
    generation_defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a ready-to-serve model dir: weights (safetensors), processor, chat template, generation defaults and
    config."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    gen = GenerationConfig(
        **{**DEFAULT_GENERATION, **(generation_defaults or {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = gen
    state_dict = checkpoint_state_dict(model)
    if state_dict is None:
        log.warning("%s: parameter names outside the LLaVA layout; saving them as transformers names them",
                    type(model).__name__)
        model.save_pretrained(out, safe_serialization=True)
    else:  # names are final: no renaming by transformers on top
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict, save_original_format=False)
    processor.save_pretrained(out)
    gen.save_pretrained(out)
    (out / TRAINING_CONFIG_FILE).write_text(json.dumps(training_config, indent=2, sort_keys=True, default=str) + "\n")
    return out
