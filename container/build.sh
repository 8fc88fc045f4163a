#!/usr/bin/env bash
# Builds the serving and/or training image with docker or podman: the GPU images by default, the CPU variant with --cpu.
#
#   container/build.sh                      # both GPU images (CUDA 13.0): llava-sm-serve:latest, llava-sm-train:latest
#   container/build.sh serve --cpu          # CPU serving image: llava-sm-serve:cpu
#   container/build.sh --cuda 12.6          # GPU images for NVIDIA drivers older than 580 (PyTorch's cu126 index)
#   container/build.sh train --flash-attn flash-attn==2.8.3
#   container/build.sh --base localhost/llava-sm/debian:bookworm --wheel-cache /var/tmp/wheels   # as CI builds
#
# Options:
#   --cuda VERSION        13.0 (default: PyPI's torch 2.13.0, a CUDA 13.0 build; NVIDIA driver >= 580) or 12.6
#                         (torch 2.13.0+cu126 from https://download.pytorch.org/whl/cu126; driver >= 525)
#   --cpu                 CPU variant: torch==2.13.0+cpu from the PyTorch CPU index
#   --engine E            docker or podman (default: $CONTAINER_ENGINE, else the first of podman, docker that answers)
#   --name PREFIX         image name prefix (default llava-sm: llava-sm-serve, llava-sm-train)
#   --tag TAG             image tag (default: latest, or cpu with --cpu)
#   --base IMAGE          BASE_IMAGE build arg (default: the Dockerfiles' debian:bookworm-slim)
#   --torch-spec SPEC     TORCH_SPEC build arg (default: the variant's torch, see --cuda and --cpu)
#   --torch-index URL     TORCH_INDEX_URL build arg, an extra index for torch only; `none` for no extra index
#   --flash-attn SPEC     FLASH_ATTN_SPEC build arg for the training image (default: none, sdpa attention)
#   --ca-bundle FILE      CA bundle for pip behind a TLS-intercepting proxy (a build secret, not kept in the image)
#   --host-pip            use this host's pip configuration (indexes, wheel folders, CA bundle) inside the build;
#                         local folders are mounted read-only (podman only)
#   --wheel-cache DIR     share downloads between builds: DIR/<variant> (cu130, cu126 or cpu) is mounted into the
#                         builds, pip downloads into it only what it lacks and installs from it (podman only)
#   --dry-run             print the build commands instead of running them
#   -- ARGS               passed to `<engine> build` as they are (e.g. -- --network host --no-cache)
set -euo pipefail
cd "$(dirname "$0")/.."

# The variants' torch and extra index; the Dockerfiles' defaults are the CUDA 13.0 ones.
CPU_TORCH_SPEC=torch==2.13.0+cpu
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
CU126_TORCH_SPEC=torch==2.13.0+cu126
CU126_TORCH_INDEX=https://download.pytorch.org/whl/cu126

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "build.sh: $*" >&2; exit 2; }

targets=() cpu=0 cuda="" engine=${CONTAINER_ENGINE:-} name=llava-sm tag="" base="" torch_spec="" torch_index=""
torch_index_set=0 flash_attn="" ca_bundle="" host_pip=0 wheel_cache="" dry_run=0 passthrough=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        serve | train) targets+=("$1") ;;
        all) targets+=(serve train) ;;
        --cpu) cpu=1 ;;
        --cuda) cuda=${2:?--cuda needs a value}; shift ;;
        --engine) engine=${2:?--engine needs a value}; shift ;;
        --name) name=${2:?--name needs a value}; shift ;;
        --tag) tag=${2:?--tag needs a value}; shift ;;
        --base) base=${2:?--base needs a value}; shift ;;
        --torch-spec) torch_spec=${2:?--torch-spec needs a value}; shift ;;
        --torch-index) torch_index=${2:?--torch-index needs a value}; torch_index_set=1; shift ;;
        --flash-attn) flash_attn=${2:?--flash-attn needs a value}; shift ;;
        --ca-bundle) ca_bundle=${2:?--ca-bundle needs a value}; shift ;;
        --host-pip) host_pip=1 ;;
        --wheel-cache) wheel_cache=${2:?--wheel-cache needs a value}; shift ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage 0 ;;
        --) shift; passthrough=("$@"); break ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[ "${#targets[@]}" -gt 0 ] || targets=(serve train)

# shellcheck source=container/engine.sh
. "$(dirname "$0")/engine.sh"
pick_engine podman docker  # podman first for building, as --engine's help says
check_engine podman docker
[ "$dry_run" = 1 ] || command -v "$engine" >/dev/null || die "$engine is not installed"

build_args=()
[ "$cpu" = 0 ] || [ -z "$cuda" ] || die "--cuda and --cpu exclude each other"
case "${cuda:-13.0}" in
    13.0) variant=cu130 ;;  # the Dockerfiles' defaults
    12.6)
        variant=cu126
        torch_spec=${torch_spec:-$CU126_TORCH_SPEC}
        [ "$torch_index_set" = 1 ] || { torch_index=$CU126_TORCH_INDEX; torch_index_set=1; }
        ;;
    *) die "--cuda must be 13.0 or 12.6, not $cuda" ;;
esac
if [ "$cpu" = 1 ]; then
    variant=cpu
    torch_spec=${torch_spec:-$CPU_TORCH_SPEC}
    [ "$torch_index_set" = 1 ] || { torch_index=$CPU_TORCH_INDEX; torch_index_set=1; }
fi
tag=${tag:-$([ "$cpu" = 1 ] && echo cpu || echo latest)}
[ "$torch_index" = none ] && torch_index=""
[ -n "$base" ] && build_args+=(--build-arg "BASE_IMAGE=$base")
[ -n "$torch_spec" ] && build_args+=(--build-arg "TORCH_SPEC=$torch_spec")
if [ "$torch_index_set" = 1 ]; then
    build_args+=(--build-arg "TORCH_INDEX_URL=$torch_index")
fi

# Podman writes OCI images by default, which drop HEALTHCHECK and SHELL: ask for Docker's format.
[ "$engine" = podman ] && build_args+=(--format docker)

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

host_pip_config() {
    # This host's pip settings as one pip.conf (secret `pipconf`), plus the local folders it names (mounted at the same
    # paths). The CA bundle goes separately (secret `cabundle`); host-only keys (cert, constraint) are left out.
    "${PYTHON:-python3}" - "$workdir/pip.conf" "$workdir/mounts" <<'PY'
import configparser, os, subprocess, sys
from urllib.parse import urlparse
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
keep = ("index-url", "extra-index-url", "find-links", "trusted-host", "default-timeout", "retries")
values = {}
for line in listing.splitlines():
    key, _, raw = line.partition("=")
    option = key.rsplit(".", 1)[-1]
    if option in keep:
        values[option] = raw.strip().strip("'\"")
folders = set()
for option in ("index-url", "extra-index-url", "find-links"):
    for item in values.get(option, "").split():
        path = urlparse(item).path if item.startswith("file:") else (item if item.startswith("/") else "")
        if path and os.path.isdir(path):
            folders.add(os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path)
conf = configparser.ConfigParser()
conf["global"] = values
with open(sys.argv[1], "w") as f:
    conf.write(f)
with open(sys.argv[2], "w") as f:
    f.write("".join(p + "\n" for p in sorted(folders)))
PY
}

secrets=()
if [ "$host_pip" = 1 ]; then
    [ "$engine" = podman ] || die "--host-pip mounts local wheel folders into the build, which only podman can do"
    [ "$variant" = cpu ] || echo "build.sh: warning: --host-pip on a GPU build: a local torch 2.13.0+cpu wheel would" \
        "win over PyPI's torch==2.13.0 (a local version label sorts higher); check torch.version.cuda in the image" >&2
    host_pip_config
    secrets+=(--secret "id=pipconf,src=$workdir/pip.conf")
    while read -r folder; do
        [ -n "$folder" ] && build_args+=(-v "$folder:$folder:ro")
    done < "$workdir/mounts"
    ca_bundle=${ca_bundle:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
    [ -n "$ca_bundle" ] || [ ! -s /etc/ssl/certs/ca-certificates.crt ] || ca_bundle=/etc/ssl/certs/ca-certificates.crt
fi
if [ -n "$ca_bundle" ]; then
    [ -s "$ca_bundle" ] || die "--ca-bundle $ca_bundle is not a readable file"
    secrets+=(--secret "id=cabundle,src=$ca_bundle")
fi

if [ -n "$wheel_cache" ]; then
    [ "$engine" = podman ] || die "--wheel-cache mounts a host folder into the build, which only podman can do"
    [ "$dry_run" = 1 ] || { mkdir -p "$wheel_cache/$variant" && wheel_cache=$(cd "$wheel_cache" && pwd); }
    # Read and written by the build's pip: the mount point container/pip-install.sh looks for.
    build_args+=(-v "$wheel_cache/$variant:/var/cache/llava-sm-wheels")
fi

for target in "${targets[@]}"; do
    image="$name-$target:$tag"
    extra=()
    if [ "$target" = train ]; then
        [ -z "$flash_attn" ] || extra+=(--build-arg "FLASH_ATTN_SPEC=$flash_attn")
    fi
    command=("$engine" build -f "Dockerfile.$target" -t "$image" "${build_args[@]}" "${extra[@]}" "${secrets[@]}"
        "${passthrough[@]}" .)
    if [ "$dry_run" = 1 ]; then
        echo "+ ${command[*]}"
        continue
    fi
    echo "== building $image with $engine (Dockerfile.$target)"
    start=$SECONDS
    "${command[@]}"
    size=$("$engine" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')
    echo "== built $image in $((SECONDS - start)) s: $size"
done
