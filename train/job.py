"""The fine-tuning job, step by step: data -> checks -> model -> train (resuming) -> merge -> report -> artifact.

Data and the checkpoint's config are validated before any weights are loaded, so a bad row or flag fails in
seconds. Every rank trains; rank 0 alone then merges the adapter into an unquantised copy of the base, runs the
generation report and writes the artifact (train/artifact.py) with eval_report.json and loss_curve.png.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

from train.config import ConfigError, TrainConfig
from train.data import DataError, load_examples
from train.modeling import ampere_or_newer

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the final LoRA adapter (+ projector), kept inside the model dir
FULL_WEIGHTS_DIR = ".full-weights"  # the final full fine-tune, removed once the artifact is written


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (rank 0: the report's scores) for the caller to log."""
    examples = load_examples(cfg.data_path, cfg.image_folder)
    val_examples = load_examples(cfg.validation_data_path, cfg.image_folder) if cfg.validation_data_path else []
    check_model(cfg)
    resume = find_resume(cfg)  # before any weights load: a checkpoint this config cannot resume is refused now
    if resume is not None and training_finished(cfg, resume):
        # A job restarted after its last step (e.g. a spot interruption during the export): Trainer.train would run
        # past the end (a step more, at the end of a partial epoch), so export the final checkpoint as it is.
        log.info("%s already reached the end of training: exporting it without training further", resume)
        return export_finished(cfg, resume, val_examples)
    runtime = prepare_runtime(cfg)
    from train.trainer import training_arguments

    # Before the model is loaded: under ZeRO-3 the arguments make from_pretrained partition weights as it loads.
    args = training_arguments(cfg, use_cpu=not runtime["cuda"], tf32=runtime["tf32"])
    if cfg.deepspeed:
        init_deepspeed_comm(args, cuda=runtime["cuda"])
    processor = load_training_processor(cfg)
    trainer = make_trainer(cfg, args, processor, examples, val_examples)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.stop_on_signal.raise_if_stopped(cfg.checkpoint_dir)  # SIGTERM: checkpoint saved, no export
    final = save_final(cfg, trainer)
    history = list(trainer.state.log_history)
    if not trainer.is_world_process_zero():
        return {}
    release(trainer)
    del trainer
    from train.export import export

    return export(cfg, final, processor, history, val_examples, resumed_from=resume)


def check_model(cfg: TrainConfig) -> None:
    from train.modeling import ModelConfigError, checkpoint_problems, read_model_config

    problems = checkpoint_problems(cfg, read_model_config(cfg.model_name_or_path))
    if problems:
        raise ModelConfigError(problems)


def prepare_runtime(cfg: TrainConfig) -> dict[str, Any]:
    import torch

    from train.launch import ensure_rendezvous_env
    from train.trainer import skip_deepspeed_shm_build

    cuda = torch.cuda.is_available()
    if cfg.deepspeed:
        ensure_rendezvous_env(os.environ)
        if not cuda:
            skip_deepspeed_shm_build()
    capability = torch.cuda.get_device_capability() if cuda else None
    problem = bf16_problem(cfg.bf16, capability, torch.cuda.get_device_name() if cuda else None)
    if problem:
        raise ConfigError([problem])
    tf32 = cfg.tf32
    if tf32 and not ampere_or_newer(capability):
        log.warning("--tf32 True ignored: it needs an Ampere or newer GPU")
        tf32 = None
    check_trackers(cfg)
    return {"cuda": cuda, "tf32": tf32}


def bf16_problem(bf16: bool, capability: tuple[int, int] | None, gpu: str | None) -> str | None:
    """--bf16 True on a GPU older than Ampere (the T4 of ml.g4dn, the V100 of ml.p3): torch would emulate bf16, slowly,
    and bitsandbytes' and DeepSpeed's kernels may not take it; refused before any weights load. (On CPU bf16 runs.)"""
    if not bf16 or capability is None or ampere_or_newer(capability):  # None: CPU, where bf16 runs
        return None
    return (f"--bf16 True needs a GPU with bf16 (compute capability 8.0+, e.g. A10G, L4, A100, H100); this {gpu} has "
            f"{capability[0]}.{capability[1]}: use --fp16 True")


def init_deepspeed_comm(args: Any, *, cuda: bool) -> None:
    """Join DeepSpeed's communicator to the process group before the model loads: ZeRO-3's zero.Init reads the
    world size from it (else it sees 1 and rejects the batch sizes the Trainer filled in for all ranks)."""
    import deepspeed

    _ = args.device  # sets up accelerate's process group first
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def check_trackers(cfg: TrainConfig) -> None:
    from transformers.integrations import get_available_reporting_integrations

    wanted = cfg.trackers()
    missing = [r for r in wanted if r not in get_available_reporting_integrations() and r != "all"]
    if missing:
        log.warning("--report_to %s: not installed in this environment, dropped; metrics still go to the log "
                    "lines (and CloudWatch through the metric definitions)", ",".join(missing))
        kept = [r for r in wanted if r not in missing]
        cfg.report_to = ",".join(kept) or "none"


def load_training_processor(cfg: TrainConfig) -> Any:
    from train.merge import load_processor

    return load_processor([cfg.model_name_or_path], version=cfg.version, image_aspect_ratio=cfg.image_aspect_ratio)


def make_trainer(cfg: TrainConfig, args: Any, processor: Any, examples: list, val_examples: list) -> Any:
    from transformers import set_seed

    from train.labels import ExampleDataset, LlavaCollator
    from train.modeling import build_model
    from train.trainer import SampleIdLogger, build_trainer

    train_ds = ExampleDataset(examples, processor, max_length=cfg.model_max_length)
    if len(train_ds) == 0:
        raise DataError(str(cfg.data_path), [f"none of the {len(examples)} examples fits --model_max_length "
                                             f"{cfg.model_max_length} (image tokens count towards it)"])
    eval_ds = None
    if val_examples and cfg.evaluation_strategy != "no":
        eval_ds = ExampleDataset(val_examples, processor, max_length=cfg.model_max_length)
    collator = LlavaCollator(processor, cfg.image_folder, cfg.model_max_length)
    if cfg.log_sample_ids:
        collator = SampleIdLogger(collator, args.process_index)
    # Seeded here, not only by the Trainer (which seeds after the model exists): the LoRA weights are drawn here.
    set_seed(cfg.seed)
    model = build_model(cfg, device=args.device)
    return build_trainer(cfg, model, processor, train_ds, eval_ds, collator, args)


def find_resume(cfg: TrainConfig) -> Path | None:
    from train.checkpoints import find_resume_checkpoint, resume_conflicts, resume_step

    if not cfg.resume:
        return None
    checkpoint = find_resume_checkpoint(cfg.checkpoint_dir)
    conflicts = resume_conflicts(cfg.to_dict(), checkpoint) if checkpoint is not None else []
    if conflicts:
        raise ConfigError(conflicts + [f"keep those settings to resume, or start over with --resume False or "
                                            f"another --checkpoint_dir than {cfg.checkpoint_dir}"])
    if checkpoint is not None:
        log.info("resuming from %s (step %d): adapter, projector, optimizer, scheduler and RNG states",
                 checkpoint, resume_step(checkpoint))
    return checkpoint


def training_finished(cfg: TrainConfig, checkpoint: Path) -> bool:
    """Whether `checkpoint` is already where this config's training ends (--max_steps, else the epochs)."""
    from train.checkpoints import read_state

    state = read_state(checkpoint)
    if cfg.max_steps > 0:
        return state["global_step"] >= cfg.max_steps
    return state.get("epoch", 0) >= cfg.num_train_epochs and state["global_step"] >= state.get("max_steps", 0)


def export_finished(cfg: TrainConfig, checkpoint: Path, val_examples: list) -> dict[str, Any]:
    """Rank 0 exports the final checkpoint's model files (what save_final wrote at the last step) with its loss
    history; no model is loaded for training, no process group is needed, other ranks have nothing to do."""
    from train.artifact import write_training_config
    from train.checkpoints import copy_model_files, read_state
    from train.export import export
    from train.launch import process_rank

    if process_rank() != 0:
        return {}
    final = final_dir(cfg)
    copy_model_files(checkpoint, final)
    write_training_config(final, cfg.to_dict())
    history = list(read_state(checkpoint).get("log_history", []))
    return export(cfg, final, load_training_processor(cfg), history, val_examples, resumed_from=checkpoint)


def final_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / (ADAPTER_DIR if cfg.lora_enable else FULL_WEIGHTS_DIR)


def save_final(cfg: TrainConfig, trainer: Any) -> Path:
    """Every rank takes part (ZeRO-3 gathers the weights); rank 0 writes."""
    from train.artifact import write_training_config

    final = final_dir(cfg)
    trainer.save_model(str(final))
    if trainer.is_world_process_zero() and final.is_dir():
        write_training_config(final, cfg.to_dict())  # lets `python -m train.merge --adapter` find the base
    trainer.accelerator.wait_for_everyone()
    return final


def release(trainer: Any) -> None:
    """Free the training model, optimizer and DeepSpeed state before the export loads fresh copies."""
    import torch

    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained would build the export's models under zero.Init
    except ImportError:
        pass
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

