"""Helpers for tests/test_containers.py: find a working container engine, build the CPU images once, run commands.

The engine is $CONTAINER_ENGINE, else podman, else docker. Podman uses the private store and knobs that
container/ci/setup.sh writes (container/ci/podman-env.sh) when they exist. On a machine prepared by that script (no
registry: a local Debian base, torch's CPU wheel from the host's pip configuration) the images are built the way CI
builds them; anywhere else with `container/build.sh --cpu` (debian:bookworm-slim, PyTorch's CPU index).
$LLAVA_SM_BUILD_ARGS, when set, replaces those build.sh arguments.

No engine (or one that cannot run containers) skips the container tests with a visible reason and a warning; with
LLAVA_SM_REQUIRE_CONTAINERS=1 (.ci/run sets it) that is a failure instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "LLAVA_SM_REQUIRE_CONTAINERS"
# The same defaults as container/ci/podman-env.sh.
PODMAN_DIR = Path(os.environ.get("LLAVA_SM_PODMAN_DIR", "/var/tmp/llava-sm-podman"))
LOCAL_BASE = os.environ.get("LLAVA_SM_BASE_IMAGE", "localhost/llava-sm/debian:bookworm")
TAG = "cpu"  # what `container/build.sh --cpu` tags, so tests and users share one layer cache


def unavailable(reason: str):
    """Skip loudly (a reason in the summary and a warning), or fail where containers are required (CI)."""
    message = f"container tests not run: {reason}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1)")
    warnings.warn(message, UserWarning, stacklevel=2)
    pytest.skip(message)


@dataclass
class Engine:
    name: str
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.name, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name} {shlex.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc

    def script(self, script: str, *args: str, timeout: float, log: Path) -> subprocess.CompletedProcess:
        """Run one of container/*.sh with this engine, output to `log` (shown on failure by the caller)."""
        with open(log, "w") as out:
            return subprocess.run(["bash", str(REPO / "container" / script), *args], cwd=REPO, env=self.env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)

    def image_config(self, image: str) -> dict:
        import json

        [info] = json.loads(self.run("image", "inspect", image).stdout)
        return info


def find_engine() -> Engine:
    name = os.environ.get("CONTAINER_ENGINE") or next((e for e in ("podman", "docker") if shutil.which(e)), None)
    if name is None:
        unavailable("neither podman nor docker is installed (CI installs podman: container/ci/setup.sh)")
    if not shutil.which(name):
        unavailable(f"CONTAINER_ENGINE={name} is not installed")
    env = dict(os.environ)
    if name == "podman" and "CONTAINERS_CONF" not in env and (PODMAN_DIR / "containers.conf").is_file():
        env["CONTAINERS_CONF"] = str(PODMAN_DIR / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(PODMAN_DIR / "storage.conf")
    engine = Engine(name, env)
    try:
        info = engine.run("info", timeout=60, check=False)
    except subprocess.TimeoutExpired:
        unavailable(f"`{name} info` hung")
    if info.returncode != 0:
        unavailable(f"`{name} info` failed: {info.stderr.strip()[-300:]}")
    return engine


def build_args(engine: Engine) -> list[str]:
    if os.environ.get("LLAVA_SM_BUILD_ARGS"):
        return shlex.split(os.environ["LLAVA_SM_BUILD_ARGS"])
    if engine.name == "podman" and engine.run("image", "exists", LOCAL_BASE, check=False).returncode == 0:
        # A registry-less machine prepared by container/ci/setup.sh: local base, torch from the host's wheels.
        return ["--base", LOCAL_BASE, "--torch-index", "none", "--host-pip", "--", "--network", "host"]
    return []


def build_images(engine: Engine, log_dir: Path) -> dict[str, str]:
    """Both CPU images via container/build.sh (layer cache makes a rebuild of unchanged sources take seconds)."""
    images = {}
    for target in ("serve", "train"):
        started = time.monotonic()
        log = log_dir / f"build-{target}.log"
        proc = engine.script("build.sh", target, "--cpu", "--engine", engine.name, "--tag", TAG,
                             *build_args(engine), timeout=1800, log=log)
        engine.timings[f"build {target}"] = time.monotonic() - started
        assert proc.returncode == 0, f"building the {target} image failed:\n{log.read_text()[-5000:]}"
        images[target] = f"llava-sm-{target}:{TAG}"
    return images


def report_timings(config: pytest.Config, engine: Engine) -> None:
    """One line in the test log (outside pytest's capture) with how long builds and runs took."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not engine.timings:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\ncontainer timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in engine.timings.items()))


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
