# shellcheck shell=bash
# Shared by the container scripts (sourced, not run): which container engine to use. Expects `die` and `engine`
# (--engine's value, may be empty) to be set by the caller.
#
# Without --engine (or $CONTAINER_ENGINE) the engine is the first of two candidates whose `<engine> info` answers, so
# a docker client without a running daemon is passed over. Podman, chosen or given, uses the store that
# container/ci/setup.sh prepares ($LLAVA_SM_PODMAN_DIR, default /var/tmp/llava-sm-podman) when that store exists and
# CONTAINERS_CONF is unset: the images built there, and the settings such a host needs (runc, ulimits).

ENGINE_PROBE_TIMEOUT=${ENGINE_PROBE_TIMEOUT:-20}
engine_notes=()

use_prepared_podman_store() {
    local dir=${LLAVA_SM_PODMAN_DIR:-/var/tmp/llava-sm-podman}
    if [ -z "${CONTAINERS_CONF:-}" ] && [ -s "$dir/containers.conf" ] && [ -s "$dir/storage.conf" ]; then
        export CONTAINERS_CONF="$dir/containers.conf" CONTAINERS_STORAGE_CONF="$dir/storage.conf"
    fi
}

# engine_answers NAME: whether `NAME info` succeeds within ENGINE_PROBE_TIMEOUT seconds; why not goes to engine_notes.
engine_answers() {
    local name=$1 err status=0
    if ! command -v "$name" >/dev/null; then
        engine_notes+=("$name is not installed")
        return 1
    fi
    [ "$name" != podman ] || use_prepared_podman_store
    err=$(timeout "$ENGINE_PROBE_TIMEOUT" "$name" info 2>&1 >/dev/null) || status=$?
    case "$status" in
        0) return 0 ;;
        124) engine_notes+=("\`$name info\` did not answer within $ENGINE_PROBE_TIMEOUT s") ;;
        *) engine_notes+=("\`$name info\` failed (exit $status): $(printf '%s\n' "$err" | grep -v '^$' | tail -n 1)") ;;
    esac
    return 1
}

# pick_engine FIRST SECOND: keep --engine when given, else the first of the two that answers (or none).
pick_engine() {
    if [ -n "$engine" ]; then
        [ "$engine" != podman ] || use_prepared_podman_store
        return 0
    fi
    local candidate
    for candidate in "$1" "$2"; do
        if engine_answers "$candidate"; then
            engine=$candidate
            return 0
        fi
    done
}

# check_engine FIRST SECOND: stop unless the engine is docker or podman, saying what to fix when none answered.
check_engine() {
    case "$engine" in
        docker | podman) ;;
        "")
            die "no container engine answers:$(printf '\n  %s' "${engine_notes[@]}")
What to do:
  docker: start its daemon, or point DOCKER_HOST at one.
  podman: on a host without systemd or with hybrid cgroups, run container/ci/setup.sh once (it writes the settings
          podman needs there to ${LLAVA_SM_PODMAN_DIR:-/var/tmp/llava-sm-podman}); later runs find them.
  Or choose one with --engine $1|$2 (or CONTAINER_ENGINE)." ;;
        *) die "--engine must be docker or podman, not $engine" ;;
    esac
}
