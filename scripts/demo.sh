#!/usr/bin/env bash
# The main job on an offline default: set up, build a tiny LLaVA artifact in the training artifact's layout,
# serve it with `python -m serve`, ask it one question with curl, and stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m train.tiny runs/tiny-artifact

PORT="${DEMO_PORT:-8080}"
SM_MODEL_DIR=runs/tiny-artifact SAGEMAKER_BIND_TO_PORT="$PORT" SERVE_HOST=127.0.0.1 SERVE_TORCH_THREADS=1 \
    python -m serve > runs/serve.log 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

for _ in $(seq 1 240); do  # /ping is 503 while the model loads, 200 when it is ready
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/ping")" = 200 ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat runs/serve.log >&2; echo "server exited" >&2; exit 1; }
    sleep 0.5
done

python - > runs/demo-request.json <<'EOF'
import base64, io, json
from PIL import Image
buf = io.BytesIO()
Image.new("RGB", (64, 48), (220, 60, 40)).save(buf, "PNG")
print(json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "question": "What is shown in the image?",
                  "temperature": 0}))
EOF
echo "POST /invocations: What is shown in the image?"
curl -sS --fail-with-body "http://127.0.0.1:$PORT/invocations" -H 'Content-Type: application/json' \
    --data @runs/demo-request.json
echo
