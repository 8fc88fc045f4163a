"""Build step of Dockerfile.train: nvcc and the CUDA headers for the CUDA torch was built with, as a CUDA_HOME tree.

DeepSpeed is installed without its ops (DS_BUILD_OPS=0) and compiles one the first time a job needs it, through
torch's cpp_extension, which looks for the CUDA toolkit in /usr/local/cuda. The image has no CUDA base: torch brings its
CUDA libraries as NVIDIA's pip wheels, and so does this step for the compiler:

    torch for CUDA 13.x (PyPI's default)   cuda-toolkit[nvcc,cccl] at the version torch itself pins
    torch for CUDA 12.x (PyTorch's index)  nvidia-cuda-nvcc-cu12 and nvidia-cuda-cccl-cu12 of the same minor version
    CPU torch                              nothing

The wheels land in site-packages/nvidia/ (CUDA 13: all in nvidia/cu13/; CUDA 12: one folder per package), and
DEST (e.g. /usr/local/cuda) gets bin/, include/, lib64/ and nvvm/ made of symlinks into them, plus the unversioned
`libX.so` names the linker wants. nvcc finds cicc, the headers and the libraries relative to the path it was started
from (DEST/bin), not to its real location, so DEST must hold all four. DEST/lib64 is registered with the dynamic
loader (/etc/ld.so.conf.d), as a CUDA toolkit install does. At the end nvcc must compile and link a kernel that then
loads libcudart, its release must match torch's CUDA, and torch must find DEST.

    python cuda_toolchain.py /usr/local/cuda     # in the image, after torch (uses the image's pip-install)
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

# site-packages/nvidia/<package>/<folder> -> DEST/<folder>
FOLDERS = {"bin": "bin", "include": "include", "lib": "lib64", "nvvm": "nvvm"}
LOADER_CONFIG = Path("/etc/ld.so.conf.d/000-cuda.conf")
PROBE = r"""
#include <cstdio>
__global__ void add_one(float *x) { x[threadIdx.x] += 1.0f; }
int main() { float *x = nullptr; printf("%s\n", cudaGetErrorName(cudaMalloc(&x, 16))); return 0; }
"""
SKIPPED = {"__init__.py", "__pycache__"}
VERSIONED_LIBRARY = re.compile(r"^(lib.+\.so)(\.\d+)+$")


def toolchain_specs(cuda: str | None, toolkit_version: str | None) -> list[str]:
    """The pip requirements that bring nvcc + headers for torch's CUDA version (None: a CPU torch, nothing).

    `toolkit_version` is the installed cuda-toolkit metapackage, which torch for CUDA 13 pins exactly; its extras
    select the compiler pieces of that same release.
    """
    if cuda is None:
        return []
    major, minor = cuda.split(".")[:2]
    if major == "12":
        return [f"nvidia-cuda-nvcc-cu12=={major}.{minor}.*", f"nvidia-cuda-cccl-cu12=={major}.{minor}.*"]
    if int(major) >= 13 and toolkit_version:
        return [f"cuda-toolkit[nvcc,cccl]=={toolkit_version}"]
    raise SystemExit(f"cuda_toolchain: no recipe for torch built with CUDA {cuda} (cuda-toolkit: {toolkit_version})")


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def link_tree(source: Path, dest: Path) -> list[str]:
    """Symlink every entry of `source` into `dest`; folders present on both sides are merged. Returns the clashes."""
    clashes = []
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.name in SKIPPED:
            continue
        target = dest / entry.name
        if not target.exists() and not target.is_symlink():
            target.symlink_to(entry.resolve())
        elif entry.is_dir() and target.is_dir():
            if target.is_symlink():  # a folder so far linked whole becomes a real folder of links
                first = target.resolve()
                target.unlink()
                clashes += link_tree(first, target)
            clashes += link_tree(entry, target)
        else:
            clashes.append(str(target))
    return clashes


def add_unversioned_names(lib: Path) -> None:
    """libcudart.so -> libcudart.so.13 and so on: wheels ship only the versioned names, `-lcudart` needs the other."""
    found: dict[str, Path] = {}
    for entry in sorted(lib.iterdir()):
        match = VERSIONED_LIBRARY.match(entry.name)
        if match:
            found.setdefault(match.group(1), entry)
    for name, entry in found.items():
        if not (lib / name).exists():
            (lib / name).symlink_to(entry.resolve())


def link_cuda_home(nvidia: Path, dest: Path) -> list[str]:
    """DEST/{bin,include,lib64} from every package folder under site-packages/nvidia. Returns the clashes."""
    clashes = []
    for package in sorted(p for p in nvidia.iterdir() if p.is_dir() and p.name not in SKIPPED):
        for folder, into in FOLDERS.items():
            if (package / folder).is_dir():
                clashes += link_tree(package / folder, dest / into)
    if (dest / "lib64").is_dir():
        add_unversioned_names(dest / "lib64")
    return clashes


def nvcc_release(dest: Path) -> str:
    """`release 13.0` in `nvcc --version` -> "13.0"."""
    out = subprocess.run([str(dest / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise SystemExit(f"cuda_toolchain: no release in `nvcc --version`:\n{out}")
    return match.group(1)


def register_libraries(dest: Path) -> None:
    """Programs built with this nvcc find libcudart & co. without LD_LIBRARY_PATH (torch loads its own copies)."""
    LOADER_CONFIG.write_text(f"{dest / 'lib64'}\n")
    subprocess.run(["ldconfig"], check=True)


def compile_probe(dest: Path) -> str:
    """Compile, link and run a kernel's host program: no GPU here, so it prints the runtime's error name."""
    with tempfile.TemporaryDirectory() as tmp:
        source, program = Path(tmp) / "probe.cu", Path(tmp) / "probe"
        source.write_text(PROBE)
        subprocess.run([str(dest / "bin" / "nvcc"), "-cudart", "shared", "-o", str(program), str(source)], check=True)
        return subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout.strip()


def check(dest: Path, cuda: str) -> None:
    """nvcc works and is torch's CUDA (DeepSpeed refuses a mismatch), and torch's cpp_extension finds DEST."""
    release = nvcc_release(dest)
    if release != ".".join(cuda.split(".")[:2]):
        raise SystemExit(f"cuda_toolchain: nvcc is CUDA {release}, torch was built with CUDA {cuda}")
    answer = compile_probe(dest)
    if not answer.startswith("cuda"):
        raise SystemExit(f"cuda_toolchain: the compiled probe printed {answer!r}")
    from torch.utils import cpp_extension

    if Path(cpp_extension.CUDA_HOME or "").resolve() != dest.resolve():
        raise SystemExit(f"cuda_toolchain: torch looks for CUDA in {cpp_extension.CUDA_HOME}, not {dest}")
    print(f"cuda_toolchain: nvcc {release} in {dest}, found by torch; a compiled probe runs ({answer})")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python cuda_toolchain.py DEST   (e.g. /usr/local/cuda)", file=sys.stderr)
        return 2
    dest = Path(argv[0])
    import torch

    specs = toolchain_specs(torch.version.cuda, installed_version("cuda-toolkit"))
    if not specs:
        print(f"cuda_toolchain: torch {torch.__version__} is a CPU build: no CUDA toolchain")
        return 0
    subprocess.run(["pip-install", *specs], check=True)
    clashes = link_cuda_home(Path(sysconfig.get_paths()["platlib"]) / "nvidia", dest)
    if clashes:  # the same header from two wheels: the first one (by package name) is kept
        print(f"cuda_toolchain: kept the first of {len(clashes)} duplicate names, e.g. {clashes[:3]}")
    register_libraries(dest)
    check(dest, torch.version.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
