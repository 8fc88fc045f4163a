#!/bin/sh
# Build-time `pip install` for the Dockerfiles. Two optional build secrets, never baked into a layer:
#   cabundle  a CA bundle, for builds behind a TLS-intercepting proxy (pip would otherwise reject PyPI's certificate)
#   pipconf   a pip.conf naming local indexes / wheel folders (container/build.sh --host-pip writes one from the host's)
# Without them (a plain `docker build` on a normal network) this is exactly `pip install`.
set -eu
if [ -s /run/secrets/cabundle ]; then
    export PIP_CERT=/run/secrets/cabundle
fi
if [ -s /run/secrets/pipconf ]; then
    export PIP_CONFIG_FILE=/run/secrets/pipconf
fi
exec python -m pip install --no-cache-dir "$@"
