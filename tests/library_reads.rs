//! The multi-id and inspection reads of the library (`get_many`, `contains`, `submit_many`,
//! `delete_many`, `get_verified`, `len`, `status`) against real MariaDB and Redis. Tests about
//! L2 run against both a standalone Redis and the Redis Cluster.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use sqlx::{Connection, Executor};
use sync_engine::config::Secret;
use sync_engine::storage::redis::RedisStore;
use sync_engine::CacheStore;
use sync_engine::{
    CacheTtl, EngineError, ItemStatus, SubmitOptions, SyncEngine, SyncEngineConfig, SyncItem, Tier, Tiers,
};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug)]
enum L2 {
    Standalone,
    Cluster,
}

fn standalone_url() -> String {
    std::env::var("SYNC_TEST_REDIS_STANDALONE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

fn urls(l2: L2) -> Vec<String> {
    match l2 {
        L2::Standalone => vec![standalone_url()],
        L2::Cluster => redis_urls(),
    }
}

fn config(names: &Names, l2: L2) -> SyncEngineConfig {
    SyncEngineConfig { redis_url: Some(Secret::new(urls(l2).join(","))), ..engine_config(names) }
}

async fn engine(config: SyncEngineConfig) -> SyncEngine {
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

async fn stop(engine: SyncEngine) {
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// A direct connection to the test's Redis, past the engine: to look at and tamper with keys.
enum Raw {
    Standalone(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn connect(l2: L2) -> Raw {
        match l2 {
            L2::Standalone => {
                let client = redis::Client::open(standalone_url()).unwrap();
                Raw::Standalone(client.get_multiplexed_async_connection().await.expect("redis answers"))
            }
            L2::Cluster => {
                let client = redis::cluster::ClusterClient::new(redis_urls()).unwrap();
                Raw::Cluster(client.get_async_connection().await.expect("cluster answers"))
            }
        }
    }

    async fn hgetall(&mut self, key: &str) -> HashMap<String, Vec<u8>> {
        match self {
            Raw::Standalone(connection) => connection.hgetall(key).await.unwrap(),
            Raw::Cluster(connection) => connection.hgetall(key).await.unwrap(),
        }
    }

    async fn hset(&mut self, key: &str, fields: &[(&str, &[u8])]) {
        match self {
            Raw::Standalone(connection) => connection.hset_multiple::<_, _, _, ()>(key, fields).await.unwrap(),
            Raw::Cluster(connection) => connection.hset_multiple::<_, _, _, ()>(key, fields).await.unwrap(),
        }
    }

    async fn hdel(&mut self, key: &str, field: &str) {
        match self {
            Raw::Standalone(connection) => connection.hdel::<_, _, ()>(key, field).await.unwrap(),
            Raw::Cluster(connection) => connection.hdel::<_, _, ()>(key, field).await.unwrap(),
        }
    }

    async fn del(&mut self, key: &str) {
        match self {
            Raw::Standalone(connection) => connection.del::<_, ()>(key).await.unwrap(),
            Raw::Cluster(connection) => connection.del::<_, ()>(key).await.unwrap(),
        }
    }

    /// The version L2 holds for the key, if any.
    async fn version(&mut self, key: &str) -> Option<u64> {
        let fields = self.hgetall(key).await;
        fields.get("v").map(|v| String::from_utf8(v.clone()).unwrap().parse().unwrap())
    }
}

fn only(l1: bool, l2: bool, l3: bool) -> SubmitOptions {
    SubmitOptions { tiers: Tiers { l1, l2, l3 }, redis_ttl: CacheTtl::Default }
}

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}.{n}")).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

/// Each id's item, version 10, content naming the id.
fn items(ids: &[String]) -> Vec<SyncItem> {
    ids.iter().map(|id| SyncItem::new(id.as_str(), id.as_bytes().to_vec()).with_version(10)).collect()
}

async fn submit_routed(engine: &SyncEngine, items: Vec<SyncItem>, options: SubmitOptions) {
    let mut receipts = Vec::new();
    for item in items {
        receipts.push(engine.enqueue(item, options).await.unwrap());
    }
    engine.flush().await.unwrap();
    for receipt in receipts {
        receipt.await.expect("settles");
    }
}

async fn get_many_returns_exactly_the_live_ids_and_fills_l1_and_l2(l2: L2, test: &str) {
    let names = Names::new(test);
    let reader = engine(config(&names, l2)).await;
    assert!(reader.is_empty().await);
    // Twelve ids per place, so that a Cluster spreads them over every master.
    let (in_l1, in_l2, in_l3) = (ids("l1", 12), ids("l2", 12), ids("l3", 12));
    let (missing, deleted_l2, deleted_l3) = (ids("missing", 12), ids("deleted.l2", 12), ids("deleted.l3", 12));
    submit_routed(&reader, items(&in_l1), only(true, false, false)).await;
    submit_routed(&reader, items(&in_l2), only(false, true, false)).await;
    submit_routed(&reader, items(&in_l3), only(false, false, true)).await;
    let tombstones = |ids: &[String]| ids.iter().map(|id| SyncItem::tombstone(id.as_str(), 11)).collect::<Vec<_>>();
    submit_routed(&reader, tombstones(&deleted_l2), only(false, true, false)).await;
    submit_routed(&reader, tombstones(&deleted_l3), only(false, false, true)).await;
    assert_eq!(reader.len().await, 12, "only the L1-routed items are in L1");

    let every: Vec<&str> =
        [&in_l1, &in_l2, &in_l3, &missing, &deleted_l2, &deleted_l3].into_iter().flat_map(|ids| refs(ids)).collect();
    let l3 = reader.l3().unwrap();
    let statements = l3.read_statements();
    let found = reader.get_many(&every).await.unwrap();
    assert_eq!(l3.read_statements() - statements, 1, "the L3 misses are read with one statement");
    let live: Vec<&String> = in_l1.iter().chain(&in_l2).chain(&in_l3).collect();
    let mut want: Vec<&str> = live.iter().map(|id| id.as_str()).collect();
    want.sort_unstable();
    let mut got: Vec<&str> = found.keys().map(String::as_str).collect();
    got.sort_unstable();
    assert_eq!(got, want, "exactly the live items");
    for id in &live {
        let item = &found[id.as_str()];
        assert_eq!((item.version, item.content.as_deref()), (10, Some(id.as_bytes())));
    }

    // L2 now holds what L3 held, tombstones included; the L2-only entries are untouched.
    let mut raw = Raw::connect(l2).await;
    let store = RedisStore::connect(&urls(l2), &names.prefix).await.unwrap();
    for id in in_l3.iter().chain(&in_l2) {
        let held = store.get(id).await.unwrap().expect("filled into L2");
        assert_eq!((held.version, held.content.as_deref()), (10, Some(id.as_bytes())));
    }
    for id in &deleted_l3 {
        assert!(store.get(id).await.unwrap().expect("tombstone filled into L2").is_tombstone());
    }
    for id in &missing {
        assert!(raw.hgetall(&store.key(id)).await.is_empty(), "nothing is invented for a missing id");
    }

    // L1 holds every entry now (tombstones too): a second read needs neither L2 nor L3.
    assert_eq!(reader.len().await, 12 * 5);
    for id in in_l2.iter().chain(&in_l3) {
        assert_eq!(reader.status(id).await.unwrap(), ItemStatus::InL1, "{id}");
        raw.del(&store.key(id)).await;
    }
    let cached: Vec<&str> = every.iter().copied().filter(|id| !id.starts_with("missing.")).collect();
    let statements = l3.read_statements();
    let again = reader.get_many(&cached).await.unwrap();
    assert_eq!(again.len(), 36, "served from L1, although their L2 keys are gone");
    assert_eq!(l3.read_statements(), statements, "no L3 read");
    stop(reader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_returns_exactly_the_live_ids_and_fills_l1_and_l2_standalone() {
    get_many_returns_exactly_the_live_ids_and_fills_l1_and_l2(L2::Standalone, "reads_many_sa").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_returns_exactly_the_live_ids_and_fills_l1_and_l2_cluster() {
    get_many_returns_exactly_the_live_ids_and_fills_l1_and_l2(L2::Cluster, "reads_many_cl").await;
}

/// An L2 write that lands between `get_many`'s L2 lookup and its L2 fill meets the fill at
/// L2's version guard: an older version there is replaced by L3's, a newer one is kept.
/// The read is held at L3 by a table lock, so the interleaving is certain, not timed.
async fn a_get_many_fill_goes_through_the_l2_version_guard(l2: L2, test: &str) {
    let names = Names::new(test);
    let reader = std::sync::Arc::new(engine(config(&names, l2)).await);
    let at_five = |id: &str| SyncItem::new(id, b"from L3".to_vec()).with_version(5);
    submit_routed(&reader, vec![at_five("older.in.l2"), at_five("newer.in.l2")], only(false, false, true)).await;

    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", names.table).as_str()).await.unwrap();
    let reading = tokio::spawn({
        let reader = reader.clone();
        async move { reader.get_many(&["older.in.l2", "newer.in.l2"]).await }
    });
    wait_for_a_read_blocked_on(&mut locker, &names.table).await;
    // The read has missed in L2 and waits for L3. Another writer now puts version 3 of one
    // id and version 9 of the other into L2.
    let mut raw = Raw::connect(l2).await;
    let store = RedisStore::connect(&urls(l2), &names.prefix).await.unwrap();
    let entry = |version: &'static [u8], content: &'static [u8]| {
        [("v", version), ("c", content), ("t", &b"binary"[..]), ("d", &b"0"[..])]
    };
    raw.hset(&store.key("older.in.l2"), &entry(b"3", b"stale")).await;
    raw.hset(&store.key("newer.in.l2"), &entry(b"9", b"fresh")).await;
    locker.execute("UNLOCK TABLES").await.unwrap();

    let found = reading.await.unwrap().unwrap();
    assert_eq!(found["older.in.l2"].version, 5, "the read answers with what L3 held");
    assert_eq!(raw.version(&store.key("older.in.l2")).await, Some(5), "the older L2 entry lost to L3's");
    assert_eq!(raw.version(&store.key("newer.in.l2")).await, Some(9), "the fill never replaces a newer entry");
    assert_eq!(reader.get("older.in.l2").await.unwrap().unwrap().version, 5);
    assert_eq!(reader.status("older.in.l2").await.unwrap(), ItemStatus::InL1);
    reader.shutdown_within(Duration::from_secs(5)).await;
}

/// Waits until a session other than `locker` waits for the table lock with a multi-id read.
async fn wait_for_a_read_blocked_on(locker: &mut sqlx::MySqlConnection, table: &str) {
    let query = "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                 WHERE ID <> CONNECTION_ID() AND STATE LIKE 'Waiting for table%' AND INFO LIKE ?";
    let pattern = format!("%FROM {table} WHERE id IN%");
    for _ in 0..600 {
        let waiting: i64 = sqlx::query_scalar(query).bind(&pattern).fetch_one(&mut *locker).await.unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("get_many never reached L3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_many_fill_goes_through_the_l2_version_guard_standalone() {
    a_get_many_fill_goes_through_the_l2_version_guard(L2::Standalone, "reads_guard_sa").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_many_fill_goes_through_the_l2_version_guard_cluster() {
    a_get_many_fill_goes_through_the_l2_version_guard(L2::Cluster, "reads_guard_cl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_many_of_2500_ids_reads_l3_in_three_statements() {
    let names = Names::new("reads_chunks");
    let writer = engine(SyncEngineConfig { redis_url: None, ..engine_config(&names) }).await;
    let written = ids("bulk", 2500);
    let tiers = writer.submit_many(items(&written)).await.unwrap();
    assert!(tiers.len() == 2500 && tiers.iter().all(|tier| *tier == Tier::L3));
    stop(writer).await;

    // A fresh engine: every id misses L1 and L2, so L3 gets them all, a thousand per statement.
    let reader = engine(config(&names, L2::Standalone)).await;
    let unknown = ids("unknown", 100);
    let asked: Vec<&str> = refs(&written).into_iter().chain(refs(&unknown)).collect();
    let l3 = reader.l3().unwrap();
    let before = l3.read_statements();
    let found = reader.get_many(&asked).await.unwrap();
    assert_eq!(found.len(), 2500);
    assert_eq!(l3.read_statements() - before, 3, "2,600 ids: 1,000 + 1,000 + 600");
    let before = l3.read_statements();
    assert_eq!(reader.get_many(&refs(&written)).await.unwrap().len(), 2500);
    assert_eq!(l3.read_statements(), before, "the second read is served by L1");
    stop(reader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_many_and_delete_many_round_trip() {
    let names = Names::new("reads_round");
    let engine = engine(engine_config(&names)).await;
    let written = ids("round", 40);
    let mut batch = items(&written);
    // A version far ahead of the clock: its tombstone must still be newer.
    let future = 4_000_000_000_000;
    batch[0].version = future;
    let tiers = engine.submit_many(batch).await.unwrap();
    assert_eq!(tiers, vec![Tier::L3; 40]);
    let found = engine.get_many(&refs(&written)).await.unwrap();
    assert_eq!(found.len(), 40);
    assert_eq!(found["round.0"].version, future);

    let invalid = vec![SyncItem::new("round.extra", b"x".to_vec()), SyncItem::new("", b"x".to_vec())];
    assert!(matches!(engine.submit_many(invalid).await, Err(EngineError::InvalidItem(_))));
    assert!(!engine.contains("round.extra").await.unwrap(), "an invalid id submits nothing of its batch");

    let mut doomed = refs(&written[..20]);
    doomed.push("round.unknown");
    assert_eq!(engine.delete_many(&doomed).await.unwrap(), vec![Tier::L3; 21]);
    let left = engine.get_many(&refs(&written)).await.unwrap();
    let mut left: Vec<&str> = left.keys().map(String::as_str).collect();
    left.sort_unstable();
    let mut kept = refs(&written[20..]);
    kept.sort_unstable();
    assert_eq!(left, kept);
    assert!(!engine.contains("round.1").await.unwrap() && engine.contains("round.21").await.unwrap());
    stop(engine).await;

    let rows: BTreeMap<String, _> = l3_rows(&names).await.into_iter().map(|row| (row.id.clone(), row)).collect();
    assert_eq!(rows.len(), 41);
    for id in &doomed {
        let row = &rows[*id];
        assert!(row.deleted, "{id} is a tombstone in L3");
        assert!(row.version > 10);
    }
    assert_eq!(rows["round.0"].version, future + 1);
    assert!(!rows["round.20"].deleted);
    let store = RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap();
    assert!(store.get("round.0").await.unwrap().unwrap().is_tombstone());
    assert_eq!(store.get("round.0").await.unwrap().unwrap().version, future + 1);
}

/// The `sync_corrupt_reads_total` sample for `tier` in the rendered metrics, if any.
fn corrupt_reads(rendered: &str, tier: &str) -> Option<f64> {
    let prefix = format!("sync_corrupt_reads_total{{tier=\"{tier}\"}} ");
    rendered.lines().find_map(|line| line.strip_prefix(prefix.as_str())).and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_verified_detects_content_altered_in_sql() {
    let metrics = sync_engine::metrics::install();
    let names = Names::new("reads_verify_sql");
    let writer = engine(config(&names, L2::Standalone)).await;
    writer
        .submit_many(vec![SyncItem::new("sound", b"sound".to_vec()), SyncItem::new("altered", b"a".to_vec())])
        .await
        .unwrap();
    stop(writer).await;
    let mut sql = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    let update = format!("UPDATE {} SET content = ? WHERE id = ?", names.table);
    sqlx::query(&update).bind(&b"altered behind our back"[..]).bind(&b"altered"[..]).execute(&mut sql).await.unwrap();
    // Without their L2 copies, the verified read has to go to L3.
    let mut raw = Raw::connect(L2::Standalone).await;
    let store = RedisStore::connect(&urls(L2::Standalone), &names.prefix).await.unwrap();
    raw.del(&store.key("sound")).await;
    raw.del(&store.key("altered")).await;

    let reader = engine(config(&names, L2::Standalone)).await;
    match reader.get_verified("altered").await {
        Err(EngineError::Corrupt { id, tier }) => assert_eq!((id.as_str(), tier), ("altered", Tier::L3)),
        other => panic!("expected a corrupt read, got {other:?}"),
    }
    assert!(raw.hgetall(&store.key("altered")).await.is_empty(), "nothing is filled from a corrupt read");
    assert_eq!(reader.status("altered").await.unwrap(), ItemStatus::InL3);
    assert!(corrupt_reads(&metrics.render(), "l3").is_some_and(|count| count >= 1.0));

    let sound = reader.get_verified("sound").await.unwrap().expect("a sound row reads");
    assert_eq!(sound.content.as_deref(), Some(&b"sound"[..]));
    assert!(raw.hgetall(&store.key("sound")).await.contains_key("h"), "filled into L2, with its hash");
    // A plain read does not check: it returns the altered bytes.
    let unchecked = reader.get("altered").await.unwrap().unwrap();
    assert_eq!(unchecked.content.as_deref(), Some(&b"altered behind our back"[..]));
    stop(reader).await;
}

async fn get_verified_detects_content_altered_in_redis(l2: L2, test: &str) {
    let metrics = sync_engine::metrics::install();
    let names = Names::new(test);
    let writer = engine(config(&names, l2)).await;
    let written = ["sound", "altered", "hashless"].map(|id| SyncItem::new(id, id.as_bytes().to_vec()));
    writer.submit_many(written.to_vec()).await.unwrap();
    stop(writer).await;
    let mut raw = Raw::connect(l2).await;
    let store = RedisStore::connect(&urls(l2), &names.prefix).await.unwrap();
    assert_eq!(raw.hgetall(&store.key("sound")).await["h"].len(), 64, "L2 stores the hash in hex");
    raw.hset(&store.key("altered"), &[("c", &b"altered behind our back"[..])]).await;
    // An entry as written before L2 stored hashes, and altered: L3 answers for it.
    raw.hdel(&store.key("hashless"), "h").await;
    raw.hset(&store.key("hashless"), &[("c", &b"unverifiable"[..])]).await;

    let reader = engine(config(&names, l2)).await;
    match reader.get_verified("altered").await {
        Err(EngineError::Corrupt { id, tier }) => assert_eq!((id.as_str(), tier), ("altered", Tier::L2)),
        other => panic!("expected a corrupt read, got {other:?}"),
    }
    assert_eq!(reader.status("altered").await.unwrap(), ItemStatus::InL2, "L1 is not filled from a corrupt read");
    assert!(corrupt_reads(&metrics.render(), "l2").is_some_and(|count| count >= 1.0));
    assert_eq!(reader.get_verified("sound").await.unwrap().unwrap().content.as_deref(), Some(&b"sound"[..]));
    assert_eq!(reader.status("sound").await.unwrap(), ItemStatus::InL1);
    let hashless = reader.get_verified("hashless").await.unwrap().unwrap();
    assert_eq!(hashless.content.as_deref(), Some(&b"hashless"[..]), "read from L3, which has a hash");
    stop(reader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_verified_detects_content_altered_in_redis_standalone() {
    get_verified_detects_content_altered_in_redis(L2::Standalone, "reads_verify_sa").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_verified_detects_content_altered_in_redis_cluster() {
    get_verified_detects_content_altered_in_redis(L2::Cluster, "reads_verify_cl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_moves_from_pending_to_the_fastest_tier_that_holds_the_item() {
    let names = Names::new("reads_status");
    let mut slow = config(&names, L2::Standalone);
    // A batch closes only when flushed: the item stays pending for as long as the test needs.
    slow.batch.max_delay = Duration::from_secs(3600);
    let engine = engine(slow).await;
    let receipt = engine.enqueue(SyncItem::new("s.1", b"x".to_vec()), SubmitOptions::default()).await.unwrap();
    assert_eq!(engine.status("s.1").await.unwrap(), ItemStatus::Pending);
    assert!(engine.contains("s.1").await.unwrap(), "L1 already has it");
    engine.flush().await.unwrap();
    assert_eq!(receipt.await, Ok(Tier::L3));
    assert_eq!(engine.status("s.1").await.unwrap(), ItemStatus::InL1);
    stop(engine).await;

    let engine = self::engine(config(&names, L2::Standalone)).await;
    assert_eq!(engine.status("s.1").await.unwrap(), ItemStatus::InL2);
    let store = RedisStore::connect(&urls(L2::Standalone), &names.prefix).await.unwrap();
    Raw::connect(L2::Standalone).await.del(&store.key("s.1")).await;
    assert_eq!(engine.status("s.1").await.unwrap(), ItemStatus::InL3);
    assert!(engine.contains("s.1").await.unwrap());
    engine.delete("s.1").await.unwrap();
    assert_eq!(engine.status("s.1").await.unwrap(), ItemStatus::Missing);
    assert!(!engine.contains("s.1").await.unwrap());
    assert_eq!(engine.status("s.unknown").await.unwrap(), ItemStatus::Missing);
    assert!(!engine.contains("s.unknown").await.unwrap());
    stop(engine).await;
}

/// The same reads on SQLite, the single-node L3 (no L2: every miss goes to L3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_and_get_verified_read_sqlite_too() {
    let names = Names::new("reads_sqlite");
    let file = tempfile::NamedTempFile::new().unwrap();
    let config = SyncEngineConfig {
        redis_url: None,
        sql_url: Some(Secret::new(format!("sqlite://{}?mode=rwc", file.path().display()))),
        ..engine_config(&names)
    };
    let writer = engine(config.clone()).await;
    let written = ids("lite", 120);
    writer.submit_many(items(&written)).await.unwrap();
    writer.delete_many(&["lite.0"]).await.unwrap();
    stop(writer).await;

    let reader = engine(config).await;
    let l3 = reader.l3().unwrap();
    let before = l3.read_statements();
    let found = reader.get_many(&refs(&written)).await.unwrap();
    assert_eq!((found.len(), l3.read_statements() - before), (119, 1));
    assert!(!found.contains_key("lite.0"));
    assert_eq!(reader.get_verified("lite.7").await.unwrap().unwrap().content.as_deref(), Some(&b"lite.7"[..]));
    assert!(reader.get_verified("lite.0").await.unwrap().is_none(), "a tombstone verifies and reads as none");
    stop(reader).await;
}
