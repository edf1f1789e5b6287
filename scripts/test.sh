#!/usr/bin/env bash
# Installs/starts what the tests need (idempotently, loopback only) and runs every test:
# unit and property tests, and the integration tests against real MariaDB, a real Redis
# Cluster and Apache Kafka, then the embedded demo's own check, then the deployment files'
# check (scripts/check-deploy.sh: manifests, alert rules, dashboard, a real Prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "test: cargo not found; install Rust with rustup" >&2; exit 1; }

# The services script prints `export SYNC_TEST_...` lines for the tests to find them.
eval "$(scripts/services.sh)"

# The WAL directories of the tests' workers, all in one place, removed at the end if every step passed.
SYNC_TEST_WAL_ROOT=$(mktemp -d -t sync-engine-test-wal.XXXXXX)
export SYNC_TEST_WAL_ROOT

echo "test: building" >&2
cargo build --tests --bins --locked 2>&1 | tail -n 3

echo "test: unit, property and integration tests" >&2
cargo test --locked --no-fail-fast -- --test-threads=4

echo "test: embedded demo (20,000 items) must pass its own check" >&2
cargo run --locked --quiet -- demo --items 20000 --quiet

echo "test: the library quick start (examples/quickstart.rs): standalone Redis + MariaDB, Redis Cluster + SQLite" >&2
SYNC_QUICKSTART_REDIS_URL="$SYNC_TEST_REDIS_STANDALONE_URL" SYNC_QUICKSTART_SQL_URL="$SYNC_TEST_MYSQL_URL" \
    cargo run --locked --quiet --example quickstart
quickstart_dir=$(mktemp -d)
SYNC_QUICKSTART_REDIS_URL="${SYNC_TEST_REDIS_URLS%%,*}" SYNC_QUICKSTART_SQL_URL="sqlite://$quickstart_dir/items.db?mode=rwc" \
    cargo run --locked --quiet --example quickstart
rm -rf "$quickstart_dir"

SYNC_ENGINE_BIN=target/debug/sync-engine scripts/check-deploy.sh

rm -rf "$SYNC_TEST_WAL_ROOT"
