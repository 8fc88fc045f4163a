"""`python -m train`: the fine-tuning job (also the training image's `train` command, run by SageMaker).

    python -m train --model_name_or_path BASE --data_path data.json --image_folder images/ \\
        --lora_enable True --output_dir out/            # see docs/training.md for every flag

Wiring only: resolve the config (train/sources.py), start one process per GPU (train/launch.py), run the job
(train/job.py). Any failure writes a one-paragraph reason to SageMaker's failure file and exits non-zero: 2 for the
user's own error (config, data, base model), 1 for anything else (with the traceback in the log), 143 when stopped
by SIGTERM (StopTrainingJob, a spot interruption, MaxRuntime). SIGTERM during training saves a checkpoint at the end
of the step first (train/stopping.py); the next run resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from train.config import ConfigError
from train.data import DataError
from train.launch import already_launched, process_rank, relaunch_if_needed
from train.logs import setup_logging
from train.merge import MergeError
from train.modeling import ModelConfigError
from train.sagemaker_env import BASE_DIR_ENV, SageMakerConfigError, SageMakerPaths
from train.sources import describe, resolve_config
from train.stopping import EXIT_STOPPED, StopRequested, install_stop_handler

log = logging.getLogger("train")

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    paths = SageMakerPaths.from_env()
    rank = process_rank()
    setup_logging(rank)
    install_stop_handler()
    if not already_launched(os.environ):  # the first process of the job; torchrun's ranks come later
        paths.clear_failure()
    try:
        resolved = resolve_config(argv, paths)
        if rank == 0:
            log.info(describe(resolved))
            for note in resolved.notes:
                log.warning("note: %s", note)
        relaunch_if_needed(argv, paths.read_resource_config())
        from train.job import run

        run(resolved.config)
        return 0
    except (ConfigError, DataError, SageMakerConfigError, ModelConfigError, MergeError) as e:
        return fail(paths, rank, f"Invalid input: {e}", EXIT_USER_ERROR)
    except StopRequested as e:
        saved = f"saved {e.checkpoint} on the way out; " if e.checkpoint else ""
        return fail(paths, rank, f"Stopped by SIGTERM before finishing; {saved}a new run resumes from the newest "
                    "complete checkpoint", EXIT_STOPPED)
    except Exception as e:
        log.exception("training failed")
        return fail(paths, rank, f"Training failed ({type(e).__name__}): {e}", EXIT_FAILURE)
    finally:
        shutdown_distributed()


def fail(paths: SageMakerPaths, rank: int, reason: str, code: int) -> int:
    """Log the reason; in a SageMaker job (or a test's fake /opt/ml) also write it to the failure file."""
    log.error("%s", reason)
    if paths.in_training_job() or os.environ.get(BASE_DIR_ENV):
        prefix = f"rank {rank}: " if rank else ""
        try:
            paths.write_failure(prefix + reason)
        except OSError as e:
            log.error("cannot write the failure file %s: %s", paths.failure_file, e)
    return code


def shutdown_distributed() -> None:
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
