#!/usr/bin/env bash
# The end-to-end benchmark (release build): 1 KiB items on 8 partitions, L2 + L3 (Redis
# Cluster + MariaDB). The topic is filled before the worker starts. Prints end-to-end
# items/s (first record consumed -> last offset committed), the raw MariaDB ceiling measured
# in this same run, their ratio, p50/p99 latencies and the worker's peak RSS.
#
#   scripts/bench.sh [ITEMS]        default 200000
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${1:-200000}
eval "$(scripts/services.sh)"
cargo build --release --locked --quiet
exec python3 scripts/bench.py --items "$ITEMS" --binary target/release/sync-engine
