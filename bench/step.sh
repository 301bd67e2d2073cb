# Sourced by the bench/run_*_gpu.sh scripts: `step NAME TIMEOUT_S COMMAND...` runs a command
# with a time limit, its output in $OUT/NAME.log, and prints its exit status, its wall time
# and the last $STEP_TAIL_LINES (default 8) lines of the log less progress bars.
# shellcheck shell=bash

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T)): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name rc=$? in $((SECONDS - t0)) s"
    grep -v -e "it/s]" "$OUT/$name.log" | tail -n "${STEP_TAIL_LINES:-8}"
}
