#!/usr/bin/env bash
# One namespace node of the running test cluster, for the node-failure test:
#
#   tests/cluster/node.sh kill dsnode2    # cut its link, then SIGKILL all its processes
#   tests/cluster/node.sh start dsnode2   # bring it back (new namespaces, slurmd) and resume it
#
# A killed node goes silent as one that loses power: its link is cut before its processes
# die, so its peers receive no connection reset and must notice on their own.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

resume_if_down() {
    # A node that came back on its own is idle (ReturnToService=2); one that did not yet
    # register is told to.
    case "$(sinfo -h -n "$1" -o %T)" in
        down* | drain*) scontrol update NodeName="$1" State=RESUME ;;
    esac
}

usage() {
    echo "usage: $0 kill|start ${NODES[*]}" >&2
    exit 2
}

[ $# -eq 2 ] || usage
node=$2
[[ " ${NODES[*]} " == *" $node "* ]] || usage
case $1 in
    kill)
        ip link set "$(veth_name "$node")" down
        kill_node_processes "$node"
        log "killed $node"
        ;;
    start)
        start_node "$node"
        resume_if_down "$node"
        log "started $node"
        ;;
    *) usage ;;
esac
