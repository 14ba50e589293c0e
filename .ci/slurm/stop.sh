#!/usr/bin/env bash
# Stop the daemons started by .ci/slurm/start.sh, by the PIDs they recorded.
set -uo pipefail
STATE_DIR=${SPECDEC_SLURM_DIR:-/tmp/specdec-slurm}

# Signal every daemon in the group at once, then wait (each takes a second or two to exit).
stop_pidfiles() {
    local pids=() pidfile pid
    for pidfile in "$@"; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

stop_pidfiles "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid"
stop_pidfiles /run/munge/munged.pid   # last: the SLURM daemons authenticate through it
