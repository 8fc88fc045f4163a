"""Relaxed accuracy for short answers: the one implementation shared by the trainer's end-of-training report and
`llava-sm eval`. Pure Python, so the light client can use it too.

Relaxed match (ChartQA-style): two answers that both read as numbers match when within `tolerance` (5%) of each
other, after percent signs, thousands separators and currency signs are removed ("15%" == "15", "1,000" == "1000");
everything else must match exactly after normalisation (case, surrounding whitespace and punctuation, inner spaces).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_STRIP = " \t\n\r.,;:!?\"'`"


def normalize_answer(text: str) -> str:
    """Lower-case, trim surrounding punctuation and quotes, collapse inner whitespace."""
    return " ".join(str(text).strip().strip(_STRIP).lower().split())


def parse_number(text: str) -> float | None:
    """The number a short answer states ("15%", "1,000", "$2.5", "-3"), or None when it is not just a number."""
    s = normalize_answer(text).replace(",", "").replace(" ", "")
    s = s.lstrip("$€£").rstrip("%")
    return float(s) if _NUMBER.fullmatch(s) else None


def relaxed_match(prediction: str, answer: str, *, tolerance: float = 0.05) -> bool:
    """True when `prediction` answers like `answer`: numbers within `tolerance` (relative), text exactly."""
    target, guess = parse_number(answer), parse_number(prediction)
    if target is not None and guess is not None:
        if target == 0:
            return guess == 0
        return abs(guess - target) <= tolerance * abs(target)
    return normalize_answer(prediction) == normalize_answer(answer)


def _cell(correct: int, n: int) -> dict[str, Any]:
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}


def score(records: Iterable[Mapping[str, Any]], group_keys: Iterable[str] = (), *,
          tolerance: float = 0.05) -> dict[str, Any]:
    """Accuracy overall and per value of each group key.

    Each record needs "prediction" and "answer"; group keys (e.g. "chart_type", "question_type") are read from the
    record when present. Returns {"overall": {n, correct, accuracy}, "groups": {key: {value: {n, correct,
    accuracy}}}}.
    """
    keys = list(group_keys)
    total = hits = 0
    counts: dict[str, dict[str, list[int]]] = {k: {} for k in keys}
    for record in records:
        ok = relaxed_match(str(record["prediction"]), str(record["answer"]), tolerance=tolerance)
        total += 1
        hits += ok
        for key in keys:
            if key in record:
                tally = counts[key].setdefault(str(record[key]), [0, 0])
                tally[0] += ok
                tally[1] += 1
    groups = {k: {v: _cell(c, n) for v, (c, n) in sorted(vals.items())} for k, vals in counts.items()}
    return {"overall": _cell(hits, total), "groups": groups}


def markdown_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One markdown table comparing `score()` results side by side (columns = runs, rows = overall + each group)."""
    names = list(runs)
    rows: list[tuple[str, str]] = [("overall", "")]
    for report in runs.values():
        for key, values in report.get("groups", {}).items():
            rows += [(key, value) for value in values if (key, value) not in rows]

    def cell(report: Mapping[str, Any], key: str, value: str) -> str:
        c = report["overall"] if key == "overall" else report.get("groups", {}).get(key, {}).get(value)
        return f"{c['accuracy']:.2f} ({c['correct']}/{c['n']})" if c else "-"

    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, value in rows:
        label = "**overall**" if key == "overall" else f"{key}: {value}"
        lines.append(f"| {label} | " + " | ".join(cell(runs[n], key, value) for n in names) + " |")
    return "\n".join(lines)
