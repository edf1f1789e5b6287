//! Every metric, declared in one place: the catalogue. `http.rs` serves it on `/metrics`.
//!
//! Names follow Prometheus conventions: `sync_<name>_<unit>[_total]`. Code records through the
//! constants below, so a metric's name lives here only. Nothing secret is ever a label.

use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const RECORDS_CONSUMED: &str = "sync_records_consumed_total";
pub const ITEMS_SETTLED: &str = "sync_items_settled_total";
pub const DEAD_LETTERED: &str = "sync_dead_lettered_total";
pub const BATCH_ITEMS: &str = "sync_batch_items";
pub const BATCH_FLUSHES: &str = "sync_batch_flushes_total";
pub const FLUSH_SECONDS: &str = "sync_flush_duration_seconds";
pub const SETTLE_LATENCY_SECONDS: &str = "sync_settle_latency_seconds";
pub const ITEM_SETTLE_SECONDS: &str = "sync_item_settle_seconds";
pub const CONSUMER_LAG: &str = "sync_consumer_lag_records";
pub const CONSUMER_LAG_SECONDS: &str = "sync_consumer_lag_seconds";
pub const PAUSED_PARTITIONS: &str = "sync_paused_partitions";
pub const ASSIGNED_PARTITIONS: &str = "sync_assigned_partitions";
pub const BYTES_IN_FLIGHT: &str = "sync_bytes_in_flight_bytes";
pub const MEMORY_BUDGET: &str = "sync_memory_budget_bytes";
pub const BACKPRESSURE_LEVEL: &str = "sync_backpressure_level";
pub const STORE_ERRORS: &str = "sync_store_errors_total";
pub const OFFSETS_COMMITTED: &str = "sync_offsets_committed_total";
pub const COMMIT_ERRORS: &str = "sync_commit_errors_total";
pub const REBALANCES: &str = "sync_rebalances_total";
pub const PAUSES: &str = "sync_partition_pauses_total";
pub const WAL_BYTES: &str = "sync_wal_bytes";
pub const WAL_APPENDED_ITEMS: &str = "sync_wal_appended_items_total";
pub const WAL_DRAINED_ITEMS: &str = "sync_wal_drained_items_total";
pub const WAL_CORRUPT_RECORDS: &str = "sync_wal_corrupt_records_total";
pub const WAL_TORN_BYTES: &str = "sync_wal_torn_bytes_total";
pub const WAL_ERRORS: &str = "sync_wal_errors_total";
pub const CIRCUIT_STATE: &str = "sync_circuit_state";
pub const L2_STALE_IDS: &str = "sync_l2_stale_ids";
pub const L2_REPAIRED_IDS: &str = "sync_l2_repaired_ids_total";
pub const MERKLE_DRAINED_MARKS: &str = "sync_merkle_drained_marks_total";
pub const MERKLE_DRAIN_ERRORS: &str = "sync_merkle_drain_errors_total";
pub const WAL_REJECTED_ITEMS: &str = "sync_wal_rejected_items_total";
pub const DEAD_LETTER_DROPPED: &str = "sync_dead_letter_dropped_total";
pub const CORRUPT_READS: &str = "sync_corrupt_reads_total";
pub const L2_AUDIT_KEYS: &str = "sync_l2_audit_keys_total";
pub const L2_AUDIT_DRIFT: &str = "sync_l2_audit_drift_total";
pub const L2_AUDIT_REPAIRED: &str = "sync_l2_audit_repaired_total";
pub const L2_AUDIT_PASS_SECONDS: &str = "sync_l2_audit_pass_seconds";
pub const CONFIG_RELOADS: &str = "sync_config_reloads_total";
pub const FILTER_TRUST: &str = "sync_filter_trust";
pub const FILTER_IDS: &str = "sync_filter_ids";
pub const FILTER_BYTES: &str = "sync_filter_bytes";
pub const FILTER_QUERIES_SAVED: &str = "sync_filter_queries_saved_total";
pub const FILTER_TAIL_LAG_MS: &str = "sync_filter_tail_lag_ms";

const LATENCY_BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// Installs the global recorder once (later calls return the first handle) and describes
/// every metric.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &LATENCY_BUCKETS,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(BATCH_ITEMS.into()),
                        &BATCH_BUCKETS,
                    )
                })
                .and_then(|builder| builder.install_recorder());
            let handle = match handle {
                Ok(handle) => handle,
                // Another recorder is installed (embedding app): render an empty local one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(RECORDS_CONSUMED, "Kafka records received by the worker, by topic");
    describe_counter!(ITEMS_SETTLED, "Items settled, by the tier that made them durable (l1, l2, l3)");
    describe_counter!(DEAD_LETTERED, "Records acknowledged by the dead-letter topic, by reason code");
    describe_histogram!(BATCH_ITEMS, "Items per flushed batch");
    describe_counter!(BATCH_FLUSHES, "Batches closed, by reason (count, bytes, age, explicit)");
    describe_histogram!(FLUSH_SECONDS, Unit::Seconds, "Time to write one batch, by tier");
    describe_histogram!(SETTLE_LATENCY_SECONDS, Unit::Seconds, "Kafka record timestamp to settled");
    describe_histogram!(ITEM_SETTLE_SECONDS, Unit::Seconds, "Engine enqueue to settled, per item");
    describe_gauge!(PAUSED_PARTITIONS, "Partitions paused for memory pressure");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions assigned to this worker");
    describe_gauge!(BYTES_IN_FLIGHT, Unit::Bytes, "Bytes held for records not yet settled");
    describe_gauge!(
        MEMORY_BUDGET,
        Unit::Bytes,
        "The memory budget the backpressure levels are computed against (unsettled items, L1, records in flight)"
    );
    describe_gauge!(
        BACKPRESSURE_LEVEL,
        "Memory pressure level: 0 normal, 1 warn, 2 throttle, 3 critical, 4 emergency, 5 shutdown"
    );
    describe_counter!(STORE_ERRORS, "Failed writes or reads, by tier and kind (unavailable, rejected)");
    describe_counter!(OFFSETS_COMMITTED, "Offset commits sent to Kafka");
    describe_counter!(COMMIT_ERRORS, "Offset commits Kafka refused");
    describe_counter!(REBALANCES, "Rebalance events, by kind (assign, revoke, lost)");
    describe_counter!(PAUSES, "Times the worker paused its partitions for memory pressure");
    describe_gauge!(WAL_BYTES, Unit::Bytes, "Bytes in the local write-ahead log, waiting to drain into L3");
    describe_counter!(WAL_APPENDED_ITEMS, "Items settled in the write-ahead log because L3 was unavailable");
    describe_counter!(WAL_DRAINED_ITEMS, "Items replayed from the write-ahead log into L3");
    describe_counter!(WAL_REJECTED_ITEMS, "Items L3 rejected for their content while the write-ahead log drained");
    describe_counter!(
        DEAD_LETTER_DROPPED,
        "Dead letters the topic could not take even without their value: logged and settled"
    );
    describe_counter!(WAL_CORRUPT_RECORDS, "Write-ahead log records that failed their checksum (skipped)");
    describe_counter!(
        WAL_TORN_BYTES,
        Unit::Bytes,
        "Bytes cut from torn write-ahead log tails at start (never settled)"
    );
    describe_counter!(WAL_ERRORS, "Write-ahead log appends or drains that failed (full, i/o)");
    describe_gauge!(L2_STALE_IDS, "Ids whose L2 write failed, waiting for repair from L3");
    describe_counter!(L2_REPAIRED_IDS, "Ids rewritten from L3 (or invalidated) in L2 after a failed write");
    describe_counter!(MERKLE_DRAINED_MARKS, "Merkle dirty marks folded into the tree over L3");
    describe_counter!(MERKLE_DRAIN_ERRORS, "Failed merkle drain steps (retried after a second)");
    describe_gauge!(CIRCUIT_STATE, "Circuit breaker state by backend: 0 closed, 1 open, 2 half-open");
    describe_counter!(CONFIG_RELOADS, "SIGHUP reloads of the configuration, by outcome (applied, refused)");
    describe_gauge!(
        FILTER_TRUST,
        "Membership filter trust: 0 untrusted, 1 warming up, 2 lagging (reads go to L3), 3 trusted"
    );
    describe_gauge!(FILTER_IDS, "Ids in the membership filter over L3 (duplicates counted once)");
    describe_gauge!(FILTER_BYTES, Unit::Bytes, "Memory of the membership filter");
    describe_counter!(FILTER_QUERIES_SAVED, "L3 reads skipped because the trusted filter said the id is not in L3");
    describe_gauge!(
        FILTER_TAIL_LAG_MS,
        "Milliseconds since the last completed tail poll of other processes' inserts started"
    );
    describe_counter!(L2_AUDIT_KEYS, "L2 entries the auditor compared with L3");
    describe_counter!(
        L2_AUDIT_DRIFT,
        "L2 entries the auditor found disagreeing with L3, by kind (stale, corrupt, unreadable)"
    );
    describe_counter!(L2_AUDIT_REPAIRED, "L2 entries the auditor rewrote from L3 or deleted");
    describe_gauge!(L2_AUDIT_PASS_SECONDS, "Duration of the L2 auditor's last complete pass");
    describe_counter!(CORRUPT_READS, "Verified reads whose content did not match its stored SHA-256, by tier (l2, l3)");
}

/// Times one operation into a histogram, in seconds: `observe` records it (a timer dropped
/// without `observe`, on an early return, records nothing: a failed or abandoned operation
/// is not a latency).
#[must_use = "a timer records only when observed"]
pub struct LatencyTimer {
    histogram: metrics::Histogram,
    started: Instant,
}

impl LatencyTimer {
    pub fn start(histogram: metrics::Histogram) -> LatencyTimer {
        LatencyTimer { histogram, started: Instant::now() }
    }

    /// Records the time since `start` and returns it.
    pub fn observe(self) -> std::time::Duration {
        let elapsed = self.started.elapsed();
        self.histogram.record(elapsed.as_secs_f64());
        elapsed
    }
}
