//! Issue 6, item 6, end to end: a stream with out-of-order versions and deletes is ingested
//! with a 2 s L2 TTL, the entries expire, the group is reset to the middle of each partition
//! and the worker runs again. Every id present in L2 must then hold exactly what L3 holds.
//! Before the fix, L2 took the replayed older versions that L3 refused.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sync_engine::config::SyncEngineConfig;
use sync_engine::workload::{Workload, WorkloadSpec};

const PARTITIONS: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_the_middle_after_l2_expiry_leaves_l2_agreeing_with_l3() {
    let names = Names::new("replay_l2");
    create_topic(&names.topic, PARTITIONS).await;
    // Few records per id and many out of order: an id's newest version often sits in the
    // first half while an older one comes after the middle, which the replay delivers alone.
    let mut workload = Workload::new(WorkloadSpec { out_of_order_share: 0.5, ..spec(&names, 6_000, 2_000) });
    let ends = produce(&names, &mut workload).await;
    let config = SyncEngineConfig { redis_ttl_secs: 2, ..engine_config(&names) };

    let first = InProcessWorker::start_with(config.clone(), kafka_config(&names)).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(60)).await;
    assert_eq!(committed, ends.0, "the first run commits everything");
    first.stop().await;
    let ids: Vec<String> = workload.expected().keys().cloned().collect();
    let expired = eventually_l2_empty(&names, &ids).await;
    assert!(expired, "L2 entries expire after 2 s");

    let middle: HashMap<i32, i64> = ends.0.iter().map(|(partition, end)| (*partition, end / 2)).collect();
    reset_to(&names, &middle);
    let second = InProcessWorker::start_with(config, kafka_config(&names)).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(60)).await;
    assert_eq!(committed, ends.0, "the replay commits everything");
    second.stop().await;

    let l3: HashMap<String, (u64, [u8; 32], bool)> =
        l3_rows(&names).await.into_iter().map(|row| (row.id, (row.version, row.content_hash, row.deleted))).collect();
    let l2 = l2_state(&names, ids.into_iter()).await;
    let mut present = 0;
    let mut stale = Vec::new();
    for (id, entry) in &l2 {
        let Some((version, hash, _ttl)) = entry else { continue };
        present += 1;
        let (l3_version, l3_hash, l3_deleted) = l3[id];
        let agrees = *version == l3_version && hash.is_none() == l3_deleted && hash.is_none_or(|h| h == l3_hash);
        if !agrees {
            stale
                .push(format!("{id}: L2 v{version} deleted={}, L3 v{l3_version} deleted={l3_deleted}", hash.is_none()));
        }
    }
    eprintln!("replay l2: {} ids, {present} in L2 after the replay, {} disagree with L3", l2.len(), stale.len());
    assert!(present > 0, "the replay wrote L2 again");
    assert!(stale.is_empty(), "{} ids in L2 disagree with L3, e.g. {:?}", stale.len(), &stale[..stale.len().min(5)]);
}

/// Waits until none of the ids has an L2 entry (their TTL passed).
async fn eventually_l2_empty(names: &Names, ids: &[String]) -> bool {
    for _ in 0..50 {
        let state = l2_state(names, ids.iter().cloned()).await;
        if state.values().all(Option::is_none) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
