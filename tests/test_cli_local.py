"""`llava-sm` as the one front door: the grouped --help, the local verbs (finetune, merge, serve, demo) running the
project's own entry points with their flags, and `llava-sm train` refused because it would mean two things.

The end-to-end test drives a whole local workflow through `llava-sm` only: data synth -> finetune (LoRA) -> merge ->
serve -> predict, each as a real subprocess.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from train_support import FAST_ARGS, train_env

from client.cli import build_parser, main
from demo.pipeline import free_port, wait_until_ready

LOCAL = ("data synth", "finetune", "merge", "serve", "eval", "demo")
AWS = ("submit", "package", "deploy", "predict", "delete", "adapter")


def llava_sm(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`llava-sm ARGS` in a fresh interpreter (the console script is `client.cli:main`)."""
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=train_env(**env))


def help_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


# ---- the front door's help -------------------------------------------------------------------------------------

def test_help_lists_every_command_once_grouped_here_and_on_sagemaker(capsys):
    out = help_of(capsys, ["--help"])
    here, sagemaker = out.index("Here ("), out.index("On SageMaker (")
    listed = re.findall(r"^  ([a-z]+(?: [a-z]+)?)\s{2,}\S", out, flags=re.MULTILINE)
    assert listed == [*LOCAL, *AWS]  # one line each, in two groups
    for name in LOCAL:
        assert here < out.index(f"\n  {name} ") < sagemaker
    for name in AWS:
        assert out.index(f"\n  {name} ") > sagemaker
    assert "Example" in out and "llava-sm finetune --model_name_or_path" in out
    assert "\n  train " not in out and "add_parser" not in out and "subcommand" not in out


def test_every_registered_command_is_in_the_help():
    registered = {name for action in build_parser()._actions if action.dest == "command" for name in action.choices}
    assert registered == {"data", *LOCAL[1:], *AWS, "train"}  # `train` only to refuse it


def test_train_is_refused_naming_finetune_and_submit(capsys):
    for argv in (["train"], ["train", "--help"], ["train", "--model_name_or_path", "x", "--output_dir", "out"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "llava-sm finetune" in err and "llava-sm submit" in err, err


def test_finetune_and_merge_and_demo_take_their_entry_points_flags():
    """The --help of each pass-through verb is its entry point's own, so the flags are the same by construction."""
    for verb, module in (("finetune", "train"), ("merge", "train.merge"), ("demo", "demo")):
        ours = llava_sm(verb, "--help", timeout=120)
        theirs = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                                timeout=120, env=train_env())
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout
        assert ("--workdir" if verb == "demo" else "--output_dir") in ours.stdout


def test_finetune_passes_its_flags_to_the_training_entry_point(tmp_path):
    """A user error reaches `python -m train`'s own validation and its exit status (2), every problem listed.
    (A subprocess: the training entry point installs its own SIGTERM handler.)"""
    proc = llava_sm("finetune", "--model_name_or_path", str(tmp_path), "--data_path", str(tmp_path / "no.json"),
                    "--output_dir", str(tmp_path / "out"), "--bits", "3", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bits" in proc.stdout and "no.json" in proc.stdout


def test_serve_flag_problems_are_clear(tmp_path, capsys):
    assert main(["serve", "--model-dir", str(tmp_path / "absent")]) == 2
    assert f"--model-dir {tmp_path / 'absent'} is not a directory" in capsys.readouterr().err
    proc = llava_sm("serve", "--model-dir", str(tmp_path), "--port", "70000", timeout=120)
    assert proc.returncode == 2 and "SAGEMAKER_BIND_TO_PORT" in proc.stderr, proc.stderr


# ---- a whole local workflow through llava-sm -------------------------------------------------------------------

@pytest.mark.slow
def test_synth_finetune_merge_serve_predict_all_through_llava_sm(tmp_path, tiny_artifact):
    data, out, merged = tmp_path / "data", tmp_path / "out", tmp_path / "merged"
    proc = llava_sm("data", "synth", str(data), "-n", "6", "--preset", "demo", "--val-fraction", "0.34", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = llava_sm("finetune", "--model_name_or_path", tiny_artifact, "--data_path",
                    str(data / "train" / "dataset.json"), "--image_folder", str(data / "images"),
                    "--output_dir", str(out), "--lora_enable", "True", "--max_steps", "2", "--save_steps", "2",
                    "--eval_generation", "False", *FAST_ARGS)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((out / "training_config.json").read_text())["global_step"] == 2

    proc = llava_sm("merge", "--adapter", str(out / "checkpoint-2"), "--output_dir", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((merged / "training_config.json").read_text())["made_by"] == "train.merge"

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--model-dir", str(merged), "--port",
                               str(port), "--host", "127.0.0.1"], env=train_env(SERVE_TORCH_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server)
        image = sorted((data / "images").iterdir())[0]
        proc = llava_sm("predict", str(image), "What type of chart is this?", "--url", f"http://127.0.0.1:{port}",
                        "--json", "--max-new-tokens", "3", timeout=120)
        assert proc.returncode == 0, proc.stderr
        reply = json.loads(proc.stdout)
        assert reply["usage"]["completion_tokens"] >= 1 and isinstance(reply["answer"], str)
    finally:
        server.send_signal(signal.SIGTERM)
        log, _ = server.communicate(timeout=60)
    assert server.returncode == 0, log[-3000:]  # drained and stopped on request
    assert str(merged) in log
