#!/bin/sh
# Build-time `pip install` for the Dockerfiles. Two optional build secrets, never baked into a layer:
#   cabundle  a CA bundle, for builds behind a TLS-intercepting proxy (pip would otherwise reject PyPI's certificate)
#   pipconf   a pip.conf naming local indexes / wheel folders (container/build.sh --host-pip writes one from the host's)
# and one optional mount, also never in a layer:
#   /var/cache/llava-sm-wheels  a wheel folder shared by builds (container/build.sh --wheel-cache DIR): pip first
#                               downloads into it what it lacks, then installs from it alone, so the serving and the
#                               training build (and later builds) fetch each file once. (pip's own HTTP cache would
#                               not do: it keeps nothing when a proxy drops PyPI's Cache-Control headers.)
# Without them (a plain `docker build` on a normal network) this is exactly `pip install`.
set -eu
if [ -s /run/secrets/cabundle ]; then
    export PIP_CERT=/run/secrets/cabundle
fi
if [ -s /run/secrets/pipconf ]; then
    export PIP_CONFIG_FILE=/run/secrets/pipconf
fi
cache=/var/cache/llava-sm-wheels
# A mount point only: an empty folder left in a layer by an earlier mount must not turn a build into a cache user.
if grep -q " $cache " /proc/self/mountinfo 2>/dev/null; then
    # `pip download` resolves as if nothing were installed: the locks leave torch unpinned (it comes from TORCH_SPEC),
    # so without this pin it would fetch the newest torch for accelerate/peft/... instead of the one installed.
    pins=$(mktemp)
    trap 'rm -f "$pins"' EXIT
    python -m pip list --format=freeze 2>/dev/null | grep -i '^torch==' > "$pins" || true
    python -m pip download --progress-bar off --no-cache-dir --dest "$cache" --find-links "$cache" -c "$pins" "$@"
    python -m pip install --no-cache-dir --no-index --find-links "$cache" "$@"
    exit
fi
exec python -m pip install --no-cache-dir "$@"
