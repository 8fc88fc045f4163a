#!/usr/bin/env bash
# Builds the local Debian bookworm base image the CPU variants are built FROM when no registry can be reached:
# debootstrap (minbase) from the Debian mirror, then `podman import`. Python is NOT preinstalled, exactly like
# debian:bookworm-slim, so the Dockerfiles take the same path as with a registry base.
# Usage: container/ci/base-image.sh            (idempotent: does nothing when $LLAVA_SM_BASE_IMAGE exists)
# Env: DEBIAN_MIRROR (default: the host's apt mirror, else http://deb.debian.org/debian), LLAVA_SM_BASE_IMAGE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=container/ci/podman-env.sh
. "$here/podman-env.sh"

if podman image exists "$LLAVA_SM_BASE_IMAGE"; then
    echo "base image $LLAVA_SM_BASE_IMAGE already present"
    exit 0
fi

host_mirror() {
    # The first Debian (non-security) URI apt uses on this host, so the base image gets the same mirror.
    grep -h -m1 -E '^URIs: .*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -n1
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}

rootfs=$(mktemp -d "$LLAVA_SM_PODMAN_DIR/tmp/rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror-security bookworm-security main
SOURCES
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$LLAVA_SM_BASE_IMAGE" >/dev/null
echo "base image $LLAVA_SM_BASE_IMAGE built from $mirror"
