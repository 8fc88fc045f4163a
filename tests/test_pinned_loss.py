"""Pinned losses: the real `python -m train` on the fixed tiny model (demo/tiny.py, seed 0) and the fixed tiny
dataset (tests/data_helpers.py), six LoRA steps with a fixed seed, on one CPU thread; the logged losses must equal
the pinned values (torch.testing.assert_close, rtol = atol = 1e-5, as torchtune's recipe tests pin theirs).

A silent change to the labels (what is masked), the chat template, the tokenisation, the learning rates (LoRA and
projector), the scheduler or the optimizer moves these numbers and fails here, where every other test would pass.
The first loss is the untrained model's: it moves with the data, template and labels alone.

When a change is meant to move them (or a torch / transformers upgrade does), the failure prints the new values:
check that the change explains them, then pin those.
"""

from __future__ import annotations

import pytest
from data_helpers import write_tiny_dataset
from train_support import output_of, run_train

from train.logs import parse_metrics

EXPECTED_LOSSES = [5.97955, 5.87135, 5.89941, 5.89957, 5.74108, 5.82877]  # as logged: 6 significant digits
RECIPE = ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "6", "--logging_steps", "1",
          "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--mm_projector_lr", "1e-2",
          "--warmup_ratio", "0", "--lr_scheduler_type", "cosine", "--seed", "7", "--save_strategy", "no",
          "--eval_generation", "False", "--dataloader_num_workers", "0"]
# One thread: a CPU matmul split across threads may sum in another order from run to run.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_the_training_losses_are_pinned(tmp_path, tiny_artifact):
    torch = pytest.importorskip("torch")
    data, images = write_tiny_dataset(tmp_path / "data", n=8)
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", str(data), "--image_folder", str(images),
                      "--output_dir", str(tmp_path / "out"), *RECIPE], **ONE_THREAD)
    assert proc.returncode == 0, output_of(proc)[-4000:]
    losses = parse_metrics(proc.stdout).get("loss", [])
    assert len(losses) == len(EXPECTED_LOSSES), proc.stdout[-4000:]
    torch.testing.assert_close(losses, EXPECTED_LOSSES, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{m}\nlosses now: {losses}\npinned:     {EXPECTED_LOSSES}")
