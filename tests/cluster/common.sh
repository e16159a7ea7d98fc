# Settings and helpers of the local test cluster, sourced by start.sh, stop.sh and node.sh.
#
# The cluster: slurmctld and a one-node partition's slurmd (node $HOST, loopback) in the
# root namespaces, as before; and two compute nodes, dsnode1 and dsnode2, each a slurmd in
# its own network, UTS and mount namespace. A node's network namespace reaches the root
# namespace through a veth pair whose root end sits on a bridge; the bridge holds the
# controller's address. Only the addresses of that private link and loopback are used.
# A node's mount namespace differs from the root one by a single file: its /etc/hosts,
# which names the link's addresses (every other path is the machine's, as a cluster's
# shared filesystem would be).

STATE_DIR=${DINOSPEC_SLURM_DIR:-/tmp/dinospec-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by dinospec tests/cluster/start.sh"
HOST=$(hostname -s)
SUBNET=${DINOSPEC_SLURM_SUBNET:-10.213.25}
BRIDGE=dsbr0
CONTROLLER_ADDR=$SUBNET.1
NODES=(dsnode1 dsnode2)

log() { echo "cluster: $*"; }

fail() {
    echo "cluster: $*" >&2
    exit 1
}

node_addr() {
    # dsnodeN answers at $SUBNET.(10+N)
    echo "$SUBNET.$((10 + ${1#dsnode}))"
}

veth_name() {
    # the root namespace's end of the node's veth pair
    echo "ds-$1"
}

stop_pid() {
    # Stop the process whose id the file holds: SIGTERM, then SIGKILL after 10 s.
    local pid_file=$1 pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

netns_exists() {
    [ -e "/run/netns/$1" ]
}

kill_node_processes() {
    # Every process in the node's network namespace (slurmd, its job steps, their tasks),
    # at once and without warning, as a node that loses power.
    local pids
    netns_exists "$1" || return 0
    pids=$(ip netns pids "$1")
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
}

remove_node() {
    # The node's processes, its veth pair and its network namespace.
    kill_node_processes "$1"
    ip link del "$(veth_name "$1")" 2>/dev/null || true
    if netns_exists "$1"; then
        ip netns del "$1"
    fi
    rm -f "$STATE_DIR/slurmd-$1.pid"
}

start_node() {
    # Namespaces, link and slurmd of one node (a node left from before is removed first).
    # slurmd runs with the node's name as hostname and the link's names in /etc/hosts, so
    # that its job steps resolve every node to its address on the link, as on a cluster.
    local node=$1 veth
    veth=$(veth_name "$node")
    remove_node "$node"
    ip netns add "$node" || fail "the kernel refused a network namespace for $node (ip netns add)"
    ip link add "$veth" type veth peer name eth0 netns "$node" \
        || fail "the kernel refused a veth pair for $node (ip link add type veth: CONFIG_VETH?)"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$node" addr add "$(node_addr "$node")/24" dev eth0
    ip -n "$node" link set lo up
    ip -n "$node" link set eth0 up
    mkdir -p "$STATE_DIR/slurmd/$node"
    # not `ip netns exec`, whose fresh /sys has no cgroup filesystem, which slurmd needs
    nsenter --net="/run/netns/$node" -- unshare --uts --mount -- sh -c \
        'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1"' \
        sh "$node" "$STATE_DIR/hosts" \
        || fail "slurmd of $node did not start in its namespaces (UTS namespace or bind mount" \
            "refused by the kernel, or slurmd failed: see $STATE_DIR/slurmd-$node.log)"
}
