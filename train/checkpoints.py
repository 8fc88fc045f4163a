"""Checkpoints: which one to resume from, and what a checkpoint carries beyond the Trainer's own files.

The Trainer writes `checkpoint-<step>/` into the checkpoint dir (SageMaker syncs `/opt/ml/checkpoints` to S3, and
copies it back when a managed-spot job restarts): weights (the LoRA adapter with the projector, or the full model),
optimizer, scheduler, RNG states, and `trainer_state.json` last. A checkpoint is complete when it has
`trainer_state.json`, its weights file, and, under DeepSpeed, the engine state dir named by its `latest` file; a
job killed mid-save (or an interrupted S3 sync) leaves an incomplete one, which is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# What the Trainer and DeepSpeed keep only to resume; every other file of a checkpoint is what save_model wrote.
RESUME_STATE_FILES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|trainer_state\.json|rng_state.*\.pth|latest"
                                r"|zero_to_.*\.py)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin")


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def incompleteness(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"unreadable {STATE_FILE}"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return "no weights file"
    latest = path / "latest"  # DeepSpeed names its engine-state dir here
    if latest.is_file():
        engine_dir = latest.read_text().strip()
        if not (path / engine_dir).is_dir():
            return f"DeepSpeed state {engine_dir!r} missing"
    return None


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` in `checkpoint_dir`, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                        key=checkpoint_step, reverse=True)
    for path in candidates:
        reason = incompleteness(path)
        if reason is None:
            return path
        log.warning("skipping incomplete checkpoint %s (%s)", path, reason)
    return None


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state (global_step, epoch, max_steps, log_history, ...)."""
    return json.loads((path / STATE_FILE).read_text())


def resume_step(path: Path) -> int:
    """The global step a checkpoint was saved at, from its trainer state."""
    return int(read_state(path)["global_step"])


# Settings that decide the shapes of what a checkpoint holds: resuming across a change cannot load it.
SHAPE_SETTINGS = ("lora_enable", "lora_r")


def resume_conflicts(config: dict, checkpoint: Path) -> list[str]:
    """Why this run's config cannot resume `checkpoint` (empty when it can, or when the checkpoint has no config)."""
    from train.artifact import read_training_config

    saved = read_training_config(checkpoint)
    return [f"{checkpoint.name} was trained with {key}={saved[key]!r}, this run asks for {key}={config[key]!r}"
            for key in SHAPE_SETTINGS if key in saved and saved[key] != config.get(key)]


def copy_model_files(checkpoint: Path, dest: Path) -> None:
    """The model as the Trainer saved it in `checkpoint` (weights, configs, processor files) into `dest`, without
    the optimizer, scheduler, RNG or DeepSpeed engine state."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(checkpoint.iterdir()):
        if item.is_file() and not RESUME_STATE_FILES.match(item.name):
            shutil.copy2(item, dest / item.name)
