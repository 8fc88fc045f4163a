"""The serving and training images, built and run the way SageMaker runs them.

Always: the pinned locks match the project venv, both Dockerfiles share their torch layers, the entry point execs
(so SIGTERM reaches python) and dispatches `serve`/`train`, the scripts in container/ check their arguments and pick an
engine that answers, the training image's CUDA_HOME tree is linked right, and push.sh resolves
account/region/repository against a moto ECR.
With podman or docker (marker `container`; skipped loudly without one, see tests/container_support.py): hadolint on
both Dockerfiles; the CPU images built; the serving image answers /invocations over a published port with the tiny
artifact at /opt/ml/model and exits 0 on SIGTERM; the training image trains two LoRA steps on tiny data in an
/opt/ml tree and leaves a merged model that the server loads, and turns a bad hyperparameter into a failure file.
With LLAVA_SM_GPU_IMAGES=1 as well: the GPU images built; the GPU serving image passes the same serving tests on CPU,
and the GPU training image's nvcc compiles and links CUDA code.
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
from typing import NamedTuple

import pytest
import requests
from container_support import (
    GPU_ENV,
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

    def shared(text: str) -> str:  # from the base image to the marker
        head = text[text.index("ARG BASE_IMAGE="):text.index(SHARED_MARK)]
        assert "TORCH_SPEC" in head and "requirements-torch.lock" in head
        return head

    assert shared(serve) == shared(train), "the layers before the marker must stay identical to be shared"
    pin = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    # PyPI's torch (the CUDA 13.0 build, with its CUDA libraries as wheels) on a plain Debian base: no registry but
    # Docker Hub's Debian and no index but PyPI needed.
    assert f"ARG TORCH_SPEC={pin}\n" in serve and 'ARG TORCH_INDEX_URL=""\n' in serve
    assert "ARG BASE_IMAGE=debian:bookworm-slim\n" in serve


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


def test_build_script_composes_the_variants(tmp_path):
    def commands(*args: str) -> list[str]:
        proc = _run(["bash", "container/build.sh", *args, "--dry-run"])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    serve, train = commands("--engine", "docker")  # the Dockerfiles' defaults: CUDA 13.0
    assert serve.startswith("+ docker build -f Dockerfile.serve -t llava-sm-serve:latest")
    assert "--build-arg" not in serve + train
    serve, train = commands("all", "--cuda", "12.6", "--engine", "docker", "--flash-attn", "flash-attn==2.8.3")
    assert all("TORCH_SPEC=torch==2.13.0+cu126 " in c for c in (serve, train)) and "FLASH_ATTN" not in serve
    assert all("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 " in c for c in (serve, train))
    assert "FLASH_ATTN_SPEC=flash-attn==2.8.3" in train
    [cpu] = commands("serve", "--cpu", "--engine", "podman", "--wheel-cache", str(tmp_path / "wheels"))
    assert "-t llava-sm-serve:cpu" in cpu and "--format docker" in cpu  # podman keeps HEALTHCHECK only so
    assert "TORCH_SPEC=torch==2.13.0+cpu" in cpu and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    assert f"-v {tmp_path / 'wheels'}/cpu:/var/cache/llava-sm-wheels " in cpu  # one cache folder per variant
    both = _run(["bash", "container/build.sh", "--cpu", "--cuda", "13.0", "--dry-run"])
    assert both.returncode == 2 and "exclude each other" in both.stderr
    docker = _run(["bash", "container/build.sh", "--engine", "docker", "--wheel-cache", str(tmp_path), "--dry-run"])
    assert docker.returncode == 2 and "only podman" in docker.stderr


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


def _fake_engine(folder: Path, name: str) -> None:
    """An installed client whose daemon does not answer, like docker's CLI without dockerd."""
    folder.mkdir(exist_ok=True)
    fake = folder / name
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)


def _run_local_dry_run(tiny_dir: Path, fakes: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CONTAINER_ENGINE", "DOCKER_HOST")}
    env["PATH"] = f"{fakes}{os.pathsep}{env['PATH']}"
    return _run(["bash", "container/run-local.sh", str(tiny_dir), "--cpu", "--dry-run"], env=env)


def test_run_local_says_what_to_set_when_no_engine_answers(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("docker", "podman"):
        _fake_engine(tmp_path / "bin", name)
    proc = _run_local_dry_run(tmp_path / "model", tmp_path / "bin")
    assert proc.returncode == 2 and not proc.stdout
    assert "no container engine answers" in proc.stderr
    assert "`docker info` failed (exit 1): Cannot connect to the Docker daemon" in proc.stderr
    assert "`podman info` failed (exit 1)" in proc.stderr
    assert "DOCKER_HOST" in proc.stderr and "container/ci/setup.sh" in proc.stderr and "--engine" in proc.stderr


def test_cuda_home_links_every_nvidia_wheel_into_one_tree(tmp_path):
    sys.path.insert(0, str(REPO / "container"))
    try:
        import cuda_toolchain
    finally:
        sys.path.remove(str(REPO / "container"))
    assert cuda_toolchain.toolchain_specs(None, None) == []
    assert cuda_toolchain.toolchain_specs("13.0", "13.0.3") == ["cuda-toolkit[nvcc,cccl]==13.0.3"]
    assert cuda_toolchain.toolchain_specs("12.6", None) == ["nvidia-cuda-nvcc-cu12==12.6.*",
                                                             "nvidia-cuda-cccl-cu12==12.6.*"]
    # CUDA 12 wheels: one folder per package, with the same subfolder (include/crt) in two of them.
    nvidia = tmp_path / "site-packages" / "nvidia"
    files = ["cuda_nvcc/bin/nvcc", "cuda_nvcc/nvvm/bin/cicc", "cuda_nvcc/include/crt/host_config.h",
             "cuda_nvcc/include/__init__.py",
             "cuda_runtime/include/cuda_runtime.h", "cuda_runtime/include/crt/host_defines.h",
             "cuda_runtime/lib/libcudart.so.12", "cublas/lib/libcublas.so.12", "cublas/lib/libcublasLt.so.12",
             "cuda_cccl/include/crt/host_config.h"]
    for name in files:
        (nvidia / name).parent.mkdir(parents=True, exist_ok=True)
        (nvidia / name).write_text(name)
    (nvidia / "__init__.py").write_text("")
    home = tmp_path / "cuda"
    clashes = cuda_toolchain.link_cuda_home(nvidia, home)
    assert clashes == [str(home / "include" / "crt" / "host_config.h")]  # the first package's copy is kept
    assert (home / "bin" / "nvcc").read_text() == "cuda_nvcc/bin/nvcc"
    assert (home / "nvvm" / "bin" / "cicc").read_text() == "cuda_nvcc/nvvm/bin/cicc"  # nvcc looks for it from bin/..
    assert (home / "include" / "crt").is_dir() and not (home / "include" / "crt").is_symlink()
    assert (home / "include" / "crt" / "host_config.h").read_text() == "cuda_cccl/include/crt/host_config.h"
    assert (home / "include" / "crt" / "host_defines.h").read_text() == "cuda_runtime/include/crt/host_defines.h"
    assert not (home / "include" / "__init__.py").exists()
    for lib in ("libcudart", "libcublas", "libcublasLt"):  # what `-lcudart` etc. look for
        assert (home / "lib64" / f"{lib}.so").resolve() == (home / "lib64" / f"{lib}.so.12").resolve()


# ---------------------------------------------------------------- with a container engine


@pytest.fixture(scope="module")
def engine():
    return find_engine()


@pytest.fixture(scope="module")
def builds(engine, tmp_path_factory, request):
    """builds(variant) -> {"serve": image, "train": image}, each variant built once (its failure kept, not retried)."""
    log_dir = tmp_path_factory.mktemp("builds")
    done: dict[str, dict[str, str] | BaseException] = {}

    def get(variant: str) -> dict[str, str]:
        if variant == "gpu" and os.environ.get(GPU_ENV) != "1":
            pytest.skip(f"the GPU images are built only with {GPU_ENV}=1 (3 GB of wheels to fetch, 7 GB of images)")
        if variant not in done:
            try:
                done[variant] = build_images(engine, variant, log_dir)
            except BaseException as error:
                done[variant] = error
        if isinstance(done[variant], BaseException):
            raise done[variant]
        return done[variant]

    yield get
    report_timings(request.config, engine)


@pytest.fixture(scope="module")
def images(builds):
    return builds("cpu")


class Built(NamedTuple):
    variant: str
    image: str


# Ids other than the bare variant name: tests/conftest.py skips every test with a `gpu` keyword on machines without
# CUDA, and these run on the CPU.
VARIANT_IDS = {"ids": ["cpu-image", "gpu-image"]}


@pytest.fixture(scope="module", params=["cpu", "gpu"], **VARIANT_IDS)
def serve_image(builds, request) -> Built:
    """The serving image of each variant; the GPU one runs on the CPU here, the way the CPU one does."""
    return Built(request.param, builds(request.param)["serve"])


@pytest.fixture(scope="module", params=["cpu", "gpu"], **VARIANT_IDS)
def train_image(builds, request) -> Built:
    return Built(request.param, builds(request.param)["train"])


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
def test_serving_image_follows_the_sagemaker_contract(engine, serve_image):
    info = engine.image_config(serve_image.image)
    config = info["Config"]
    assert config["Entrypoint"] == ["/usr/local/bin/entrypoint.sh"] and config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"] and config.get("User", "") in ("", "root", "0")
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert "HF_HUB_OFFLINE=1" in config["Env"]
    assert "/ping" in " ".join(_healthcheck(info)["Test"])


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_serving_image_answers_over_the_published_port_and_stops_cleanly(engine, serve_image, tiny_artifact, tmp_path):
    name = f"llava-sm-test-serve-{os.getpid()}"
    log = open(tmp_path / "serve.log", "w")
    started = time.monotonic()
    # run-local.sh, attached, as a user runs it: its exit status is the container's.
    proc = subprocess.Popen(
        ["bash", str(REPO / "container" / "run-local.sh"), tiny_artifact, "--cpu", "--image", serve_image.image,
         "--engine", engine.name, "--port", "0", "--", "--name", name, "-e", "SERVE_TORCH_THREADS=1"],
        env=engine.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_for(lambda: engine.run("port", name, "8080", check=False).stdout.strip(), timeout=120,
                        what="the container's published port")
        base = "http://" + port.splitlines()[0].replace("0.0.0.0", "127.0.0.1")
        wait_for(lambda: _ping(base), timeout=300, interval=1, what="/ping 200")
        engine.timings[f"serve ready {serve_image.variant}"] = time.monotonic() - started

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

        test = _healthcheck(engine.image_config(serve_image.image))["Test"]
        assert test[0] == "CMD"  # the image's own HEALTHCHECK command, run inside the container
        assert engine.run("exec", name, *test[1:], check=False).returncode == 0

        stopping = time.monotonic()
        engine.run("stop", "-t", "30", name, timeout=60)  # SIGTERM, SIGKILL after 30 s (as SageMaker)
        assert proc.wait(timeout=60) == 0, "the server did not exit 0 on SIGTERM"
        stopped = engine.timings[f"serve stop {serve_image.variant}"] = time.monotonic() - stopping
        assert stopped < 25
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
def test_training_image_trains_and_leaves_a_servable_merged_model(engine, train_image, tiny_artifact, tmp_path):
    data, _ = write_tiny_dataset(tmp_path / "data", n=4, fmt="jsonl")
    ml, log = tmp_path / "ml", tmp_path / "train.log"
    started = time.monotonic()
    proc = _train(engine, train_image.image, ml, {"train": str(data.parent), "model": tiny_artifact}, TRAIN_HPS, log)
    engine.timings[f"train 2 steps {train_image.variant}"] = time.monotonic() - started
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    assert not (ml / "output" / "failure").exists()

    model = ml / "model"
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "processor_config.json",
                 "tokenizer.json", "generation_config.json"):
        assert (model / name).is_file(), name
    record = json.loads((model / "training_config.json").read_text())
    assert record["lora_enable"] is True and record["global_step"] == 2
    # The preset shipped in the image, wherever the installed project keeps it.
    from train.config import resolve_deepspeed

    shipped = engine.run("run", "--rm", train_image.image, "cat", record["deepspeed"]).stdout
    assert json.loads(shipped) == json.loads(Path(resolve_deepspeed("zero2")[0]).read_text())
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


CUDA_PROBE = r"""
set -euo pipefail
cd /tmp
cat > probe.cu <<'CU'
#include <cstdio>
__global__ void add_one(float *x) { x[threadIdx.x] += 1.0f; }
int main() {
    float *x = nullptr;
    printf("%s\n", cudaGetErrorName(cudaMalloc(&x, 4 * sizeof(float))));
    return 0;
}
CU
nvcc -arch=sm_90 -cudart shared -o probe probe.cu
ldd probe | grep libcudart
./probe
python -c 'import torch; from torch.utils import cpp_extension as c; print("torch", torch.version.cuda, c.CUDA_HOME)' \
    2>/dev/null
nvcc --version | grep release
"""


@pytest.mark.container
@pytest.mark.timeout(2400)
def test_gpu_training_image_compiles_and_links_cuda_code_for_torchs_cuda(engine, builds):
    """The nvcc DeepSpeed's just-in-time ops use: it compiles a kernel, links NVIDIA's libcudart, and matches torch."""
    image = builds("gpu")["train"]
    proc = engine.run("run", "--rm", image, "bash", "-c", CUDA_PROBE, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    libcudart, error, torch_line, release = proc.stdout.strip().splitlines()
    assert "/usr/local/cuda/lib64/libcudart.so" in libcudart and "not found" not in libcudart
    assert error.startswith("cudaError")  # the runtime loads and answers: there is no GPU (nor driver) in here
    _, torch_cuda, cuda_home = torch_line.split()
    assert cuda_home == "/usr/local/cuda" and f"release {torch_cuda}," in release


@pytest.mark.container
def test_run_local_passes_over_a_docker_without_daemon(engine, tmp_path):
    if engine.name != "podman":
        pytest.skip("needs podman as the engine that answers")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    _fake_engine(tmp_path / "bin", "docker")  # found first on PATH, like a docker CLI whose daemon is not running
    proc = _run_local_dry_run(tmp_path / "model", tmp_path / "bin")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"+ podman run --rm -p 127.0.0.1:8080:8080 -v {tmp_path / 'model'}:/opt/ml/model:ro")
