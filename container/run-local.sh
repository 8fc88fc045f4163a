#!/usr/bin/env bash
# Runs the serving image locally the way SageMaker hosting does: the model dir mounted read-only at /opt/ml/model,
# `serve` as the argument, port 8080. Stop it with Ctrl-C (the server drains in-flight requests and exits 0).
#
#   container/run-local.sh MODEL_DIR                       # GPU: llava-sm-serve:latest on http://127.0.0.1:8080
#   container/run-local.sh MODEL_DIR --cpu --port 8081     # CPU image llava-sm-serve:cpu
#   container/run-local.sh MODEL_DIR -- -d --name llava -e SERVE_LOG_LEVEL=DEBUG   # extra `run` arguments
#
# Options:
#   --image IMAGE   default llava-sm-serve:latest (llava-sm-serve:cpu with --cpu)
#   --cpu           no GPU flags (and the CPU image by default)
#   --port PORT     host port on 127.0.0.1 (default 8080; 0 = any free port, see `<engine> port`)
#   --engine E      docker or podman (default: $CONTAINER_ENGINE, else the first of docker and podman that answers
#                   `<engine> info`; podman uses the store container/ci/setup.sh prepared, when there is one)
#   --dry-run       print the `run` command instead of running it
#   -- ARGS         passed to `<engine> run` before the image
# GPUs: docker uses `--gpus all` (NVIDIA Container Toolkit); podman uses CDI, `--device nvidia.com/gpu=all`.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "run-local.sh: $*" >&2; exit 2; }

model="" image="" cpu=0 port=8080 engine=${CONTAINER_ENGINE:-} dry_run=0 extra=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --image) image=${2:?--image needs a value}; shift ;;
        --cpu) cpu=1 ;;
        --port) port=${2:?--port needs a value}; shift ;;
        --engine) engine=${2:?--engine needs a value}; shift ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "run-local.sh: unknown option: $1" >&2; usage ;;
        *) [ -z "$model" ] || die "one model dir (got $model and $1)"; model=$1 ;;
    esac
    shift
done
if [ -z "$model" ]; then
    echo "run-local.sh: which model dir? (a saved artifact: config.json, model.safetensors, ...)" >&2
    usage
fi
[ -f "$model/config.json" ] || die "$model has no config.json: not a model dir"
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, not $port"
model=$(cd "$model" && pwd)

# shellcheck source=container/run-common.sh
. "$(dirname "$0")/run-common.sh"
image=${image:-llava-sm-serve:$([ "$cpu" = 1 ] && echo cpu || echo latest)}
publish="127.0.0.1:$port:8080"
[ "$port" != 0 ] || publish="127.0.0.1::8080"

command=("$engine" run --rm "${gpu[@]}" -p "$publish" -v "$model:/opt/ml/model:ro" "${extra[@]}" "$image" serve)
if [ "$dry_run" = 1 ]; then
    echo "+ ${command[*]}"
    exit 0
fi
exec "${command[@]}"
