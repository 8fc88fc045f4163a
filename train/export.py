"""The end of a training run (rank 0): base-model answers, adapter export, merge, artifact, fine-tuned answers from
what was saved, report, loss curve.

One unquantised copy of the base is loaded (16-bit on a GPU, fp32 on CPU) and answers the validation questions.
`--export merged` (the default) then merges the adapter into it in place (`merge_and_unload`; a full fine-tune
reloads its trained weights instead) and saves the merged model as the artifact. `--export adapter` keeps the LoRA
adapter and projector as a PEFT folder and a .tar.gz for an adapter inference component, after checking on that copy
of the base that it changes the logits (train/adapter_export.py); `--export both` writes both. The fine-tuned
answers come from what was saved, loaded the way the server loads it (serve.engine: NF4 on CUDA, unquantized on CPU):
the merged artifact, or for `adapter` the base with the adapter registered on it, so the report scores exactly what
will be served. Questions, answering and scoring are the evaluation package's, the same code as `llava-sm eval`:
every human/gpt pair a single-turn question, plus the blank-image control for the fine-tuned model.
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path
from typing import Any

from train.config import TrainConfig

log = logging.getLogger(__name__)

ADAPTER_NAME = "fine_tuned"  # the adapter's name in the job's own evaluation of an adapter-only export


def export(cfg: TrainConfig, final_dir: Path, processor: Any, history: list[dict[str, Any]], val_examples: list,
           *, resumed_from: Path | None) -> dict[str, Any]:
    from train.artifact import EVAL_REPORT_FILE, save_artifact
    from train.logs import format_metrics
    from train.merge import apply_adapter, device_and_dtype, load_model
    from train.report import LOSS_CURVE_FILE, plot_loss_curve, write_report

    device, dtype = device_and_dtype(cfg.merge_dtype, bf16=cfg.bf16, fp16=cfg.fp16)
    questions = report_questions(cfg) if cfg.eval_generation and val_examples else []
    model = load_model(cfg.model_name_or_path, dtype=dtype, device=device)
    reports = [answer_in_memory(cfg, model, processor, questions)] if questions else []
    out = Path(cfg.output_dir)
    if cfg.export != "merged":
        from train.adapter_export import export_adapter

        export_adapter(model, processor, final_dir, out)  # checked on `model`, which it leaves as the base
    if cfg.export != "adapter":
        if cfg.lora_enable:
            log.info("merging the adapter into the %s base", dtype)
            model = apply_adapter(model, final_dir)
        else:
            del model
            model = load_model(final_dir, dtype=dtype, device=device)
        record = {**cfg.to_dict(), "made_by": "train", "merge_dtype": str(dtype),
                  "resumed_from": str(resumed_from) if resumed_from else None,
                  "global_step": max((h.get("step", 0) for h in history), default=0)}
        save_artifact(out, model, processor, training_config=record)
    del model
    free_memory()
    if not cfg.lora_enable:  # the full fine-tune's final weights (job.FULL_WEIGHTS_DIR): the artifact has them now
        shutil.rmtree(final_dir, ignore_errors=True)
    if questions:
        reports.append(answer_from_artifact(cfg, out, str(device), questions) if cfg.export != "adapter"
                       else answer_from_adapter(cfg, final_dir, str(device), questions))
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    summary: dict[str, Any] = {"eval_loss": eval_loss}
    if questions:
        report = combine(reports, eval_loss=eval_loss)
        write_report(report, out / EVAL_REPORT_FILE)
        summary |= {"eval_accuracy": report["runs"]["fine_tuned"]["overall"]["accuracy"],
                    "base_eval_accuracy": report["runs"]["base"]["overall"]["accuracy"], "n": report["questions"]}
        print(format_metrics("report", summary), flush=True)
    plot_loss_curve(history, out / LOSS_CURVE_FILE)
    log.info("model dir ready: %s", out)
    return summary


def report_questions(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The first --eval_max_samples questions of the validation file (text-only conversations left out)."""
    from evaluation.questions import load_questions

    return load_questions(cfg.validation_data_path, cfg.image_folder, limit=cfg.eval_max_samples)


def answer_in_memory(cfg: TrainConfig, model: Any, processor: Any, questions: list[dict]) -> tuple[dict, list]:
    """The base model's run, through the serving engine on the model already in memory, with the job's processor
    (so the base is asked with the same chat template as the fine-tuned model)."""
    from serve.engine.accel import AccelConfig
    from serve.engine.model import LoadedModel
    from serve.engine.predictor import Predictor

    loaded = LoadedModel(model=model, processor=processor, generation_config=model.generation_config,
                         device=str(model.device), quantization=str(model.dtype),
                         model_dir=Path(cfg.model_name_or_path))
    return _evaluate(cfg, Predictor(loaded, max_new_tokens_cap=cfg.eval_max_new_tokens,
                                    accel=AccelConfig(mode="off")), questions, "base", blank=False)


def answer_from_artifact(cfg: TrainConfig, model_dir: Path, device: str, questions: list[dict]) -> tuple[dict, list]:
    """The fine-tuned run (and its blank-image control), from the saved artifact as the server loads it. Compiled
    decode is left off: it gives the same tokens and would only add its warm-up to the job."""
    from serve.engine.accel import AccelConfig
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor

    loaded = load_artifact(model_dir, quantization="auto", device=device)
    log.info("evaluating the artifact as served (quantization=%s on %s)", loaded.quantization, loaded.device)
    predictor = Predictor(loaded, max_new_tokens_cap=cfg.eval_max_new_tokens, accel=AccelConfig(mode="off"))
    try:
        return _evaluate(cfg, predictor, questions, "fine_tuned", blank=True)
    finally:
        del predictor, loaded
        free_memory()


def answer_from_adapter(cfg: TrainConfig, adapter_dir: Path, device: str, questions: list[dict]) -> tuple[dict, list]:
    """The fine-tuned run of an adapter-only export: the base loaded as the server loads it, the exported adapter
    registered on it as the server registers one (serve.engine.adapters), every question asked through it."""
    from serve.engine.accel import AccelConfig
    from serve.engine.adapter_files import SourcePolicy
    from serve.engine.adapters import AdapterLimits
    from serve.engine.model import load_artifact
    from serve.engine.predictor import Predictor

    loaded = load_artifact(cfg.model_name_or_path, quantization="auto", device=device)
    limits = AdapterLimits(max_resident=1, max_rank=cfg.lora_r, memory_bytes=2**40,
                           sources=SourcePolicy(local_roots=(adapter_dir.resolve(),)))
    predictor = Predictor(loaded, max_new_tokens_cap=cfg.eval_max_new_tokens, accel=AccelConfig(mode="off"),
                          adapters=limits)
    predictor.adapters.register(ADAPTER_NAME, str(adapter_dir.resolve()))
    log.info("evaluating the adapter as served (on the base, quantization=%s on %s)", loaded.quantization,
             loaded.device)
    try:
        return _evaluate(cfg, predictor, questions, "fine_tuned", blank=True, adapter=ADAPTER_NAME)
    finally:
        del predictor, loaded
        free_memory()


def _evaluate(cfg: TrainConfig, predictor: Any, questions: list[dict], run: str, *, blank: bool,
              adapter: str | None = None) -> tuple[dict, list]:
    from evaluation.answerers import engine_answerer
    from evaluation.report import evaluate

    answerer = engine_answerer(predictor, max_new_tokens=cfg.eval_max_new_tokens,
                               batch_size=cfg.per_device_eval_batch_size, adapter=adapter)
    return evaluate(questions, {run: answerer}, blank_control=[run] if blank else [],
                    max_new_tokens=cfg.eval_max_new_tokens)


def combine(reports: list[tuple[dict, list]], *, eval_loss: float | None) -> dict[str, Any]:
    """One eval_report.json from the runs: evaluation/report.py's report + eval_loss + every prediction."""
    first = reports[0][0]
    return {"questions": first["questions"], "max_new_tokens": first["max_new_tokens"], "eval_loss": eval_loss,
            "failed": sum(r["failed"] for r, _ in reports), "seconds": round(sum(r["seconds"] for r, _ in reports), 1),
            "runs": {name: run for r, _ in reports for name, run in r["runs"].items()},
            "predictions": [p for _, preds in reports for p in preds]}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
