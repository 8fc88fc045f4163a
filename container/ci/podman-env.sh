# shellcheck shell=bash
# Source me: points podman at a private store under $LLAVA_SM_PODMAN_DIR with the knobs a CI machine like ours needs.
#
# Why each knob (docs/containers.md, "CI"):
#   runtime = runc            crun 1.8 refuses hybrid cgroup v1+v2 hosts ("cgroups in hybrid mode not supported")
#   cgroup_manager = cgroupfs no systemd
#   default_ulimits           podman's root default (1048576 files) exceeds the hard limit of a host without CAP_SYS_RESOURCE
#   private graphroot/runroot/tmp_dir/networks: nothing lands in /var/lib/containers, and the whole state is one folder
# The config is written before podman's first call: changing tmp_dir afterwards makes every `podman run` hang 20 s.
# The files are rewritten only when missing, so a reused machine keeps its layer cache.

LLAVA_SM_PODMAN_DIR=${LLAVA_SM_PODMAN_DIR:-/var/tmp/llava-sm-podman}
LLAVA_SM_BASE_IMAGE=${LLAVA_SM_BASE_IMAGE:-localhost/llava-sm/debian:bookworm}
export LLAVA_SM_PODMAN_DIR LLAVA_SM_BASE_IMAGE

mkdir -p "$LLAVA_SM_PODMAN_DIR"/{storage,run,tmp,networks}
if [ ! -s "$LLAVA_SM_PODMAN_DIR/storage.conf" ]; then
    cat > "$LLAVA_SM_PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$LLAVA_SM_PODMAN_DIR/storage"
runroot = "$LLAVA_SM_PODMAN_DIR/run"
CONF
fi
if [ ! -s "$LLAVA_SM_PODMAN_DIR/containers.conf" ]; then
    cat > "$LLAVA_SM_PODMAN_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$LLAVA_SM_PODMAN_DIR/tmp"

[network]
network_config_dir = "$LLAVA_SM_PODMAN_DIR/networks"
CONF
fi
export CONTAINERS_STORAGE_CONF="$LLAVA_SM_PODMAN_DIR/storage.conf"
export CONTAINERS_CONF="$LLAVA_SM_PODMAN_DIR/containers.conf"
