"""Load a model dir for serving: `load_artifact(model_dir, quantization=..., device=...) -> LoadedModel`.

The one place the 4-bit load lives. On CUDA the default is NF4 with 16-bit compute (`half_dtype`: bf16, or fp16 on
a GPU older than Ampere) and double quantization; the vision tower, the projector and lm_head stay unquantized
(bitsandbytes matches skip names from the start of the full module name, hence the `model.` prefix). On CPU the
default is unquantized fp32; NF4 can be forced there too (bitsandbytes has CPU kernels; every quantized Linear needs
in_features divisible by 64).

The processor (tokenizer, chat template, image padding) and the generation defaults come from the model dir.
A dir holding a PEFT adapter (`adapter_config.json` naming `base_model_name_or_path`) is served too: the adapter
is merged into a 16-bit/fp32 copy of the base in memory (and only then quantized), with a logged warning, because
merging once with `python -m train.merge` makes start-up faster.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# SERVE_QUANTIZATION: auto is NF4 on CUDA and unquantized on CPU (resolve_quantization).
QUANTIZATIONS = ("auto", "nf4", "bf16", "fp16", "none")

# Prefixes of the full module names bitsandbytes must leave alone.
NF4_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


class ModelLoadError(RuntimeError):
    """The model dir cannot be served (missing files, unknown base model, bad quantization for the device)."""


@dataclass
class LoadedModel:
    model: Any  # LlavaForConditionalGeneration (or another image-text-to-text model), in eval mode
    processor: Any  # its processor: tokenizer (left padding) + image processor + chat template
    generation_config: Any  # transformers.GenerationConfig: the artifact's defaults
    device: str
    quantization: str  # the resolved choice: nf4, bf16, fp16 or none
    model_dir: Path
    adapter_base: str | None = None  # base model the adapter was merged into, if the dir held an adapter

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else [int(e) for e in (eos or [])]

    @property
    def max_positions(self) -> int | None:
        text = getattr(self.model.config, "text_config", self.model.config)
        return getattr(text, "max_position_embeddings", None)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def resolve_quantization(quantization: str, device: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "auto":
        return "nf4" if device.startswith("cuda") else "none"
    return quantization


def load_artifact(model_dir: str | Path, *, quantization: str = "auto", device: str | None = None) -> LoadedModel:
    """Load weights, processor and generation defaults from `model_dir`, ready for `generate`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model dir {model_dir} does not exist")
    device = resolve_device(device)
    quant = resolve_quantization(quantization, device)
    adapter = _adapter_base(model_dir)
    if adapter is not None:
        model, processor_dir = _load_adapter_merged(model_dir, adapter, quant, device)
    else:
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"{model_dir} holds neither a model (config.json) nor a PEFT adapter "
                                 "(adapter_config.json)")
        model, processor_dir = _load_weights(model_dir, quant, device), model_dir
    processor = _load_processor(processor_dir)
    gen = _load_generation_config(model_dir if (model_dir / "generation_config.json").is_file() else processor_dir,
                                  model, processor)
    model.generation_config = gen
    log.info("loaded %s on %s (quantization=%s%s)", model_dir, device, quant,
             f", adapter merged into {adapter}" if adapter else "")
    return LoadedModel(model=model, processor=processor, generation_config=gen, device=device, quantization=quant,
                       model_dir=model_dir, adapter_base=adapter)


def half_dtype(device: str, capability: tuple[int, int] | None = None) -> Any:
    """The 16-bit type NF4 computes in and the unquantized parts are kept in: bf16, except on a GPU older than
    Ampere (compute capability < 8.0: the T4 of ml.g4dn, the V100 of ml.p3). bf16 is only emulated there, and
    torch.compile's Triton kernels are not built for it, so fp16 it is (LLaVA-1.5's own release dtype)."""
    import torch

    if not device.startswith("cuda"):
        return torch.bfloat16  # bitsandbytes' CPU kernels take bf16
    major, _ = capability or torch.cuda.get_device_capability(torch.device(device))
    return torch.bfloat16 if major >= 8 else torch.float16


def _dtype(quant: str, device: str) -> Any:
    import torch

    if quant == "nf4":
        return half_dtype(device)
    if quant == "bf16":
        if half_dtype(device) != torch.bfloat16:
            log.warning("SERVE_QUANTIZATION=bf16 on a GPU without native bf16 (compute capability %s): emulated and "
                        "slow; fp16 or nf4 (fp16 compute here) are the fast choices",
                        ".".join(map(str, torch.cuda.get_device_capability(torch.device(device)))))
        return torch.bfloat16
    if quant == "fp16":
        return torch.float16
    return torch.float32


def nf4_config(compute_dtype: Any = None) -> Any:
    """NF4 + double quantization, computing in `compute_dtype` (default bf16); the vision tower, the projector and
    lm_head are left unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(NF4_SKIP_MODULES))


def _load_weights(path: str | Path, quant: str, device: str):
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": _dtype(quant, device), "device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(kwargs["dtype"])
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model weights from {path}: {e}") from e
    return model.eval()


def _adapter_base(model_dir: Path) -> str | None:
    cfg_file = model_dir / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    try:
        base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not readable JSON: {e}") from e
    if not base:
        raise ModelLoadError(f"{cfg_file} does not name base_model_name_or_path; cannot serve the adapter")
    # A relative base path is read relative to the adapter dir (artifacts are moved around as a tree).
    relative = (model_dir / base)
    return str(relative.resolve()) if not Path(base).is_absolute() and relative.is_dir() else base


def _load_adapter_merged(model_dir: Path, base: str, quant: str, device: str):
    """Merge the adapter into a full-precision copy of the base; quantize only after merging (merging into 4-bit
    weights rounds the adapter's update away)."""
    from peft import PeftModel

    log.warning("%s holds a PEFT adapter: merging it into %s at start-up (run `python -m train.merge` once to "
                "serve a merged artifact and start faster)", model_dir, base)
    merge_quant = quant
    if quant == "nf4":  # merged in the 16-bit type it will compute in, then quantized
        import torch

        merge_quant = "bf16" if half_dtype(device) == torch.bfloat16 else "fp16"
    base_model = _load_weights(base, merge_quant, device)
    try:
        merged = PeftModel.from_pretrained(base_model, str(model_dir)).merge_and_unload()
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot apply the adapter in {model_dir} to {base}: {e}") from e
    has_processor = (model_dir / "processor_config.json").is_file() or (model_dir / "tokenizer.json").is_file()
    processor_dir = model_dir if has_processor else base
    if quant != "nf4":
        return merged.eval(), processor_dir
    with tempfile.TemporaryDirectory(prefix="serve-merged-") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged, base_model
        return _load_weights(tmp, "nf4", device), processor_dir


def _load_processor(path: str | Path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the processor from {path}: {e}") from e
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation appends on the right, so prompts pad on the left
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"{path} has no chat template (chat_template.jinja); cannot render prompts")
    return processor


def _load_generation_config(path: str | Path, model: Any, processor: Any):
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(model.config)
    if gen.pad_token_id is None:
        gen.pad_token_id = processor.tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = processor.tokenizer.eos_token_id
    return gen
