"""The client is light: importing it, and running every AWS-side `llava-sm` command, loads no torch, transformers,
PIL or numpy (checked in fresh interpreters, since this test process has them loaded already). In a venv that has
only the base install's dependencies (boto3, pyyaml), `llava-sm --help` and every command's --help work, and the
local commands say which extra to install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from venv_support import add_paths, clean_env, light_site, make_venv

HEAVY = ("torch", "transformers", "PIL", "numpy", "safetensors", "peft", "deepspeed")
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llava:1"

RUN_COMMANDS = """
import contextlib, io, json, sys
from client.cli import main
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code
    print(json.dumps({"argv": argv[:1], "rc": rc, "out": out.getvalue()[-300:]}))
print(json.dumps({"heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_import_client_is_light():
    proc = _run(f"import sys; from client import predict, predict_full, ClientError; "
                f"print([m for m in {HEAVY + ('boto3',)!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # boto3 too: it is imported on the first endpoint call


def test_every_aws_command_runs_without_heavy_imports(moto_server, tiny_artifact, tmp_path):
    boto_s3 = __import__("boto3").client("s3", endpoint_url=moto_server)
    boto_s3.create_bucket(Bucket="imports-test")
    aws = ["--endpoint-url", moto_server]
    commands = [
        ["--help"],
        ["submit", "--dry-run", "--image-uri", IMAGE, "--role", ROLE, "--train", "s3://imports-test/d/",
         "--output-path", "s3://imports-test/o/"],
        ["submit", *aws, "--image-uri", IMAGE, "--role", ROLE, "--train", "s3://imports-test/d/",
         "--output-path", "s3://imports-test/o/", "--wait", "--poll", "0.01"],
        ["package", *aws, "--model-dir", tiny_artifact, "--s3-uri", "s3://imports-test/m/"],
        ["deploy", *aws, "--image-uri", IMAGE, "--role", ROLE, "--model-data", "s3://imports-test/m/model.tar.gz",
         "--endpoint-name", "imports-test", "--instance-type", "ml.m5.large", "--poll", "0.01"],
        ["predict", str(tmp_path / "absent.png"), "What?", "--url", "http://127.0.0.1:9", "--retries", "0"],
        ["delete", *aws, "--endpoint-name", "imports-test"],
    ]
    proc = _run(RUN_COMMANDS, json.dumps(commands))
    assert proc.returncode == 0, proc.stderr
    *runs, last = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["rc"] for r in runs] == [0, 0, 0, 0, 0, 1, 0], runs  # predict: the image file does not exist
    assert "neither an existing file nor" in runs[5]["out"]
    assert last["heavy"] == []


def test_console_script_is_installed():
    # the script sits next to the interpreter running the tests (the venv's bin/), on PATH or not
    exe = shutil.which("llava-sm", path=str(Path(sys.executable).parent)) or shutil.which("llava-sm")
    if exe is None:
        pytest.fail("the llava-sm console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("finetune", "serve", "submit", "package", "deploy", "predict", "delete"):
        assert f"\n  {command} " in proc.stdout


def test_dry_run_into_a_closed_pipe_exits_quietly():
    """`llava-sm submit --dry-run | head -1`: the reader leaves early; no traceback, exit 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    cmd = [sys.executable, "-m", "client.cli", "submit", "--image-uri",
           "123456789012.dkr.ecr.us-east-1.amazonaws.com/llava-sm-train:latest",
           "--role", "arn:aws:iam::123456789012:role/SageMakerRole", "--output-path", "s3://my-bucket/output/",
           "--train", "s3://my-bucket/data/train/", "--dry-run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the request is printed
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


# ---- a venv with the base install's dependencies only ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
HELP_COMMANDS = [["--help"], ["data", "synth", "--help"], ["finetune", "--help"], ["merge", "--help"],
                 ["serve", "--help"], ["eval", "--help"], ["demo", "--help"], ["submit", "--help"],
                 ["package", "--help"], ["deploy", "--help"], ["predict", "--help"], ["delete", "--help"]]


@pytest.fixture(scope="module")
def light_python(tmp_path_factory):
    """A fresh venv whose only packages are boto3, pyyaml and their dependencies, with the checkout on its path."""
    root = tmp_path_factory.mktemp("light")
    python = make_venv(root / "venv")
    add_paths(python, [light_site(root / "deps", ("boto3", "pyyaml")), REPO])
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in HEAVY if u.find_spec(m)])"
                            .replace("HEAVY", repr(HEAVY + ("matplotlib", "fastapi", "uvicorn")))],
                           capture_output=True, text=True, timeout=60, env=clean_env(), cwd=root)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return python, root


def test_every_help_works_without_torch(light_python):
    python, cwd = light_python
    proc = subprocess.run([str(python), "-c", RUN_COMMANDS, json.dumps(HELP_COMMANDS)], capture_output=True,
                          text=True, timeout=120, env=clean_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    *runs, last = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["rc"] for r in runs] == [0] * len(HELP_COMMANDS), runs
    assert last["heavy"] == []


@pytest.mark.parametrize("argv, extra", [
    (["finetune", "--model_name_or_path", "base", "--data_path", "d.json", "--output_dir", "out"], "train"),
    (["merge", "--adapter", "out/checkpoint-2", "--output_dir", "merged"], "train"),
    (["demo", "--quick"], "train,serve"),
    (["data", "synth", "charts", "-n", "2"], "train"),
])
def test_local_commands_without_their_extra_name_it(light_python, argv, extra):
    python, cwd = light_python
    proc = subprocess.run([str(python), "-m", "client.cli", *argv], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=cwd)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert f"llava-sm {command}: needs the {extra} extra" in proc.stderr, proc.stderr
    assert f"(pip install 'llava-sagemaker[{extra}]'); missing: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(cwd.glob("charts"))


def test_serve_without_its_extra_names_it(light_python, tmp_path):
    python, cwd = light_python
    proc = subprocess.run([str(python), "-m", "client.cli", "serve", "--model-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=clean_env(), cwd=cwd)
    assert proc.returncode == 1 and "needs the serve extra" in proc.stderr and "uvicorn" in proc.stderr, proc.stderr


NO_HEAVY = """
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
"""


def test_submit_checks_hyperparameters_without_torch_and_before_any_aws_call(moto_server):
    """`llava-sm submit` on a client without torch: bad hyperparameters exit 2 listing each problem, and no
    training job reaches the (moto) SageMaker; good ones are submitted from the same process."""
    sm = __import__("boto3").client("sagemaker", endpoint_url=moto_server)
    job = ["submit", "--endpoint-url", moto_server, "--image-uri", IMAGE, "--role", ROLE,
           "--train", "s3://no-torch/d/", "--output-path", "s3://no-torch/o/"]
    bad = [*job, "--job-name", "bad-hp", "--hyperparameter", "lora_rr=3", "--hyperparameter", "bits=4"]
    good = [*job, "--job-name", "good-hp", "--hyperparameter", "lora_r=8"]
    code = NO_HEAVY.replace("HEAVY", repr(HEAVY)) + RUN_COMMANDS
    proc = _run(code, json.dumps([bad, good]))
    assert proc.returncode == 0, proc.stderr
    *runs, last = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["rc"] for r in runs] == [2, 0], runs
    assert "lora_rr (from hyperparameters): unknown setting; did you mean 'lora_r'?" in runs[0]["out"]
    assert "--bits 4 needs --lora_enable True" in runs[0]["out"]
    assert last["heavy"] == []
    names = [j["TrainingJobName"] for j in sm.list_training_jobs()["TrainingJobSummaries"]]
    assert "good-hp" in names and "bad-hp" not in names
