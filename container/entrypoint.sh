#!/bin/sh
# The images' entry point, run under tini (PID 1, forwards signals, reaps zombies). SageMaker starts a container as
# `docker run IMAGE serve` (hosting) or `docker run IMAGE train` (training); `exec` makes python tini's direct child, so
# the SIGTERM that `docker stop` / SageMaker sends reaches it. Anything else runs as given (e.g. `bash`,
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
