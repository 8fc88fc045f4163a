"""The serving and training images, built in their CPU variant and run the way SageMaker runs them.

Always: the pinned locks match the project venv, both Dockerfiles share their torch layers, the entry point execs
(so SIGTERM reaches python) and dispatches `serve`/`train`, the scripts in container/ check their arguments, and
push.sh resolves account/region/repository against a moto ECR.
With podman or docker (marker `container`; skipped loudly without one, see tests/container_support.py): hadolint on
both Dockerfiles; both images built; the serving image answers /invocations over a published port with the tiny
artifact at /opt/ml/model and exits 0 on SIGTERM; the training image trains two LoRA steps on tiny data in an
/opt/ml tree and leaves a merged model that the server loads, and turns a bad hyperparameter into a failure file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from container_support import (
    PODMAN_DIR,
    REPO,
    build_images,
    find_engine,
    report_timings,
    unavailable,
    wait_for,
)
from data_helpers import write_tiny_dataset
from serve_support import b64_png, png_bytes

from client.stream import predict_stream

SHARED_MARK = "# ---- end of the part shared with"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


def _venv_env(**extra: str) -> dict[str, str]:
    """This interpreter's bin dir first on PATH (the entry point runs `python`), no SageMaker/serve settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "SM_", "SAGEMAKER_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


# ---------------------------------------------------------------- always run


def test_locks_pin_every_requirement_of_the_extras(tmp_path, monkeypatch):
    proc = _run([sys.executable, "container/lock.py", "--verify"])
    assert proc.returncode == 0, proc.stderr

    sys.path.insert(0, str(REPO / "container"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "container"))
    stale = tmp_path / "requirements-serve.lock"
    stale.write_text("fastapi==0.100.0\ntransformers==5.24.0\n")
    monkeypatch.setattr(lock, "lock_path", lambda name: stale)
    problems = lock.unmet("serve")
    assert any(p.startswith("serve: fastapi==0.100.0 does not satisfy fastapi>=") for p in problems), problems
    assert any(p.startswith("serve: uvicorn") and p.endswith("is not pinned") for p in problems)
    assert not any("transformers" in p for p in problems)


def test_dockerfiles_share_the_torch_layers_and_pin_the_projects_torch():
    serve = (REPO / "Dockerfile.serve").read_text()
    train = (REPO / "Dockerfile.train").read_text()

    def shared(text: str) -> str:  # from the first build arg to the marker, the base image's default aside
        head = text[text.index("FROM ${BASE_IMAGE}"):text.index(SHARED_MARK)]
        assert "TORCH_SPEC" in head and "requirements-torch.lock" in head
        return head

    assert shared(serve) == shared(train), "the layers before the marker must stay identical to be shared"
    pin = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    for text in (serve, train):
        assert f"ARG TORCH_SPEC={pin}+cu126\n" in text
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126\n" in text
        assert "ARG BASE_IMAGE=nvidia/cuda:12.6." in text  # the CUDA of the torch build (DeepSpeed's nvcc checks it)
    assert "ARG BASE_IMAGE=nvidia/cuda:" in serve and "-runtime-" in serve
    assert "ARG BASE_IMAGE=nvidia/cuda:" in train and "-devel-" in train


def test_entrypoint_execs_the_command_so_signals_reach_it():
    script = REPO / "container" / "entrypoint.sh"
    proc = subprocess.Popen(["sh", str(script), "sh", "-c", "echo $$; exec sleep 30"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert int(proc.stdout.readline()) == proc.pid  # no shell left between the caller and the command
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    usage = _run(["sh", str(script)])
    assert usage.returncode == 2 and "usage: IMAGE serve | IMAGE train" in usage.stderr


def test_entrypoint_dispatches_serve_and_train_to_the_project(tmp_path):
    script = str(REPO / "container" / "entrypoint.sh")
    serve = _run(["sh", script, "serve"], env=_venv_env(SERVE_QUANTIZATION="int3"))
    assert serve.returncode == 2 and "SERVE_QUANTIZATION: must be one of auto, nf4" in serve.stderr
    train = _run(["sh", script, "train", "--no_such_flag", "1"], env=_venv_env(SM_BASE_DIR=str(tmp_path / "ml")))
    assert train.returncode == 2 and "no_such_flag" in train.stdout + train.stderr
    assert "no_such_flag" in (tmp_path / "ml" / "output" / "failure").read_text()


def test_build_script_composes_the_variants():
    def commands(*args: str) -> list[str]:
        proc = _run(["bash", "container/build.sh", *args, "--dry-run"])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    serve, train = commands("--engine", "docker")  # the Dockerfiles' CUDA 12.6 defaults
    assert serve.startswith("+ docker build -f Dockerfile.serve -t llava-sm-serve:latest")
    assert "--build-arg" not in serve
    serve, train = commands("all", "--cuda", "13.0", "--engine", "docker", "--flash-attn", "flash-attn==2.8.3")
    assert "BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04" in serve and "FLASH_ATTN" not in serve
    assert "BASE_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04" in train and "FLASH_ATTN_SPEC=flash-attn==2.8.3" in train
    assert all("TORCH_SPEC=torch==2.13.0 " in c and "TORCH_INDEX_URL= " in c for c in (serve, train))
    [cpu] = commands("serve", "--cpu", "--engine", "podman")
    assert "-t llava-sm-serve:cpu" in cpu and "--format docker" in cpu  # podman keeps HEALTHCHECK only so
    assert "BASE_IMAGE=debian:bookworm-slim" in cpu and "TORCH_SPEC=torch==2.13.0+cpu" in cpu
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    both = _run(["bash", "container/build.sh", "--cpu", "--cuda", "13.0", "--dry-run"])
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_local_scripts_report_every_bad_argument(tmp_path):
    train = _run(["bash", "container/train-local.sh", str(tmp_path / "ml"), "--channel", "train",
                  "--channel", f"model={tmp_path / 'missing'}", "--hp", "=3", "--engine", "docker"])
    assert train.returncode == 2
    assert train.stderr.count("train-local.sh: ") == 3, train.stderr
    assert "--channel train: expected NAME=PATH" in train.stderr and "--hp =3: expected KEY=VALUE" in train.stderr
    assert not (tmp_path / "ml").exists()  # nothing created before the arguments are known to be good
    serve = _run(["bash", "container/run-local.sh", str(tmp_path)])
    assert serve.returncode == 2 and "has no config.json: not a model dir" in serve.stderr
    build = _run(["bash", "container/build.sh", "serve", "--engine", "rkt"])
    assert build.returncode == 2 and "--engine must be docker or podman" in build.stderr


def test_push_resolves_account_region_and_repository(moto_server):
    env = _venv_env(AWS_ENDPOINT_URL=moto_server, PYTHON=sys.executable)
    args = ["bash", "container/push.sh", "llava-sm-serve:cpu", "--region", "eu-west-1", "--dry-run",
            "--engine", "podman"]
    missing = _run(args, env=env)
    assert missing.returncode == 1 and "pass --create" in missing.stderr

    created = _run([*args, "--create", "--tag", "v1"], env=env)
    assert created.returncode == 0, created.stderr
    remote = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/llava-sm-serve:v1"
    assert created.stdout.splitlines() == [
        "+ podman login --username AWS --password-stdin 123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        f"+ podman tag llava-sm-serve:cpu {remote}", f"+ podman push {remote}", remote]
    again = _run(args, env=env)  # the repository exists now; the local tag is kept
    assert again.returncode == 0 and again.stdout.splitlines()[-1].endswith("/llava-sm-serve:cpu")


# ---------------------------------------------------------------- with a container engine


@pytest.fixture(scope="module")
def engine():
    return find_engine()


@pytest.fixture(scope="module")
def images(engine, tmp_path_factory, request):
    built = build_images(engine, tmp_path_factory.mktemp("builds"))
    yield built
    report_timings(request.config, engine)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [PODMAN_DIR / "tools" / "bin" / "hadolint"] if p.is_file()), None)


@pytest.mark.container
def test_hadolint_finds_no_errors_in_either_dockerfile():
    hadolint = _hadolint()
    if hadolint is None:
        unavailable("hadolint is not installed (container/ci/setup.sh installs it)")
    for dockerfile in ("Dockerfile.serve", "Dockerfile.train"):
        proc = _run([hadolint, "--no-color", "--failure-threshold", "error", dockerfile])
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_serving_image_follows_the_sagemaker_contract(engine, images):
    info = engine.image_config(images["serve"])
    config = info["Config"]
    assert config["Entrypoint"] == ["/usr/local/bin/entrypoint.sh"] and config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"] and config.get("User", "") in ("", "root", "0")
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert "HF_HUB_OFFLINE=1" in config["Env"]
    assert "/ping" in " ".join(_healthcheck(info)["Test"])


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_serving_image_answers_over_the_published_port_and_stops_cleanly(engine, images, tiny_artifact, tmp_path):
    name = f"llava-sm-test-serve-{os.getpid()}"
    log = open(tmp_path / "serve.log", "w")
    started = time.monotonic()
    # run-local.sh, attached, as a user runs it: its exit status is the container's.
    proc = subprocess.Popen(
        ["bash", str(REPO / "container" / "run-local.sh"), tiny_artifact, "--cpu", "--image", images["serve"],
         "--engine", engine.name, "--port", "0", "--", "--name", name, "-e", "SERVE_TORCH_THREADS=1"],
        env=engine.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_for(lambda: engine.run("port", name, "8080", check=False).stdout.strip(), timeout=120,
                        what="the container's published port")
        base = "http://" + port.splitlines()[0].replace("0.0.0.0", "127.0.0.1")
        wait_for(lambda: _ping(base), timeout=300, interval=1, what="/ping 200")
        engine.timings["serve ready"] = time.monotonic() - started

        answer = requests.post(base + "/invocations", timeout=60, json={
            "image": b64_png(), "question": "What is shown?", "temperature": 0, "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert isinstance(body["answer"], str) and 1 <= body["usage"]["completion_tokens"] <= 4
        streamed = predict_stream(png_bytes(), "What is shown?", url=base, temperature=0, max_new_tokens=4)
        assert "".join(streamed) == streamed.answer == body["answer"]  # chunked events through the port mapping
        bad = requests.post(base + "/invocations", data=b"{not json", timeout=30,
                            headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"

        test = _healthcheck(engine.image_config(images["serve"]))["Test"]
        assert test[0] == "CMD"  # the image's own HEALTHCHECK command, run inside the container
        assert engine.run("exec", name, *test[1:], check=False).returncode == 0

        stopping = time.monotonic()
        engine.run("stop", "-t", "30", name, timeout=60)  # SIGTERM, SIGKILL after 30 s (as SageMaker)
        assert proc.wait(timeout=60) == 0, "the server did not exit 0 on SIGTERM"
        engine.timings["serve stop"] = time.monotonic() - stopping
        assert engine.timings["serve stop"] < 25
    finally:
        if proc.poll() is None:
            engine.run("rm", "-f", name, check=False)
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "model ready" in text and "Application shutdown complete" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def _healthcheck(info: dict) -> dict:
    """Docker keeps HEALTHCHECK in Config, podman next to it."""
    health = info["Config"].get("Healthcheck") or info.get("Healthcheck")
    assert health, "the image has no HEALTHCHECK (podman drops it unless built with --format docker)"
    return health


def _ping(base: str) -> bool:
    try:
        return requests.get(base + "/ping", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


TRAIN_HPS = {"lora_enable": "true", "lora_r": "8", "lora_alpha": "16", "max_steps": "2", "save_steps": "2",
             "logging_steps": "1", "per_device_train_batch_size": "2", "learning_rate": "1e-3", "warmup_ratio": "0",
             "gradient_checkpointing": "false", "eval_generation": "false", "dataloader_num_workers": "0",
             "image_folder": "/opt/ml/input/data/train/images", "deepspeed": "zero2"}


def _train(engine, image, ml: Path, channels: dict[str, str], hps: dict[str, str], log: Path):
    args = [str(ml), "--cpu", "--image", image, "--engine", engine.name]
    for name, path in channels.items():
        args += ["--channel", f"{name}={path}"]
    for key, value in hps.items():
        args += ["--hp", f"{key}={value}"]
    return engine.script("train-local.sh", *args, "--", "-e", "OMP_NUM_THREADS=2", timeout=1200, log=log)


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_training_image_trains_and_leaves_a_servable_merged_model(engine, images, tiny_artifact, tmp_path):
    data, _ = write_tiny_dataset(tmp_path / "data", n=4, fmt="jsonl")
    ml, log = tmp_path / "ml", tmp_path / "train.log"
    started = time.monotonic()
    proc = _train(engine, images["train"], ml, {"train": str(data.parent), "model": tiny_artifact}, TRAIN_HPS, log)
    engine.timings["train 2 steps"] = time.monotonic() - started
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert not (ml / "output" / "failure").exists()

    model = ml / "model"
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "processor_config.json",
                 "tokenizer.json", "generation_config.json"):
        assert (model / name).is_file(), name
    record = json.loads((model / "training_config.json").read_text())
    assert record["lora_enable"] is True and record["global_step"] == 2
    assert record["deepspeed"] == "/opt/program/train/deepspeed/zero2.json"  # the preset shipped in the image
    assert json.loads((ml / "input" / "config" / "hyperparameters.json").read_text()) == TRAIN_HPS
    assert (ml / "checkpoints" / "checkpoint-2").is_dir()

    from PIL import Image

    from serve.engine.model import load_artifact
    from serve.engine.predictor import GenerationRequest, GenerationResult, Predictor

    loaded = load_artifact(model, quantization="none", device="cpu")
    image = Image.open(data.parent / "images" / "img_0.png").convert("RGB")
    [result] = Predictor(loaded).predict([GenerationRequest(image=image, question="What type of chart is this?",
                                                            temperature=0, max_new_tokens=3)])
    assert isinstance(result, GenerationResult) and result.completion_tokens > 0, result


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_training_image_turns_a_bad_hyperparameter_into_a_failure_reason(engine, images, tmp_path):
    ml, log = tmp_path / "ml", tmp_path / "train.log"
    proc = _train(engine, images["train"], ml, {}, {"bits": "3", "max_steps": "two"}, log)
    assert proc.returncode == 2, log.read_text()[-3000:]
    reason = (ml / "output" / "failure").read_text()
    assert reason.startswith("Invalid input") and "bits" in reason and "max_steps" in reason, reason
