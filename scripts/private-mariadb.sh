#!/usr/bin/env bash
# A private MariaDB for fault tests, so killing it never touches the shared server.
#   scripts/private-mariadb.sh start PORT   initialize (once) and start; prints the server pid
#   scripts/private-mariadb.sh kill PORT    kill -9 it (a crash, not a clean shutdown)
#   scripts/private-mariadb.sh remove PORT  kill it and delete its data
# Data lives in ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/mariadb-PORT; loopback only,
# no authentication (--skip-grant-tables): it is a throwaway test server.
set -euo pipefail
action=${1:?usage: $0 start|kill|remove PORT} port=${2:?usage: $0 start|kill|remove PORT}
[[ $port =~ ^[0-9]+$ ]] || { echo "private-mariadb: bad port $port" >&2; exit 2; }
dir="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/mariadb-$port"
pidfile="$dir/mariadbd.pid"

case $action in
start)
    mkdir -p "$dir/tmp"
    if [[ ! -d $dir/data/mysql ]]; then
        # Concurrent bootstraps trip over each other: one at a time, each with its own tmpdir.
        flock "${dir%/*}/mariadb-install.lock" mariadb-install-db --no-defaults --datadir="$dir/data" \
            --tmpdir="$dir/tmp" --user="$(id -un)" --auth-root-authentication-method=normal \
            --skip-test-db >"$dir/install.log" 2>&1 || { cat "$dir/install.log" >&2; exit 1; }
    fi
    nohup mariadbd --no-defaults --datadir="$dir/data" --port="$port" --bind-address=127.0.0.1 \
        --socket="$dir/mysqld.sock" --pid-file="$pidfile" --tmpdir="$dir/tmp" --user="$(id -un)" --skip-grant-tables \
        --innodb-buffer-pool-size=64M --log-error="$dir/error.log" >/dev/null 2>&1 &
    for _ in $(seq 1 150); do
        if mariadb --protocol=tcp -h127.0.0.1 -P"$port" -uroot --connect-timeout=1 \
            -e "CREATE DATABASE IF NOT EXISTS test" >/dev/null 2>&1; then
            cat "$pidfile"
            exit 0
        fi
        sleep 0.2
    done
    echo "private-mariadb: no answer on port $port; see $dir/error.log" >&2
    exit 1
    ;;
kill | remove)
    [[ -f $pidfile ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 1 50); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            [[ $action == remove ]] && rm -rf "$dir"
            exit 0
        fi
        sleep 0.1
    done
    echo "private-mariadb: port $port still answers" >&2
    exit 1
    ;;
*) echo "usage: $0 start|kill|remove PORT" >&2; exit 2 ;;
esac
