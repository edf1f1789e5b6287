#!/usr/bin/env bash
# Stop the Redis Cluster nodes, the standalone Redis, the Tansu broker and the shared Apache Kafka that
# scripts/services.sh started, by the pids in their own pid files (MariaDB is left running). Their state is kept in
# ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}; pass --wipe to delete it too.
set -euo pipefail

SERVICES_DIR="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}"

# stop PIDFILE NAME: SIGTERM the process if it is still the NAME we started, wait up to 10 s.
stop() {
    local pidfile=$1 name=$2 pid i
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    if grep -qa "$name" "/proc/$pid/cmdline" 2>/dev/null; then
        echo "stop-services: stopping $name (pid $pid)" >&2
        kill "$pid"
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

for port in 7000 7001 7002 7003 7004 7005; do
    stop "$SERVICES_DIR/redis/$port/redis.pid" redis-server
done
stop "$SERVICES_DIR/redis/standalone-6390/redis.pid" redis-server
stop "$SERVICES_DIR/tansu/tansu.pid" tansu
"$(dirname "$0")/kafka.sh" stop shared || true

if [[ ${1:-} == --wipe ]]; then
    # Redis cluster state (nodes.conf) and the standalone's directory; the verified tansu binary is kept.
    rm -rf "$SERVICES_DIR/redis"
fi
