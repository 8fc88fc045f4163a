"""Helpers for the training tests (tests/test_train_*.py): run the real entry point, read weights, greedy output.

Nothing here stands in for the job: `run_train` starts `python -m train` (or torchrun) as a subprocess, exactly as
the training image does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small, fast and still meaningful: several logging steps, two checkpoints, a couple of eval batches.
FAST_ARGS = ["--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
             "--lora_r", "8", "--lora_alpha", "16", "--eval_max_new_tokens", "4", "--eval_max_samples", "4",
             "--dataloader_num_workers", "0"]


def train_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    env.pop("SM_BASE_DIR", None)
    return env | extra


def run_train(args: list[str], *, launcher: list[str] | None = None, timeout: int = 300,
              **env: str) -> subprocess.CompletedProcess:
    """Run the job to completion; on timeout kill its whole process group (torchrun's workers included)."""
    cmd = (launcher or [sys.executable, "-m"]) + ["train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def changed(a: dict, b: dict, key: str) -> bool:
    import torch

    return not torch.equal(a[key], b[key])


def greedy(model, processor, image_path: Path, question: str, max_new_tokens: int = 8):
    """(generated ids, first-step logits) for one image question, greedy, prompt from the processor's template."""
    import torch

    from train.data import load_image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[load_image(image_path)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), logits


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())
