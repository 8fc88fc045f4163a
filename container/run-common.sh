# Shared by container/run-local.sh and container/train-local.sh (sourced, not run): pick the container engine and
# the GPU flags for `run`. Expects `die`, `engine` (may be empty) and `cpu` (0/1) to be set by the caller.

# shellcheck source=container/engine.sh
. "$(dirname "$0")/engine.sh"
pick_engine docker podman  # docker first for running (its --gpus is the usual local GPU path)
check_engine docker podman

# GPU access: docker's --gpus, podman's CDI device (nvidia-container-toolkit's generated spec).
gpu=()
if [ "$cpu" = 0 ]; then
    if [ "$engine" = docker ]; then gpu=(--gpus all); else gpu=(--device nvidia.com/gpu=all); fi
fi
