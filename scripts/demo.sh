#!/usr/bin/env bash
# The main job on an offline default: set up, build a tiny LLaVA artifact in the training artifact's layout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m train.tiny runs/tiny-artifact
