#!/usr/bin/env bash
# Create a Kafka topic on the test broker with the Tansu CLI; a topic that exists already is fine.
#   scripts/create-topic.sh NAME PARTITIONS
# Broker: the first entry of SYNC_TEST_KAFKA_BROKERS (default 127.0.0.1:9092).
# The tansu binary: the one scripts/services.sh installed, else `tansu` on PATH.
set -euo pipefail

[[ $# -eq 2 && $2 =~ ^[0-9]+$ ]] || { echo "usage: $0 NAME PARTITIONS" >&2; exit 2; }
name=$1 partitions=$2
# shellcheck source=scripts/tansu-env.sh
source "$(dirname "$0")/tansu-env.sh"

if out=$("$tansu" topic create "$name" --partitions "$partitions" --broker "tcp://$broker" 2>&1); then
    echo "create-topic: created $name ($partitions partitions)" >&2
elif grep -q 'already exists' <<<"$out"; then
    echo "create-topic: $name exists already" >&2
else
    echo "create-topic: failed to create $name: $out" >&2
    exit 1
fi
