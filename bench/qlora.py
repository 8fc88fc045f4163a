"""QLoRA fine-tuning speed and memory: the training loop's tokens/s and peak GPU memory, on the job's own code.

    python -m bench.qlora --model-dir DIR [--steps 12] [--warmup-steps 3] [--batch-size 4] [--lora-r 128]
                          [--tokens 650] [--out FILE.json] [--tiny]

Writes a dataset of chart images with one question and an answer long enough that each example is `--tokens`
tokens (a LLaVA-1.5 image is 576 of them), then runs train/job.py's steps up to and including `Trainer.train`
(config resolution and checks, runtime, DeepSpeed ZeRO-2, the model built as the job builds it: NF4 + double
quantization, LoRA r=`--lora-r` on the language model, the projector trained in full, gradient checkpointing, bf16
on CUDA) for `--steps` optimizer steps, and stops there: the export (merge into a 16-bit copy of the base and the
artifact) is not part of the loop and is not run. Reported: tokens/s over the steps after `--warmup-steps`
(tokens counted by the job's own collator), seconds per step, peak GPU memory allocated and reserved (CUDA only),
the trainable parameters. One process, one device; bench.gpu runs it in a subprocess of its own so the serving
model's memory is not counted. --tiny: the tiny test model on CPU (bf16 off), a smoke run for the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTION = "What type of chart is this, and what is its title?"
ANSWER_WORDS = "The chart shows bars for twelve categories ; the tallest is category seven and the title reads".split()


def write_dataset(directory: Path, processor: Any, *, examples: int, tokens: int, image_size: int
                  ) -> tuple[Path, Path, int]:
    """`examples` rows, each one image + one question + an answer sized so the row is ~`tokens` tokens as the
    job's collator encodes it: (data file, image folder, tokens per row)."""
    from bench.samples import chart_image
    from train.data import load_examples
    from train.labels import LlavaCollator

    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(examples):
        chart_image(image_size, image_size, seed=i).save(images / f"chart_{i}.png")
    data = directory / "data.json"

    def write(words: int) -> int:
        answer = " ".join(ANSWER_WORDS[k % len(ANSWER_WORDS)] for k in range(words))
        rows = [{"id": f"chart-{i}", "image": f"chart_{i}.png",
                 "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                   {"from": "gpt", "value": answer}]} for i in range(examples)]
        data.write_text(json.dumps(rows))
        batch = LlavaCollator(processor, images, None)(load_examples(data, images)[:1])
        return int(batch["attention_mask"].sum())

    count = write(1)
    words = 1
    if count < tokens:  # tokens grow linearly with the words: one measured slope lands on the target
        per_word = max((write(65) - count) / 64, 1e-3)
        words = max(1, 1 + round((tokens - count) / per_word))
        count = write(words)
    return data, images, count


class StepClock:
    """Trainer callback: the time at the end of every optimizer step (after the device is done)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def measure(argv: list[str], tokens_per_row: int, batch: int, warmup: int) -> dict[str, Any]:
    """train/job.py's run() up to Trainer.train, timed; returns the numbers."""
    import torch
    from transformers import TrainerCallback

    from train.data import load_examples
    from train.job import check_model, init_deepspeed_comm, load_training_processor, make_trainer, prepare_runtime
    from train.modeling import trainable_summary
    from train.sagemaker_env import SageMakerPaths
    from train.sources import resolve_config
    from train.trainer import training_arguments

    cfg = resolve_config(argv, SageMakerPaths.from_env({"SM_BASE_DIR": tempfile.mkdtemp(prefix="no-sagemaker-")}))
    cfg = cfg.config
    examples = load_examples(cfg.data_path, cfg.image_folder)
    check_model(cfg)
    runtime = prepare_runtime(cfg)
    args = training_arguments(cfg, use_cpu=not runtime["cuda"], tf32=runtime["tf32"])
    if cfg.deepspeed:
        init_deepspeed_comm(args, cuda=runtime["cuda"])
    processor = load_training_processor(cfg)
    if runtime["cuda"]:
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(cfg, args, processor, examples, [])
    clock = StepClock()
    trainer.add_callback(type("Clock", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: clock.on_step_end(
        *a, **k)})())
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    timed = clock.ends[warmup:]
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0] if steps > 0 else float("nan")
    step_times = [b - a for a, b in zip(timed, timed[1:], strict=False)]
    out = {"steps": len(clock.ends), "timed_steps": steps, "batch_size": batch, "tokens_per_example": tokens_per_row,
           "tokens_per_s": steps * batch * tokens_per_row / seconds if steps > 0 else float("nan"),
           "seconds_per_step_p50": statistics.median(step_times) if step_times else float("nan"),
           "train_wall_s": wall, "trainable": trainable_summary(trainer.model), "deepspeed": cfg.deepspeed,
           "lora_r": cfg.lora_r, "bits": cfg.bits, "bf16": cfg.bf16,
           "device": torch.cuda.get_device_name() if runtime["cuda"] else "cpu"}
    if runtime["cuda"]:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.qlora", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="LLaVA model dir to fine-tune (bench.gpu passes its 7B-shaped one)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch size")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=650, help="tokens per example, image tokens included")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on CPU, 3 steps: a smoke run")
    parser.add_argument("--out", help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.tiny:
        args.steps, args.warmup_steps, args.batch_size, args.lora_r, args.tokens, args.examples = 3, 1, 2, 8, 60, 8
    elif not cuda:
        parser.error("no CUDA device: QLoRA timing needs a GPU (use --tiny for a CPU smoke run)")
    if args.warmup_steps + 2 > args.steps or min(args.batch_size, args.lora_r, args.tokens, args.examples) < 1:
        parser.error("--steps must exceed --warmup-steps by 2 or more; sizes must be positive")
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            if not args.tiny:
                parser.error("--model-dir is required (bench.gpu passes its 7B-shaped model)")
            from demo.tiny import build_tiny_artifact

            model_dir = str(build_tiny_artifact(Path(tmp) / "tiny"))
        from train.merge import load_processor

        processor = load_processor([model_dir], version="v1", image_aspect_ratio="pad")
        data, images, tokens = write_dataset(Path(tmp) / "data", processor, examples=args.examples,
                                             tokens=args.tokens, image_size=336)
        train_argv = ["--model_name_or_path", model_dir, "--data_path", str(data), "--image_folder", str(images),
                      "--lora_enable", "True", "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r),
                      "--bits", "4", "--bf16", str(cuda), "--deepspeed", "zero2", "--gradient_checkpointing", "True",
                      "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
                      "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--eval_generation", "False",
                      "--logging_steps", "1", "--model_max_length", str(max(2048, 2 * tokens)),
                      "--dataloader_num_workers", "0", "--output_dir", str(Path(tmp) / "out")]
        result = measure(train_argv, tokens, args.batch_size, args.warmup_steps)
    result["model_dir"] = model_dir
    print(json.dumps(result, indent=2, default=str), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
