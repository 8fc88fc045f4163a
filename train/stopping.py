"""SIGTERM handling: during training, finish the step, save a checkpoint and stop; elsewhere, unwind at once.

SageMaker stops a job (StopTrainingJob, MaxRuntime, a spot interruption) with SIGTERM, then SIGKILL 120 s later
(torchrun, when it runs the ranks, gives them 30 s). The steps since the last --save_steps checkpoint would be
lost, so:
- inside the training loop, the handler only records the request. `train.trainer.StopOnSignal` sees it
  when the current optimizer step ends and tells the Trainer to save a checkpoint there and stop. With several
  processes they agree first (one all-reduce of a flag per step), so every rank saves the same step. The job then
  exits 143 naming that checkpoint, which is where the next run resumes;
- anywhere else (loading, data checks, the export), or at a second SIGTERM, the handler raises `StopRequested`
  in the main thread, so the job unwinds and writes its failure file. As PID 1 in a container, python would
  otherwise not react until SIGKILL.

    install_stop_handler()                         # once, first thing in the process
    ... train.trainer.StopOnSignal calls training_loop(True/False) and stop_agreed(args) at each step end
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_STOPPED = 128 + signal.SIGTERM


class StopRequested(Exception):
    """SIGTERM arrived; `checkpoint` is the one saved on the way out, if the training loop got to save one."""

    def __init__(self, checkpoint: Path | None = None):
        super().__init__(str(checkpoint or ""))
        self.checkpoint = checkpoint


class _Signal:
    in_training_loop = False  # between the Trainer's on_train_begin and on_train_end
    requested = False


def install_stop_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _Signal.in_training_loop and not _Signal.requested:
        _Signal.requested = True
        log.warning("SIGTERM: saving a checkpoint when this step ends, then stopping")
        return
    raise StopRequested()


def training_loop(running: bool) -> None:
    """Whether a SIGTERM now can wait for the end of the current step (True) or must unwind at once."""
    _Signal.in_training_loop = running


def stop_agreed(args: Any) -> bool:
    """Whether SIGTERM arrived on any rank (one all-reduce when several processes train; NCCL needs the tensor on
    the GPU, `args.device`)."""
    import torch
    import torch.distributed as dist

    flag = _Signal.requested
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    anywhere = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    return bool(anywhere.item())
