"""Training runs beyond the happy path: failures (failure file, exit codes, data checked before the model), a run
killed after a checkpoint that resumes, DeepSpeed ZeRO-2 with two CPU processes on gloo, QLoRA (bitsandbytes
4-bit also runs on CPU), and the GPU-only paths (4-bit on CUDA, NCCL), which skip without CUDA."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import tiny_rows, write_images, write_rows, write_tiny_dataset
from train_support import FAST_ARGS, REPO, load_weights, output_of, run_train, train_env, trainer_state


def sagemaker_tree(base: Path, hyperparameters: dict[str, str]) -> Path:
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    return base


def wait_until(job: subprocess.Popen, done: Callable[[], bool], what: str, timeout: float = 240) -> None:
    """Block until `done()` while the job runs; fail if the job ends (or `timeout` passes) first."""
    deadline = time.monotonic() + timeout
    while not done():
        assert job.poll() is None and time.monotonic() < deadline, f"no {what} before the run ended"
        time.sleep(0.05)


def wait_for_checkpoint(job: subprocess.Popen, checkpoint: Path) -> None:
    """Block until the running job has written `checkpoint` completely (its trainer state is saved last)."""
    wait_until(job, (checkpoint / "trainer_state.json").exists, f"complete {checkpoint.name}")


def lora_run_args(base: str, dataset: dict, out: Path, *, max_steps: int) -> list[str]:
    """A short LoRA run that checkpoints every 2 steps and skips the generation report."""
    return ["--model_name_or_path", base, "--data_path", dataset["data"], "--image_folder", dataset["images"],
            "--lora_enable", "True", "--output_dir", str(out), "--max_steps", str(max_steps), "--save_steps", "2",
            "--eval_generation", "False", *FAST_ARGS]


@pytest.fixture
def dataset(tmp_path):
    data, images = write_tiny_dataset(tmp_path / "data", n=8)
    return {"data": str(data), "images": str(images)}


def user_error_reason(base: Path, monkeypatch, caplog) -> str:
    """Run the job in the SageMaker tree `base`: it must exit 2 with a one-line "Invalid input:" failure file and no
    traceback in the log; returns that reason."""
    from train.__main__ import main

    monkeypatch.setenv("SM_BASE_DIR", str(base))
    caplog.set_level(logging.INFO)
    assert main([]) == 2
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("Invalid input:") and "\n" not in failure
    assert "Traceback" not in caplog.text
    return failure


def test_bad_data_is_a_user_error_reported_before_any_model_is_read(tmp_path, monkeypatch, caplog):
    rows = tiny_rows(4)
    rows[1]["conversations"] = []
    rows[3]["image"] = "missing.png"
    write_images(tmp_path / "images", 4)
    data = write_rows(tmp_path / "data.json", rows)
    base = sagemaker_tree(tmp_path / "ml", {"data_path": str(data), "image_folder": str(tmp_path / "images"),
                                            "model_name_or_path": str(tmp_path / "no-such-model")})
    failure = user_error_reason(base, monkeypatch, caplog)
    assert "row 2 (id 'ex-1'): 'conversations' must be a non-empty list" in failure
    assert "row 4 (id 'ex-3'): image 'missing.png' not found" in failure
    assert "no-such-model" not in failure  # the data was rejected before the model was even looked at


def test_no_example_fitting_model_max_length_is_a_user_error(tmp_path, dataset, tiny_artifact, monkeypatch, caplog):
    base = sagemaker_tree(tmp_path / "ml", {"data_path": dataset["data"], "image_folder": dataset["images"],
                                            "model_name_or_path": tiny_artifact, "lora_enable": "true",
                                            "model_max_length": "8"})
    failure = user_error_reason(base, monkeypatch, caplog)
    assert "none of the 8 examples fits --model_max_length 8 (image tokens count towards it)" in failure
    assert "row 0" not in failure  # rows are numbered from 1; this is about the whole file


@pytest.mark.parametrize("argv, expected", [
    (["--lora_enable", "True", "--lora_rank", "8"], "--lora_rank (from command line): unknown setting; did you mean "
                                                      "'lora_r'?"),
    (["--vision_tower", "openai/clip-vit-large-patch14-336"], "differs from the checkpoint's own vision tower"),
    (["--mm_projector_type", "linear"], "does not match the checkpoint's projector (mlp2x_gelu)"),
    (["--mm_vision_select_layer", "-1"], "differs from the checkpoint's vision_feature_layer -2"),
])
def test_config_and_model_flag_errors_write_the_failure_file(argv, expected, tmp_path, monkeypatch, dataset,
                                                             tiny_artifact):
    from train.__main__ import main

    monkeypatch.setenv("SM_BASE_DIR", str(tmp_path / "ml"))
    stale = tmp_path / "ml" / "output" / "failure"  # an earlier run's reason in a reused local tree
    stale.parent.mkdir(parents=True)
    stale.write_text("Training failed (OSError): an earlier run's disk was full")
    assert main(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                 dataset["images"], "--output_dir", str(tmp_path / "out"), *argv]) == 2
    assert expected in stale.read_text() and "earlier run" not in stale.read_text()


def test_a_crash_is_reported_as_our_failure_with_a_traceback(tmp_path, monkeypatch, dataset, tiny_artifact, caplog):
    """Corrupt weights in an otherwise valid base: exit 1, the reason in the failure file, the traceback logged."""
    from train.__main__ import main

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_artifact).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    monkeypatch.setenv("SM_BASE_DIR", str(tmp_path / "ml"))
    caplog.set_level(logging.INFO)
    assert main(["--model_name_or_path", str(broken), "--data_path", dataset["data"], "--image_folder",
                 dataset["images"], "--output_dir", str(tmp_path / "out"), "--lora_enable", "True"]) == 1
    assert (tmp_path / "ml" / "output" / "failure").read_text().startswith("Training failed (")
    assert "Traceback" in caplog.text


def test_a_rerun_after_the_last_step_exports_without_training_more(tmp_path, dataset, tiny_artifact):
    """A spot job restarted after training ended (say, during the merge) finds its final checkpoint: it must export
    again from it, not train past --max_steps."""
    out = tmp_path / "out"
    rerun_exports_the_same_weights(lora_run_args(tiny_artifact, dataset, out, max_steps=2), out, last_step=2)


def rerun_exports_the_same_weights(argv: list[str], out: Path, *, last_step: int, **launch) -> None:
    """Train, then run the same command again: the rerun must train nothing and export the same merged weights."""
    import torch

    first = run_train(argv, **launch)
    assert first.returncode == 0, output_of(first)[-4000:]
    merged = load_weights(out / "model.safetensors")
    again = run_train(argv, **launch)
    assert again.returncode == 0, output_of(again)[-4000:]
    assert "already reached the end of training" in again.stdout
    assert "[train] step=" not in again.stdout
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{last_step}"]
    rerun = load_weights(out / "model.safetensors")
    assert merged.keys() == rerun.keys() and all(torch.equal(merged[k], rerun[k]) for k in merged)


def test_resuming_with_another_lora_rank_is_refused_before_loading(tmp_path, dataset, tiny_artifact):
    out = tmp_path / "out"
    argv = lora_run_args(tiny_artifact, dataset, out, max_steps=2)
    assert run_train(argv).returncode == 0
    other_rank = run_train(argv + ["--lora_r", "4", "--max_steps", "4"])
    assert other_rank.returncode == 2, output_of(other_rank)[-4000:]
    text = output_of(other_rank)
    assert "checkpoint-2 was trained with lora_r=8, this run asks for lora_r=4" in text
    assert "Traceback" not in text and "loading " not in text  # refused before any weights were read
    fresh = run_train(argv + ["--lora_r", "4", "--max_steps", "4", "--resume", "False"])
    assert fresh.returncode == 0, output_of(fresh)[-4000:]


def test_killed_run_resumes_from_its_newest_complete_checkpoint(tmp_path, dataset, tiny_artifact):
    out = tmp_path / "out"
    argv = lora_run_args(tiny_artifact, dataset, out, max_steps=6)
    first = subprocess.Popen([sys.executable, "-m", "train", *argv], cwd=REPO, env=train_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(first, out / "checkpoint-2")
        first.send_signal(signal.SIGKILL)  # as a spot interruption would, mid-training
    finally:
        first.wait(timeout=60)
    done = sorted(p.name for p in out.glob("checkpoint-*"))
    assert "checkpoint-6" not in done
    (out / "checkpoint-98").mkdir()  # a checkpoint whose save was cut short: no trainer state, no weights
    (out / "checkpoint-98" / "adapter_config.json").write_text("{}")

    second = run_train(argv)
    assert second.returncode == 0, output_of(second)[-4000:]
    resumed = re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", second.stdout)
    assert resumed and resumed.group(1) == resumed.group(2) and int(resumed.group(1)) in (2, 4)
    start = int(resumed.group(1))
    steps = [int(s) for s in re.findall(r"\[train\] step=(\d+) ", second.stdout)]
    assert steps == list(range(start + 1, 7))  # continues at the next step, never from 1
    assert "skipping incomplete checkpoint" in second.stdout and "checkpoint-98" in second.stdout

    import torch

    final = out / "checkpoint-6"
    assert trainer_state(final)["global_step"] == 6
    optimizer = torch.load(final / "optimizer.pt", weights_only=False)
    # AdamW counts its own steps: 6 only if the killed run's moments and count were loaded, else 6 - start.
    assert {int(s["step"]) for s in optimizer["state"].values()} == {6}
    assert (out / "model.safetensors").is_file()


def sigterm_after(argv: list[str], log: Path, text: str, *, launcher: list[str] | None = None, timeout: float = 110,
                  **env: str) -> int:
    """Start the job, SIGTERM it once its log shows `text` (as SageMaker stops a job: StopTrainingJob, spot,
    MaxRuntime; SIGKILL comes 120 s later); returns its exit status, which must come within `timeout`."""
    with open(log, "wb") as out:
        job = subprocess.Popen([*(launcher or [sys.executable, "-m"]), "train", *argv], cwd=REPO,
                               env=train_env(**env), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(job, lambda: text in log.read_text(errors="replace"), repr(text))
        job.send_signal(signal.SIGTERM)
        return job.wait(timeout=timeout)
    finally:
        job.kill()


def test_sigterm_mid_training_saves_that_step_exits_143_and_the_next_run_resumes_there(tmp_path, dataset,
                                                                                       tiny_artifact):
    """No --save_steps checkpoint would come for a long time: the job finishes its step, saves it, names it in the
    failure file and exits 143 without exporting; the next run continues from exactly that step."""
    base = sagemaker_tree(tmp_path / "ml", {})
    out = tmp_path / "out"

    def argv(max_steps: int) -> list[str]:
        return lora_run_args(tiny_artifact, dataset, out, max_steps=max_steps) + [
            "--checkpoint_dir", str(out), "--save_steps", "1000"]

    assert sigterm_after(argv(400), tmp_path / "job.log", "[train] step=2 ", SM_BASE_DIR=str(base)) == 143
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1, tmp_path.joinpath("job.log").read_text()[-4000:]
    step = trainer_state(saved[0])["global_step"]
    assert saved[0].name == f"checkpoint-{step}" and step >= 2
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith("Stopped by SIGTERM") and f"saved {saved[0]} on the way out" in failure
    assert not (out / "model.safetensors").exists()  # stopped: no export of a half-trained model

    second = run_train(argv(step + 2))
    assert second.returncode == 0, output_of(second)[-4000:]
    assert f"resuming from {saved[0]} (step {step})" in second.stdout
    assert [int(s) for s in re.findall(r"\[train\] step=(\d+) ", second.stdout)] == [step + 1, step + 2]


def test_sigterm_under_deepspeed_saves_the_same_step_on_both_ranks(tmp_path, dataset, tiny_artifact):
    """torchrun forwards SIGTERM to both ranks, which may see it in different steps: they agree on one step
    (an all-reduce per step) and save it together (DeepSpeed's engine state included)."""
    out = tmp_path / "out"
    argv = lora_run_args(tiny_artifact, dataset, out, max_steps=400) + ["--save_steps", "1000", "--deepspeed",
                                                                          "zero2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--shutdown-timeout", "100", "-m"]
    status = sigterm_after(argv, tmp_path / "job.log", "[train] step=2 ", launcher=launcher, OMP_NUM_THREADS="1")
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert status != 0, log[-4000:]
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1, log[-4000:]
    step = trainer_state(saved[0])["global_step"]
    assert (saved[0] / f"global_step{step}").is_dir()
    assert len(re.findall(r"Stopped by SIGTERM before finishing; saved \S+checkpoint-(\d+)", log)) == 2
    assert set(re.findall(r"Stopped by SIGTERM before finishing; saved \S+checkpoint-(\d+)", log)) == {str(step)}


def test_sigterm_before_training_unwinds_at_once(tmp_path, dataset, tiny_artifact):
    """Outside the training loop there is no step to finish: the job stops at once, exit 143, failure file."""
    base = sagemaker_tree(tmp_path / "ml", {})
    log = tmp_path / "job.log"
    argv = lora_run_args(tiny_artifact, dataset, tmp_path / "o", max_steps=400)
    # "loading ": data checked, the model loading, not training yet
    assert sigterm_after(argv, log, "loading ", timeout=60, SM_BASE_DIR=str(base)) == 143
    assert "[train] step=" not in log.read_text()
    assert (base / "output" / "failure").read_text().startswith("Stopped by SIGTERM before finishing; a new run")


@pytest.mark.parametrize("flags", [
    ["--lr_scheduler_type", "reduce_lr_on_plateau", "--evaluation_strategy", "steps", "--eval_steps", "1"],
    ["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs", '{"num_decay_steps": 2}'],
    ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.5}',
     "--warmup_ratio", "0"],
], ids=["plateau", "wsd", "min_lr"])
def test_schedulers_that_need_evaluation_or_arguments_train(tmp_path, dataset, tiny_artifact, flags):
    """These once passed the config checks and crashed after the model loaded; with what they need, they train."""
    validation, _ = write_tiny_dataset(tmp_path / "val", n=4)
    out = tmp_path / "out"
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                      dataset["images"], "--validation_data_path", str(validation), "--lora_enable", "True",
                      "--output_dir", str(out), "--max_steps", "4", "--eval_generation", "False", *FAST_ARGS,
                      *flags])
    assert proc.returncode == 0, output_of(proc)[-4000:]
    rates = [float(r) for r in re.findall(r"\[train\] step=\d+ .*learning_rate=(\S+)", proc.stdout)]
    assert len(rates) == 4 and max(rates) > 0
    if "cosine_with_min_lr" in flags:
        assert min(rates) >= 0.5 * max(rates) * 0.999  # the floor it was given
    if "reduce_lr_on_plateau" in flags:
        assert "[eval]" in proc.stdout
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_cpu_processes_train_on_different_data(zero, tmp_path, dataset, tiny_artifact):
    out = tmp_path / "out"
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                      dataset["images"], "--lora_enable", "True", "--output_dir", str(out), "--max_steps", "2",
                      "--save_steps", "2", "--deepspeed", zero, "--log_sample_ids", "True",
                      "--eval_generation", "False", *FAST_ARGS],
                     launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m"], OMP_NUM_THREADS="1")
    log = output_of(proc)
    assert proc.returncode == 0, log[-4000:]
    ids = {rank: [i for line in re.findall(rf"\[data\] rank={rank} ids=(\S+)", log) for i in line.split(",")]
           for rank in (0, 1)}
    assert len(ids[0]) == len(ids[1]) == 4  # 2 steps x batch 2 on each rank
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 8  # sharded, not duplicated
    assert len(re.findall(r"\[train\] step=1 ", proc.stdout)) == 1  # log lines from the main process only
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's engine state: it really ran
    adapter = load_weights(out / "adapter" / "adapter_model.safetensors")
    assert all(v.numel() > 0 for v in adapter.values())  # ZeRO-3 gathered its partitions before saving
    assert sum(float(v.abs().sum()) for k, v in adapter.items() if "lora_B" in k) > 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("zero, lora", [("zero2", "True"), ("zero3", "False")], ids=["zero2-lora", "zero3-full"])
def test_deepspeed_rerun_after_the_last_step_exports_without_training_more(zero, lora, tmp_path, dataset,
                                                                           tiny_artifact):
    """3 steps of 2 per epoch end mid-epoch, where the Trainer's own resume would train a 4th step: the rerun
    exports the final checkpoint's model files instead, the same merged weights as the first run."""
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
            dataset["images"], "--lora_enable", lora, "--output_dir", str(out), "--max_steps", "3", "--save_steps",
            "3", "--deepspeed", zero, "--eval_generation", "False", *FAST_ARGS]
    rerun_exports_the_same_weights(argv, out, last_step=3, OMP_NUM_THREADS="1", launcher=[
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"])
    # The base's names (llava-hf's): a ZeRO-3 save alone wrote `language_model.model.model.*` (train/artifact.py).
    base = load_weights(Path(tiny_artifact) / "model.safetensors")
    assert load_weights(out / "model.safetensors").keys() == base.keys()


def test_qlora_4bit_trains_and_merges_into_an_unquantised_base(tmp_path, dataset, tiny_artifact, monkeypatch,
                                                               caplog):
    """bitsandbytes' 4-bit layers also run on CPU (tiny dims are multiples of 64), so QLoRA is tested here too."""
    from train.__main__ import main

    monkeypatch.delenv("SM_BASE_DIR", raising=False)
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    assert main(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                 dataset["images"], "--lora_enable", "True", "--bits", "4", "--output_dir", str(out),
                 "--max_steps", "2", "--save_steps", "2", "--eval_generation", "False", *FAST_ARGS]) == 0
    assert "bits=4" in caplog.text
    merged = load_weights(out / "model.safetensors")
    assert not any("absmax" in k or "quant" in k for k in merged)  # a plain checkpoint, not a 4-bit one
    base = load_weights(Path(tiny_artifact) / "model.safetensors")
    assert set(merged) == set(base) and all(merged[k].dtype == base[k].dtype for k in base)


@pytest.mark.gpu
def test_qlora_on_cuda_with_bf16(tmp_path, dataset, tiny_artifact):
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                      dataset["images"], "--lora_enable", "True", "--bits", "4", "--bf16", "True", "--output_dir",
                      str(tmp_path / "out"), "--max_steps", "2", "--save_steps", "2", "--deepspeed", "zero2",
                      "--validation_data_path", dataset["data"], *FAST_ARGS])
    assert proc.returncode == 0, output_of(proc)[-4000:]
    assert json.loads((tmp_path / "out" / "training_config.json").read_text())["merge_dtype"] == "torch.bfloat16"


@pytest.mark.gpu
def test_nccl_all_gpus_of_the_node(tmp_path, dataset, tiny_artifact):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    proc = run_train(["--model_name_or_path", tiny_artifact, "--data_path", dataset["data"], "--image_folder",
                      dataset["images"], "--lora_enable", "True", "--output_dir", str(tmp_path / "out"),
                      "--max_steps", "2", "--deepspeed", "zero2", "--bf16", "True", "--log_sample_ids", "True",
                      "--eval_generation", "False", *FAST_ARGS])  # no launcher: python -m train relaunches itself
    assert proc.returncode == 0, output_of(proc)[-4000:]
    assert "launching" in proc.stdout and "[data] rank=1 " in output_of(proc)
