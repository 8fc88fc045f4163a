"""End-of-training report: greedy answers on the validation set from the base and the fine-tuned model, scored with
the relaxed accuracy of train/metrics.py, written to eval_report.json; and the loss curve as a PNG.

Each validation conversation is asked up to its last question; its last answer is the reference. Prompts come from
the processor's chat template, exactly as serving renders them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from train.metrics import relaxed_match, score

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"


def message_text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


def question_and_answer(example: Any) -> tuple[list[dict[str, Any]], str, str]:
    """(prompt messages, last question, reference answer) of a conversation ending with an assistant turn."""
    prompt = example.messages[:-1]
    return prompt, message_text(prompt[-1]), message_text(example.messages[-1])


def generate_answers(model: Any, processor: Any, examples: list[Any], image_folder: str | Path | None, *,
                     max_new_tokens: int, batch_size: int, desc: str) -> list[str]:
    """Greedy answers for `examples`, batched with left padding; a progress bar per model."""
    import torch
    from tqdm.auto import tqdm

    from train.data import load_image

    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
            batch = examples[start:start + batch_size]
            prompts = [processor.apply_chat_template(question_and_answer(e)[0], add_generation_prompt=True)
                       for e in batch]
            images = [load_image(Path(image_folder) / e.image) for e in batch if e.image is not None]
            inputs = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def build_report(examples: list[Any], predictions: dict[str, list[str]], *, eval_loss: float | None,
                 max_new_tokens: int) -> dict[str, Any]:
    """{"n", "eval_loss", "<run>": score(...), "examples": [{id, question, answer, <run>_prediction, ...}]}."""
    rows = []
    for i, example in enumerate(examples):
        _, question, answer = question_and_answer(example)
        row: dict[str, Any] = {"id": example.id, "image": example.image, "question": question, "answer": answer}
        for run, preds in predictions.items():
            row[f"{run}_prediction"] = preds[i]
            row[f"{run}_correct"] = relaxed_match(preds[i], answer)
        rows.append(row)
    report: dict[str, Any] = {"n": len(rows), "max_new_tokens": max_new_tokens, "eval_loss": eval_loss}
    for run, preds in predictions.items():
        report[run] = score({"prediction": p, "answer": r["answer"]} for p, r in zip(preds, rows, strict=True))
    report["examples"] = rows
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def plot_loss_curve(log_history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training loss (and validation loss when there is one) against the step; None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        log.warning("no losses were logged; no loss curve")
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
