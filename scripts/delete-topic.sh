#!/usr/bin/env bash
# Delete Kafka topics on the test broker with the Tansu CLI; a topic that does not exist is fine.
#   scripts/delete-topic.sh NAME...
# Broker: the first entry of SYNC_TEST_KAFKA_BROKERS (default 127.0.0.1:9092).
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 NAME..." >&2; exit 2; }
# shellcheck source=scripts/tansu-env.sh
source "$(dirname "$0")/tansu-env.sh"

for name in "$@"; do
    if out=$("$tansu" topic delete "$name" --broker "tcp://$broker" 2>&1); then
        echo "delete-topic: deleted $name" >&2
    elif grep -qi 'does not host this topic\|unknown topic' <<<"$out"; then
        echo "delete-topic: $name does not exist" >&2
    else
        echo "delete-topic: failed to delete $name: $out" >&2
        exit 1
    fi
done
