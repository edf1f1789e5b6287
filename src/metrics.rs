//! Every metric, declared in one place, and the `/metrics`, `/health/live`, `/health/ready`
//! HTTP endpoint.
//!
//! Names follow Prometheus conventions: `sync_<name>_<unit>[_total]`. Code records through the
//! constants below, so a metric's name lives here only. The endpoint is a deliberately tiny
//! HTTP/1.0 responder: GET only (405 otherwise), request head capped at 8 KiB and due within
//! `REQUEST_TIMEOUT` (408 and closed otherwise); it serves three fixed paths and pulls in no
//! web framework. Nothing secret is ever a label.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::resilience::circuit_breaker::BreakerState;

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
pub const WAL_REJECTED_ITEMS: &str = "sync_wal_rejected_items_total";
pub const DEAD_LETTER_DROPPED: &str = "sync_dead_letter_dropped_total";
pub const CORRUPT_READS: &str = "sync_corrupt_reads_total";

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
    describe_gauge!(BYTES_IN_FLIGHT, Unit::Bytes, "Bytes held for records not yet settled");
    describe_gauge!(MEMORY_BUDGET, Unit::Bytes, "The configured memory budget for unsettled records");
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
    describe_gauge!(CIRCUIT_STATE, "Circuit breaker state by backend: 0 closed, 1 open, 2 half-open");
    describe_counter!(CORRUPT_READS, "Verified reads whose content did not match its stored SHA-256, by tier (l2, l3)");
}

/// Readiness: set once the worker is connected and consuming.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A circuit breaker's position, as `/health/ready` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerPosition {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerPosition {
    fn as_str(self) -> &'static str {
        match self {
            BreakerPosition::Closed => "closed",
            BreakerPosition::Open => "open",
            BreakerPosition::HalfOpen => "half-open",
        }
    }
}

impl From<BreakerState> for BreakerPosition {
    fn from(state: BreakerState) -> BreakerPosition {
        match state {
            BreakerState::Closed { .. } => BreakerPosition::Closed,
            BreakerState::Open { .. } => BreakerPosition::Open,
            BreakerState::HalfOpen => BreakerPosition::HalfOpen,
        }
    }
}

/// The backend state `/health/ready` lists besides readiness. An open breaker does not make
/// the pod unready: with the WAL it keeps settling, so this is for the operator to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadyState {
    /// Circuit breaker per backend (`l3`, `l2`, `dlq`).
    pub breakers: Vec<(String, BreakerPosition)>,
    /// Bytes in the local write-ahead log, waiting to drain into L3.
    pub wal_bytes: u64,
    /// Ids whose L2 write failed, waiting for repair from L3.
    pub l2_stale_ids: u64,
    /// The engine's memory pressure level.
    pub backpressure: crate::pressure::BackpressureLevel,
}

impl ReadyState {
    fn render(&self) -> String {
        let mut body = String::new();
        for (backend, position) in &self.breakers {
            body.push_str(&format!("circuit {backend} {}\n", position.as_str()));
        }
        body.push_str(&format!("wal_bytes {}\nl2_stale_ids {}\n", self.wal_bytes, self.l2_stale_ids));
        body.push_str(&format!("backpressure {}\n", self.backpressure));
        body
    }
}

/// Reads the live backend state on every `/health/ready` request; whoever runs the worker
/// builds it from the engine and the worker it starts.
pub type ReadyProbe = Arc<dyn Fn() -> ReadyState + Send + Sync>;

/// The whole request head must arrive within this, or the client gets 408 and is closed: a
/// silent or trickling client cannot hold a connection and its task for ever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A client that never reads its response cannot hold the connection for ever either.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 8192;

/// Metrics rendered by their owner on every scrape instead of through the recorder, whose
/// series never go away (the lag of the partitions a worker owns *now*).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint needs to answer a request.
#[derive(Clone)]
struct Endpoint {
    handle: PrometheusHandle,
    readiness: Readiness,
    probe: ReadyProbe,
    extra: ExtraMetrics,
}

/// Serves the endpoint until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
    probe: ReadyProbe,
    extra: ExtraMetrics,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let endpoint = Endpoint { handle, readiness, probe, extra };
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => { tracing::warn!(%error, "metrics endpoint accept failed"); continue; }
                },
            };
            tokio::spawn(answer(stream, endpoint.clone()));
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, endpoint: Endpoint) {
    let (status, body) = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => endpoint.route(&head),
        Err(_) => ("408 Request Timeout", "request timeout\n".to_owned()),
    };
    // 405 must say what is allowed (RFC 9110); it costs nothing on the other answers.
    let response = format!(
        "HTTP/1.0 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nallow: GET\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(response.as_bytes())).await;
}

/// Reads until the blank line that ends the head, the size cap, or the client's EOF.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = vec![0u8; MAX_HEAD_BYTES];
    let mut read = 0;
    while read < head.len() && !head[..read].windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut head[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    String::from_utf8_lossy(&head[..read]).into_owned()
}

impl Endpoint {
    fn route(&self, head: &str) -> (&'static str, String) {
        let mut request_line = head.split_whitespace();
        let (method, path) = (request_line.next().unwrap_or(""), request_line.next().unwrap_or(""));
        if method != "GET" {
            return ("405 Method Not Allowed", "only GET\n".to_owned());
        }
        match path {
            "/metrics" => ("200 OK", self.handle.render() + &(self.extra)()),
            "/health/live" => ("200 OK", "ok\n".to_owned()),
            "/health/ready" if self.readiness.is_ready() => ("200 OK", format!("ready\n{}", (self.probe)().render())),
            "/health/ready" => ("503 Service Unavailable", format!("not ready\n{}", (self.probe)().render())),
            _ => ("404 Not Found", "not found\n".to_owned()),
        }
    }
}
