#!/usr/bin/env bash
# Stop the daemons started by .ci/slurm/start.sh, by the PIDs they recorded.
set -uo pipefail
STATE_DIR=${SPECDEC_SLURM_DIR:-/tmp/specdec-slurm}

stop_pidfile() {
    local pidfile=$1
    [ -s "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

stop_pidfile "$STATE_DIR/slurmd.pid"
stop_pidfile "$STATE_DIR/slurmctld.pid"
stop_pidfile /run/munge/munged.pid
