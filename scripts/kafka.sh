#!/usr/bin/env bash
# Apache Kafka (the real broker, KRaft mode, single node) for the tests, from Kafka's own jars.
#   scripts/kafka.sh install            fetch the pinned jars (scripts/kafka/pom.xml) once
#   scripts/kafka.sh start PORT [NAME]  format (once) and start a broker+controller on
#                                       127.0.0.1:PORT; prints its pid; NAME defaults to PORT
#   scripts/kafka.sh stop PORT|NAME     SIGTERM (a clean, controlled shutdown), SIGKILL after 30 s
#   scripts/kafka.sh kill PORT|NAME     kill -9 (a crash, for chaos tests)
#   scripts/kafka.sh remove PORT|NAME   stop it and delete its data
#   scripts/kafka.sh tool CLASS ARGS... run one of Kafka's tools from the jars, e.g.
#       org.apache.kafka.tools.TopicCommand, org.apache.kafka.tools.ConsoleProducer,
#       org.apache.kafka.tools.consumer.ConsoleConsumer, org.apache.kafka.tools.GetOffsetShell,
#       org.apache.kafka.tools.consumer.group.ConsumerGroupCommand (all take --bootstrap-server)
# Jars:  ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/kafka-VERSION/libs
# Data:  ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/kafka-data-NAME (log dirs, the cluster
#        id, server.properties, server.log, the pid file): it survives stop/start, so a broker
#        restart keeps topics, records and committed offsets.
# Loopback only, no authentication: a throwaway test broker. Only pids from its own pid files
# are ever signalled. Progress goes to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POM="$HERE/kafka/pom.xml"
SERVICES_DIR="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}"
KAFKA_VERSION=$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$POM")
KAFKA_HOME="$SERVICES_DIR/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
START_SECS=90 # bound for "until the broker answers a metadata request"
STOP_SECS=30  # bound for a clean shutdown before SIGKILL

log() { echo "kafka: $*" >&2; }
die() { echo "kafka: ERROR: $*" >&2; exit 1; }
usage() { die "usage: $0 install | start PORT [NAME] | stop|kill|remove PORT|NAME | tool CLASS ARGS..."; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- install ----------
# The stamp names the version and the pom's checksum: a changed pom (another version, another
# logging jar) installs afresh, an unchanged one costs nothing and needs no network.
stamp() { echo "kafka $KAFKA_VERSION pom-sha256 $(sha256sum "$POM" | cut -d' ' -f1)"; }

install() {
    [[ -n $KAFKA_VERSION ]] || die "no <kafka.version> in $POM"
    if [[ $(cat "$KAFKA_HOME/installed" 2>/dev/null) == "$(stamp)" ]]; then
        return 0
    fi
    mkdir -p "$KAFKA_HOME"
    # Two test runs installing at once would trip over each other's half-copied libs dir.
    exec 8>"$KAFKA_HOME/install.lock"
    flock 8
    if [[ $(cat "$KAFKA_HOME/installed" 2>/dev/null) == "$(stamp)" ]]; then
        exec 8>&-
        return 0 # the other one did it
    fi
    command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
    check_java
    log "fetching Apache Kafka $KAFKA_VERSION jars with Maven (checksums verified) into $LIBS"
    rm -rf "$LIBS.tmp"
    # -C: a checksum mismatch fails the download instead of warning. -q: Maven prints only errors.
    mvn -q -B -C -f "$POM" dependency:copy-dependencies -DoutputDirectory="$LIBS.tmp" \
        -DincludeScope=runtime >"$KAFKA_HOME/mvn.log" 2>&1 ||
        { tail -n 30 "$KAFKA_HOME/mvn.log" >&2; die "mvn could not fetch the jars (see $KAFKA_HOME/mvn.log)"; }
    [[ -f $LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "mvn ran but kafka_2.13-$KAFKA_VERSION.jar is missing"
    rm -rf "$LIBS"
    mv "$LIBS.tmp" "$LIBS"
    stamp >"$KAFKA_HOME/installed"
    exec 8>&-
    log "installed Apache Kafka $KAFKA_VERSION ($(ls "$LIBS" | wc -l) jars)"
}

check_java() { # Kafka 4's broker needs Java 17 or newer.
    local v
    v=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    [[ -n $v ]] || die "no java found (install openjdk-17-jre-headless or set JAVA_HOME)"
    ((${v%%.*} >= 17)) || die "Apache Kafka $KAFKA_VERSION needs Java 17+, $JAVA is $v"
}

# kafka_tool CLASS ARGS...: run one of Kafka's command-line tools from the installed jars.
kafka_tool() { "$JAVA" -Xmx256m -cp "$LIBS/*" "$@"; }

# ----------------------------------------------------------------- broker ----------
data_dir() { echo "$SERVICES_DIR/kafka-data-$1"; }

# resolve ARG: the NAME of a broker given its name or its port.
resolve() {
    local arg=$1 f
    [[ $arg =~ ^[A-Za-z0-9._-]+$ ]] || die "bad broker name or port: $arg"
    if [[ -d $(data_dir "$arg") ]] || ! [[ $arg =~ ^[0-9]+$ ]]; then
        echo "$arg"
        return 0
    fi
    for f in "$SERVICES_DIR"/kafka-data-*/port; do
        [[ -f $f && $(cat "$f") == "$arg" ]] && { basename "$(dirname "$f")" | sed 's/^kafka-data-//'; return 0; }
    done
    echo "$arg"
}

# pid_of NAME: the broker's pid if its pid file names a live kafka.Kafka running on this data
# dir (a recycled pid belongs to someone else and is never signalled).
pid_of() {
    local dir pid
    dir=$(data_dir "$1")
    pid=$(cat "$dir/kafka.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # (Braces: a failed redirection's message comes from the shell, before a 2> on the command.)
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q "kafka.Kafka $dir/server.properties" || return 1
    echo "$pid"
}

# answers PORT: the broker serves a metadata request (a TCP connect is not enough: the socket
# opens before the broker has caught up with its metadata log and can serve clients).
answers() {
    timeout 30 "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "127.0.0.1:$1" --list >/dev/null 2>&1
}

# free_port: a port nobody listens on (the kernel's choice).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

write_config() { # write_config DIR PORT CONTROLLER_PORT: regenerated on every start
    local dir=$1 port=$2 cport=$3
    cat >"$dir/server.properties" <<EOF
# Written by scripts/kafka.sh on every start; edits here are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/logs
# As users run it: topics appear on first use, with 4 partitions.
auto.create.topics.enable=true
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
# One node: every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests start consumers and expect partitions at once, not after a 3 s grace.
group.initial.rebalance.delay.ms=0
EOF
}

start() {
    local port=${1:-} name=${2:-${1:-}} dir cport pid cid logged=0
    [[ $port =~ ^[0-9]+$ ]] || usage
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "bad broker name: $name"
    dir=$(data_dir "$name")
    install
    mkdir -p "$dir"
    # One start per broker at a time (fd 9 is closed for the broker, which must not hold it).
    exec 9>"$dir/start.lock"
    flock 9
    if pid=$(pid_of "$name"); then
        [[ $(cat "$dir/port") == "$port" ]] || die "broker $name runs on port $(cat "$dir/port"), not $port"
        if answers "$port"; then
            log "Apache Kafka $name already running (pid $pid, 127.0.0.1:$port)"
            echo "$pid"
            return 0
        fi
        log "broker $name (pid $pid) is running but not answering yet; waiting"
    else
        port_open "$port" && die "port $port is taken by something that is not broker $name"
        # The controller listens on a second port, kept for the life of the data dir: PORT+1000
        # when free, else any free one.
        cport=$(cat "$dir/controller.port" 2>/dev/null) || true
        if [[ -z $cport ]]; then
            cport=$((port + 1000))
            if ((cport > 65535)) || port_open "$cport"; then cport=$(free_port); fi
            echo "$cport" >"$dir/controller.port"
        fi
        port_open "$cport" && die "controller port $cport of broker $name is taken"
        echo "$port" >"$dir/port"
        write_config "$dir" "$port" "$cport"
        cp "$HERE/kafka/log4j2.yaml" "$dir/log4j2.yaml"

        if [[ ! -f $dir/logs/meta.properties ]]; then
            # Format once; the cluster id lives in the data dir (and in meta.properties).
            cid=$(cat "$dir/cluster.id" 2>/dev/null) || true
            if [[ -z $cid ]]; then
                cid=$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null) || die "StorageTool random-uuid failed"
                echo "$cid" >"$dir/cluster.id"
            fi
            log "formatting $dir/logs (cluster id $cid)"
            kafka_tool kafka.tools.StorageTool format --cluster-id "$cid" \
                --config "$dir/server.properties" >"$dir/format.log" 2>&1 ||
                { cat "$dir/format.log" >&2; die "formatting $dir/logs failed"; }
        fi

        # server.log is appended to across restarts: look for "started" only past this point.
        logged=$(stat -c %s "$dir/server.log" 2>/dev/null || echo 0)
        log "starting Apache Kafka $KAFKA_VERSION '$name' on 127.0.0.1:$port (controller :$cport, log: $dir/server.log)"
        # The JVM flags of Kafka's own kafka-server-start.sh, with a small heap.
        # setsid + nohup: the broker outlives this script and the shell that ran it.
        setsid nohup "$JAVA" -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
            -Djava.awt.headless=true -Dkafka.logs.dir="$dir" \
            -Dlog4j2.configurationFile="$dir/log4j2.yaml" \
            -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
            >"$dir/stdout.log" 2>&1 </dev/null 9>&- &
        pid=$!
        echo "$pid" >"$dir/kafka.pid"
    fi

    local deadline=$((SECONDS + START_SECS))
    # The log line first (cheap to poll), then one real metadata request.
    # (A process substitution, not a pipe: with pipefail, grep -q quitting early fails the pipe.)
    until grep -q "Kafka Server started" <(tail -c +$((logged + 1)) "$dir/server.log" 2>/dev/null) &&
        answers "$port"; do
        # The log rolled over (20 MB) while starting: read the new file from its start.
        (($(stat -c %s "$dir/server.log" 2>/dev/null || echo 0) >= logged)) || logged=0
        kill -0 "$pid" 2>/dev/null || {
            tail -n 20 "$dir/server.log" "$dir/stdout.log" >&2 2>/dev/null
            die "broker $name exited while starting (see $dir/server.log and $dir/stdout.log)"
        }
        ((SECONDS < deadline)) || die "broker $name does not answer on 127.0.0.1:$port after ${START_SECS}s (see $dir/server.log)"
        sleep 0.5
    done
    log "Apache Kafka $name ok (127.0.0.1:$port, pid $pid)"
    echo "$pid"
}

stop() { # stop NAME [SIGNAL]: TERM waits for a clean shutdown (up to STOP_SECS), KILL does not
    local name=$1 sig=${2:-TERM} dir pid i
    dir=$(data_dir "$name")
    if ! pid=$(pid_of "$name"); then
        log "broker $name is not running"
        rm -f "$dir/kafka.pid"
        return 0
    fi
    log "stopping broker $name (pid $pid, SIG$sig)"
    kill -"$sig" "$pid"
    for ((i = 0; i < STOP_SECS * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "broker $name did not stop within ${STOP_SECS}s; SIGKILL"
        kill -9 "$pid"
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$dir/kafka.pid"
}

case ${1:-} in
install) install ;;
start) start "${2:-}" "${3:-}" ;;
stop) [[ -n ${2:-} ]] || usage; stop "$(resolve "$2")" ;;
kill) [[ -n ${2:-} ]] || usage; stop "$(resolve "$2")" KILL ;;
remove)
    [[ -n ${2:-} ]] || usage
    name=$(resolve "$2")
    stop "$name"
    rm -rf "$(data_dir "$name")"
    log "removed broker $name and its data"
    ;;
tool)
    [[ -n ${2:-} ]] || usage
    install
    shift
    kafka_tool "$@"
    ;;
*) usage ;;
esac
