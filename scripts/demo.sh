#!/usr/bin/env bash
# The main job, offline on CPU (about 9 minutes on 2 idle cores): synthesize chart-QA data, build a small LLaVA,
# fine-tune it with `python -m train`, serve it with `python -m serve`, ask it questions through the client, and
# print the evaluation table (untrained vs fine-tuned, and the blank-image control). See docs/demo.md.
# Extra arguments go to `python -m demo`: --quick (every stage in a couple of minutes), --workdir DIR, --lora.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m demo "$@"
