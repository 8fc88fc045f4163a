#!/bin/sh
# Build-time `pip install` for the Dockerfiles. Two optional build secrets, never baked into a layer:
#   cabundle  a CA bundle, for builds behind a TLS-intercepting proxy (pip would otherwise reject PyPI's certificate)
#   pipconf   a pip.conf naming local indexes / wheel folders (container/build.sh --host-pip writes one from the host's)
# and one optional mount, also never in a layer:
#   /var/cache/llava-sm-wheels  pip's cache, shared by builds (container/build.sh --wheel-cache DIR): each wheel is
#                               downloaded once for the serving and the training build (and for later builds), and
#                               an sdist such as DeepSpeed's is built once per variant
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
    exec python -m pip install --cache-dir "$cache" "$@"
fi
exec python -m pip install --no-cache-dir "$@"
