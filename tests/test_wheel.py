"""The project installs like a library: the wheel built from this checkout, installed in a fresh venv outside it and
run from an unrelated directory, has every package, the DeepSpeed presets (package data) and the console script,
and its server answers on a tiny model that its own `demo.tiny` builds.

The venv borrows the test run's installed dependencies (torch, transformers, ...) through a `.pth` file, so nothing
is downloaded; the checkout's editable install does not come with them (tests/venv_support.py says why), and every
check below first proves that the code running is the wheel's.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from venv_support import add_paths, clean_env, make_venv, pip_install, site_packages, this_run_site_packages

from demo.pipeline import free_port, wait_until_ready

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "serve", "client", "datagen", "demo")
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")


@dataclass
class Installed:
    python: Path
    site: Path
    cwd: Path  # an empty directory outside the checkout: no module can come from the working directory

    def run(self, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env=clean_env(**env))


def copy_source(dest: Path) -> Path:
    """What the build reads: the metadata files and every top-level package dir (pyproject decides what ships).
    Built from a copy so the build's build/ and *.egg-info never land in the checkout."""
    dest.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, dest / name)
    for init in REPO.glob("*/__init__.py"):
        shutil.copytree(init.parent, dest / init.parent.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = copy_source(root / "src")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "-q", "-w", str(root / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = (root / "dist").glob("llava_sagemaker-*.whl")
    python = make_venv(root / "venv")
    pip_install(python, "--no-deps", str(wheel))
    add_paths(python, this_run_site_packages())  # after the install: pip sees only the wheel in the venv
    cwd = root / "cwd"
    cwd.mkdir()
    return Installed(python, site_packages(python), cwd)


def test_every_package_is_imported_from_the_installed_wheel(installed):
    code = f"import json, importlib; print(json.dumps({{m: importlib.import_module(m).__file__ for m in {PACKAGES}}}))"
    proc = installed.run("-c", code)
    assert proc.returncode == 0, proc.stderr
    for module, path in json.loads(proc.stdout).items():
        assert Path(path).is_relative_to(installed.site), (module, path)
        assert not Path(path).is_relative_to(REPO), (module, path)


def test_training_entry_point_and_console_script_run_from_any_directory(installed):
    proc = installed.run("-m", "train", "--help")
    assert proc.returncode == 0 and "--deepspeed" in proc.stdout and "--lora_enable" in proc.stdout, proc.stderr
    for module in ("datagen", "demo", "demo.tiny", "train.merge"):
        proc = installed.run("-m", module, "--help", timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m {module}"), (module, proc.stderr)
    script = subprocess.run([str(installed.python.parent / "llava-sm"), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=installed.cwd, env=clean_env())
    assert script.returncode == 0 and "\n  finetune " in script.stdout and "\n  submit " in script.stdout
    assert script.stdout == installed.run("-m", "client.cli", "--help").stdout


def test_deepspeed_presets_ship_in_the_wheel(installed):
    code = """
import json
from pathlib import Path
from train.config import resolve_deepspeed
out = {}
for name in ("zero2", "zero3", "zero3_offload"):
    path, note = resolve_deepspeed(name)
    out[name] = {"path": path, "note": note, "config": json.loads(Path(path).read_text())}
print(json.dumps(out))
"""
    proc = installed.run("-c", code)
    assert proc.returncode == 0, proc.stderr
    presets = json.loads(proc.stdout)
    for name, preset in presets.items():
        assert Path(preset["path"]) == installed.site / "train" / "deepspeed" / f"{name}.json"
        assert preset["note"] is None
    assert {name: p["config"]["zero_optimization"]["stage"] for name, p in presets.items()} == {
        "zero2": 2, "zero3": 3, "zero3_offload": 3}
    assert presets["zero3_offload"]["config"]["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_installed_server_answers_on_a_tiny_model(installed):
    model = installed.cwd / "tiny"
    proc = installed.run("-m", "demo.tiny", str(model))
    assert proc.returncode == 0, proc.stderr[-3000:]
    port, log = free_port(), installed.cwd / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(installed.python), "-m", "serve"], cwd=installed.cwd, stdout=out,
                                  stderr=subprocess.STDOUT,
                                  env=clean_env(SM_MODEL_DIR=str(model), SAGEMAKER_BIND_TO_PORT=str(port),
                                                SERVE_HOST="127.0.0.1", SERVE_TORCH_THREADS="1"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, server, log_path=log)
        from evaluation.questions import blank_png

        body = json.dumps({"image": base64.b64encode(blank_png(32)).decode(), "question": "What is shown?",
                           "temperature": 0, "max_new_tokens": 3}).encode()
        request = urllib.request.Request(base + "/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert reply.status == 200
            answer = json.loads(reply.read())
        assert isinstance(answer["answer"], str) and answer["usage"]["completion_tokens"] >= 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-3000:]  # drained and stopped on request

