"""Shared helpers of the bench scripts: percentiles, markdown tables and writing results as JSON + markdown."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], digits: int = 1) -> str:
    """A GitHub markdown table; `columns` are (key, header) pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), digits) for k, _ in columns) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the numbers were taken (CPU count, load average, Python, torch/CUDA device when importable)."""
    import os

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def write_report(out_dir: str | Path | None, name: str, data: dict[str, Any], markdown: str) -> None:
    """Print the markdown and, with an out dir, write NAME.json and NAME.md there."""
    print(markdown, flush=True)
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
