"""Where a TrainConfig's values come from: defaults < `--config file.yaml` < SageMaker `hyperparameters.json` (string
values JSON-decoded) < command-line flags, then SageMaker's channels for the paths left unset.

    resolved = resolve_config(sys.argv[1:], SageMakerPaths.from_env())   # ConfigError lists every problem
    problems = hyperparameter_problems({"lora_r": "8"}, channels=("train",))   # what `llava-sm submit` checks

Unknown keys are an error naming every one of them (with the closest known name); every invalid value is reported
at once, naming its source. A bare boolean flag (`--lora_enable`) means True. Importable without torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import settings
from core.settings import ConfigError, Problem
from train.config import TrainConfig, machine_problems, resolve_deepspeed
from train.sagemaker_env import SageMakerPaths, decode_hyperparameters

SAGEMAKER_RESERVED_PREFIX = "sagemaker_"  # keys the SageMaker SDK adds to hyperparameters.json
# Paths SageMaker's channels give a job that leaves them unset (`llava-sm submit` mounts these channels).
CHANNEL_FIELDS = {"model": "model_name_or_path", "train": "data_path", "validation": "validation_data_path"}


@dataclass
class Resolved:
    config: TrainConfig
    sources: dict[str, str]  # field -> where its value came from (non-defaults only)
    notes: list[str]  # things to log: flags accepted but without effect, paths that SageMaker decides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", allow_abbrev=False, exit_on_error=False,
        description="Fine-tune LLaVA-1.5 (LoRA / QLoRA / full) and write a merged, servable model dir.")
    parser.add_argument("--config", help="YAML file of TrainConfig fields (overridden by everything else)")
    settings.add_arguments(parser, TrainConfig, style="snake")
    return parser


def resolve_config(argv: Sequence[str], paths: SageMakerPaths) -> Resolved:
    """Merge the four sources, fill SageMaker defaults, validate; raise ConfigError listing every problem."""
    cli, problems = parse_command_line(argv)
    hyper = {k: v for k, v in paths.read_hyperparameters().items() if not k.startswith(SAGEMAKER_RESERVED_PREFIX)}
    config_file = cli.pop("config", None) or hyper.pop("config", None)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file:
        layers.append((f"config file {config_file}", settings.read_yaml(config_file, problems)))
    layers += [("hyperparameters.json", hyper), ("command line", cli)]
    merged = settings.merge(TrainConfig, layers)
    cfg = TrainConfig(**merged.values)  # fields with problems keep their defaults, so every check below still runs
    notes = apply_environment_defaults(cfg, merged.sources, paths)
    problems = [*problems, *merged.problems, *cfg.problems(), *machine_problems(cfg)]
    if problems:
        raise ConfigError(problems)
    return Resolved(cfg, merged.sources, notes + compatibility_notes(merged.sources))


def parse_command_line(argv: Sequence[str]) -> tuple[dict[str, Any], list[Problem]]:
    """The flags given (field -> text, plus `config`) and the problems of the command line itself."""
    try:
        namespace, unknown = build_parser().parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        return {}, [Problem("", "command line", str(e))]
    cli = settings.given_flags(TrainConfig, namespace)
    if namespace.config:
        cli["config"] = namespace.config
    # Values after an unknown flag belong to it; only a value with no flag before it is worth its own message.
    problems = [settings.unknown(u.split("=")[0], "command line", settings.specs(TrainConfig))
                for u in unknown if u.startswith("-")]
    if unknown and not unknown[0].startswith("-"):
        problems.insert(0, Problem("", "command line", f"unexpected value {unknown[0]!r} (flags look like "
                                                       "--name value)"))
    return cli, problems


def hyperparameter_problems(hyperparameters: Mapping[str, str], channels: Iterable[str] = ()) -> list[Problem]:
    """What the job would refuse in these hyperparameters (strings, as SageMaker passes them) before reading any
    data or weights, for a job that mounts `channels`: unknown names, types, choices, ranges and the checks across
    fields. A `config` file inside the image cannot be read from here: its values are not checked."""
    hyper = {k: v for k, v in decode_hyperparameters(hyperparameters).items()
             if not k.startswith(SAGEMAKER_RESERVED_PREFIX) and k != "config"}
    merged = settings.merge(TrainConfig, [("hyperparameters", hyper)])
    mounted = {CHANNEL_FIELDS[c]: f"/opt/ml/input/data/{c}" for c in channels if c in CHANNEL_FIELDS}
    cfg = TrainConfig(**{**mounted, **merged.values})
    return merged.problems + [Problem("", "hyperparameters", p) for p in cfg.problems()]


def apply_environment_defaults(cfg: TrainConfig, sources: dict[str, str], paths: SageMakerPaths) -> list[str]:
    """Fill unset paths from the SageMaker layout (in a training job) or from other flags; return notes."""
    notes: list[str] = []
    if paths.in_training_job():
        for channel, name in CHANNEL_FIELDS.items():
            if getattr(cfg, name) is None and paths.channel(channel).is_dir():
                setattr(cfg, name, str(paths.channel(channel) if channel == "model"
                                       else _single_file(paths.channel(channel))))
                sources[name] = f"SageMaker channel '{channel}'"
        # `llava-sm submit --images s3://...` mounts the image folder as its own channel.
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


def compatibility_notes(sources: Mapping[str, str]) -> list[str]:
    notes = []
    if "lazy_preprocess" in sources:
        notes.append("--lazy_preprocess has no effect: examples are always tokenised lazily, batch by batch")
    return notes


def describe(resolved: Resolved) -> str:
    """The resolved config as one log message: JSON, then where each non-default value came from."""
    origin = "\n".join(f"  {k} = {getattr(resolved.config, k)!r}  ({s})" for k, s in sorted(resolved.sources.items()))
    return ("resolved training config:\n" + json.dumps(resolved.config.to_dict(), indent=2, sort_keys=True)
            + ("\nset explicitly:\n" + origin if origin else ""))
