#!/usr/bin/env bash
# Keeps the CI podman store bounded between runs (.ci/run calls it before and after the tests):
#   - removes every container of the store (CI leaves none running), including the build containers an interrupted
#     build leaves behind, then the dangling images: the layers of earlier builds that a rebuild replaced (the tagged
#     images and their layers stay, as the layer cache of the next run);
#   - empties the wheel cache ($LLAVA_SM_PODMAN_DIR/wheels, container/build.sh --wheel-cache) once it grows past
#     LLAVA_SM_WHEEL_CACHE_MAX_GB (default 8; one set of CUDA 13.0 wheels is about 3.4 GB), for example after
#     version bumps;
#   - prints what the store, the wheel cache and the disk hold.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=container/ci/podman-env.sh
. "$here/podman-env.sh"
max_gb=${LLAVA_SM_WHEEL_CACHE_MAX_GB:-8}

podman ps --all --quiet --external | xargs -r podman rm --force >/dev/null
removed=$(podman image prune -f | grep -c . || true)
echo "## prune: $removed dangling image(s) removed"

wheels=$LLAVA_SM_PODMAN_DIR/wheels
if [ -d "$wheels" ]; then
    size_kb=$(du -sk "$wheels" | cut -f1)
    if [ "$size_kb" -gt $((max_gb * 1024 * 1024)) ]; then
        rm -rf "${wheels:?}"/*
        echo "## prune: wheel cache was $((size_kb / 1024)) MB (> $max_gb GB): emptied"
    fi
fi

echo "## store: $(du -sh "$LLAVA_SM_PODMAN_DIR/storage" | cut -f1), wheel cache: $(du -sh "$wheels" 2>/dev/null | cut -f1)"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | sed 's/^/##   /'
df -h "$LLAVA_SM_PODMAN_DIR" | sed 's/^/## /'
