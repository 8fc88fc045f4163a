"""The HF Trainer wiring: arguments from TrainConfig, optimizer groups, the modality sampler, log-line callbacks.

- Optimizer: AdamW with four groups, (projector | rest) x (decay | no decay); the projector's groups use
  `--mm_projector_lr` (LLaVA's recipe). Under DeepSpeed the Trainer hands this optimizer to the engine; with
  optimizer offload it is DeepSpeed's CPUAdam with the same groups (a torch optimizer would be refused).
- `--group_by_modality_length`: train/sampler.py's ModalityLengthGroupedSampler replaces the random sampler.
- SIGTERM inside the training loop: `StopOnSignal` saves a checkpoint at the end of the step and stops
  (train/stopping.py); the job then exits 143 naming it.
- Log lines: `MetricLogCallback` prints train/logs.py's `[train]` / `[eval]` lines on the main process; the
  progress bar stays but no longer prints its own dict lines.
- On CPU (tests, laptops) DeepSpeed runs on gloo with `use_cpu=True` (without it two processes silently train on
  identical data) and without JIT-compiling its shared-memory op.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from train import stopping
from train.artifact import write_training_config
from train.config import TrainConfig
from train.logs import format_metrics
from train.modeling import is_projector_param

log = logging.getLogger(__name__)

STEP_KEYS = ("loss", "grad_norm", "learning_rate")
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


class LlavaTrainer(Trainer):
    def __init__(self, *args: Any, projector_lr: float | None = None, group_by_modality: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_modality = group_by_modality

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if not self.group_by_modality:
            return super()._get_train_sampler(train_dataset)
        from train.sampler import ModalityLengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthGroupedSampler(dataset.modality_lengths, self.args.train_batch_size,
                                            world_size=self.args.world_size, seed=self.args.seed)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = self.parameter_groups(opt_model)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if _offloads_optimizer(self.args):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer_cls = DeepSpeedCPUAdam
            kwargs = {k: v for k, v in kwargs.items() if k in ("lr", "betas", "eps")} | {"adamw_mode": True}
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def parameter_groups(self, model: Any) -> list[dict[str, Any]]:
        decay = set(self.get_decay_parameter_names(model))
        buckets: dict[tuple[bool, bool], list[Any]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                buckets.setdefault((is_projector_param(name), name in decay), []).append(param)
        groups = []
        for (projector, decayed), params in sorted(buckets.items()):
            group: dict[str, Any] = {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0}
            if projector and self.projector_lr is not None:
                group["lr"] = self.projector_lr
            groups.append(group)
        return groups


def _offloads_optimizer(args: Any) -> bool:
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is None:
        return False
    device = ds.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return "optimizer" not in ds.config and device in ("cpu", "nvme")


class MetricLogCallback(TrainerCallback):
    """One regex-readable line per log event (train/logs.py), printed by the main process only."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = metric_line(logs, state.global_step)
        if line:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stdout)  # clears the progress bars first: the line stays whole
            sys.stdout.flush()


def metric_line(logs: dict[str, Any], step: int) -> str | None:
    if "train_runtime" in logs:
        return format_metrics("train", {k: logs.get(k) for k in SUMMARY_KEYS} | {"step": step})
    if any(k.startswith("eval_") for k in logs):
        evals = {k: v for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        return format_metrics("eval", {"step": step, "epoch": logs.get("epoch")} | evals)
    if "loss" in logs:
        return format_metrics("train", {"step": step, "epoch": logs.get("epoch")}
                              | {k: logs.get(k) for k in STEP_KEYS})
    return None


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bars, without the raw dict lines they print on every log event."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        return None


class StopOnSignal(TrainerCallback):
    """SIGTERM inside the training loop (train/stopping.py): at the end of the optimizer step, the same step on
    every rank, save a checkpoint and stop; `raise_if_stopped` then names it."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stopping.training_loop(True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if stopping.stop_agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stopping.training_loop(False)

    def raise_if_stopped(self, checkpoint_dir: str | Path) -> None:
        """After `trainer.train()` returns: StopRequested naming the checkpoint saved, if SIGTERM stopped it."""
        if self.stopped_at is not None:
            raise stopping.StopRequested(Path(checkpoint_dir) / f"checkpoint-{self.stopped_at}")


class SaveConfigCallback(TrainerCallback):
    """Put the resolved config into every checkpoint, so `python -m train.merge` knows how it was trained."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_training_config(folder, self.config)


class SampleIdLogger:
    """Wraps a collator to print `[data] rank=R ids=a,b` per batch: proves how data is sharded across ranks."""

    def __init__(self, collator: Any, rank: int):
        self.collator, self.rank = collator, rank

    def __call__(self, examples: list[Any]) -> Any:
        print(f"[data] rank={self.rank} ids={','.join(e.id for e in examples)}", flush=True)
        return self.collator(examples)


def training_arguments(cfg: TrainConfig, *, use_cpu: bool, tf32: bool | None) -> Any:
    from transformers import TrainingArguments

    report_to = cfg.trackers()
    return TrainingArguments(
        output_dir=cfg.checkpoint_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        lr_scheduler_kwargs=cfg.lr_scheduler_kwargs or {},
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        tf32=tf32,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy=cfg.evaluation_strategy,
        eval_steps=cfg.eval_steps or cfg.logging_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=report_to or "none",
        seed=cfg.seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,  # the dataset yields Example objects; the collator builds tensors
        label_names=["labels"],
        deepspeed=cfg.deepspeed,
        use_cpu=use_cpu,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op on every CPU init (~40 s on 2 cores); gloo works without it.

    `import deepspeed.comm.torch as m` would bind torch itself (attribute shadowing), hence importlib.
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def build_trainer(cfg: TrainConfig, model: Any, processor: Any, train_dataset: Any, eval_dataset: Any,
                  collator: Any, args: Any) -> LlavaTrainer:
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=processor, projector_lr=cfg.mm_projector_lr,
        group_by_modality=cfg.group_by_modality_length,
        callbacks=[MetricLogCallback(), SaveConfigCallback(cfg.to_dict()), stop := StopOnSignal()])
    trainer.stop_on_signal = stop
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback())
    return trainer
