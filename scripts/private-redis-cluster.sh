#!/usr/bin/env bash
# A private Redis Cluster for fault tests, so killing one of its masters never touches the
# shared cluster of scripts/services.sh (7000-7005) or another test's cluster.
#   scripts/private-redis-cluster.sh start PORT_BASE   six nodes on PORT_BASE..PORT_BASE+5,
#       3 masters + 3 replicas; returns once the cluster is ok and every replica is linked.
#       Exits 3 (starting nothing) if any of the six ports is in use: pick another base.
#   scripts/private-redis-cluster.sh remove PORT_BASE  kill -9 its nodes and delete their data
# Data lives in ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/redis-private-PORT; loopback
# only, no persistence: it is a throwaway test cluster. Pick ports outside the kernel's
# ephemeral range (32768-60999 here), so no outgoing connection can be holding one.
set -euo pipefail
usage="usage: $0 start|remove PORT_BASE"
action=${1:?$usage} base=${2:?$usage}
[[ $base =~ ^[0-9]+$ ]] && ((base + 5 <= 65535)) || { echo "private-redis-cluster: bad port $base" >&2; exit 2; }
services_dir="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}"
mapfile -t ports < <(seq "$base" $((base + 5)))
PORTS_TAKEN=3

node_dir() { echo "$services_dir/redis-private-$1"; }
rcli() { local port=$1; shift; redis-cli -h 127.0.0.1 -p "$port" "$@"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for TRIES CMD...: retry CMD every 0.1 s until it succeeds or TRIES tries are used up.
wait_for() {
    local tries=$1 i
    shift
    for ((i = 0; i < tries; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

# The pid in the node's own pid file, if that process is still a redis-server.
live_pid() {
    local pid
    pid=$(cat "$(node_dir "$1")/redis.pid" 2>/dev/null) || return 1
    grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

# Kills the node on PORT by the pid in its own pid file (never by name: other clusters run).
kill_node() {
    local pid
    pid=$(live_pid "$1") || return 0
    kill -9 "$pid" 2>/dev/null || true
    wait_for 50 bash -c "! kill -0 $pid" || true
}

ports_free() {
    local port
    for port in "${ports[@]}"; do
        if port_open "$port" || live_pid "$port" >/dev/null; then
            echo "private-redis-cluster: port $port is in use (a leftover of ours? '$0 remove $base')" >&2
            return 1
        fi
    done
}

start_node() {
    local port=$1 dir
    dir=$(node_dir "$port")
    rm -rf "$dir" # a stale nodes.conf would make the node rejoin a cluster that is gone
    mkdir -p "$dir"
    # A short node timeout: the fault tests wait for the failover.
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 3000 \
        --save "" --appendonly no --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" 9>&- # not our lock
}

cluster_ok() { rcli "$1" cluster info | grep -q '^cluster_state:ok'; }
# A replica counts once its link to the master is up: only then can its master fail over.
replica_linked() { rcli "$1" info replication | grep -q -e '^connected_slaves:1' -e '^master_link_status:up'; }

start() {
    local port
    mkdir -p "$services_dir"
    # Two tests choosing the same free base at once: one claims it, the other is told it is taken.
    exec 9>"$services_dir/redis-private.lock"
    flock 9
    ports_free || exit $PORTS_TAKEN
    trap remove EXIT # from here on the ports are ours: a half-built cluster is removed again
    for port in "${ports[@]}"; do start_node "$port"; done
    flock -u 9
    for port in "${ports[@]}"; do
        wait_for 200 rcli "$port" ping || { echo "private-redis-cluster: :$port did not start" >&2; exit 1; }
    done
    local log
    log="$services_dir/redis-private-$base-create.log"
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes >"$log" 2>&1 ||
        { cat "$log" >&2; exit 1; }
    rm -f "$log"
    for port in "${ports[@]}"; do
        wait_for 600 cluster_ok "$port" || { echo "private-redis-cluster: no cluster_state:ok on :$port" >&2; exit 1; }
        wait_for 600 replica_linked "$port" || { echo "private-redis-cluster: :$port has no replica link" >&2; exit 1; }
    done
    trap - EXIT
}

remove() {
    local port
    for port in "${ports[@]}"; do
        kill_node "$port"
        rm -rf "$(node_dir "$port")"
    done
}

case $action in
start) start ;;
remove) remove ;;
*) echo "$usage" >&2; exit 2 ;;
esac
