#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by tests/cluster/start.sh and remove its state.
# Idempotent: stopping a cluster that is not running succeeds. munged is stopped only when
# start.sh started it (another service on the machine may rely on a munged it found).
set -euo pipefail

STATE_DIR=${DINOSPEC_SLURM_DIR:-/tmp/dinospec-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by dinospec tests/cluster/start.sh"

stop_pid() {
    local pid_file=$1 pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        return 0
    fi
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

ours=false
if [ -f "$CONF" ] && grep -qxF "$MARKER" "$CONF"; then
    ours=true
    scancel --quiet 2>/dev/null || true
    # the steps must end while slurmd still runs, or their slurmstepd outlives it
    for _ in $(seq 60); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi
stop_pid "$STATE_DIR/slurmd.pid"
stop_pid "$STATE_DIR/slurmctld.pid"
if [ -f "$STATE_DIR/munged.started" ]; then
    stop_pid /run/munge/munged.pid
fi
if $ours; then
    rm -f "$CONF"
fi
rm -rf "$STATE_DIR"
echo "cluster: stopped"
