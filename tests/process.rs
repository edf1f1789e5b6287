//! The worker as a real process: `kill -9` mid-stream, restart, SIGTERM, health and metrics,
//! and peak memory under a small budget.

mod common;

use std::time::Duration;

use common::*;
use sync_engine::demo::compare;
use sync_engine::workload::Workload;

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
