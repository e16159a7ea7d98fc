#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the cluster tests (and for trying the
# launcher by hand): munged, slurmctld and slurmd on loopback, run directly as root (CI
# machines have no systemd). Idempotent: a cluster that already answers is left alone.
#
#   tests/cluster/start.sh     # install if needed, configure, start, wait until the node is idle
#   tests/cluster/stop.sh      # stop the daemons, remove the state
#
# State, logs and pid files live in $DINOSPEC_SLURM_DIR (default /tmp/dinospec-slurm).
# slurm.conf is written to /etc/slurm/slurm.conf so that sbatch, squeue and scontrol find it
# without SLURM_CONF; an existing slurm.conf that this script did not write is never replaced.
set -euo pipefail

STATE_DIR=${DINOSPEC_SLURM_DIR:-/tmp/dinospec-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by dinospec tests/cluster/start.sh"
HOST=$(hostname -s)

log() { echo "cluster: $*"; }

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "cluster: must run as root (it installs packages and starts daemons)" >&2
        exit 1
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

cluster_is_up() {
    [ -f "$CONF" ] && grep -qxF "$MARKER" "$CONF" \
        && pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" \
        && scontrol ping 2>/dev/null | grep -q "is UP" \
        && sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$STATE_DIR"
    touch "$STATE_DIR/munged.started"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "cluster: munged did not come up" >&2
    exit 1
}

node_line() {
    # The machine's CPU count, but at least 2 so that the 2-task test jobs fit on a 1-CPU
    # CI runner (config_overrides lets the node announce what is written here). RealMemory
    # is 90% of the total so that the node is never drained for announcing too much.
    local cpus memory
    cpus=$(nproc)
    cpus=$((cpus < 2 ? 2 : cpus))
    memory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN"
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
        echo "cluster: $CONF exists and was not written by this script; not replacing it" >&2
        exit 1
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    cat >"$CONF" <<CONFEOF
$MARKER
ClusterName=dinospec
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
InactiveLimit=0
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$(node_line)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONFEOF
}

start_daemons() {
    # -c: a cluster that is not answering starts from empty job state, never from a
    # previous run's stale jobs.
    stop_pid "$STATE_DIR/slurmctld.pid"
    stop_pid "$STATE_DIR/slurmd.pid"
    slurmctld -c
    slurmd
}

stop_pid() {
    local pid_file=$1 pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$pid_file"
}

wait_for_node() {
    for _ in $(seq 120); do
        local state
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
        case "$state" in
            idle | mixed | allocated) return ;;
            down* | drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "cluster: node $HOST did not become idle; logs in $STATE_DIR" >&2
    tail -n 20 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" >&2 || true
    exit 1
}

main() {
    require_root
    install_packages
    start_munge
    if cluster_is_up; then
        log "already up ($HOST, state in $STATE_DIR)"
        return
    fi
    write_config
    start_daemons
    wait_for_node
    log "up: node $HOST, $(sinfo -h -n "$HOST" -o %c) CPUs, partitions debug (default, preemptible) and urgent; state in $STATE_DIR"
}

main "$@"
