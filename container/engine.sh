# Shared by the container scripts (sourced, not run): which container engine to use. Expects `die` and `engine`
# (--engine's value, may be empty) to be set by the caller.

# pick_engine FIRST SECOND: keep --engine when given, else the first of the two that is installed (or none).
pick_engine() {
    [ -z "$engine" ] || return 0
    if command -v "$1" >/dev/null; then engine=$1; elif command -v "$2" >/dev/null; then engine=$2; fi
}

# check_engine FIRST SECOND: stop unless the engine is docker or podman.
check_engine() {
    case "$engine" in
        docker | podman) ;;
        "") die "neither $1 nor $2 is installed" ;;
        *) die "--engine must be docker or podman, not $engine" ;;
    esac
}
