//! The library API against real MariaDB and a real Redis Cluster: submit, read-through
//! fallback L1 → L2 → L3 with fills, versioned deletes, tier routing, shutdown flushing.

mod common;

use std::time::Duration;

use common::*;
use sync_engine::storage::redis::RedisStore;
use sync_engine::CacheStore;
use sync_engine::{CacheTtl, SubmitOptions, SyncEngine, SyncEngineConfig, SyncItem, Tier, Tiers};
use tokio::sync::watch;

async fn engine(config: SyncEngineConfig) -> SyncEngine {
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_from_l1_to_l2_to_l3_and_fill_the_faster_tiers() {
    let names = Names::new("engine_get");
    let writer = engine(engine_config(&names)).await;
    let item = SyncItem::from_json("uk.nhs.patient.1".into(), &serde_json::json!({"name": "Ada"})).with_version(10);
    assert_eq!(writer.submit(item.clone()).await.unwrap(), Tier::L3);
    assert_eq!(writer.get("uk.nhs.patient.1").await.unwrap().unwrap().content_as_json().unwrap()["name"], "Ada");
    writer.shutdown_within(Duration::from_secs(5)).await;

    // A fresh engine has an empty L1: the read comes from L2.
    let reader = engine(engine_config(&names)).await;
    let got = reader.get("uk.nhs.patient.1").await.unwrap().expect("found in L2");
    assert_eq!((got.version, got.content.clone()), (10, item.content.clone()));

    // Remove the L2 copy: a third engine must find it in L3 and refill L2.
    let redis = RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap();
    let client = redis::cluster::ClusterClient::new(redis_urls()).unwrap();
    let mut connection = client.get_async_connection().await.unwrap();
    let _: () = redis::AsyncCommands::del(&mut connection, redis.key("uk.nhs.patient.1")).await.unwrap();
    assert!(redis.get("uk.nhs.patient.1").await.unwrap().is_none());
    let third = engine(engine_config(&names)).await;
    assert_eq!(third.get("uk.nhs.patient.1").await.unwrap().expect("found in L3").version, 10);
    assert_eq!(redis.get("uk.nhs.patient.1").await.unwrap().expect("L2 refilled").version, 10);
    assert!(third.get("uk.nhs.patient.missing").await.unwrap().is_none());
    third.shutdown_within(Duration::from_secs(5)).await;
    reader.shutdown_within(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_wins_and_a_delete_is_a_versioned_tombstone() {
    let names = Names::new("engine_order");
    let engine = engine(engine_config(&names)).await;
    engine.submit(SyncItem::new("a.b", b"new".to_vec()).with_version(5)).await.unwrap();
    engine.submit(SyncItem::new("a.b", b"old".to_vec()).with_version(4)).await.unwrap();
    assert_eq!(engine.get("a.b").await.unwrap().unwrap().content.as_deref(), Some(&b"new"[..]));
    engine.delete("a.b").await.unwrap();
    assert!(engine.get("a.b").await.unwrap().is_none());
    // A replayed older upsert cannot resurrect it, in L3 or in L2.
    engine.submit(SyncItem::new("a.b", b"old".to_vec()).with_version(5)).await.unwrap();
    engine.shutdown_within(Duration::from_secs(5)).await;
    let rows = l3_rows(&names).await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].deleted && rows[0].version > 5);
    let redis = RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap();
    assert!(redis.get("a.b").await.unwrap().unwrap().is_tombstone());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_route_items_and_ttls_reach_l2() {
    let names = Names::new("engine_tiers");
    let engine = engine(engine_config(&names)).await;
    let l2_only = SubmitOptions {
        tiers: Tiers { l1: false, l2: true, l3: false },
        redis_ttl: CacheTtl::After(Duration::from_secs(60)),
    };
    assert_eq!(engine.submit_with(SyncItem::new("only.l2", b"x".to_vec()), l2_only).await.unwrap(), Tier::L2);
    let l1_only = SubmitOptions { tiers: Tiers { l1: true, l2: false, l3: false }, redis_ttl: CacheTtl::Default };
    assert_eq!(engine.submit_with(SyncItem::new("only.l1", b"y".to_vec()), l1_only).await.unwrap(), Tier::L1);
    let forever = SubmitOptions { redis_ttl: CacheTtl::Forever, ..SubmitOptions::default() };
    engine.submit_with(SyncItem::new("forever", b"z".to_vec()), forever).await.unwrap();
    engine.shutdown_within(Duration::from_secs(5)).await;

    let ids = ["only.l2", "only.l1", "forever"].map(String::from);
    let l2 = l2_state(&names, ids.into_iter()).await;
    let ttl = |id: &str| l2[id].map(|(_, _, ttl)| ttl);
    assert!(ttl("only.l2").is_some_and(|ttl| (1..=60).contains(&ttl)), "{:?}", ttl("only.l2"));
    assert_eq!(ttl("only.l1"), None, "an L1-only item never reaches L2");
    assert_eq!(ttl("forever"), Some(-1), "ttl 0 means no expiry");
    let rows: Vec<String> = l3_rows(&names).await.into_iter().map(|row| row.id).collect();
    assert_eq!(rows, vec!["forever".to_owned()], "only the default-routed item reaches L3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_every_accepted_item() {
    let names = Names::new("engine_shutdown");
    let config = SyncEngineConfig {
        batch: sync_engine::batch::BatchConfig {
            max_delay: Duration::from_secs(60),
            ..SyncEngineConfig::in_memory().batch
        },
        ..engine_config(&names)
    };
    let engine = engine(config).await;
    let mut receipts = Vec::new();
    for index in 0..250 {
        receipts.push(
            engine.enqueue(SyncItem::new(format!("s.{index}"), b"v".to_vec()), SubmitOptions::default()).await.unwrap(),
        );
    }
    // The batch is far from full and its age limit is a minute: only shutdown flushes it.
    engine.shutdown_within(Duration::from_secs(10)).await;
    for receipt in receipts {
        assert_eq!(receipt.await, Ok(Tier::L3));
    }
    assert_eq!(l3_rows(&names).await.len(), 250);
    assert!(engine.enqueue(SyncItem::new("late", b"v".to_vec()), SubmitOptions::default()).await.is_err());
}

/// Issue 6, item 6: each tier used to be guarded only against what it holds itself, so once
/// an L2 entry expired an older version (or an upsert older than a delete) replayed later
/// was refused by L3 but taken by L1 and L2. The end state must be: an id present in L1 or
/// L2 holds the version L3 holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_l2_expiry_an_older_replay_l3_refuses_never_reaches_l1_or_l2() {
    let names = Names::new("engine_stale_l2");
    let config = SyncEngineConfig { redis_ttl_secs: 1, ..engine_config(&names) };
    let writer = engine(config.clone()).await;
    writer.submit(SyncItem::new("p.upserted", b"new".to_vec()).with_version(5)).await.unwrap();
    writer.submit(SyncItem::tombstone("p.deleted", 5)).await.unwrap();
    writer.shutdown_within(Duration::from_secs(5)).await;
    let redis = RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap();
    assert!(wait_until_gone(&redis, &["p.upserted", "p.deleted"]).await, "L2 entries expire after 1 s");

    // A fresh engine (empty L1) replays older versions: L3 refuses them.
    let replayer = engine(config).await;
    replayer.submit(SyncItem::new("p.upserted", b"old".to_vec()).with_version(3)).await.unwrap();
    replayer.submit(SyncItem::new("p.deleted", b"zombie".to_vec()).with_version(4)).await.unwrap();
    let rows = l3_rows(&names).await;
    assert_eq!(
        rows.iter().map(|row| (row.id.as_str(), row.version)).collect::<Vec<_>>(),
        [("p.deleted", 5), ("p.upserted", 5)]
    );
    for id in ["p.upserted", "p.deleted"] {
        if let Some(in_l2) = redis.get(id).await.unwrap() {
            assert_eq!(in_l2.version, 5, "L2 holds a version L3 refused for {id}");
        }
    }
    let read = replayer.get("p.upserted").await.unwrap().expect("the newest upsert is readable");
    assert_eq!((read.version, read.content.as_deref()), (5, Some(&b"new"[..])), "L1 answered a version L3 refused");
    assert!(replayer.get("p.deleted").await.unwrap().is_none(), "a delete was resurrected by an older upsert");
    replayer.shutdown_within(Duration::from_secs(5)).await;
}

/// Waits until none of these ids is in L2 (their TTL passed).
async fn wait_until_gone(redis: &RedisStore, ids: &[&str]) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let mut present = false;
        for id in ids {
            present |= redis.get(id).await.unwrap().is_some();
        }
        if !present {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

// The lifecycle through the `watch` receiver: Connecting while `start` waits on a backend,
// back to Created when it fails, Running after a good start, Draining then Stopped on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_state_follows_its_life_and_a_failed_start_returns_to_created() {
    use sync_engine::EngineState;

    // A "Redis" that accepts connections and never answers: start stays in Connecting until
    // the connect gives up.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let names = Names::new("engine_state");
    let stuck =
        SyncEngineConfig { redis_url: Some(format!("redis://127.0.0.1:{port}").into()), ..engine_config(&names) };
    let mut engine = SyncEngine::new(stuck.clone(), watch::channel(stuck).1);
    let mut states = engine.state_receiver();
    assert_eq!(*states.borrow(), EngineState::Created);
    let starting = tokio::spawn(async move {
        let result = engine.start().await;
        (engine, result)
    });
    let connecting =
        tokio::time::timeout(Duration::from_secs(10), states.wait_for(|state| *state == EngineState::Connecting));
    assert!(connecting.await.is_ok(), "start announces Connecting");
    let (engine, result) =
        tokio::time::timeout(Duration::from_secs(60), starting).await.expect("start gives up").unwrap();
    assert!(result.is_err(), "a Redis that never answers fails the start");
    assert_eq!(engine.state(), EngineState::Created);
    holding.abort();

    let config = engine_config(&names);
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    let mut states = engine.state_receiver();
    let recorder = tokio::spawn(async move {
        let mut seen = Vec::new();
        while states.changed().await.is_ok() {
            let state = *states.borrow_and_update();
            seen.push(state);
            if state == EngineState::Stopped {
                break;
            }
        }
        seen
    });
    engine.start().await.expect("engine starts");
    assert_eq!(engine.state(), EngineState::Running);
    engine.submit(sync_engine::SyncItem::new("state.1", b"x".to_vec())).await.expect("submitted");
    engine.shutdown_within(Duration::from_secs(5)).await;
    assert_eq!(engine.state(), EngineState::Stopped);
    let seen = tokio::time::timeout(Duration::from_secs(5), recorder).await.expect("recorder ends").unwrap();
    // A watch keeps only the latest value, so quick steps may merge; the order never changes.
    let order = [EngineState::Connecting, EngineState::Running, EngineState::Draining, EngineState::Stopped];
    let positions: Vec<usize> =
        seen.iter().map(|state| order.iter().position(|o| o == state).expect("known")).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "states in lifecycle order: {seen:?}");
    assert_eq!(seen.last(), Some(&EngineState::Stopped));
}
