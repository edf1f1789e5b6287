//! Live reconfiguration of the worker process: `SYNC_ENV_FILE` overrides the environment,
//! SIGHUP applies a valid file's live settings (here the default L2 TTL, observed on the keys
//! written after it), keeps restart-only settings (the group) at their running value, and
//! refuses an invalid file whole.

mod common;

use std::time::Duration;

use common::*;
use sync_engine::kafka::producer::{EndOffsets, ItemProducer};
use sync_engine::workload::{Workload, WorkloadSpec};

const PARTITIONS: i32 = 2;

/// The L2 TTLs of the workload's ids (every id must be in L2).
async fn ttls(names: &Names, workload: &Workload) -> Vec<i64> {
    let state = l2_state(names, workload.expected().keys().cloned()).await;
    state.into_iter().map(|(id, entry)| entry.unwrap_or_else(|| panic!("{id} is not in L2")).2).collect()
}

/// Publishes a workload of fresh ids (its own prefix) and waits until all of it is committed.
async fn run_phase(names: &Names, producer: &ItemProducer, ends: &mut EndOffsets, phase: &str) -> Workload {
    let spec = WorkloadSpec { id_prefix: format!("uk.nhs.{}.{phase}", names.group), ..spec(names, 300, 100) };
    let mut workload = Workload::new(spec);
    publish_more(producer, workload.by_ref().collect(), ends).await;
    let committed = wait_for_commits(names, PARTITIONS, ends, Duration::from_secs(60)).await;
    assert_eq!(&committed, &ends.0, "phase {phase} is committed");
    workload
}

async fn reloads(port: u16, outcome: &str) -> u64 {
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    let prefix = format!("sync_config_reloads_total{{outcome=\"{outcome}\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_live_settings_from_the_env_file_and_refuses_an_invalid_one() {
    let names = Names::new("reload");
    create_topic(&names.topic, PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("sync.env");
    // The process environment says 3600 s (spawn_worker): the file wins.
    std::fs::write(&env_file, "# live settings\nSYNC_REDIS_TTL_SECS=1000\n").unwrap();
    let port = free_port();
    let mut worker = spawn_worker(&names, port, &[("SYNC_ENV_FILE", env_file.display().to_string())]);
    assert!(wait_ready(port, Duration::from_secs(30)).await, "the worker starts");
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let mut ends = EndOffsets::default();

    let first = run_phase(&names, &producer, &mut ends, "a").await;
    let first_ttls = ttls(&names, &first).await;
    assert!(first_ttls.iter().all(|ttl| (900..=1000).contains(ttl)), "the file's TTL applies: {first_ttls:?}");

    // A valid change: the TTL applies live; the group id needs a restart and stays.
    std::fs::write(
        &env_file,
        "SYNC_REDIS_TTL_SECS=200\nSYNC_MEMORY_BUDGET_BYTES=100000000\nSYNC_KAFKA_GROUP_ID=another-group\n",
    )
    .unwrap();
    signal(&worker, "HUP");
    assert!(eventually(Duration::from_secs(10), || futures::executor::block_on(reloads(port, "applied")) == 1).await);
    // Phase b commits in the original group (run_phase waits on names.group's offsets).
    let second = run_phase(&names, &producer, &mut ends, "b").await;
    let second_ttls = ttls(&names, &second).await;
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    assert!(metrics.contains("sync_memory_budget_bytes 100000000"), "the budget applies live");
    assert!(second_ttls.iter().all(|ttl| (100..=200).contains(ttl)), "the new TTL applies live: {second_ttls:?}");

    // An invalid file is refused whole: the TTL in it does not apply either.
    std::fs::write(&env_file, "SYNC_REDIS_TTL_SECS=5000\nSYNC_BATCH_MAX_ITEMS=lots\n").unwrap();
    signal(&worker, "HUP");
    assert!(eventually(Duration::from_secs(10), || futures::executor::block_on(reloads(port, "refused")) == 1).await);
    let third = run_phase(&names, &producer, &mut ends, "c").await;
    let third_ttls = ttls(&names, &third).await;
    assert!(third_ttls.iter().all(|ttl| (100..=200).contains(ttl)), "the running TTL stays: {third_ttls:?}");
    assert_eq!(reloads(port, "applied").await, 1);

    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30)).await.expect("SIGTERM stops the worker");
    assert!(status.success(), "exit 0 after reloads, got {status}");
}
