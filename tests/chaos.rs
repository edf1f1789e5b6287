//! Faults, counted: every produced item is checked in L3 and L2 after recovery.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::config::{Secret, SyncEngineConfig};
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

fn wal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(|entry| entry.ok()?.metadata().ok()).map(|meta| meta.len().saturating_sub(8)).sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_down_for_fifteen_seconds_the_wal_settles_and_drains_and_the_final_state_is_exact() {
    let names = Names::new("mysql_down");
    let port = free_port();
    private_mariadb("start", port);
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    let wal_dir = tempfile::tempdir().unwrap();
    create_topic(&names.topic, PARTITIONS).await;
    let config = SyncEngineConfig {
        sql_url: Some(Secret::new(url.clone())),
        wal_dir: Some(wal_dir.path().to_owned()),
        breaker_failures: 1,
        breaker_cool_down: Duration::from_millis(500),
        ..engine_config(&names)
    };
    let worker = InProcessWorker::start_with(config, kafka_config(&names)).await;
    let mut workload = Workload::new(spec(&names, 20_000, 5_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let before: Vec<_> = workload.by_ref().take(5_000).collect();
    let mut ends = publish_all(&producer, before, 0, || {}).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || worker.stats.stored.load(Ordering::Relaxed) >= 5_000).await);

    private_mariadb("kill", port);
    let down_at = Instant::now();
    let during: Vec<_> = workload.by_ref().collect();
    publish_more(&producer, during, &mut ends).await;
    // With MySQL down, everything still settles (in the WAL) and every offset commits.
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(60)).await;
    assert_eq!(committed, ends.0, "offsets must commit while MySQL is down: the WAL settles them");
    let logged = wal_bytes(wal_dir.path());
    assert!(logged > 0, "the WAL must hold the batches MySQL could not take");
    let stats = worker.engine.wal_stats().expect("the engine has a WAL");
    assert!(stats.bytes > 0 && stats.segments > 0, "wal_stats shows what the log holds: {stats:?}");
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(down_at.elapsed())).await;

    private_mariadb("start", port);
    let up_at = Instant::now();
    let dir = wal_dir.path().to_owned();
    let drained = eventually(Duration::from_secs(60), move || wal_bytes(&dir) == 0).await;
    let recovery = up_at.elapsed();
    assert!(drained, "the WAL must drain once MySQL is back");
    assert_eq!(worker.engine.wal_stats().map(|stats| stats.bytes), Some(0), "wal_stats follows the drain");
    worker.stop().await;

    let produced = workload.expected().len();
    let l3 = compare(&workload, &l3_rows_at(&url, &names).await);
    let l2 = compare_l2(&names, &workload).await;
    eprintln!(
        "chaos mysql_down: records 20000, ids {produced}, L3 mismatches {}, L2 mismatches {}, down {:.1}s, \
         WAL held {} KiB, drained in {:.1}s ({:.0} KiB/s)",
        l3.len(),
        l2.len(),
        up_at.duration_since(down_at).as_secs_f64(),
        logged / 1024,
        recovery.as_secs_f64(),
        logged as f64 / 1024.0 / recovery.as_secs_f64().max(0.001)
    );
    assert_eq!(l3, Vec::<String>::new());
    assert_eq!(l2, Vec::<String>::new());
    private_mariadb("remove", port);
}

/// A worker process on the private MariaDB that turns to its WAL at the first failure.
fn wal_worker_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SYNC_SQL_URL", url.to_owned()),
        ("SYNC_BREAKER_FAILURES", "1".to_owned()),
        ("SYNC_BREAKER_COOLDOWN_MS", "500".to_owned()),
    ]
}

async fn table_rows(url: &str, table: &str) -> i64 {
    let Ok(pool) = sqlx::mysql::MySqlPoolOptions::new().max_connections(1).connect(url).await else { return -1 };
    let count = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}")).fetch_one(&pool).await.unwrap_or(-1);
    pool.close().await;
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_its_wal_drains_finishes_the_drain_after_restart() {
    let names = Names::new("wal_kill");
    let port = free_port();
    private_mariadb("start", port);
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    create_topic(&names.topic, PARTITIONS).await;
    let wal_dir = names.wal_dir();
    let mut env = wal_worker_env(&url);
    env.push(("SYNC_BATCH_MAX_ITEMS", "200".to_owned()));
    let metrics_port = free_port();
    let mut worker = spawn_worker(&names, metrics_port, &env);
    let ready = wait_ready(metrics_port, Duration::from_secs(30)).await;
    assert!(ready);
    private_mariadb("kill", port);

    let mut workload =
        Workload::new(sync_engine::workload::WorkloadSpec { item_bytes: 1024, ..spec(&names, 30_000, 30_000) });
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let ends = publish_all(&producer, workload.by_ref(), 0, || {}).await.unwrap();
    producer.flush();
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(90)).await;
    assert_eq!(committed, ends.0, "everything settles in the WAL while MySQL is down");
    let logged = wal_bytes(&wal_dir);
    assert!(logged > 1 << 20, "the WAL holds the batches: {logged} bytes");

    // MySQL returns; kill the worker as soon as the drain has written some rows.
    private_mariadb("start", port);
    let table = names.table.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rows = 0;
    while rows <= 0 && Instant::now() < deadline {
        rows = table_rows(&url, &table).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&worker, "KILL");
    wait_exit(&mut worker, Duration::from_secs(10)).await.expect("killed");
    let left = wal_bytes(&wal_dir);
    assert!(rows > 0 && left > 0, "the kill must land mid-drain: {rows} rows in L3, {left} WAL bytes left");

    let restarted_at = Instant::now();
    let mut worker = spawn_worker(&names, metrics_port, &env);
    let dir = wal_dir.clone();
    let drained = eventually(Duration::from_secs(60), move || wal_bytes(&dir) == 0).await;
    let drain_time = restarted_at.elapsed();
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.is_some_and(|status| status.success()));
    assert!(drained, "the restarted worker drains the leftover WAL");

    let l3 = compare(&workload, &l3_rows_at(&url, &names).await);
    let l2 = compare_l2(&names, &workload).await;
    eprintln!(
        "chaos wal_kill: records 30000, ids {}, L3 mismatches {}, L2 mismatches {}, WAL {} KiB, killed with {} KiB left, \
         restart drained it in {:.1}s",
        workload.expected().len(),
        l3.len(),
        l2.len(),
        logged / 1024,
        left / 1024,
        drain_time.as_secs_f64()
    );
    assert_eq!(l3, Vec::<String>::new());
    assert_eq!(l2, Vec::<String>::new());
    private_mariadb("remove", port);
    let _ = std::fs::remove_dir_all(&wal_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_wal_tail_after_a_crash_is_cut_at_restart_and_the_final_state_is_exact() {
    let names = Names::new("wal_torn");
    let port = free_port();
    private_mariadb("start", port);
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    create_topic(&names.topic, PARTITIONS).await;
    let wal_dir = names.wal_dir();
    let env = wal_worker_env(&url);
    let metrics_port = free_port();
    let mut worker = spawn_worker(&names, metrics_port, &env);
    assert!(wait_ready(metrics_port, Duration::from_secs(30)).await);
    private_mariadb("kill", port);
    let mut workload = Workload::new(spec(&names, 8_000, 3_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let ends = publish_all(&producer, workload.by_ref(), 0, || {}).await.unwrap();
    producer.flush();
    assert_eq!(wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(90)).await, ends.0);
    signal(&worker, "KILL");
    wait_exit(&mut worker, Duration::from_secs(10)).await.expect("killed");

    // A crash in the middle of an append: a frame header announcing 4 KiB, and only 100 of
    // them on disk. That append was never fsynced, so nothing of it was settled or committed.
    let mut segments: Vec<_> = std::fs::read_dir(&wal_dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    segments.sort();
    let newest = segments.last().expect("a WAL segment");
    let mut torn = Vec::new();
    torn.extend_from_slice(&4096u32.to_le_bytes());
    torn.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    torn.extend_from_slice(&[7u8; 100]);
    let mut segment = std::fs::OpenOptions::new().append(true).open(newest).unwrap();
    std::io::Write::write_all(&mut segment, &torn).unwrap();
    segment.sync_all().unwrap();

    private_mariadb("start", port);
    let mut worker = spawn_worker(&names, metrics_port, &env);
    let dir = wal_dir.clone();
    assert!(
        eventually(Duration::from_secs(60), move || wal_bytes(&dir) == 0).await,
        "the WAL drains after the restart"
    );
    let metrics = http_get(metrics_port, "/metrics").unwrap_or_default();
    signal(&worker, "TERM");
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.is_some_and(|status| status.success()));
    let torn_metric =
        metrics.lines().find(|line| line.starts_with("sync_wal_torn_bytes_total")).unwrap_or("").to_owned();
    assert!(torn_metric.ends_with(" 108"), "recovery reports the 108 torn bytes: {torn_metric:?}");

    let l3 = compare(&workload, &l3_rows_at(&url, &names).await);
    let l2 = compare_l2(&names, &workload).await;
    eprintln!(
        "chaos wal_torn: records 8000, ids {}, L3 mismatches {}, L2 mismatches {}, torn bytes cut 108",
        workload.expected().len(),
        l3.len(),
        l2.len()
    );
    assert_eq!(l3, Vec::<String>::new());
    assert_eq!(l2, Vec::<String>::new());
    private_mariadb("remove", port);
    let _ = std::fs::remove_dir_all(&wal_dir);
}
