//! The worker as a real process: `kill -9` mid-stream, restart, SIGTERM, health and metrics,
//! and peak memory under a small budget; the health endpoint against misbehaving clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::http::{BreakerPosition, Readiness, ReadyProbe, ReadyState, REQUEST_TIMEOUT};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_nothing_after_restart_and_sigterm_exits_zero() {
    let names = Names::new("crash");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(spec(&names, 40_000, 10_000));
    let first_half: Vec<_> = workload.by_ref().take(30_000).collect();
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    let mut ends = sync_engine::kafka::producer::publish_all(&producer, first_half, 0, || {}).await.unwrap();

    let port = free_port();
    // Small batches slow the first worker down, so the kill surely lands mid-stream.
    let mut worker = spawn_worker(&names, port, &[("SYNC_BATCH_MAX_ITEMS", "20".into())]);
    let total: i64 = ends.0.values().sum();
    let mut committed_before_kill = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while committed_before_kill == 0 && std::time::Instant::now() < deadline {
        let names = names.clone();
        committed_before_kill =
            tokio::task::spawn_blocking(move || committed(&names, PARTITIONS).values().sum::<i64>()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&worker, "KILL");
    let status = wait_exit(&mut worker, Duration::from_secs(10)).await.expect("killed worker exits");
    assert!(!status.success());
    assert!(
        committed_before_kill > 0 && committed_before_kill < total,
        "the kill must land after the first commit and before the last: {committed_before_kill} of {total}"
    );

    // More data arrives while no worker runs; then a fresh process takes over.
    let rest: Vec<_> = workload.by_ref().collect();
    let more = sync_engine::kafka::producer::publish_all(&producer, rest, 0, || {}).await.unwrap();
    producer.flush();
    for (partition, end) in more.0 {
        ends.record(partition, end - 1);
    }
    let mut worker = spawn_worker(&names, port, &[]);
    let ready = wait_ready(port, Duration::from_secs(30)).await;
    assert!(ready, "the restarted worker reports ready");
    let backends = http_get(port, "/health/ready").unwrap_or_default();
    for line in ["circuit l3 ", "circuit l2 ", "wal_bytes ", "l2_stale_ids "] {
        assert!(backends.contains(line), "/health/ready reads the engine's backends, lacks {line:?}: {backends}");
    }
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    assert_eq!(committed, ends.0, "after the restart every offset is committed");

    let metrics = http_get(port, "/metrics").expect("metrics endpoint answers");
    for name in [
        "sync_records_consumed_total",
        "sync_items_settled_total",
        "sync_batch_items",
        "sync_flush_duration_seconds",
        "sync_bytes_in_flight_bytes",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert!(http_get(port, "/health/live").unwrap().starts_with("HTTP/1.0 200"));

    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30))
        .await
        .expect("SIGTERM stops the worker within its grace period");
    assert!(status.success(), "SIGTERM must drain and exit 0, got {status}");

    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());
    assert_eq!(compare_l2(&names, &workload).await, Vec::<String>::new());
}

/// Stated overhead above the budget: the binary and its allocator, librdkafka's own buffers
/// and threads, the sqlx and Redis pools. Measured here: 70 MiB peak for 16 MiB budget + 8 MiB
/// L1, so ~46 MiB of overhead; 96 MiB leaves room for allocator and scheduling noise.
const FIXED_OVERHEAD_BYTES: u64 = 96 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_stays_under_the_budget_plus_a_fixed_overhead() {
    let names = Names::new("rss");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload =
        Workload::new(sync_engine::workload::WorkloadSpec { item_bytes: 4096, ..spec(&names, 15_000, 15_000) });
    let ends = produce(&names, &mut workload).await; // ~60 MiB backlog
    let budget: u64 = 16 << 20;
    let l1: u64 = 8 << 20;
    let port = free_port();
    let mut worker = spawn_worker(
        &names,
        port,
        &[("SYNC_MEMORY_BUDGET_BYTES", budget.to_string()), ("SYNC_L1_MAX_BYTES", l1.to_string())],
    );
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.is_some_and(|status| status.success()));
    assert_eq!(committed, ends.0);
    let paused = metrics.lines().any(|line| line.starts_with("sync_partition_pauses_total") && !line.ends_with(" 0"));
    assert!(paused, "a backlog four times the budget must make the worker pause");
    let peak = peak_kib * 1024;
    eprintln!("peak RSS {} MiB for a budget of {} MiB + L1 {} MiB", peak >> 20, budget >> 20, l1 >> 20);
    assert!(peak <= budget + l1 + FIXED_OVERHEAD_BYTES, "peak RSS {} MiB over budget + L1 + overhead", peak >> 20);
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());
}

/// Sends `request` as is and reads the response until the server closes the connection; a
/// server that never closes fails the read after `REQUEST_TIMEOUT` plus a margin.
fn send_raw(port: u16, request: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Like `send_raw`, but the head trickles in a byte at a time and never ends: each read
/// gets data, so only a deadline on the whole head stops it.
fn send_trickling(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nx-slow: ")?;
    let mut writer = stream.try_clone()?;
    std::thread::spawn(move || {
        while writer.write_all(b"a").is_ok() && writer.flush().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_endpoint_answers_only_get_reads_the_probe_and_cuts_off_slow_clients() {
    let readiness = Readiness::default();
    readiness.set(true);
    // The probe stands for the live engine: /health/ready must show what it reads now.
    let probe: ReadyProbe = Arc::new(|| ReadyState {
        breakers: vec![("l3".into(), BreakerPosition::Open), ("l2".into(), BreakerPosition::Closed)],
        wal_bytes: 4096,
        l2_stale_ids: 7,
        backpressure: sync_engine::BackpressureLevel::Throttle,
        filter: Some(sync_engine::FilterTrust::Lagging { lag_ms: 6000 }.to_string()),
    });
    let stop = CancellationToken::new();
    let any_port = "127.0.0.1:0".parse().unwrap();
    let extra: sync_engine::http::ExtraMetrics = Arc::new(|| "sync_extra_series 1\n".to_owned());
    let bound =
        sync_engine::http::serve(any_port, sync_engine::metrics::install(), readiness, probe, extra, stop.clone())
            .await
            .expect("endpoint binds");
    let port = bound.port();

    let metrics = http_get(port, "/metrics").expect("metrics answer");
    assert!(metrics.ends_with("sync_extra_series 1\n"), "the owner-rendered series follow the recorder's: {metrics}");

    let ready = http_get(port, "/health/ready").expect("ready answers");
    assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
    assert!(ready.ends_with("ready\ncircuit l3 open\ncircuit l2 closed\nwal_bytes 4096\nl2_stale_ids 7\nbackpressure throttle\nfilter lagging (6000 ms behind)\n"), "{ready}");

    for method in ["POST", "PUT", "DELETE", "HEAD"] {
        let response = send_raw(port, &format!("{method} /health/ready HTTP/1.0\r\n\r\n")).expect("answered");
        assert!(response.starts_with("HTTP/1.0 405"), "{method}: {response}");
        assert!(response.contains("allow: GET"), "{method}: {response}");
    }

    let started = Instant::now();
    let silent = send_raw(port, "GET /metrics HTTP/1.0\r\n").expect("a half-sent head is answered and closed");
    assert!(silent.starts_with("HTTP/1.0 408"), "{silent}");
    let trickling = send_trickling(port).expect("a trickling head is answered and closed");
    assert!(trickling.starts_with("HTTP/1.0 408"), "{trickling}");
    let took = started.elapsed();
    assert!(took < 2 * REQUEST_TIMEOUT + Duration::from_secs(2), "cut off after {took:?}");
    assert!(http_get(port, "/health/live").unwrap().starts_with("HTTP/1.0 200"), "still serving");
    stop.cancel();
}

/// Issue 6, item 8: a worker that cannot settle within `SYNC_SHUTDOWN_GRACE_MS` exits
/// non-zero at the grace, never later. Its L3 table is locked and its write deadline is
/// longer than the grace, so nothing can settle; before the fix the engine's own shutdown got
/// a second full grace after the worker's and the process waited out the hung write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_settle_exits_non_zero_at_the_grace() {
    use sqlx::{Connection, Executor};
    let names = Names::new("grace");
    create_topic(&names.topic, PARTITIONS).await;
    let port = free_port();
    let grace = Duration::from_millis(2_000);
    let mut worker = spawn_worker(
        &names,
        port,
        &[("SYNC_SHUTDOWN_GRACE_MS", grace.as_millis().to_string()), ("SYNC_SQL_WRITE_TIMEOUT_MS", "30000".into())],
    );
    assert!(wait_ready(port, Duration::from_secs(30)).await, "worker ready");
    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", names.table).as_str()).await.unwrap();
    let mut workload = Workload::new(spec(&names, 2_000, 500));
    produce(&names, &mut workload).await;
    let consumed = eventually_metric(port, "sync_records_consumed_total", Duration::from_secs(30)).await;
    assert!(consumed, "the worker consumed records before the stop");

    let stopped = Instant::now();
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(25)).await;
    let took = stopped.elapsed();
    locker.execute("UNLOCK TABLES").await.unwrap();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM with a {grace:?} grace"));
    eprintln!("grace: exit {status} {:.1}s after SIGTERM (grace {:.1}s)", took.as_secs_f64(), grace.as_secs_f64());
    assert!(!status.success(), "unsettled items must make the exit non-zero");
    assert!(took < grace + Duration::from_millis(1_500), "exited {took:?} after SIGTERM, the grace is {grace:?}");
}

/// Waits until a counter on the worker's `/metrics` is above zero.
async fn eventually_metric(port: u16, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let metrics = http_get(port, "/metrics").unwrap_or_default();
        if metrics.lines().any(|line| line.starts_with(name) && !line.ends_with(" 0")) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
