"""Merge a LoRA adapter into a 16-bit (fp32 on CPU) copy of its base model and write a servable artifact.

    python -m train.merge --adapter OUT/checkpoint-500 --output_dir merged/ [--base_model PATH] [--dtype auto]

The base is always reloaded unquantised: merging into a 4-bit model rounds the merged weights (QLoRA trained
against a 4-bit base, but its adapter applies to the 16-bit weights just as well). The processor (chat template,
padding) comes from the checkpoint when the Trainer saved it there, else from the base configured for the
checkpoint's `--version`; `training_config.json` in the checkpoint supplies the base path and version.
The training job calls the same functions at its end.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from train.artifact import read_training_config

log = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class MergeError(ValueError):
    """The adapter or base cannot be merged as asked (a user error)."""


def resolve_dtype(name: str, *, bf16: bool = False, fp16: bool = False, cuda: bool = False) -> Any:
    """`auto`: the training precision on a GPU (bf16 / fp16), float32 otherwise (CPU kernels are fp32)."""
    import torch

    if name == "auto":
        if cuda and bf16:
            return torch.bfloat16
        if cuda and fp16:
            return torch.float16
        return torch.float32
    return getattr(torch, name)


def device_and_dtype(name: str, *, bf16: bool, fp16: bool) -> tuple[Any, Any]:
    """Where merging and eval run (the GPU when there is one) and `resolve_dtype` there."""
    import torch

    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), resolve_dtype(name, bf16=bf16, fp16=fp16, cuda=cuda)


def load_model(path: str | Path, *, dtype: Any, device: Any) -> Any:
    """A full LLaVA model in `dtype` on `device`, in eval mode (never quantised: this is for merging and eval)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def apply_adapter(base: Any, adapter_dir: str | Path) -> Any:
    """base + LoRA adapter (and its trained projector copy) -> one plain model with the deltas folded in."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    return peft_model.merge_and_unload().eval()


def load_processor(sources: list[str | Path], *, version: str, image_aspect_ratio: str) -> Any:
    """The processor from the first source that has one, configured for `version` (idempotent for ours)."""
    from transformers import AutoProcessor

    from train.artifact import configure_processor

    for source in sources:
        path = Path(source)
        if path.exists() and not any((path / name).is_file() for name in PROCESSOR_FILES):
            continue
        processor = AutoProcessor.from_pretrained(str(source))
        return configure_processor(processor, version=version, image_aspect_ratio=image_aspect_ratio)
    raise MergeError(f"no processor found in {', '.join(map(str, sources))}")


def read_adapter_info(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, training_config.json or {}) of an adapter dir; MergeError when it is not one."""
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        raise MergeError(f"{adapter_dir} has no adapter_config.json: not a LoRA checkpoint (a full fine-tune "
                         "checkpoint is already a complete model)")
    return json.loads(adapter_config.read_text()), read_training_config(adapter_dir)


def merge_checkpoint(adapter_dir: str | Path, output_dir: str | Path, *, base_model: str | None = None,
                     version: str | None = None, image_aspect_ratio: str | None = None,
                     dtype: str = "auto") -> Path:
    """Merge an adapter checkpoint into its base and save an artifact (train/artifact.py) to `output_dir`."""
    from train.artifact import save_artifact

    adapter_dir = Path(adapter_dir)
    adapter_config, training = read_adapter_info(adapter_dir)
    base = base_model or training.get("model_name_or_path") or adapter_config.get("base_model_name_or_path")
    origin = "given by --base_model" if base_model else "recorded in the checkpoint"
    if not base or not Path(base).exists():
        raise MergeError(f"base model {base!r} ({origin}) is not available here; pass --base_model with a local "
                         "model dir")
    if not (Path(base) / "config.json").is_file():
        raise MergeError(f"base model {base!r} ({origin}) has no config.json: not a model dir")
    version = version or training.get("version") or "v1"
    aspect = image_aspect_ratio or training.get("image_aspect_ratio") or "pad"
    device, torch_dtype = device_and_dtype(dtype, bf16=training.get("bf16", False), fp16=training.get("fp16", False))
    log.info("merging %s into %s (%s)", adapter_dir, base, torch_dtype)
    model = apply_adapter(load_model(base, dtype=torch_dtype, device=device), adapter_dir)
    processor = load_processor([adapter_dir, base], version=version, image_aspect_ratio=aspect)
    record = {**training, "made_by": "train.merge", "adapter": str(adapter_dir), "model_name_or_path": base,
              "version": version, "image_aspect_ratio": aspect, "merge_dtype": str(torch_dtype)}
    out = save_artifact(output_dir, model, processor, training_config=record)
    log.info("merged model written to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    from train.logs import setup_logging
    from train.templates import CHAT_TEMPLATES

    parser = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="LoRA checkpoint dir (checkpoint-N or the final adapter)")
    parser.add_argument("--output_dir", required=True, help="where the merged model dir is written")
    parser.add_argument("--base_model", help="base model dir (default: the one recorded in the checkpoint)")
    parser.add_argument("--version", choices=sorted(CHAT_TEMPLATES), help="chat template (default: the checkpoint's)")
    parser.add_argument("--image_aspect_ratio", choices=("pad", "crop"), help="default: the checkpoint's")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="merged weights: auto = training precision on a GPU, float32 on CPU")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        merge_checkpoint(args.adapter, args.output_dir, base_model=args.base_model, version=args.version,
                         image_aspect_ratio=args.image_aspect_ratio, dtype=args.dtype)
    except MergeError as e:
        log.error("merge failed: %s", e)
        return 2
    except Exception:
        log.exception("merge failed")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
