#!/usr/bin/env bash
# Runs the training image locally on a SageMaker-style /opt/ml tree, exactly as a training job would see it:
#   DIR/input/config/hyperparameters.json   (string values)        DIR/input/data/<channel>/   (mounted read-only)
#   DIR/model/       the merged, ready-to-serve model afterwards   DIR/output/, DIR/checkpoints/
#
#   container/train-local.sh DIR                                        # an already prepared tree
#   container/train-local.sh DIR --channel model=~/llava-1.5-7b-hf --channel train=data/ \
#       --hp lora_enable=True --hp bits=4 --hp deepspeed=zero2          # build the tree, then train
#
# Options:
#   --channel NAME=PATH   copy PATH (a folder) into DIR/input/data/NAME (replacing what was there)
#   --hp KEY=VALUE        set a hyperparameter in DIR/input/config/hyperparameters.json (kept as a string)
#   --image IMAGE         default llava-sm-train:latest (llava-sm-train:cpu with --cpu)
#   --cpu                 no GPU flags (and the CPU image by default)
#   --engine E            docker or podman (default: $CONTAINER_ENGINE, else the first of docker, podman that answers)
#   -- ARGS               passed to `<engine> run` before the image (e.g. -- --shm-size 16g)
# Exits with the training job's exit code; a failure's reason is in DIR/output/failure.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "train-local.sh: $*" >&2; exit 2; }

dir="" image="" cpu=0 engine=${CONTAINER_ENGINE:-} channels=() hps=() extra=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --channel) channels+=("${2:?--channel needs NAME=PATH}"); shift ;;
        --hp) hps+=("${2:?--hp needs KEY=VALUE}"); shift ;;
        --image) image=${2:?--image needs a value}; shift ;;
        --cpu) cpu=1 ;;
        --engine) engine=${2:?--engine needs a value}; shift ;;
        -h | --help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "train-local.sh: unknown option: $1" >&2; usage ;;
        *) [ -z "$dir" ] || die "one /opt/ml dir (got $dir and $1)"; dir=$1 ;;
    esac
    shift
done
[ -n "$dir" ] || { echo "train-local.sh: which local /opt/ml dir?" >&2; usage; }

problems=()
for channel in "${channels[@]}"; do
    name=${channel%%=*} path=${channel#*=}
    [[ $channel == *=* && $name =~ ^[A-Za-z0-9._-]{1,64}$ ]] || problems+=("--channel $channel: expected NAME=PATH")
    [ -d "$path" ] || problems+=("--channel $channel: $path is not a folder")
done
for hp in "${hps[@]}"; do
    [[ $hp == ?*=* ]] || problems+=("--hp $hp: expected KEY=VALUE")
done
if [ "${#problems[@]}" -gt 0 ]; then
    printf 'train-local.sh: %s\n' "${problems[@]}" >&2
    exit 2
fi

mkdir -p "$dir"/{input/config,input/data,model,output,checkpoints}
dir=$(cd "$dir" && pwd)
for channel in "${channels[@]}"; do
    name=${channel%%=*} path=${channel#*=}
    rm -rf "${dir:?}/input/data/$name"
    cp -r "$path" "$dir/input/data/$name"
done
if [ "${#hps[@]}" -gt 0 ] || [ ! -f "$dir/input/config/hyperparameters.json" ]; then
    "${PYTHON:-python3}" - "$dir/input/config/hyperparameters.json" "${hps[@]}" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
values = json.loads(path.read_text()) if path.exists() else {}
for item in sys.argv[2:]:
    key, _, value = item.partition("=")
    values[key] = value  # SageMaker passes every hyperparameter as a string
path.write_text(json.dumps(values, indent=2) + "\n")
PY
fi

# shellcheck source=container/run-common.sh
. "$(dirname "$0")/run-common.sh"
image=${image:-llava-sm-train:$([ "$cpu" = 1 ] && echo cpu || echo latest)}

# Data channels are read-only, as in FastFile mode; PyTorch's data loader workers need more than 64 MB of /dev/shm.
exec "$engine" run --rm "${gpu[@]}" --shm-size 2g \
    -v "$dir:/opt/ml" -v "$dir/input:/opt/ml/input:ro" \
    -e TRAINING_JOB_NAME="local-$(date +%Y%m%d-%H%M%S)" \
    "${extra[@]}" "$image" train
