#!/usr/bin/env bash
# Start the local SLURM cluster of the cluster tests (and for trying the launcher by hand),
# run directly as root (CI machines have no systemd). Idempotent: a cluster that already
# answers is left alone.
#
#   tests/cluster/start.sh     # install if needed, configure, start, wait until every node is idle
#   tests/cluster/stop.sh      # stop the daemons, remove the namespaces, the link and the state
#
# Nodes (see common.sh for the namespaces and the link):
#   $HOST              loopback, root namespaces: partitions debug (default, preemptible) and urgent
#   dsnode1, dsnode2   one network + UTS namespace each: partitions multi (preemptible) and
#                      multi-urgent, for jobs that span two nodes
#
# State, logs and pid files live in $DINOSPEC_SLURM_DIR (default /tmp/dinospec-slurm).
# slurm.conf is written to /etc/slurm/slurm.conf so that sbatch, squeue and scontrol find it
# without SLURM_CONF; an existing slurm.conf that this script did not write is never replaced.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "cluster: must run as root (it installs packages, makes namespaces, starts daemons)" >&2
        exit 1
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null \
        && command -v ip >/dev/null && command -v unshare >/dev/null; then
        return
    fi
    log "installing slurm-wlm, munge and iproute2"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge iproute2 util-linux >/dev/null
}

check_namespaces() {
    # What the kernel must allow, tried before anything is changed, each failure named.
    local err
    if ! err=$(unshare --net --uts --mount -- true 2>&1); then
        fail "the kernel refused new network/UTS/mount namespaces (unshare: $err): the" \
            "two-node cluster needs root with CAP_SYS_ADMIN and CONFIG_NET_NS, CONFIG_UTS_NS" \
            "(in a container: --privileged)"
    fi
    if ! err=$(ip link add dsprobe0 type veth peer name dsprobe1 2>&1); then
        fail "the kernel refused a veth pair (ip link add type veth: $err): needs CONFIG_VETH"
    fi
    ip link del dsprobe0
}

check_subnet_is_free() {
    # The link's /24 must not be a network this machine already reaches.
    local taken
    taken=$(ip -4 route show root "$SUBNET.0/24" | grep -v " dev $BRIDGE " || true)
    if [ -n "$taken" ]; then
        fail "$SUBNET.0/24 is already routed here ($taken); choose another private /24 with" \
            "DINOSPEC_SLURM_SUBNET=a.b.c"
    fi
}

start_link() {
    local err
    if ! ip link show "$BRIDGE" >/dev/null 2>&1 && ! err=$(ip link add "$BRIDGE" type bridge 2>&1); then
        fail "the kernel refused a bridge (ip link add type bridge: $err): needs CONFIG_BRIDGE"
    fi
    ip link set "$BRIDGE" up
    if ! ip -4 addr show dev "$BRIDGE" | grep -qF " $CONTROLLER_ADDR/24 "; then
        ip addr add "$CONTROLLER_ADDR/24" dev "$BRIDGE"
    fi
}

write_hosts() {
    # The /etc/hosts of the namespace nodes: loopback, the controller and every node.
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost"
        echo "$CONTROLLER_ADDR $HOST"
        for node in "${NODES[@]}"; do
            echo "$(node_addr "$node") $node"
        done
    } >"$STATE_DIR/hosts"
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
    fail "munged did not come up"
}

all_nodes() {
    echo "$HOST" "${NODES[@]}"
}

node_is_usable() {
    sinfo -h -n "$1" -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated)"
}

cluster_is_up() {
    [ -f "$CONF" ] && grep -qxF "$MARKER" "$CONF" \
        && pid_alive "$STATE_DIR/slurmctld.pid" \
        && scontrol ping 2>/dev/null | grep -q "is UP" \
        && for node in $(all_nodes); do
            pid_alive "$STATE_DIR/slurmd-$node.pid" && node_is_usable "$node" || return 1
        done
}

pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

node_line() {
    # The machine's CPU count, but at least 2 so that the 2-task test jobs fit on a 1-CPU
    # CI runner (config_overrides lets the node announce what is written here). RealMemory
    # is 90% of the total so that the node is never drained for announcing too much.
    local name=$1 addr=$2 cpus memory
    cpus=$(nproc)
    cpus=$((cpus < 2 ? 2 : cpus))
    memory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    echo "NodeName=$name NodeAddr=$addr CPUs=$cpus RealMemory=$memory State=UNKNOWN"
}

write_config() {
    # SlurmdTimeout=20: a node that stops answering is declared down (and its jobs requeued)
    # within half a minute, which the node-failure test waits for.
    if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF"; then
        fail "$CONF exists and was not written by this script; not replacing it"
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    local multi
    multi=$(IFS=,; echo "${NODES[*]}")
    cat >"$CONF" <<CONFEOF
$MARKER
ClusterName=dinospec
SlurmctldHost=$HOST($CONTROLLER_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=20
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
$(node_line "$HOST" 127.0.0.1)
$(for node in "${NODES[@]}"; do node_line "$node" "$(node_addr "$node")"; done)
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
PartitionName=multi Nodes=$multi MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=multi-urgent Nodes=$multi MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONFEOF
}

stop_everything_left() {
    # A cluster that is not answering starts from nothing: no daemon, node or job state
    # of a previous run survives.
    stop_pid "$STATE_DIR/slurmctld.pid"
    for node in "${NODES[@]}"; do
        remove_node "$node"
    done
    stop_pid "$STATE_DIR/slurmd-$HOST.pid"
}

start_daemons() {
    slurmctld -c
    slurmd -N "$HOST"
    for node in "${NODES[@]}"; do
        start_node "$node"
    done
}

wait_for_nodes() {
    for node in $(all_nodes); do
        wait_for_node "$node"
    done
}

wait_for_node() {
    local node=$1 state
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        case "$state" in
            idle | mixed | allocated) return ;;
            down* | drain*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "cluster: node $node did not become idle; logs in $STATE_DIR" >&2
    tail -n 20 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd-$node.log" >&2 || true
    exit 1
}

check_nodes_reach_each_other() {
    # Node-to-node traffic crosses the bridge, where a firewall on bridged packets (Docker's
    # br_netfilter with a FORWARD policy of DROP) would stop it while the controller still
    # reaches both nodes: then the nodes' ranks could never meet.
    local from=${NODES[0]} to=${NODES[1]}
    if ! nsenter --net="/run/netns/$from" -- timeout 5 \
        bash -c "exec 3<>/dev/tcp/$(node_addr "$to")/6818" 2>/dev/null; then
        fail "$from cannot reach $to's slurmd at $(node_addr "$to"):6818 across $BRIDGE" \
            "(a firewall on bridged traffic? see iptables -L FORWARD, br_netfilter)"
    fi
}

main() {
    local started
    started=$(date +%s%N)
    require_root
    install_packages
    check_namespaces
    check_subnet_is_free
    start_munge
    if cluster_is_up; then
        log "already up ($(all_nodes), state in $STATE_DIR)"
        return
    fi
    stop_everything_left
    mkdir -p "$STATE_DIR"
    start_link
    write_hosts
    write_config
    start_daemons
    wait_for_nodes
    check_nodes_reach_each_other
    log "up in $((($(date +%s%N) - started) / 1000000)) ms: node $HOST (partitions debug, default and preemptible, and" \
        "urgent) and nodes ${NODES[*]} on $SUBNET.0/24 (partitions multi, preemptible, and" \
        "multi-urgent), $(sinfo -h -n "$HOST" -o %c) CPUs each; state in $STATE_DIR"
}

main "$@"
