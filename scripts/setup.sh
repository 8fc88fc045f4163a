#!/usr/bin/env bash
# Set up .venv with the project and every extra (serve, train, aws, dev), pinned to the versions the images ship.
# torch: a torch 2.13.0 already in .venv is kept, whichever build it is (constraints.txt). Otherwise this installs
# `torch==2.13.0` from the index pip is configured with; from PyPI on Linux x86-64 that is the CUDA 13.0 build (a
# ~530 MB wheel plus the nvidia-* CUDA wheels), which also runs on CPU. For PyTorch's CPU-only build, or another CUDA
# version, install it into .venv from PyTorch's index before running this (README, "Two commands" and "GPU hosts").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed builds its C++/CUDA ops just in time instead of at install. The container locks pin the
# same versions the images ship (container/lock.py), so a new machine tests what the images run, not PyPI's newest.
DS_BUILD_OPS=0 python -m pip install -q -c constraints.txt -c container/requirements-torch.lock \
    -c container/requirements-serve.lock -c container/requirements-train.lock -e '.[dev]'
