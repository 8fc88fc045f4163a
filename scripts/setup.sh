#!/usr/bin/env bash
# Set up a fresh machine: .venv with the project and every extra (serve, train, aws, dev), CPU torch from this disk.
# On a GPU host, install the CUDA build of torch into .venv first (README, "GPU hosts"); pip then keeps it.
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
