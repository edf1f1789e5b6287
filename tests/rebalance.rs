//! Rebalances and shutdown against the real broker: partitions paused for memory pressure
//! come back after a reassignment, and a worker stopped with a full backlog commits exactly
//! what it settled.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sync_engine::workload::{Workload, WorkloadSpec};

const PARTITIONS: i32 = 4;

/// Small batches keep a worker busy, so its backlog stays in flight.
fn slow_engine(names: &Names) -> sync_engine::SyncEngineConfig {
    sync_engine::config::SyncEngineConfig {
        batch: sync_engine::batch::BatchConfig { max_items: 50, ..sync_engine::SyncEngineConfig::in_memory().batch },
        ..engine_config(names)
    }
}

// librdkafka resets only its own pause flag when partitions are unassigned, not the
// application's: a worker paused at a revoke gets the same partitions back still paused,
// while before the fix it believed them unpaused (it even "resumed" the empty assignment
// between the revoke and the assign), so they stayed paused for ever. To be sure the first
// worker is paused when the revoke begins, its L3 table is locked: nothing settles, its
// budget fills up. The lock is released while the revoke waits, so the revoke settles
// everything and the worker comes out of it far below its pause threshold. The second worker
// keeps items in L1 only (its engine must not wait on the locked table to start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_at_a_revoke_resumes_the_partitions_it_gets_back() {
    use sqlx::{Connection, Executor};
    let names = Names::new("repause");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(WorkloadSpec { item_bytes: 2048, ..spec(&names, 12_000, 4_000) });
    let ends = produce(&names, &mut workload).await;
    let budget = 2u64 << 20; // the backlog is ~24 MiB
    let kafka = sync_engine::config::KafkaConfig {
        memory_budget_bytes: budget,
        revoke_deadline: Duration::from_secs(20),
        ..kafka_config(&names)
    };

    let first = InProcessWorker::start_with(slow_engine(&names), kafka.clone()).await;
    let started = eventually(Duration::from_secs(30), || first.stats.stored.load(Ordering::Relaxed) > 0).await;
    assert!(started, "the first worker stores items");
    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", names.table).as_str()).await.unwrap();
    // Nothing settles now: within seconds the worker holds its whole budget, paused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(first.stats.pauses.load(Ordering::Relaxed) > 0, "with L3 locked the first worker pauses");

    let second = InProcessWorker::start_with(sync_engine::SyncEngineConfig::in_memory(), kafka).await;
    // The revoke begins within a few heartbeats and waits (up to its deadline) for the
    // first worker's items; they settle once the table is unlocked.
    tokio::time::sleep(Duration::from_secs(8)).await;
    locker.execute("UNLOCK TABLES").await.unwrap();
    let unlocked = std::time::Instant::now();
    let mut seen = String::new();
    let split = eventually(Duration::from_secs(40), || {
        let (a, b) = (
            first.stats.assigned_partitions.load(Ordering::Relaxed),
            second.stats.assigned_partitions.load(Ordering::Relaxed),
        );
        seen = format!("first {}, second {}", worker_state(&first), worker_state(&second));
        a > 0 && b > 0 && a + b == PARTITIONS as u64
    })
    .await;
    eprintln!("{:.1} s after the unlock: {seen}", unlocked.elapsed().as_secs_f64());
    assert!(split, "the partitions must be split between the two workers; last seen: {seen}");
    assert!(first.stats.revokes.load(Ordering::Relaxed) > 0, "the first worker went through a revoke");

    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(60)).await;
    first.stop().await;
    second.stop().await;
    assert_eq!(committed, ends.0, "every partition, paused before the rebalance or not, reaches its end");
}

/// What a failed wait reports about a worker.
fn worker_state(worker: &InProcessWorker) -> String {
    let s = &worker.stats;
    format!(
        "(assigned {}, revokes {}, pauses {}, consumed {}, stored {})",
        s.assigned_partitions.load(Ordering::Relaxed),
        s.revokes.load(Ordering::Relaxed),
        s.pauses.load(Ordering::Relaxed),
        s.consumed.load(Ordering::Relaxed),
        s.stored.load(Ordering::Relaxed)
    )
}

// Shutdown under load: the consumer thread is still handing over a large backlog when the
// worker stops fetching. The final commit must still reach the broker, and it must be
// exactly the settled watermark: every record stored, and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_under_load_commits_exactly_what_it_settled() {
    let names = Names::new("stopload");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload =
        Workload::new(WorkloadSpec { duplicate_share: 0.0, item_bytes: 1024, ..spec(&names, 100_000, 25_000) });
    let ends = produce(&names, &mut workload).await;
    let total: i64 = ends.0.values().sum();
    // No timer commit before the stop: whatever is committed comes from the final commit.
    let kafka = sync_engine::config::KafkaConfig {
        commit_interval: Duration::from_secs(3600),
        memory_budget_bytes: 1 << 30,
        ..kafka_config(&names)
    };
    let worker = InProcessWorker::start_with(slow_engine(&names), kafka).await;
    let stats = worker.stats.clone();
    // Stop as soon as something settled: the consumer thread is still fetching the backlog.
    let busy = eventually(Duration::from_secs(60), || stats.stored.load(Ordering::Relaxed) >= 100).await;
    assert!(busy, "the worker must be storing items before it is stopped");
    worker.stop().await;

    let stored = stats.stored.load(Ordering::Relaxed) as i64;
    let consumed = stats.consumed.load(Ordering::Relaxed) as i64;
    let names_now = names.clone();
    let committed = tokio::task::spawn_blocking(move || committed(&names_now, PARTITIONS)).await.unwrap();
    let committed_total: i64 = committed.values().sum();
    eprintln!("stopped with {stored} stored and {consumed} consumed of {total}; committed {committed_total}");
    assert!(stored < total, "the stop must land mid-backlog: {stored} stored, {consumed} consumed of {total}");
    assert_eq!(
        committed_total, stored,
        "the final commit must be the settled watermark ({committed:?}): every stored record and no other"
    );
}
