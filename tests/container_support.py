"""Helpers for tests/test_containers.py: find a working container engine, build each image variant once, run commands.

The engine is $CONTAINER_ENGINE, else podman, else docker. Podman uses the private store and knobs that
container/ci/setup.sh writes (container/ci/podman-env.sh) when they exist.

Two variants, each a serving and a training image built with container/build.sh:
- `cpu` (tag `cpu`): on a machine prepared by that script (no registry: a local Debian base, torch's CPU wheel from the
  host's pip configuration) the way CI builds it; anywhere else `container/build.sh --cpu` (debian:bookworm-slim,
  PyTorch's CPU index). $LLAVA_SM_BUILD_ARGS, when set, replaces those build.sh arguments.
- `gpu` (tag `latest`, the default CUDA 13.0 build: PyPI's torch with its nvidia-* wheels, about 3 GB to download):
  only with LLAVA_SM_GPU_IMAGES=1 (.ci/run sets it). On a prepared machine it uses the local base, the host's CA
  bundle and a wheel cache in the podman store folder, shared by both builds and kept for the next run.
  $LLAVA_SM_GPU_BUILD_ARGS, when set, replaces those build.sh arguments.

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
GPU_ENV = "LLAVA_SM_GPU_IMAGES"
# The same defaults as container/ci/podman-env.sh.
PODMAN_DIR = Path(os.environ.get("LLAVA_SM_PODMAN_DIR", "/var/tmp/llava-sm-podman"))
LOCAL_BASE = os.environ.get("LLAVA_SM_BASE_IMAGE", "localhost/llava-sm/debian:bookworm")
# The tags container/build.sh gives each variant, so tests and users share one layer cache.
TAGS = {"cpu": "cpu", "gpu": "latest"}
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


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


def _prepared(engine: Engine) -> bool:
    """A registry-less machine prepared by container/ci/setup.sh: podman with the local Debian base image."""
    return engine.name == "podman" and engine.run("image", "exists", LOCAL_BASE, check=False).returncode == 0


def build_args(engine: Engine, variant: str) -> list[str]:
    override = os.environ.get("LLAVA_SM_BUILD_ARGS" if variant == "cpu" else "LLAVA_SM_GPU_BUILD_ARGS")
    if override:
        return shlex.split(override)
    if not _prepared(engine):
        return []
    if variant == "cpu":  # torch's CPU wheel from the host's pip configuration
        return ["--base", LOCAL_BASE, "--torch-index", "none", "--host-pip", "--", "--network", "host"]
    # Not --host-pip: its local CPU torch wheel would win over PyPI's CUDA build.
    ca_bundle = os.environ.get("PIP_CERT") or (str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.is_file() else "")
    return ["--base", LOCAL_BASE, *(["--ca-bundle", ca_bundle] if ca_bundle else []),
            "--wheel-cache", str(PODMAN_DIR / "wheels"), "--", "--network", "host"]


def build_images(engine: Engine, variant: str, log_dir: Path) -> dict[str, str]:
    """The variant's serving and training images via container/build.sh (a rebuild of unchanged sources: seconds)."""
    images = {}
    for target in ("serve", "train"):
        started = time.monotonic()
        log = log_dir / f"build-{target}-{variant}.log"
        proc = engine.script("build.sh", target, *(["--cpu"] if variant == "cpu" else []), "--engine", engine.name,
                             "--tag", TAGS[variant], *build_args(engine, variant), timeout=1800, log=log)
        engine.timings[f"build {target} {variant}"] = time.monotonic() - started
        assert proc.returncode == 0, f"building the {variant} {target} image failed:\n{log.read_text()[-5000:]}"
        images[target] = f"llava-sm-{target}:{TAGS[variant]}"
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
