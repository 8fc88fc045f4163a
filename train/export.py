"""The end of a training run (rank 0): base-model answers, merge, fine-tuned answers, artifact, report, loss curve.

One unquantised copy of the base is loaded (16-bit on a GPU, fp32 on CPU), answers the validation questions, then
takes the adapter and is merged in place (`merge_and_unload`), so the report's "base" and "fine_tuned" runs differ
only by the fine-tune. A full fine-tune reloads its trained weights instead of merging.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from train.config import TrainConfig

log = logging.getLogger(__name__)


def export(cfg: TrainConfig, final_dir: Path, processor: Any, history: list[dict[str, Any]], val_examples: list,
           *, resumed_from: Path | None) -> dict[str, Any]:
    from train.artifact import EVAL_REPORT_FILE, save_artifact
    from train.logs import format_metrics
    from train.merge import apply_adapter, device_and_dtype, load_model
    from train.report import LOSS_CURVE_FILE, build_report, generate_answers, plot_loss_curve, write_report

    device, dtype = device_and_dtype(cfg.merge_dtype, bf16=cfg.bf16, fp16=cfg.fp16)
    eval_set = val_examples[: cfg.eval_max_samples] if cfg.eval_generation else []

    def answers(model: Any, run: str) -> list[str]:
        return generate_answers(model, processor, eval_set, cfg.image_folder, max_new_tokens=cfg.eval_max_new_tokens,
                                batch_size=cfg.per_device_eval_batch_size, desc=f"generating ({run})")

    predictions: dict[str, list[str]] = {}
    model = load_model(cfg.model_name_or_path, dtype=dtype, device=device)
    if eval_set:
        predictions["base"] = answers(model, "base model")
    if cfg.lora_enable:
        log.info("merging the adapter into the %s base", dtype)
        model = apply_adapter(model, final_dir)
    else:
        del model
        model = load_model(final_dir, dtype=dtype, device=device)
    if eval_set:
        predictions["fine_tuned"] = answers(model, "fine-tuned model")

    out = Path(cfg.output_dir)
    record = {**cfg.to_dict(), "made_by": "train", "merge_dtype": str(dtype),
              "resumed_from": str(resumed_from) if resumed_from else None,
              "global_step": max((h.get("step", 0) for h in history), default=0)}
    save_artifact(out, model, processor, training_config=record)
    if not cfg.lora_enable:  # the full fine-tune's final weights (job.FULL_WEIGHTS_DIR): the artifact has them now
        shutil.rmtree(final_dir, ignore_errors=True)
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    summary: dict[str, Any] = {"eval_loss": eval_loss}
    if eval_set:
        report = build_report(eval_set, predictions, eval_loss=eval_loss, max_new_tokens=cfg.eval_max_new_tokens)
        write_report(report, out / EVAL_REPORT_FILE)
        summary |= {"eval_accuracy": report["fine_tuned"]["overall"]["accuracy"],
                    "base_eval_accuracy": report["base"]["overall"]["accuracy"], "n": report["n"]}
        print(format_metrics("report", summary), flush=True)
    plot_loss_curve(history, out / LOSS_CURVE_FILE)
    log.info("model dir ready: %s", out)
    return summary
