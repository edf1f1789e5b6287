#!/usr/bin/env bash
# The end-to-end benchmark (release build): 1 KiB items on 8 partitions, the same rows in
# every measure, all in one run on this machine:
#   L3 alone: raw MariaDB by a naive client, two parallel clients and LOAD DATA LOCAL INFILE
#             (the best is "best raw"), and our library path (enqueue -> L3 settled);
#   end to end through Kafka (topic filled first): L3 only, and L2 (Redis Cluster) + L3;
#   latency: L2 + L3 with the topic produced live at half the measured rate.
# It prints each rate, the ratios to the library path and to the best raw rate, CPU us per
# item, p50/p99 latencies and the worker's peak RSS, for each size given.
#
#   scripts/bench.sh [ITEMS ...]        default 100000; e.g. scripts/bench.sh 100000 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- 100000
eval "$(scripts/services.sh)"
cargo build --release --locked --quiet
for items in "$@"; do
    if [ "$items" -ge 1000000 ]; then
        echo "bench: $items items: the table outgrows InnoDB's buffer pool, so this run is I/O-bound" >&2
    fi
    python3 scripts/bench.py --items "$items" --binary target/release/sync-engine
done
