//! One contract, every store: the same checks run against the in-memory stores and the real
//! ones (MariaDB and SQLite for `ArchiveStore`; standalone Redis and Redis Cluster for
//! `CacheStore`), so the in-memory stores the demo and tests use behave as the real ones do.
//! Then an engine built on the in-memory stores, including an L3 that goes away (the WAL).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, mysql_url, redis_urls, Names};
use sync_engine::storage::redis::{L2Op, RedisStore};
use sync_engine::storage::sql::{HeldRow, Selection, SqlStore};
use sync_engine::{ArchiveStore, CacheStore, MemoryArchiveStore, MemoryCacheStore, Origin, SyncEngine, SyncItem, Tier};
use tokio::sync::watch;

fn standalone_url() -> String {
    std::env::var("SYNC_TEST_REDIS_STANDALONE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

fn at(item: SyncItem, partition: i32, offset: i64) -> SyncItem {
    item.with_origin(Origin { topic: Arc::from("contract"), partition, offset })
}

fn item(id: &str, version: u64, content: &str) -> SyncItem {
    SyncItem::new(id, content.as_bytes().to_vec()).with_version(version)
}

fn content(item: &Option<SyncItem>) -> Option<(u64, String)> {
    item.as_ref()
        .map(|item| (item.version, String::from_utf8_lossy(item.content.as_deref().unwrap_or_default()).into_owned()))
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Invariant 2 in L3, and the rows a write reports back.
async fn archive_guards_versions(store: &dyn ArchiveStore) {
    let v2 = at(item("p.1", 2, "two"), 0, 10);
    let held = store.write_batch(&[&v2], TIMEOUT).await.expect("write");
    assert!(held["p.1"].is(&v2), "{}: L3 reports the row it now holds", store.kind());

    let v1 = at(item("p.1", 1, "one"), 0, 20);
    let held = store.write_batch(&[&v1], TIMEOUT).await.expect("write");
    assert!(held["p.1"].is(&v2) && !held["p.1"].is(&v1), "{}: an older version is refused", store.kind());

    let other_partition = at(item("p.1", 2, "other partition"), 1, 99);
    store.write_batch(&[&other_partition], TIMEOUT).await.expect("write");
    let later_offset = at(item("p.1", 2, "later offset"), 0, 11);
    store.write_batch(&[&later_offset], TIMEOUT).await.expect("write");
    assert_eq!(
        content(&store.get("p.1").await.unwrap()),
        Some((2, "later offset".into())),
        "{}: at equal versions only a later offset of the same partition wins",
        store.kind()
    );

    let tombstone = SyncItem::tombstone("p.1", 3);
    store.write_batch(&[&tombstone], TIMEOUT).await.expect("write");
    store.write_batch(&[&item("p.1", 2, "replayed")], TIMEOUT).await.expect("write");
    assert_eq!(store.live("p.1").await.unwrap(), Some(false), "{}: a tombstone is not resurrected", store.kind());
    assert_eq!(store.live("p.absent").await.unwrap(), None, "{}", store.kind());

    // One batch that inserts, updates and is refused: each id reports what it holds.
    let (old, newer) = (at(item("m.old", 5, "five"), 0, 1), at(item("m.new", 1, "one"), 0, 2));
    store.write_batch(&[&old, &newer], TIMEOUT).await.expect("write");
    let refused = at(item("m.old", 4, "four"), 0, 3);
    let applied = at(item("m.new", 2, "two"), 0, 4);
    let inserted = at(item("m.fresh", 1, "fresh"), 0, 5);
    let held = store.write_batch(&[&refused, &applied, &inserted], TIMEOUT).await.expect("write");
    assert_eq!(held.len(), 3, "{}: one held row per id", store.kind());
    assert!(held["m.old"].is(&old), "{}: the refused row reports the version it kept", store.kind());
    assert!(held["m.new"].is(&applied), "{}: the updated row reports the new version", store.kind());
    assert!(held["m.fresh"].is(&inserted), "{}: the inserted row reports itself", store.kind());

    // An id twice in one batch, either order: it reports the newer, which is what it holds.
    let (twice_2, twice_3) = (at(item("m.twice", 2, "two"), 0, 6), at(item("m.twice", 3, "three"), 0, 7));
    let held = store.write_batch(&[&twice_2, &twice_3], TIMEOUT).await.expect("write");
    assert!(held["m.twice"].is(&twice_3), "{}: older then newer reports the newer", store.kind());
    let (twice_4, twice_5) = (at(item("m.twice", 4, "four"), 0, 8), at(item("m.twice", 5, "five"), 0, 9));
    let held = store.write_batch(&[&twice_5, &twice_4], TIMEOUT).await.expect("write");
    assert!(held["m.twice"].is(&twice_5), "{}: newer then older reports the newer", store.kind());
}

/// Multi-id reads, prefix and state selections with the dot boundary, keyset pages.
async fn archive_reads_and_selects(store: &dyn ArchiveStore) {
    let items = [
        item("uk.nhs", 1, "root"),
        item("uk.nhs.a", 1, "a").with_state("open"),
        item("uk.nhs.b", 1, "b").with_state("open"),
        item("uk.nhsx", 1, "not under uk.nhs"),
        item("uk_nhs.c", 1, "underscore is no wildcard").with_state("open"),
        item("uk.nhs.gone", 1, "deleted below"),
    ];
    let refs: Vec<&SyncItem> = items.iter().collect();
    store.write_batch(&refs, TIMEOUT).await.expect("write");
    store.write_batch(&[&SyncItem::tombstone("uk.nhs.gone", 2)], TIMEOUT).await.expect("write");

    let mut found: Vec<String> = store
        .get_many(&["uk.nhs.a", "uk.nhs.a", "uk.nhs.gone", "nobody"])
        .await
        .unwrap()
        .into_iter()
        .map(|stored| {
            assert_eq!(stored.hash_matches(), Some(true), "{}: stored hash", store.kind());
            stored.item.id
        })
        .collect();
    found.sort();
    assert_eq!(found, ["uk.nhs.a", "uk.nhs.gone"], "{}: get_many returns tombstones, skips absent", store.kind());

    let prefix = Selection::Prefix("uk.nhs");
    let ids = store.scan_ids(prefix, None, 100).await.unwrap();
    assert_eq!(ids, ["uk.nhs", "uk.nhs.a", "uk.nhs.b"], "{}: dot boundary, live rows only", store.kind());
    assert_eq!(store.count(prefix).await.unwrap(), 3, "{}", store.kind());
    let first = store.scan(prefix, None, 2).await.unwrap();
    let rest = store.scan(prefix, Some(&first[1].id), 2).await.unwrap();
    let paged: Vec<&str> = first.iter().chain(&rest).map(|item| item.id.as_str()).collect();
    assert_eq!(paged, ["uk.nhs", "uk.nhs.a", "uk.nhs.b"], "{}: keyset pages", store.kind());

    let open = store.scan_ids(Selection::State("open"), None, 100).await.unwrap();
    assert_eq!(open, ["uk.nhs.a", "uk.nhs.b", "uk_nhs.c"], "{}: state selection", store.kind());
    assert_eq!(store.count(Selection::State("Open")).await.unwrap(), 0, "{}: states are case-sensitive", store.kind());
    assert!(store.summaries().await.unwrap().len() >= items.len(), "{}", store.kind());
}

/// Invariant 2 in L2, dropping entries behind L3 (invariant 6), invalidation, TTLs.
async fn cache_contract(store: &dyn CacheStore) {
    let v2 = at(item("c.1", 2, "two"), 0, 10);
    let v1 = at(item("c.1", 1, "one"), 0, 5);
    assert!(store.write_batch(&[(&v2, 0)]).await.is_empty());
    assert!(store.write_batch(&[(&v1, 0)]).await.is_empty());
    let stored = store.get_stored("c.1").await.unwrap().expect("present");
    assert_eq!((stored.item.version, stored.hash_matches()), (2, Some(true)), "{}: older refused", store.kind());

    // An entry behind L3's row goes; L3's own row and anything newer stay.
    let row = |version: u64| HeldRow {
        version,
        origin: Some(Origin { topic: Arc::from("contract"), partition: 0, offset: 10 }),
        content_hash: [0; 32],
        deleted: false,
        state: None,
    };
    let (row2, row3) = (row(2), row(3));
    let newer = item("c.newer", 5, "newer than L3");
    store.write_batch(&[(&newer, 0)]).await;
    let row1 = row(1);
    assert!(store.apply(&[L2Op::DropIfBehind("c.1", &row2), L2Op::DropIfBehind("c.newer", &row1)]).await.is_empty());
    assert_eq!(store.live("c.1").await.unwrap(), Some(true), "{}: L3's own row stays", store.kind());
    assert_eq!(store.live("c.newer").await.unwrap(), Some(true), "{}: newer than L3 stays", store.kind());
    store.apply(&[L2Op::DropIfBehind("c.1", &row3)]).await;
    assert_eq!(store.live("c.1").await.unwrap(), None, "{}: behind L3 is dropped", store.kind());

    let tombstone = SyncItem::tombstone("c.2", 4);
    store.write_batch(&[(&tombstone, 0), (&item("c.3", 1, "three"), 0)]).await;
    let many = store.get_many(&["c.2", "c.3", "c.absent"]).await;
    assert_eq!(many.len(), 2, "{}", store.kind());
    assert!(many["c.2"].item.is_tombstone(), "{}", store.kind());
    assert_eq!(store.live("c.2").await.unwrap(), Some(false), "{}", store.kind());
    store.invalidate(&["c.3"]).await.unwrap();
    assert!(store.get("c.3").await.unwrap().is_none(), "{}: invalidated", store.kind());

    store.write_batch(&[(&item("c.ttl", 1, "expires"), 1)]).await;
    assert!(store.get("c.ttl").await.unwrap().is_some(), "{}", store.kind());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(store.get("c.ttl").await.unwrap().is_none(), "{}: expired after its TTL", store.kind());
}

async fn archive_contract(store: &dyn ArchiveStore) {
    archive_guards_versions(store).await;
    archive_reads_and_selects(store).await;
    archive_lists_ids_for_the_filter(store).await;
}

/// What the membership filter reads: every id (tombstones too) in byte order by keyset pages,
/// and the ids inserted since a clock reading, whose stamp a later update keeps.
async fn archive_lists_ids_for_the_filter(store: &dyn ArchiveStore) {
    let before = store.clock_ms().await.unwrap();
    let written = [item("f.b", 1, "b"), item("f.a", 1, "a"), SyncItem::tombstone("f.c", 2)];
    store.write_batch(&written.iter().collect::<Vec<_>>(), TIMEOUT).await.unwrap();
    let mut all = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.ids_after(after.as_deref(), 2).await.unwrap();
        all.extend(page.iter().cloned());
        if page.len() < 2 {
            break;
        }
        after = page.last().cloned();
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(all, sorted, "pages in byte order, no id twice");
    for id in ["f.a", "f.b", "f.c"] {
        assert!(all.contains(&id.as_bytes().to_vec()), "{id} listed (tombstones too)");
    }
    // Created since `before` (less a second: the clock may round), in (stamp, id) order, paged.
    let since = before - 1_000;
    let first = store.ids_created_since(since, None, 2).await.unwrap();
    let rest = store.ids_created_since(since, first.last().map(|(at, id)| (*at, id.as_slice())), 100).await.unwrap();
    let created: Vec<&[u8]> = first.iter().chain(&rest).map(|(_, id)| id.as_slice()).collect();
    for id in ["f.a", "f.b", "f.c"] {
        assert!(created.contains(&id.as_bytes()), "{id} inserted since the clock reading");
    }
    let stamps: Vec<(i64, &[u8])> = first.iter().chain(&rest).map(|(at, id)| (*at, id.as_slice())).collect();
    assert!(stamps.windows(2).all(|pair| pair[0] < pair[1]), "in (stamp, id) order: {stamps:?}");
    // An update keeps the first insert's stamp.
    let stamp_of =
        |rows: &[(i64, Vec<u8>)], id: &str| rows.iter().find(|(_, row)| row == id.as_bytes()).map(|(at, _)| *at);
    let stamp = stamp_of(&[first.clone(), rest.clone()].concat(), "f.a").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.write_batch(&[&item("f.a", 2, "a2")], TIMEOUT).await.unwrap();
    let again = store.ids_created_since(since, None, 100).await.unwrap();
    assert_eq!(stamp_of(&again, "f.a"), Some(stamp), "an update keeps the creation stamp");
    assert!(store.ids_created_since(store.clock_ms().await.unwrap() + 60_000, None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_in_memory_archive_keeps_the_contract() {
    archive_contract(&MemoryArchiveStore::new()).await;
}

#[tokio::test]
async fn sqlite_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("items.db").display());
    let store = SqlStore::connect(&url, "contract").await.unwrap();
    archive_contract(&store).await;
    store.close().await;
}

#[tokio::test]
async fn mariadb_keeps_the_contract() {
    let names = Names::new("contract");
    let store = SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
    archive_contract(&store).await;
    store.close().await;
}

/// The read-back MySQL needs (no `INSERT … RETURNING`), run on MariaDB.
#[tokio::test]
async fn mariadb_keeps_the_contract_reading_back_with_select() {
    let names = Names::new("contract_select");
    let store = SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
    store.read_back_with_select();
    archive_contract(&store).await;
    store.close().await;
}

#[tokio::test]
async fn the_in_memory_cache_keeps_the_contract() {
    cache_contract(&MemoryCacheStore::new()).await;
}

#[tokio::test]
async fn a_standalone_redis_keeps_the_contract() {
    let names = Names::new("contract");
    cache_contract(&RedisStore::connect(&[standalone_url()], &names.prefix).await.unwrap()).await;
}

#[tokio::test]
async fn a_redis_cluster_keeps_the_contract() {
    let names = Names::new("contract");
    cache_contract(&RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap()).await;
}

/// The membership filter tails L3 every 20 ms and is trusted while its last poll started
/// within 200 ms: a row written to L3 behind the engine's back is found after that bound.
fn memory_engine_config(wal_dir: Option<std::path::PathBuf>) -> sync_engine::SyncEngineConfig {
    let filter = sync_engine::FilterConfig {
        poll_interval: Duration::from_millis(20),
        lag_bound: Duration::from_millis(200),
        ..Default::default()
    };
    sync_engine::SyncEngineConfig { wal_dir, filter, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_in_memory_stores_reads_through_and_fills_the_faster_tiers() {
    let l2 = Arc::new(MemoryCacheStore::new());
    let l3 = Arc::new(MemoryArchiveStore::new());
    let config = memory_engine_config(None);
    let lag_bound = config.filter.lag_bound;
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1)
        .with_cache_store(l2.clone())
        .with_archive_store(l3.clone());
    engine.start().await.expect("starts without any server");

    assert_eq!(engine.submit(item("m.1", 1, "one")).await.unwrap(), Tier::L3);
    assert_eq!(l3.len(), 1);
    assert!(l2.get("m.1").await.unwrap().is_some(), "L2 follows L3");

    // Written to L3 behind the engine's back: a read misses L1 and L2, finds L3, fills L2.
    l3.write_batch(&[&item("m.2", 7, "seven")], TIMEOUT).await.unwrap();
    // Another writer's insert is guaranteed to be seen once the filter's lag bound has passed
    // (README, Membership filter); before that the trusted filter may answer "not in L3".
    tokio::time::sleep(lag_bound + Duration::from_millis(50)).await;
    assert_eq!(engine.filter_trust(), Some(sync_engine::FilterTrust::Trusted), "the filter tails the memory archive");
    let read = engine.get("m.2").await.unwrap().expect("found in L3");
    assert_eq!(read.version, 7);
    assert_eq!(l2.get("m.2").await.unwrap().map(|item| item.version), Some(7), "the L3 hit filled L2");
    assert_eq!(engine.l3().map(|l3| l3.kind()), Some("memory"));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_goes_away_sends_batches_to_the_wal_and_they_drain_back() {
    let wal = tempfile::tempdir().unwrap();
    let l3 = Arc::new(MemoryArchiveStore::new());
    let config = memory_engine_config(Some(wal.path().to_path_buf()));
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1).with_archive_store(l3.clone());
    engine.start().await.unwrap();

    l3.set_available(false);
    let ids: Vec<String> = (0..50).map(|n| format!("w.{n:03}")).collect();
    let receipts = futures::future::join_all(ids.iter().map(|id| engine.submit(item(id, 1, id)))).await;
    assert!(receipts.iter().all(|tier| matches!(tier, Ok(Tier::Wal))), "settled in the WAL: {receipts:?}");
    assert_eq!(l3.len(), 0);

    l3.set_available(true);
    assert!(eventually(Duration::from_secs(30), || l3.len() == ids.len()).await, "the WAL drained into L3");
    let stored = l3.get_many(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
    assert!(stored.iter().all(|stored| stored.item.content.as_deref() == Some(stored.item.id.as_bytes())));
    engine.shutdown().await;
}
