"""The model being fine-tuned: checks against the checkpoint, quantisation, LoRA, what trains and what stays frozen.

- `--bits 4`: NF4 (or fp4), double quantisation, bf16 compute (fp16 with --fp16, fp32 on CPU), then peft's
  `prepare_model_for_kbit_training`; `--bits 8`: LLM.int8; the vision tower, projector and lm_head stay unquantised.
- LoRA (`--lora_enable`) on the language model's linear layers only, chosen by `LORA_TARGET_REGEX` (a plain
  ["q_proj", ...] list would also hit the CLIP tower); the projector is trained fully through `modules_to_save`, so
  every checkpoint and the final adapter carry it; its learning rate is set in train/trainer.py.
- Full fine-tuning when LoRA is off: language model + projector train, the vision tower stays frozen (LLaVA-1.5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from train.config import TrainConfig

log = logging.getLogger(__name__)

LORA_TARGET_REGEX = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
# bitsandbytes matches these as prefixes of full module names: "vision_tower" alone would match nothing.
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]

# Vision towers the blog's --vision_tower may name, by what identifies them in a LLaVA checkpoint's vision_config.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": {"image_size": 336, "patch_size": 14, "hidden_size": 1024,
                                          "num_hidden_layers": 24},
    "openai/clip-vit-large-patch14": {"image_size": 224, "patch_size": 14, "hidden_size": 1024,
                                      "num_hidden_layers": 24},
}


class ModelConfigError(ValueError):
    """The base checkpoint cannot be used as asked (a user error); `.problems` lists why."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the base model does not fit the config:\n  " + "\n  ".join(problems))


def read_model_config(path: str) -> Any:
    """The checkpoint's config.json as a LlavaConfig, without loading weights; user errors for anything else."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelConfigError([f"cannot read a model config from {path}: {e}"]) from e
    archs = getattr(config, "architectures", None) or []
    if "LlavaLlamaForCausalLM" in archs or "LlavaMistralForCausalLM" in archs:
        raise ModelConfigError([f"{path} is an original haotian-liu/LLaVA checkpoint; use the HF-native one "
                                "(llava-hf/llava-1.5-7b-hf) or convert it with transformers' "
                                "convert_llava_weights_to_hf.py"])
    if config.model_type != "llava":
        raise ModelConfigError([f"{path} is a {config.model_type!r} model; this job fine-tunes HF-native LLaVA "
                                "(LlavaForConditionalGeneration)"])
    return config


def checkpoint_problems(cfg: TrainConfig, config: Any) -> list[str]:
    """The blog's model flags must describe the checkpoint: they can't rebuild an HF-native model, only confirm it."""
    problems = []
    if cfg.vision_tower is not None:
        problems += _vision_tower_problems(cfg.vision_tower, config.vision_config)
    if cfg.mm_projector_type is not None:
        actual = f"mlp2x_{config.projector_hidden_act}"
        if cfg.mm_projector_type != actual:
            problems.append(f"--mm_projector_type {cfg.mm_projector_type} does not match the checkpoint's projector "
                            f"({actual}); the HF-native LLaVA projector is fixed by the checkpoint")
    if cfg.mm_vision_select_layer is not None and cfg.mm_vision_select_layer != config.vision_feature_layer:
        problems.append(f"--mm_vision_select_layer {cfg.mm_vision_select_layer} differs from the checkpoint's "
                        f"vision_feature_layer {config.vision_feature_layer}: its projector was trained on that layer")
    return problems


def _vision_tower_problems(name: str, vision_config: Any) -> list[str]:
    expected = KNOWN_VISION_TOWERS.get(name)
    if expected is None and (Path(name) / "config.json").is_file():
        from transformers import CLIPVisionConfig

        other = CLIPVisionConfig.from_pretrained(name)
        expected = {k: getattr(other, k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")}
    if expected is None:
        return [f"--vision_tower {name}: cannot check it against the checkpoint (not a local dir, not one of "
                f"{', '.join(KNOWN_VISION_TOWERS)}); the HF-native checkpoint has its own tower, drop the flag"]
    actual = {k: getattr(vision_config, k) for k in expected}
    if actual != expected:
        return [f"--vision_tower {name} differs from the checkpoint's own vision tower ({actual}); "
                "an HF-native LLaVA cannot swap towers: drop the flag or pick the matching base model"]
    return []


def ampere_or_newer(capability: tuple[int, int] | None) -> bool:
    """A GPU of compute capability 8.0+ (A10G, L4, A100, H100): native bf16 and tf32. None: no GPU."""
    return capability is not None and capability[0] >= 8


def compute_dtype(cfg: TrainConfig, *, cuda: bool) -> Any:
    import torch

    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    if not (cuda and cfg.bits == 4):
        return torch.float32  # CPUs compute in fp32
    # QLoRA's usual compute dtype on a GPU without explicit precision flags; fp16 before Ampere (no native bf16).
    return torch.bfloat16 if ampere_or_newer(torch.cuda.get_device_capability()) else torch.float16


def quantization_config(cfg: TrainConfig, *, cuda: bool) -> Any:
    if cfg.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg, cuda=cuda),
                              llm_int8_skip_modules=QUANT_SKIP_MODULES)


def build_model(cfg: TrainConfig, *, device: Any) -> Any:
    """Load the base model as configured and make exactly the intended parameters trainable."""
    from transformers import LlavaForConditionalGeneration

    cuda = device.type == "cuda"
    quant = quantization_config(cfg, cuda=cuda)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(cfg, cuda=cuda), "attn_implementation": cfg.attn_implementation}
    if quant is not None:
        # Quantised weights are placed at load time, one full copy per process (ZeRO-2 / DDP, never ZeRO-3).
        kwargs.update(quantization_config=quant, device_map={"": device})
    log.info("loading %s (bits=%d, dtype=%s, attention=%s)", cfg.model_name_or_path, cfg.bits, kwargs["dtype"],
             cfg.attn_implementation)
    model = LlavaForConditionalGeneration.from_pretrained(cfg.model_name_or_path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_enable:
        model = apply_lora(cfg, model)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    freeze_vision_tower(model)
    log.info("trainable parameters: %s", trainable_summary(model))
    return model


def apply_lora(cfg: TrainConfig, model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=LORA_TARGET_REGEX, modules_to_save=[PROJECTOR], task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def freeze_vision_tower(model: Any) -> None:
    for name, param in model.named_parameters():
        if f"{VISION_TOWER}." in name:
            param.requires_grad_(False)


def is_projector_param(name: str) -> bool:
    return f"{PROJECTOR}." in name


def trainable_summary(model: Any) -> str:
    """'N of M (p%): lora a, projector b, other c' over the trainable parameters."""
    total = trainable = lora = projector = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
            lora += n if "lora_" in name else 0
            projector += n if is_projector_param(name) else 0
    share = 100 * trainable / total if total else 0.0
    return (f"{trainable:,} of {total:,} ({share:.2f}%): lora {lora:,}, projector {projector:,}, "
            f"other {trainable - lora - projector:,}")
