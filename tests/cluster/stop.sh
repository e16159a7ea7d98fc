#!/usr/bin/env bash
# Stop the SLURM cluster started by tests/cluster/start.sh and remove its state, its node
# namespaces and its link. Idempotent: stopping a cluster that is not running succeeds.
# munged is stopped only when start.sh started it (another service on the machine may
# rely on a munged it found).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

cancel_jobs() {
    # The steps must end while their slurmd still runs, or their slurmstepd outlives it.
    scancel --quiet 2>/dev/null || true
    for _ in $(seq 60); do
        [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && return
        sleep 0.5
    done
}

ours=false
if [ -f "$CONF" ] && grep -qxF "$MARKER" "$CONF"; then
    ours=true
    cancel_jobs
fi
for node in "${NODES[@]}"; do
    stop_pid "$STATE_DIR/slurmd-$node.pid"
    remove_node "$node"
done
ip link del "$BRIDGE" 2>/dev/null || true
stop_pid "$STATE_DIR/slurmd-$HOST.pid"
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
