"""TrainConfig: the one typed config of the fine-tuning job, with its checks. Importable without torch.

    cfg.problems()          # checks that need nothing but the values (`llava-sm train` runs them before submitting)
    machine_problems(cfg)   # checks against the local machine: files, installed packages, transformers' scheduler

Each field's type, choices and range live in its metadata (core.settings checks them as values are read); the
checks here are the ones across fields. Where the values come from (flags, YAML, hyperparameters.json, SageMaker
channels) is train/sources.py. Field names are the blog's / LLaVA's flag names, so its command line works unchanged.
Blog flags that do not apply to the HF-native model are checked rather than ignored: here (`--mm_use_im_start_end
True` is refused), in train/sources.py (`--lazy_preprocess` is a note) and against the checkpoint in
train/modeling.py (`--vision_tower`, `--mm_projector_type`, `--mm_vision_select_layer`).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.settings import ConfigError as ConfigError  # re-exported: the job raises and catches it from here
from core.settings import setting
from train.templates import CHAT_TEMPLATES

# Shipped DeepSpeed configs (train/deepspeed/<name>.json, package data) and their ZeRO stage (a test keeps them
# in step).
DEEPSPEED_PRESETS = {"zero2": 2, "zero3": 3, "zero3_offload": 3}
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
MERGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
EXPORTS = ("merged", "adapter", "both")  # --export: train/export.py


@dataclass
class TrainConfig:
    # Model
    model_name_or_path: str | None = setting(None, "base LLaVA model dir (HF-native); default: SageMaker channel "
                                                   "'model'")
    version: str = setting("v1", "chat template (train/templates.py): v1 for LLaVA-1.5, llava_llama_2, plain",
                           choices=sorted(CHAT_TEMPLATES))
    bits: int = setting(16, "4 = QLoRA (NF4, double quant), 8 = LLM.int8, 16 = no quantisation", choices=(4, 8, 16))
    quant_type: str = setting("nf4", "4-bit quantisation type", choices=("nf4", "fp4"))
    double_quant: bool = setting(True, "quantise the 4-bit quantisation constants too")
    lora_enable: bool = setting(False, "train LoRA adapters on the language model (else full fine-tuning)")
    lora_r: int = setting(64, "LoRA rank", ge=1)
    lora_alpha: int = setting(16, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = setting(0.05, "LoRA dropout", ge=0, lt=1)
    mm_projector_lr: float | None = setting(None, "learning rate of the multimodal projector (default: "
                                                  "--learning_rate)", gt=0)
    vision_tower: str | None = setting(None, "must name the checkpoint's own vision tower (checked, never swapped)")
    mm_projector_type: str | None = setting(None, "must match the checkpoint's projector (mlp2x_gelu for LLaVA-1.5)")
    mm_vision_select_layer: int | None = setting(None, "must match the checkpoint's vision_feature_layer")
    mm_use_im_start_end: bool = setting(False, "not supported by the HF-native LLaVA (must be False)")
    mm_use_im_patch_token: bool = setting(False, "not supported by the HF-native LLaVA (must be False)")
    image_aspect_ratio: str = setting("pad", "pad (pad to square, LLaVA-1.5) or crop (resize + centre crop); square "
                                             "= crop (anyres is LLaVA-NeXT's)", choices=("pad", "crop", "square"))
    # Data
    data_path: str | None = setting(None, "training data, LLaVA JSON or JSONL; default: SageMaker channel 'train'")
    validation_data_path: str | None = setting(None, "validation data; default: SageMaker channel 'validation'")
    image_folder: str | None = setting(None, "folder the data's image paths are relative to; default: the data's "
                                             "folder")
    model_max_length: int = setting(2048, "tokens per example, image tokens included; longer rows are cut (dropped "
                                          "when the image or every answer would be cut)", ge=1)
    lazy_preprocess: bool = setting(True, "accepted for compatibility: preprocessing is always lazy")
    group_by_modality_length: bool = setting(False, "batch image and text-only examples separately, by similar "
                                                    "length")
    dataloader_num_workers: int = setting(0, "data loader worker processes", ge=0)
    # Optimisation
    num_train_epochs: float = setting(1.0, "epochs")
    max_steps: int = setting(-1, "optimizer steps; overrides --num_train_epochs when > 0")
    per_device_train_batch_size: int = setting(4, "training batch size per GPU", ge=1)
    per_device_eval_batch_size: int = setting(4, "evaluation / generation batch size per GPU", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = setting(2e-4, "peak learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay (not on biases and norms)", ge=0)
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming up", ge=0, lt=1)
    lr_scheduler_type: str = setting("cosine", "transformers scheduler name", choices=LR_SCHEDULERS)
    lr_scheduler_kwargs: dict | None = setting(None, "the scheduler's own arguments as a JSON object, e.g. "
                                                     "'{\"min_lr_rate\": 0.1}' for cosine_with_min_lr or "
                                                     "'{\"num_decay_steps\": 100}' for warmup_stable_decay")
    max_grad_norm: float = setting(1.0, "gradient clipping (0: none)", ge=0)
    bf16: bool = setting(False, "bfloat16 mixed precision (Ampere or newer)")
    fp16: bool = setting(False, "float16 mixed precision (older GPUs)")
    tf32: bool | None = setting(None, "allow TF32 matmuls (Ampere or newer; ignored with a warning elsewhere)")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass to save memory")
    attn_implementation: str = setting("sdpa", "attention kernel (flash_attention_2 needs flash-attn and a CUDA "
                                               "GPU; the training image installs it with --flash-attn)",
                                       choices=ATTN_IMPLEMENTATIONS)
    deepspeed: str | None = setting(None, "DeepSpeed config: a JSON file or zero2 | zero3 | zero3_offload")
    seed: int = setting(42, "random seed", ge=0, lt=2**32)
    # Evaluation, checkpoints, logs
    evaluation_strategy: str = setting("no", "validation loss every: no | steps | epoch", choices=STRATEGIES,
                                       aliases=("eval_strategy",))  # transformers' current name for the blog's flag
    eval_steps: int | None = setting(None, "steps between validation losses (default: --logging_steps)", ge=1)
    save_strategy: str = setting("steps", "checkpoint every: no | steps | epoch", choices=STRATEGIES)
    save_steps: int = setting(500, "steps between checkpoints", ge=1)
    save_total_limit: int | None = setting(2, "checkpoints kept (oldest deleted first; None keeps every one)", ge=1)
    logging_steps: int = setting(10, "steps between log lines", ge=1)
    report_to: str = setting("none", "experiment trackers (comma-separated): none, tensorboard, wandb, ...")
    output_dir: str | None = setting(None, "merged model dir; under SageMaker always /opt/ml/model")
    checkpoint_dir: str | None = setting(None, "checkpoints; default: /opt/ml/checkpoints under SageMaker, else "
                                               "output_dir")
    resume: bool = setting(True, "resume from the newest complete checkpoint in the checkpoint dir")
    # End of training
    eval_generation: bool = setting(True, "generate on the validation set (base and fine-tuned) -> eval_report.json")
    eval_max_samples: int = setting(500, "validation examples used for the generation report", ge=0)
    eval_max_new_tokens: int = setting(32, "tokens generated per validation answer", ge=1)
    merge_dtype: str = setting("auto", "dtype of the merged weights: auto (bf16/fp16 as trained, fp32 on CPU), "
                                       "bfloat16, float16, float32", choices=MERGE_DTYPES)
    export: str = setting("merged", "what the job writes: merged (the merged model), adapter (the LoRA adapter and "
                                    "projector as a PEFT folder + adapter.tar.gz, for adapter inference components; "
                                    "docs/adapters.md) or both", choices=EXPORTS)
    log_sample_ids: bool = setting(False, "log the example ids of every batch on every rank (debugging data "
                                          "sharding)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trackers(self) -> list[str]:
        """--report_to as a list, without "none" and blanks."""
        return [r.strip() for r in self.report_to.split(",") if r.strip() not in ("", "none")]

    def problems(self) -> list[str]:
        """What is wrong across fields, from the values alone: no file, package or torch is needed."""
        p: list[str] = []
        if self.bits < 16 and not self.lora_enable:
            p.append(f"--bits {self.bits} needs --lora_enable True: quantised weights cannot be fully fine-tuned")
        for name in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if getattr(self, name):
                p.append(f"--{name} True is not supported: the HF-native LLaVA-1.5 has no image start/end or patch "
                         f"tokens (LLaVA-1.5 itself trained with False)")
        if self.bf16 and self.fp16:
            p.append("choose one of --bf16 and --fp16")
        if self.evaluation_strategy != "no" and self.validation_data_path is None:
            p.append(f"--evaluation_strategy {self.evaluation_strategy} needs --validation_data_path")
        if self.lr_scheduler_type in METRIC_SCHEDULERS and self.evaluation_strategy == "no":
            p.append(f"lr_scheduler_type {self.lr_scheduler_type} lowers the learning rate from the validation loss: "
                     "it needs --evaluation_strategy steps (or epoch) and --validation_data_path")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            p.append("set --num_train_epochs > 0 or --max_steps > 0")
        if self.bits < 16 and preset_stage(self.deepspeed) == 3:
            p.append(qlora_zero3_problem(self.bits))
        if self.export != "merged" and not self.lora_enable:
            p.append(f"--export {self.export} needs --lora_enable True: a full fine-tune has no adapter to export")
        return p


def machine_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the config on the local machine: required paths, files, flash-attn, the scheduler's arguments
    (transformers builds it on a dummy optimizer) and the DeepSpeed file. Imports torch only for the scheduler."""
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
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        p.append("attn_implementation flash_attention_2 needs the flash-attn package (build the training image with "
                 "container/build.sh --flash-attn ...), or use sdpa")
    return p + _scheduler_problems(cfg) + _deepspeed_problems(cfg)


def _scheduler_problems(cfg: TrainConfig) -> list[str]:
    """Scheduler arguments that transformers would only refuse once the model is loaded and training starts."""
    name, kwargs = cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs or {}
    if name not in LR_SCHEDULERS or (name in METRIC_SCHEDULERS and cfg.evaluation_strategy == "no"):
        return []  # reported by the field's choices and by TrainConfig.problems
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
    if cfg.deepspeed is None or preset_stage(cfg.deepspeed) is not None:
        return []  # a preset not resolved to its file yet is checked by TrainConfig.problems
    try:
        stage = deepspeed_stage(cfg.deepspeed)
    except (OSError, ValueError, AttributeError) as e:
        return [f"--deepspeed {cfg.deepspeed}: not a readable DeepSpeed JSON config ({e})"]
    return [qlora_zero3_problem(cfg.bits)] if stage == 3 and cfg.bits < 16 else []


def qlora_zero3_problem(bits: int) -> str:
    return (f"--bits {bits} with ZeRO-3 is refused: ZeRO-3 partitions every parameter across GPUs, and "
            "bitsandbytes' packed quantised weights cannot be partitioned and gathered like ordinary tensors. "
            "Use --deepspeed zero2 for QLoRA (LLaVA's own QLoRA recipe), or --bits 16 with ZeRO-3")


# ---- DeepSpeed configs ----


def deepspeed_dir() -> Path:
    """The shipped ZeRO presets: package data (train/deepspeed/*.json), so a wheel carries them. A directory on disk:
    DeepSpeed takes a file path, and pip installs packages unpacked."""
    return Path(importlib.resources.files("train").joinpath("deepspeed"))


def preset_stage(value: str | None) -> int | None:
    """The ZeRO stage of a preset named by `value` (`zero3`, or a missing `./scripts/zero3.json` as the blog writes
    it); None for anything else, an existing file included."""
    if value is None or (value not in DEEPSPEED_PRESETS and Path(value).is_file()):
        return None
    return DEEPSPEED_PRESETS.get(value, DEEPSPEED_PRESETS.get(Path(value).stem))


def resolve_deepspeed(value: str) -> tuple[str, str | None]:
    """A preset name or a path; the blog's missing `./scripts/zero2.json` maps to our zero2 with a note."""
    if value in DEEPSPEED_PRESETS:
        return str(deepspeed_dir() / f"{value}.json"), None
    path = Path(value)
    if not path.is_file() and path.stem in DEEPSPEED_PRESETS:
        ours = deepspeed_dir() / f"{path.stem}.json"
        return str(ours), f"--deepspeed {value} does not exist; using the shipped {ours}"
    return value, None


def deepspeed_stage(path: str) -> int:
    data = json.loads(Path(path).read_text())
    return int(data.get("zero_optimization", {}).get("stage", 0))
