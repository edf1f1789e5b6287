# Sourced by scripts/create-topic.sh and scripts/delete-topic.sh: sets `broker` (the first entry
# of SYNC_TEST_KAFKA_BROKERS, default 127.0.0.1:9092) and `tansu` (the binary scripts/services.sh
# installed, else `tansu` on PATH), or exits naming the calling script.
broker=${SYNC_TEST_KAFKA_BROKERS:-127.0.0.1:9092}
broker=${broker%%,*}

tansu="${SYNC_SERVICES_DIR:-/tmp/sync-engine-services}/tansu/tansu"
[[ -x $tansu ]] || tansu=$(command -v tansu) || {
    echo "$(basename "$0" .sh): no tansu binary; run scripts/services.sh first" >&2
    exit 1
}
