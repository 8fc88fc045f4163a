#!/usr/bin/env bash
# The test command: set up (idempotent), lint (ruff, settings in pyproject.toml), then run the whole suite on CPU.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
exec python -m pytest "$@"
