//! librdkafka client settings built from our config: the consumer's, the dead-letter
//! producer's, and every `SYNC_KAFKA_OPT_*` passthrough (applied last, so an operator can
//! override anything, e.g. SASL/TLS or `session.timeout.ms`).

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::pressure::Pressure;

/// Partitions a pod is expected to own at most, for sizing the per-partition prefetch.
pub const PREFETCH_PARTITIONS_HINT: u64 = 16;

pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let pressure = Pressure::from_budget(kafka.memory_budget_bytes);
    let prefetch_kbytes = pressure.prefetch_kbytes_per_partition(PREFETCH_PARTITIONS_HINT);
    let fetch_max_bytes = pressure.fetch_max_bytes();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        // Offsets are stored and committed by us, only up to the settled watermark.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Incremental rebalances: partitions that stay with a member keep flowing while others
        // move (eager strategies stop everyone). Override with
        // SYNC_KAFKA_OPT_PARTITION_ASSIGNMENT_STRATEGY (e.g. `range` for brokers without it).
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("queued.max.messages.kbytes", prefetch_kbytes.to_string())
        // When the prefetch cap is reached librdkafka backs off fetching this long (default
        // 1 s, which starves a fast pipeline); the cap itself bounds memory.
        .set("fetch.queue.backoff.ms", "20")
        .set("fetch.max.bytes", fetch_max_bytes.to_string())
        .set("max.partition.fetch.bytes", (fetch_max_bytes / 4).max(1 << 20).to_string())
        .set("statistics.interval.ms", "5000");
    if let Some(instance_id) = &kafka.instance_id {
        config.set("group.instance.id", instance_id);
    }
    apply_passthrough(&mut config, kafka);
    config
}

pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", (kafka.max_item_bytes + (64 << 10)).max(1 << 20).to_string());
    apply_passthrough(&mut config, kafka);
    // Consumer-only passthrough settings would only produce warnings on a producer.
    for consumer_only in [
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "group.instance.id",
        "partition.assignment.strategy",
    ] {
        config.remove(consumer_only);
    }
    config
}

fn apply_passthrough(config: &mut ClientConfig, kafka: &KafkaConfig) {
    for (property, value) in &kafka.passthrough {
        config.set(property, value.expose());
    }
}
