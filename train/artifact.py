"""The artifact: the one contract between training and serving.

A model dir that `serve` answers from holds:
    config.json, model.safetensors        merged weights (16-bit or fp32; never a 4-bit checkpoint)
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
from pathlib import Path
from typing import Any

TRAINING_CONFIG_FILE = "training_config.json"
EVAL_REPORT_FILE = "eval_report.json"

# Generation defaults written into every artifact; a request can override each of them.
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False}


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


def save_artifact(
    out_dir: str | Path,
    model: Any,
    processor: Any,
    *,
    training_config: dict[str, Any],
    generation_defaults: dict[str, Any] | None = None,
) -> Path:
    """Write a ready-to-serve model dir: weights (safetensors), processor, chat template, generation defaults, config."""
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
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    gen.save_pretrained(out)
    (out / TRAINING_CONFIG_FILE).write_text(json.dumps(training_config, indent=2, sort_keys=True, default=str) + "\n")
    return out
