#!/usr/bin/env bash
# Checks the deployment files on a machine without Docker or Kubernetes, and runs the metrics
# path for real. Exits non-zero on any failure; prints what it checks.
#
#   1. deploy/k8s/*.yaml   kubernetes-validate --strict against the Kubernetes 1.30 and 1.37
#                          schemas (built-in kinds: unknown fields, types, required fields).
#                          The custom resources it has no schema for (ServiceMonitor,
#                          ScaledObject) are checked against the schemas generated from the real
#                          CRDs (npm @kubernetes-models/*: types, required, enums, patterns) and a
#                          strict schema of the fields we use (scripts/deploy-check/check.py:
#                          unknown or misspelt fields). Then the cross-references: selectors,
#                          ports, probes, envFrom, the WAL mount, SYNC_* names the worker reads,
#                          grace period > preStop + SYNC_SHUTDOWN_GRACE_MS + margin, memory limit
#                          >= (budget + L1 + 64 MiB) x 1.25, the ScaledObject's target and query.
#                          Not checked: anything only a cluster knows (admission, the operators'
#                          own defaulting, images, storage classes).
#   2. deploy/prometheus   promtool check rules, promtool test rules (alerts.test.yml),
#                          promtool check config (the compose stack's prometheus.yml).
#   3. names               every metric in an alert or a dashboard query is one src/metrics.rs
#                          declares (histograms as _bucket/_sum/_count); alert annotations;
#                          README's Alerts table lists exactly the alerts. Dashboard structure.
#   4. docker-compose.yml  the compose-spec JSON schema (vendored by check-jsonschema), then
#                          references: depends_on, volumes, bind-mount sources, the Dockerfile,
#                          pinned images, SYNC_* names, Prometheus targets and Grafana mounts.
#                          Not checked: that the images pull and the stack runs (no engine here).
#   5. live                a real Prometheus (Debian's package) scrapes a real worker
#                          ($SYNC_ENGINE_BIN run) consuming a few hundred produced items from the
#                          test services; the series must arrive, every scraped sync_* name must
#                          be declared, every alert and dashboard query must evaluate, every rule
#                          must load healthy.
#
# Tools are installed once, pinned, under ${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/deploy-check
# (a venv from scripts/deploy-check/requirements.txt, node modules from its package-lock.json)
# and Debian's prometheus package (promtool, prometheus) with apt-get when missing.
# The live step needs the test services: it runs scripts/services.sh unless SYNC_TEST_* are set.
# SYNC_ENGINE_BIN: the worker binary (default target/debug/sync-engine).
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICES_DIR="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}"
TOOLS="$SERVICES_DIR/deploy-check"
BIN="${SYNC_ENGINE_BIN:-target/debug/sync-engine}"
K8S_VERSIONS=(1.30.0 1.37.0) # the oldest Kubernetes we claim, and the newest the tool knows
LIVE_ITEMS=300
JOB=sync-engine # the job label alerts.yml and the dashboard select on
START=$SECONDS

say() { echo "check-deploy: $*"; }
die() { echo "check-deploy: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------ tools ---------------
mkdir -p "$TOOLS"
exec 9>"$TOOLS/install.lock"
flock 9 # two runs installing at once would trip over each other

stamp_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

PY="$TOOLS/venv/bin/python"
py_stamp=$(stamp_of scripts/deploy-check/requirements.txt)
if [[ $(cat "$TOOLS/venv/.stamp" 2>/dev/null) != "$py_stamp" ]]; then
    say "installing the pinned Python tools (kubernetes-validate, check-jsonschema) into $TOOLS/venv"
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check -r scripts/deploy-check/requirements.txt
    echo "$py_stamp" >"$TOOLS/venv/.stamp"
fi

node_stamp=$(stamp_of scripts/deploy-check/package.json scripts/deploy-check/package-lock.json)
if [[ $(cat "$TOOLS/node/.stamp" 2>/dev/null) != "$node_stamp" ]]; then
    command -v npm >/dev/null || die "npm not found (apt-get install npm)"
    say "installing the pinned CRD schemas (npm @kubernetes-models/keda, prometheus-operator) into $TOOLS/node"
    rm -rf "$TOOLS/node"
    mkdir -p "$TOOLS/node"
    cp scripts/deploy-check/package.json scripts/deploy-check/package-lock.json "$TOOLS/node/"
    (cd "$TOOLS/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null 2>"$TOOLS/npm.log") ||
        { cat "$TOOLS/npm.log" >&2; die "npm ci failed"; }
    echo "$node_stamp" >"$TOOLS/node/.stamp"
fi
# ES modules resolve packages from the script's own folder: run crds.mjs beside node_modules.
cp scripts/deploy-check/crds.mjs "$TOOLS/node/crds.mjs"

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    [[ $EUID -eq 0 ]] || die "promtool/prometheus missing and not root: apt-get install prometheus"
    say "installing Debian's prometheus package (promtool, prometheus) with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
exec 9>&-
say "tools: kubernetes-validate $("$TOOLS/venv/bin/kubernetes-validate" --version 2>&1 | head -n1), check-jsonschema $("$TOOLS/venv/bin/check-jsonschema" --version | awk '{print $NF}'), $(promtool --version 2>&1 | head -n1 | cut -d' ' -f1-3), node $(node --version) ($((SECONDS - START)) s)"

# ----------------------------------------------------------- 1. Kubernetes --------------
say "1. deploy/k8s: Kubernetes schemas (strict), CRD schemas, cross-references"
for version in "${K8S_VERSIONS[@]}"; do
    "$TOOLS/venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" deploy/k8s/*.yaml ||
        die "deploy/k8s does not validate against Kubernetes $version"
    say "  every built-in resource of deploy/k8s/*.yaml is valid against Kubernetes $version (strict)"
done
"$PY" scripts/deploy-check/check.py crd-docs deploy/k8s | (cd "$TOOLS/node" && node crds.mjs) ||
    die "a custom resource does not validate against its CRD schema"
"$PY" scripts/deploy-check/check.py k8s deploy/k8s || die "deploy/k8s cross-checks"

# ---------------------------------------------------------- 2. Prometheus ---------------
say "2. deploy/prometheus: promtool"
promtool check rules deploy/prometheus/alerts.yml | sed 's/^/  /' || die "promtool check rules"
promtool test rules deploy/prometheus/alerts.test.yml | sed 's/^/  /' || die "promtool test rules"
promtool check config deploy/prometheus/prometheus.yml 2>&1 | sed 's/^/  /' || die "promtool check config"

# ------------------------------------------------------- 3. names, dashboard ------------
say "3. metric names of the alerts and the dashboard against src/metrics.rs; the dashboard"
"$PY" scripts/deploy-check/check.py dashboard deploy/grafana/sync-engine.json || die "dashboard structure"
"$PY" scripts/deploy-check/check.py names || die "metric names / alert annotations / README table"

# ------------------------------------------------------------ 4. compose ----------------
say "4. docker-compose.yml: compose-spec schema and references"
"$TOOLS/venv/bin/check-jsonschema" -o text --builtin-schema vendor.compose-spec docker-compose.yml | sed 's/^/  /' ||
    die "docker-compose.yml does not match the compose-spec schema"
"$PY" scripts/deploy-check/check.py compose docker-compose.yml || die "docker-compose.yml references"

# --------------------------------------------------------------- 5. live ----------------
say "5. a real Prometheus scraping a real worker ($BIN)"
[[ -x $BIN ]] || die "no worker binary at $BIN: build it (cargo build) or set SYNC_ENGINE_BIN"
if [[ -z ${SYNC_TEST_KAFKA_BROKERS:-} || -z ${SYNC_TEST_MYSQL_URL:-} || -z ${SYNC_TEST_REDIS_URLS:-} ]]; then
    eval "$(scripts/services.sh)"
fi

run_id="deploycheck_$(date +%s)_$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/sync-engine-deploy-check.XXXXXX")
worker_pid='' prom_pid=''
stop_pid() { # stop_pid PID: SIGTERM, up to 15 s, then SIGKILL; only our own children
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
drop_tables() { # the run's L3 table, through the mariadb/mysql client when there is one
    local url=$SYNC_TEST_MYSQL_URL client
    client=$(command -v mariadb || command -v mysql) || return 0
    [[ $url =~ ^(mysql|mariadb)://([^:@/]+)(:([^@]*))?@([^:/]+)(:([0-9]+))?/([^/?]+) ]] || return 0
    MYSQL_PWD=$(printf '%b' "${BASH_REMATCH[4]//%/\\x}") "$client" --protocol=tcp -h "${BASH_REMATCH[5]}" \
        -P "${BASH_REMATCH[7]:-3306}" -u "${BASH_REMATCH[2]}" --connect-timeout=2 "${BASH_REMATCH[8]}" \
        -e "DROP TABLE IF EXISTS \`$run_id\`, \`${run_id}_migrations\`" 2>/dev/null || true
}
cleanup() {
    local status=$?
    stop_pid "$worker_pid"
    stop_pid "$prom_pid"
    if ((status != 0)); then
        echo "--- worker log (tail) ---" >&2; tail -n 20 "$work/worker.log" >&2 2>/dev/null || true
        echo "--- prometheus log (tail) ---" >&2; tail -n 10 "$work/prometheus.log" >&2 2>/dev/null || true
    fi
    drop_tables
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
metrics_port=$(free_port)
prom_port=$(free_port)
brokers=$SYNC_TEST_KAFKA_BROKERS

scripts/kafka.sh tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$brokers" --create \
    --topic "$run_id" --partitions 2 --replication-factor 1 >"$work/topic.log" 2>&1 ||
    { cat "$work/topic.log" >&2; die "could not create the topic $run_id"; }

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["$PWD/deploy/prometheus/alerts.yml"]
scrape_configs:
  - job_name: $JOB
    static_configs:
      - targets: ["127.0.0.1:$metrics_port"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
prom_pid=$!

# The worker as spawn_worker in tests/common configures it (64 KiB items: the poison records'
# oversize ones stay below the broker's 1 MB message limit); env -i keeps the caller's SYNC_*
# variables (and HOSTNAME, the default static-membership id) away from it.
env -i PATH="$PATH" \
    SYNC_KAFKA_BROKERS="$brokers" SYNC_KAFKA_TOPICS="$run_id" SYNC_KAFKA_GROUP_ID="$run_id" \
    SYNC_KAFKA_INSTANCE_ID="$run_id" SYNC_DLQ_TOPIC="${run_id}_dlq" \
    SYNC_REDIS_URLS="$SYNC_TEST_REDIS_URLS" SYNC_REDIS_PREFIX="$run_id:" SYNC_REDIS_TTL_SECS=600 \
    SYNC_SQL_URL="$SYNC_TEST_MYSQL_URL" SYNC_SQL_TABLE="$run_id" SYNC_WAL_DIR="$work/wal" \
    SYNC_METRICS_ADDR="127.0.0.1:$metrics_port" SYNC_COMMIT_INTERVAL_MS=200 \
    SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS=6000 SYNC_KAFKA_OPT_HEARTBEAT_INTERVAL_MS=500 \
    SYNC_SHUTDOWN_GRACE_MS=5000 SYNC_MAX_ITEM_BYTES=65536 SYNC_LOG=warn \
    "$BIN" run >"$work/worker.log" 2>&1 &
worker_pid=$!

for _ in $(seq 300); do # 30 s
    curl -sf "http://127.0.0.1:$metrics_port/health/ready" >/dev/null 2>&1 && break
    kill -0 "$worker_pid" 2>/dev/null || die "the worker exited at start"
    sleep 0.1
done
curl -sf "http://127.0.0.1:$metrics_port/health/ready" >/dev/null || die "the worker was not ready within 30 s"
for _ in $(seq 300); do # 30 s: a loaded machine starts Prometheus slowly
    curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1 && break
    kill -0 "$prom_pid" 2>/dev/null || die "Prometheus exited at start"
    sleep 0.1
done
curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null || die "Prometheus was not ready within 30 s"
say "  worker ready on :$metrics_port, Prometheus on :$prom_port; producing $LIVE_ITEMS records (5% poison) to $run_id"
"$BIN" produce --brokers "$brokers" --topic "$run_id" --count "$LIVE_ITEMS" --item-bytes 256 \
    --key-space 100 --poison-share 0.05 --max-item-bytes 65536 --quiet >"$work/produce.log" 2>&1 ||
    { cat "$work/produce.log" >&2; die "produce failed"; }
"$PY" scripts/deploy-check/check.py live "http://127.0.0.1:$prom_port" "$JOB" "$LIVE_ITEMS" ||
    die "the live Prometheus check"

say "all checks passed in $((SECONDS - START)) s"
