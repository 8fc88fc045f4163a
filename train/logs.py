"""Log lines of the training job that a regex can read, and the SageMaker `MetricDefinitions` that read them.

Importable without torch (the light client imports `METRIC_DEFINITIONS` to create training jobs). One line per
logging step and one per summary, each a single `key=value` list after a fixed tag:

    [train] step=10 epoch=0.5 loss=1.2345 grad_norm=0.8731 learning_rate=1.9e-05
    [train] train_runtime=12.31 train_samples_per_second=6.5 train_steps_per_second=0.81 train_loss=1.31
    [eval] step=10 epoch=0.5 eval_loss=1.4021
    [report] eval_accuracy=0.75 base_eval_accuracy=0.25 n=8

Every key is preceded by a space, so ` loss=` never matches inside `train_loss=` or `eval_loss=`; numbers may be
written in scientific notation (`1.9e-05`), which the regexes read in full (the blog's `[0-9]+(.|e-)[0-9]+` read
`1.9e-05` as `1.9`).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Mapping

# A number as Python's `format(x, '.6g')` or `repr` writes it, including scientific notation.
NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"

# Metric name -> the tag of the line it appears on.
_METRICS: dict[str, str] = {
    "loss": "train",
    "learning_rate": "train",
    "epoch": "train",
    "grad_norm": "train",
    "train_runtime": "train",
    "train_samples_per_second": "train",
    "train_steps_per_second": "train",
    "train_loss": "train",
    "eval_loss": "eval",
    "eval_accuracy": "report",
    "base_eval_accuracy": "report",
}


def _regex(name: str, tag: str) -> str:
    return rf"\[{tag}\].*? {name}=({NUMBER})"


# SageMaker MetricDefinitions (at most 40, each regex at most 500 characters): pass as CreateTrainingJob's
# AlgorithmSpecification.MetricDefinitions.
METRIC_DEFINITIONS: list[dict[str, str]] = [{"Name": n, "Regex": _regex(n, t)} for n, t in _METRICS.items()]


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".6g")
    return str(value)


def format_metrics(tag: str, values: Mapping[str, object]) -> str:
    """`[tag] k=v k=v`: floats with 6 significant digits, keys in the given order, spaces in values replaced."""
    parts = [f"{k}={_format_value(v).replace(' ', '_')}" for k, v in values.items() if v is not None]
    return f"[{tag}] " + " ".join(parts)


def parse_metrics(text: str) -> dict[str, list[float]]:
    """Apply `METRIC_DEFINITIONS` to log text the way SageMaker does (every match, in order)."""
    found: dict[str, list[float]] = {}
    for definition in METRIC_DEFINITIONS:
        values = [float(m.group(1)) for m in re.finditer(definition["Regex"], text)]
        if values:
            found[definition["Name"]] = values
    return found


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Plain timestamped lines on stdout (SageMaker ships stdout to CloudWatch); other ranks only warn.

    Leaves an already configured root logger alone (an embedding program's or pytest's).
    """
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if rank:
        fmt = f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, stream=sys.stdout)
