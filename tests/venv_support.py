"""Fresh virtual environments for the install tests (tests/test_wheel.py, tests/test_client_imports.py), offline.

A venv here is real (`python -m venv`, its own site-packages, no access to the test run's packages) and gets its
dependencies without a download: a `.pth` file adds directories of packages already installed beside the test run.
Directories named in a `.pth` join sys.path but their own `.pth` files are not processed, so the checkout's editable
install (a `.pth` + import hook in the test run's site-packages) does not follow them into the new venv.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement


def make_venv(path: Path) -> Path:
    """An empty venv (no pip: installs go through the test run's pip with `--python`); returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60, env=clean_env())
    return Path(out.stdout.strip())


def add_paths(python: Path, paths: list[Path]) -> None:
    """Put `paths` on the venv's sys.path, after its own site-packages."""
    (site_packages(python) / "_test_paths.pth").write_text("".join(f"{p}\n" for p in paths))


def this_run_site_packages() -> list[Path]:
    """Where the test run's own dependencies are installed (torch, transformers, boto3, ...)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[k]) for k in ("purelib", "platlib")))


def pip_install(python: Path, *args: str) -> None:
    """pip of the test run, installing into the venv of `python`, from local files only."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                           "--disable-pip-version-check", "-q", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return env | {"PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | extra


def dependency_closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need, their requirements followed (markers evaluated, no extras)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def light_site(dest: Path, names: tuple[str, ...]) -> Path:
    """A directory holding only `names` and what they need: links to their installed top-level packages/modules."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in dependency_closure(names):
        if dist.files is None:
            raise RuntimeError(f"{dist.metadata['Name']} has no RECORD: cannot tell which files are its own")
        tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (dest / top).exists():
                (dest / top).symlink_to(source)
    return dest
