"""Checks of a resolved TrainConfig: every problem at once, before any data or weights are read.

    problems = validate(cfg)      # train.config.resolve_config raises ConfigError with them

Paths, choices and ranges of every flag; flags of the original LLaVA code the HF-native model does not have;
scheduler settings that transformers would only refuse once training starts (it builds the scheduler here, on a
dummy optimizer); QLoRA with ZeRO-3. Checks against the base checkpoint itself live in train/modeling.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from train.config import TrainConfig, deepspeed_stage

STRATEGIES = ("no", "steps", "epoch")
# transformers' SchedulerType values, spelled out so validation needs no torch import (a test keeps them in step).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # they step on the validation loss
# Schedulers transformers cannot build without their own arguments (--lr_scheduler_kwargs), with an example.
SCHEDULER_KWARGS_NEEDED = {"cosine_with_min_lr": '{"min_lr_rate": 0.1}',
                           "cosine_warmup_with_min_lr": '{"min_lr_rate": 0.1}',
                           "warmup_stable_decay": '{"num_decay_steps": 100}'}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
EXPORTS = ("merged", "adapter", "both")  # --export: train/export.py


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem of the resolved config (model-specific checks live in train/modeling.py)."""
    from train.templates import CHAT_TEMPLATES

    p: list[str] = []
    for name in ("model_name_or_path", "data_path", "output_dir"):
        if getattr(cfg, name) is None:
            p.append(f"{name} is required (no SageMaker default applies)")
    for name in ("data_path", "validation_data_path"):
        value = getattr(cfg, name)
        if value is not None and not Path(value).is_file():
            p.append(f"{name}: {value} is not a file" + (" (a channel must hold exactly one .json/.jsonl file)"
                                                         if Path(value).is_dir() else ""))
    if cfg.image_folder is not None and not Path(cfg.image_folder).is_dir():
        p.append(f"image_folder: {cfg.image_folder} is not a directory")
    if cfg.version not in CHAT_TEMPLATES:
        p.append(f"version {cfg.version!r} is unknown; known: {', '.join(sorted(CHAT_TEMPLATES))}")
    if cfg.bits not in (4, 8, 16):
        p.append(f"bits must be 4, 8 or 16, got {cfg.bits}")
    if cfg.bits < 16 and not cfg.lora_enable:
        p.append(f"--bits {cfg.bits} needs --lora_enable True: quantised weights cannot be fully fine-tuned")
    if cfg.quant_type not in ("nf4", "fp4"):
        p.append(f"quant_type must be nf4 or fp4, got {cfg.quant_type!r}")
    if cfg.image_aspect_ratio not in ("pad", "crop"):
        p.append(f"image_aspect_ratio must be pad or crop, got {cfg.image_aspect_ratio!r} (anyres is LLaVA-NeXT)")
    for name in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if getattr(cfg, name):
            p.append(f"--{name} True is not supported: the HF-native LLaVA-1.5 has no image start/end or patch "
                     f"tokens (LLaVA-1.5 itself trained with False)")
    if cfg.bf16 and cfg.fp16:
        p.append("choose one of --bf16 and --fp16")
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        p.append(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                 f"got {cfg.attn_implementation!r}")
    elif cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        p.append("attn_implementation flash_attention_2 needs the flash-attn package (build the training image with "
                 "container/build.sh --flash-attn ...), or use sdpa")
    for name in ("evaluation_strategy", "save_strategy"):
        if getattr(cfg, name) not in STRATEGIES:
            p.append(f"{name} must be one of {', '.join(STRATEGIES)}, got {getattr(cfg, name)!r}")
    p += _scheduler_problems(cfg)
    if cfg.evaluation_strategy != "no" and cfg.validation_data_path is None:
        p.append(f"--evaluation_strategy {cfg.evaluation_strategy} needs --validation_data_path")
    for name in ("lora_r", "lora_alpha", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "save_steps", "logging_steps", "model_max_length",
                 "eval_max_new_tokens"):
        if getattr(cfg, name) <= 0:
            p.append(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("learning_rate", "mm_projector_lr"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            p.append(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        p.append("set --num_train_epochs > 0 or --max_steps > 0")
    for name in ("weight_decay", "max_grad_norm", "dataloader_num_workers", "eval_max_samples"):
        if getattr(cfg, name) < 0:
            p.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name, unset in (("save_total_limit", "None keeps every checkpoint"), ("eval_steps", "None: --logging_steps")):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            p.append(f"{name} must be at least 1 ({unset}), got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:
        p.append(f"seed must be in [0, 2**32), got {cfg.seed}")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0 <= cfg.lora_dropout < 1:
        p.append(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.merge_dtype not in ("auto", "bfloat16", "float16", "float32"):
        p.append(f"merge_dtype must be auto, bfloat16, float16 or float32, got {cfg.merge_dtype!r}")
    if cfg.export not in EXPORTS:
        p.append(f"export must be one of {', '.join(EXPORTS)}, got {cfg.export!r}")
    elif cfg.export != "merged" and not cfg.lora_enable:
        p.append(f"--export {cfg.export} needs --lora_enable True: a full fine-tune has no adapter to export")
    p += _deepspeed_problems(cfg)
    return p


def _scheduler_problems(cfg: TrainConfig) -> list[str]:
    """Scheduler settings that transformers would only refuse once the model is loaded and training starts."""
    name, kwargs = cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs or {}
    if name not in LR_SCHEDULERS:
        return [f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {name!r}"]
    if name in METRIC_SCHEDULERS and cfg.evaluation_strategy == "no":
        return [f"lr_scheduler_type {name} lowers the learning rate from the validation loss: it needs "
                "--evaluation_strategy steps (or epoch) and --validation_data_path"]
    if not kwargs and name not in SCHEDULER_KWARGS_NEEDED:
        return []
    # Build the scheduler once on a dummy optimizer: transformers itself says which arguments are missing or wrong.
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=0, scheduler_specific_kwargs=kwargs,
                      num_training_steps=cfg.max_steps if cfg.max_steps > 0 else 10**6)
    except (TypeError, ValueError, KeyError) as e:
        example = SCHEDULER_KWARGS_NEEDED.get(name)
        hint = f"; e.g. --lr_scheduler_kwargs '{example}'" if example else ""
        return [f"lr_scheduler_type {name} with lr_scheduler_kwargs {json.dumps(kwargs)}: {e}{hint}"]
    return []


def _deepspeed_problems(cfg: TrainConfig) -> list[str]:
    if cfg.deepspeed is None:
        return []
    try:
        stage = deepspeed_stage(cfg.deepspeed)
    except (OSError, ValueError, AttributeError) as e:
        return [f"--deepspeed {cfg.deepspeed}: not a readable DeepSpeed JSON config ({e})"]
    if stage == 3 and cfg.bits < 16:
        return [f"--bits {cfg.bits} with ZeRO-3 is refused: ZeRO-3 partitions every parameter across GPUs, and "
                "bitsandbytes' packed quantised weights cannot be partitioned and gathered like ordinary tensors. "
                "Use --deepspeed zero2 for QLoRA (LLaVA's own QLoRA recipe), or --bits 16 with ZeRO-3"]
    return []
