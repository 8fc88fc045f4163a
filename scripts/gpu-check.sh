#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine: the `gpu`-marked tests, then the 7B NF4 benchmark (bench.gpu).
#
#   bash scripts/gpu-check.sh [OUT_DIR]        # default bench-results/gpu; logs, gpu.json and gpu.md land there
#
# Each part has a wall-clock cap so a lent machine with a hard time limit still returns logs and partial numbers
# (bench.gpu writes gpu.partial.json after every phase). Environment:
#   PYTHON            interpreter (default python3)
#   TESTS_TIMEOUT_S   cap on the tests (default 240); BENCH_TIMEOUT_S cap on the benchmark (default 900)
#   BENCH_ARGS        extra bench.gpu arguments (default: --new-tokens 32 --requests 32 --repeats 3)
#   SKIP_TESTS=1 / SKIP_BENCH=1
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for n in ("transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "fastapi", "uvicorn", "triton"):
    try: print(n, m.version(n))
    except m.PackageNotFoundError: print(n, "MISSING")'
} 2>&1 | tee "$out/env.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TESTS_TIMEOUT_S:-240}" "$py" -m pytest -p no:cacheprovider -m "gpu and not slow" -v -rs \
    tests/test_accel.py tests/test_serve_predictor.py tests/test_serve_constrained.py tests/test_serve_main.py \
    tests/test_train_runs.py \
    2>&1 | tee "$out/tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=skipped
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # The 13.5 GB bf16 build goes to RAM when /dev/shm can hold it (disk speed is not what is measured).
  work=.
  if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt $((20 * 1024 * 1024)) ]; then
    work=/dev/shm
  fi
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
  timeout "${BENCH_TIMEOUT_S:-900}" "$py" -m bench.gpu --out "$out" --work-dir "$work" \
    ${BENCH_ARGS:---new-tokens 32 --requests 32 --repeats 3} 2>&1 | tee "$out/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo "gpu-check: tests exit=$tests_rc bench exit=$bench_rc (results in $out)" | tee -a "$out/env.txt"
[ "$tests_rc" != skipped ] && [ "$tests_rc" != 0 ] && exit 1
[ "$bench_rc" != skipped ] && [ "$bench_rc" != 0 ] && exit 1
exit 0
