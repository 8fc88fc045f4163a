"""Ask, score, report: `evaluate(questions, answerers)` -> the report both the training job and `llava-sm eval` write.

    report, predictions = evaluate(questions, {"base": a, "fine_tuned": b}, blank_control=("fine_tuned",))
    write_outputs(out_dir, report, predictions)    # eval.json, eval.md, predictions.jsonl, eval.png

A run is one answerer over every question; the blank-image control repeats a run with a grey image (its name gets
" (blank image)"). Scores are relaxed accuracy (train/metrics.py: numbers within 5%, text exact after
normalisation), overall and per chart type / question type when the questions carry them. The report:
{"questions", "failed", "seconds", "max_new_tokens", "runs": {run: {"overall": {n, correct, accuracy},
"groups": {...}}}} (+ whatever the caller adds); predictions: one record per question and run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from evaluation.answerers import Answerer

log = logging.getLogger(__name__)

GROUP_KEYS = ("chart_type", "question_type")
BLANK_SUFFIX = " (blank image)"


class EvalFailed(RuntimeError):
    """Every question of a run failed (server down, wrong endpoint): there is nothing to score."""


def evaluate(questions: list[dict], answerers: Mapping[str, Answerer], *, blank_control: Iterable[str] = (),
             max_new_tokens: int | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Every answerer over every question (and, for the runs named in `blank_control`, again with a grey image)."""
    from train.metrics import relaxed_match, score

    started = time.monotonic()
    blank = set(blank_control)
    runs: dict[str, Any] = {}
    predictions: list[dict] = []
    for name, answerer in answerers.items():
        for use_blank in (False, True) if name in blank else (False,):
            run = name + (BLANK_SUFFIX if use_blank else "")
            failed_before = len(answerer.errors)
            answers = ask_all(questions, answerer, use_blank, run)
            if questions and len(answerer.errors) - failed_before >= len(questions):
                raise EvalFailed(f"{run}: all {len(questions)} questions failed, e.g. {answerer.errors[-1]}")
            records = [{**q, "run": run, "prediction": a, "correct": relaxed_match(a, q["answer"])}
                       for q, a in zip(questions, answers, strict=True)]
            runs[run] = score(records, GROUP_KEYS)
            predictions += records
    errors = [e for a in answerers.values() for e in a.errors]
    if errors:
        log.warning("%d question(s) got no answer and count as wrong, e.g. %s", len(errors), errors[0])
    report = {"questions": len(questions), "failed": len(errors), "seconds": round(time.monotonic() - started, 1),
              "max_new_tokens": max_new_tokens, "runs": runs}
    return report, predictions


def ask_all(questions: list[dict], answer: Answerer, use_blank: bool, label: str) -> list[str]:
    """Answers for every question, `answer.chunk` at a time, with a progress line every ~10%."""
    out: list[str] = []
    step = max(1, len(questions) // 10)
    next_report, started = step, time.monotonic()
    for start in range(0, len(questions), answer.chunk):
        out += answer(questions[start:start + answer.chunk], use_blank)
        if len(out) >= next_report or len(out) == len(questions):
            log.info("%s: %d/%d questions (%.1f s)", label, len(out), len(questions), time.monotonic() - started)
            next_report = len(out) + step
    return out


def write_outputs(out: Path, report: dict, predictions: list[dict]) -> None:
    """eval.json (the report), eval.md (its table), predictions.jsonl and eval.png (when matplotlib is there)."""
    from train.metrics import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown_table(report["runs"]) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    try:
        plot_runs(report["runs"], out / "eval.png")
    except ImportError:
        log.warning("matplotlib is not installed: no eval.png (pip install 'llava-sagemaker[train]')")


def plot_runs(runs: dict[str, dict], path: Path) -> None:
    """Grouped horizontal bars: one group per row of the table (overall, chart types, question types), one bar
    per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [("overall", "")]
    for report in runs.values():
        for key, values in report["groups"].items():
            rows += [(key, v) for v in values if (key, v) not in rows]
    names = list(runs)
    height = 0.8 / len(names)
    fig = Figure(figsize=(8, 1.0 + 0.32 * len(rows) * max(1, len(names) * 0.6)), dpi=100)
    ax = fig.add_subplot()
    for j, run in enumerate(names):
        acc = [_accuracy(runs[run], key, value) for key, value in rows]
        ax.barh([i + j * height for i in range(len(rows))], acc, height=height, label=run)
    ax.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(rows))],
                  ["overall" if k == "overall" else f"{k}: {v}" for k, v in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("relaxed accuracy")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _accuracy(report: dict, key: str, value: str) -> float:
    cell = report["overall"] if key == "overall" else report["groups"].get(key, {}).get(value)
    return cell["accuracy"] if cell else 0.0
