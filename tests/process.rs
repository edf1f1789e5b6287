//! The worker as a real process: `kill -9` mid-stream, restart, SIGTERM, health and metrics,
//! and peak memory under a small budget.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use sync_engine::demo::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_worker(names: &Names, metrics_port: u16, extra: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
    command
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SYNC_KAFKA_BROKERS", brokers())
        .env("SYNC_KAFKA_TOPICS", &names.topic)
        .env("SYNC_KAFKA_GROUP_ID", &names.group)
        .env("SYNC_DLQ_TOPIC", &names.dlq_topic)
        .env("SYNC_REDIS_URLS", redis_urls().join(","))
        .env("SYNC_REDIS_PREFIX", &names.prefix)
        .env("SYNC_REDIS_TTL_SECS", "3600")
        .env("SYNC_SQL_URL", mysql_url())
        .env("SYNC_SQL_TABLE", &names.table)
        .env("SYNC_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS", "6000")
        .env("SYNC_KAFKA_OPT_HEARTBEAT_INTERVAL_MS", "500")
        .env("SYNC_REVOKE_DEADLINE_MS", "4000")
        .env("SYNC_COMMIT_INTERVAL_MS", "200")
        .env("SYNC_LOG", "warn")
        .env("SYNC_WAL_DIR", std::env::temp_dir().join(format!("sync-engine-wal-{}", names.group)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in extra {
        command.env(name, value);
    }
    command.spawn().expect("worker process starts")
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} failed");
}

async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

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
        committed_before_kill = tokio::task::spawn_blocking(move || committed(&names, PARTITIONS).values().sum::<i64>()).await.unwrap();
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
    let ready = eventually(Duration::from_secs(30), || http_get(port, "/health/ready").is_some_and(|r| r.starts_with("HTTP/1.0 200"))).await;
    assert!(ready, "the restarted worker reports ready");
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    assert_eq!(committed, ends.0, "after the restart every offset is committed");

    let metrics = http_get(port, "/metrics").expect("metrics endpoint answers");
    for name in ["sync_records_consumed_total", "sync_items_settled_total", "sync_batch_items", "sync_flush_duration_seconds", "sync_bytes_in_flight_bytes"] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert!(http_get(port, "/health/live").unwrap().starts_with("HTTP/1.0 200"));

    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30)).await.expect("SIGTERM stops the worker within its grace period");
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
    let mut workload = Workload::new(sync_engine::workload::WorkloadSpec { item_bytes: 4096, ..spec(&names, 15_000, 15_000) });
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
