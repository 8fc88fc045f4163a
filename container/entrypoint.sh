#!/bin/sh
# The images' exec-form entry point. SageMaker starts a container as `docker run IMAGE serve` (hosting) or
# `docker run IMAGE train` (training); `exec` makes python PID 1 itself, so the SIGTERM that `docker stop` / SageMaker
# sends reaches it (python handles it: a PID 1 without a handler would ignore it). Anything else runs as given (e.g. `bash`,
# `python -m train.merge ...`), so the image stays usable for debugging.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: IMAGE serve | IMAGE train [ARGS...] | IMAGE COMMAND [ARGS...]" >&2
    exit 2
fi

case "$1" in
    serve)
        shift
        exec python -m serve "$@"
        ;;
    train)
        shift
        exec python -m train "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
