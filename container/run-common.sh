# Shared by container/run-local.sh and container/train-local.sh (sourced, not run): pick the container engine and
# the GPU flags for `run`. Expects `die`, `engine` (may be empty) and `cpu` (0/1) to be set by the caller.

# docker first for running (its --gpus is the usual local GPU path), then podman.
if [ -z "$engine" ]; then
    if command -v docker >/dev/null; then engine=docker; elif command -v podman >/dev/null; then engine=podman; fi
fi
case "$engine" in
    docker | podman) ;;
    "") die "neither docker nor podman is installed" ;;
    *) die "--engine must be docker or podman, not $engine" ;;
esac

# GPU access: docker's --gpus, podman's CDI device (nvidia-container-toolkit's generated spec).
gpu=()
if [ "$cpu" = 0 ]; then
    if [ "$engine" = docker ]; then gpu=(--gpus all); else gpu=(--device nvidia.com/gpu=all); fi
fi
