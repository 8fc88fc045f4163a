"""TrainConfig: the one typed config of the fine-tuning job, and how it is resolved from its four sources.

Precedence, lowest to highest: field defaults < `--config file.yaml` < SageMaker `hyperparameters.json` (string
values JSON-decoded) < command-line flags. Unknown keys are an error naming every one of them; every invalid value
is reported at once (`ConfigError.problems`). Field names are the blog's / LLaVA's flag names, so its command line
works unchanged (`--lora_enable True --bits 4 ...`); a bare boolean flag (`--lora_enable`) means True.

Every value of the resolved config is then checked by train/config_checks.py. Blog flags that do not apply to the
HF-native model are checked rather than ignored: there (`--mm_use_im_start_end True` is refused), here
(`--lazy_preprocess` is a note) and against the checkpoint in train/modeling.py (`--vision_tower`,
`--mm_projector_type`, `--mm_vision_select_layer`).
"""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from train.sagemaker_env import SageMakerPaths

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
ALIASES = {"eval_strategy": "evaluation_strategy"}  # transformers' current name for the blog's flag
SAGEMAKER_RESERVED_PREFIX = "sagemaker_"  # keys the SageMaker SDK adds to hyperparameters.json


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # Model
    model_name_or_path: str | None = _f(None, "base LLaVA model dir (HF-native); default: SageMaker channel 'model'")
    version: str = _f("v1", "chat template (train/templates.py): v1 for LLaVA-1.5, llava_llama_2, plain")
    bits: int = _f(16, "4 = QLoRA (NF4, double quant), 8 = LLM.int8, 16 = no quantisation")
    quant_type: str = _f("nf4", "4-bit quantisation type: nf4 or fp4")
    double_quant: bool = _f(True, "quantise the 4-bit quantisation constants too")
    lora_enable: bool = _f(False, "train LoRA adapters on the language model (else full fine-tuning)")
    lora_r: int = _f(64, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    mm_projector_lr: float | None = _f(None, "learning rate of the multimodal projector (default: --learning_rate)")
    vision_tower: str | None = _f(None, "must name the checkpoint's own vision tower (checked, never swapped)")
    mm_projector_type: str | None = _f(None, "must match the checkpoint's projector (mlp2x_gelu for LLaVA-1.5)")
    mm_vision_select_layer: int | None = _f(None, "must match the checkpoint's vision_feature_layer")
    mm_use_im_start_end: bool = _f(False, "not supported by the HF-native LLaVA (must be False)")
    mm_use_im_patch_token: bool = _f(False, "not supported by the HF-native LLaVA (must be False)")
    image_aspect_ratio: str = _f("pad", "pad (pad to square, LLaVA-1.5) or crop (resize + centre crop); square = crop")
    # Data
    data_path: str | None = _f(None, "training data, LLaVA JSON or JSONL; default: SageMaker channel 'train'")
    validation_data_path: str | None = _f(None, "validation data; default: SageMaker channel 'validation'")
    image_folder: str | None = _f(None, "folder the data's image paths are relative to; default: the data's folder")
    model_max_length: int = _f(2048, "tokens per example, image tokens included; longer rows are cut (dropped "
                                     "when the image or every answer would be cut)")
    lazy_preprocess: bool = _f(True, "accepted for compatibility: preprocessing is always lazy")
    group_by_modality_length: bool = _f(False, "batch image and text-only examples separately, by similar length")
    dataloader_num_workers: int = _f(0, "data loader worker processes")
    # Optimisation
    num_train_epochs: float = _f(1.0, "epochs")
    max_steps: int = _f(-1, "optimizer steps; overrides --num_train_epochs when > 0")
    per_device_train_batch_size: int = _f(4, "training batch size per GPU")
    per_device_eval_batch_size: int = _f(4, "evaluation / generation batch size per GPU")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    lr_scheduler_kwargs: dict | None = _f(None, "the scheduler's own arguments as a JSON object, e.g. "
                                                "'{\"min_lr_rate\": 0.1}' for cosine_with_min_lr or "
                                                "'{\"num_decay_steps\": 100}' for warmup_stable_decay")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    bf16: bool = _f(False, "bfloat16 mixed precision (Ampere or newer)")
    fp16: bool = _f(False, "float16 mixed precision (older GPUs)")
    tf32: bool | None = _f(None, "allow TF32 matmuls (Ampere or newer; ignored with a warning elsewhere)")
    gradient_checkpointing: bool = _f(True, "recompute activations in the backward pass to save memory")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | eager | flash_attention_2 (needs flash-attn and "
                                          "a CUDA GPU; the training image installs it with --flash-attn)")
    deepspeed: str | None = _f(None, "DeepSpeed config: a JSON file or zero2 | zero3 | zero3_offload")
    seed: int = _f(42, "random seed")
    # Evaluation, checkpoints, logs
    evaluation_strategy: str = _f("no", "validation loss every: no | steps | epoch")
    eval_steps: int | None = _f(None, "steps between validation losses (default: --logging_steps)")
    save_strategy: str = _f("steps", "checkpoint every: no | steps | epoch")
    save_steps: int = _f(500, "steps between checkpoints")
    save_total_limit: int | None = _f(2, "checkpoints kept (oldest deleted first)")
    logging_steps: int = _f(10, "steps between log lines")
    report_to: str = _f("none", "experiment trackers (comma-separated): none, tensorboard, wandb, ...")
    output_dir: str | None = _f(None, "merged model dir; under SageMaker always /opt/ml/model")
    checkpoint_dir: str | None = _f(None, "checkpoints; default: /opt/ml/checkpoints under SageMaker, else output_dir")
    resume: bool = _f(True, "resume from the newest complete checkpoint in the checkpoint dir")
    # End of training
    eval_generation: bool = _f(True, "generate on the validation set (base and fine-tuned) -> eval_report.json")
    eval_max_samples: int = _f(500, "validation examples used for the generation report")
    eval_max_new_tokens: int = _f(32, "tokens generated per validation answer")
    merge_dtype: str = _f("auto", "dtype of the merged weights: auto (bf16/fp16 as trained, fp32 on CPU), "
                                  "bfloat16, float16, float32")
    export: str = _f("merged", "what the job writes: merged (the merged model), adapter (the LoRA adapter and "
                               "projector as a PEFT folder + adapter.tar.gz, for adapter inference components; "
                               "docs/adapters.md) or both")
    log_sample_ids: bool = _f(False, "log the example ids of every batch on every rank (debugging data sharding)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trackers(self) -> list[str]:
        """--report_to as a list, without "none" and blanks."""
        return [r.strip() for r in self.report_to.split(",") if r.strip() not in ("", "none")]


class ConfigError(ValueError):
    """The configuration is invalid; `.problems` lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


@dataclass
class Resolved:
    config: TrainConfig
    sources: dict[str, str]  # field -> where its value came from (non-defaults only)
    notes: list[str]  # things to log: flags accepted but without effect, paths that SageMaker decides


FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", allow_abbrev=False, argument_default=argparse.SUPPRESS, exit_on_error=False,
        description="Fine-tune LLaVA-1.5 (LoRA / QLoRA / full) and write a merged, servable model dir.")
    parser.add_argument("--config", help="YAML file of TrainConfig fields (overridden by everything else)")
    for name, f in FIELDS.items():
        flags = [f"--{name}"] + [f"--{a}" for a, target in ALIASES.items() if target == name]
        default = "" if f.default is MISSING else f" (default: {f.default})"
        if _base_type(name) is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const="true", metavar="BOOL", help=f.metadata["help"]
                                + default)
        else:
            metavar = "JSON" if _base_type(name) is dict else _base_type(name).__name__.upper()
            parser.add_argument(*flags, dest=name, metavar=metavar, help=f.metadata["help"] + default)
    return parser


def resolve_config(argv: Sequence[str], paths: SageMakerPaths) -> Resolved:
    """Merge the four sources, fill SageMaker defaults, validate; raise ConfigError listing every problem."""
    # Imported here: the checks build on TrainConfig and this module's DeepSpeed helpers.
    from train.config_checks import validate

    try:
        namespace, unknown = build_parser().parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        raise ConfigError([f"command line: {e}"]) from None
    cli = vars(namespace)
    # Values after an unknown flag belong to it; only a value with no flag before it is worth its own message.
    problems = [f"unknown command-line flag {u.split('=')[0]!r}" for u in unknown if u.startswith("-")]
    if unknown and not unknown[0].startswith("-"):
        problems.insert(0, f"unexpected command-line value {unknown[0]!r} (flags look like --name value)")
    hyper = {k: v for k, v in paths.read_hyperparameters().items() if not k.startswith(SAGEMAKER_RESERVED_PREFIX)}
    config_file = cli.pop("config", None) or hyper.pop("config", None)
    layers = [("defaults", {})]
    if config_file:
        layers.append((f"config file {config_file}", _read_yaml(config_file, problems)))
    layers += [("hyperparameters.json", hyper), ("command line", cli)]

    values: dict[str, Any] = {n: f.default for n, f in FIELDS.items()}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for key, raw in layer.items():
            name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in FIELDS:
                problems.append(f"unknown key {key!r} in {source}")
                continue
            try:
                values[name] = coerce(name, raw)
                sources[name] = source
            except ValueError as e:
                problems.append(f"{name} (from {source}): {e}")
    cfg = TrainConfig(**values)
    notes = apply_environment_defaults(cfg, sources, paths)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    notes += compatibility_notes(cfg, sources)
    return Resolved(cfg, sources, notes)


def coerce(name: str, raw: Any) -> Any:
    """Convert a raw value (CLI string, YAML or JSON scalar) to the field's type."""
    kind = _base_type(name)
    optional = type(None) in typing.get_args(_HINTS[name])
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError("a value is required")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "y", "on"):
            return True
        if text in ("false", "0", "no", "n", "off"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError(f"expected a number, got {raw!r}")
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if kind is dict:
        return _json_object(raw)
    if isinstance(raw, (dict, list)):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return str(raw)


def _json_object(raw: Any) -> dict[str, Any]:
    """A mapping from YAML, or a JSON object from the command line or hyperparameters.json (all strings there)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ValueError(f"expected a JSON object like {{\"name\": value}}, got {raw!r}")
    return dict(raw)


def _base_type(name: str) -> type:
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _read_yaml(path: str, problems: list[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"cannot read --config {path}: {e}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config {path} must be a mapping of field: value")
        return {}
    return {str(k): v for k, v in data.items()}


def apply_environment_defaults(cfg: TrainConfig, sources: dict[str, str], paths: SageMakerPaths) -> list[str]:
    """Fill unset paths from the SageMaker layout (in a training job) or from other flags; return notes."""
    notes: list[str] = []
    if paths.in_training_job():
        for name, channel in (("model_name_or_path", "model"), ("data_path", "train"),
                              ("validation_data_path", "validation")):
            if getattr(cfg, name) is None and paths.channel(channel).is_dir():
                setattr(cfg, name, str(_single_file(paths.channel(channel)) if name != "model_name_or_path"
                                       else paths.channel(channel)))
                sources[name] = f"SageMaker channel '{channel}'"
        # `llava-sm train --images s3://...` mounts the image folder as its own channel.
        if cfg.image_folder is None and paths.channel("images").is_dir():
            cfg.image_folder = str(paths.channel("images"))
            sources["image_folder"] = "SageMaker channel 'images'"
        if cfg.output_dir not in (None, str(paths.model)):
            notes.append(f"--output_dir {cfg.output_dir} is not used in a SageMaker job: the merged model goes to "
                         f"{paths.model} (uploaded as model.tar.gz), checkpoints to {paths.checkpoints}")
        cfg.output_dir = str(paths.model)
        if cfg.checkpoint_dir is None:
            cfg.checkpoint_dir = str(paths.checkpoints)
    elif cfg.checkpoint_dir is None and cfg.output_dir is not None:
        cfg.checkpoint_dir = cfg.output_dir
    if cfg.image_aspect_ratio == "square":
        cfg.image_aspect_ratio = "crop"
        notes.append("--image_aspect_ratio square means resize + centre crop (LLaVA's non-pad path): using crop")
    if cfg.image_folder is None and cfg.data_path is not None:
        cfg.image_folder = str(Path(cfg.data_path).parent)
    if cfg.deepspeed is not None:
        cfg.deepspeed, note = resolve_deepspeed(cfg.deepspeed)
        notes += [note] if note else []
    return notes


def _single_file(channel: Path) -> Path:
    """A channel dir holding one .json/.jsonl file stands for that file; otherwise the dir (validation says why)."""
    candidates = sorted(p for p in channel.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    return candidates[0] if len(candidates) == 1 else channel


def deepspeed_dir() -> Path:
    """container/deepspeed in the source tree (the training image copies the repo, configs included)."""
    return Path(__file__).resolve().parents[1] / "container" / "deepspeed"


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


def compatibility_notes(cfg: TrainConfig, sources: Mapping[str, str]) -> list[str]:
    notes = []
    if "lazy_preprocess" in sources:
        notes.append("--lazy_preprocess has no effect: examples are always tokenised lazily, batch by batch")
    return notes


def describe(resolved: Resolved) -> str:
    """The resolved config as one log message: JSON, then where each non-default value came from."""
    origin = "\n".join(f"  {k} = {getattr(resolved.config, k)!r}  ({s})" for k, s in sorted(resolved.sources.items()))
    return ("resolved training config:\n" + json.dumps(resolved.config.to_dict(), indent=2, sort_keys=True)
            + ("\nset explicitly:\n" + origin if origin else ""))
