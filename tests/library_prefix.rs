//! Prefix and state queries of the library (`scan_prefix`, `count_prefix`, `delete_prefix`,
//! `scan_state`, `count_state`) and the item `state` through every tier, against real services:
//! MariaDB + the Redis Cluster, and SQLite + the Redis Cluster. Every test runs on both L3s.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use sqlx::{Connection, Executor};
use sync_engine::config::Secret;
use sync_engine::item::now_ms;
use sync_engine::storage::redis::RedisStore;
use sync_engine::storage::sql::SqlStore;
use sync_engine::{ArchiveStore, CacheStore};
use sync_engine::{EngineError, SyncEngine, SyncEngineConfig, SyncItem, Tier};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L3 {
    MySql,
    Sqlite,
}

/// A test's engine config and, for SQLite, the database file (kept alive by the test).
struct Setup {
    names: Names,
    config: SyncEngineConfig,
    _file: Option<tempfile::NamedTempFile>,
}

impl Setup {
    fn new(l3: L3, test: &str) -> Setup {
        let names = Names::new(test);
        let mut config = engine_config(&names);
        let file = (l3 == L3::Sqlite).then(|| tempfile::NamedTempFile::new().unwrap());
        if let Some(file) = &file {
            config.sql_url = Some(Secret::new(format!("sqlite://{}?mode=rwc", file.path().display())));
        }
        Setup { names, config, _file: file }
    }

    fn sql_url(&self) -> String {
        self.config.sql_url.as_ref().unwrap().expose().to_owned()
    }

    async fn engine(&self) -> SyncEngine {
        let mut engine = SyncEngine::new(self.config.clone(), watch::channel(self.config.clone()).1);
        engine.start().await.expect("engine starts");
        engine
    }

    async fn l2(&self) -> RedisStore {
        RedisStore::connect(&redis_urls(), &self.names.prefix).await.expect("L2 connects")
    }

    /// L3 as a separate client: what the table holds, past the engine.
    async fn l3(&self) -> SqlStore {
        SqlStore::connect(&self.sql_url(), &self.names.table).await.expect("L3 connects")
    }

    /// The raw fields of the id's L2 hash.
    async fn l2_fields(&self, id: &str) -> HashMap<String, Vec<u8>> {
        let client = redis::cluster::ClusterClient::new(redis_urls()).unwrap();
        let mut connection = client.get_async_connection().await.expect("cluster answers");
        connection.hgetall(format!("{}{id}", self.names.prefix)).await.unwrap()
    }
}

async fn stop(engine: SyncEngine) {
    engine.shutdown_within(Duration::from_secs(10)).await;
}

fn ids_of(items: &[Arc<SyncItem>]) -> Vec<&str> {
    items.iter().map(|item| item.id.as_str()).collect()
}

/// Version 10 items whose content is their id.
fn items(ids: &[&str]) -> Vec<SyncItem> {
    ids.iter().map(|id| SyncItem::new(*id, id.as_bytes().to_vec()).with_version(10)).collect()
}

// ---- dot boundary, order, limit, count ----

async fn prefixes_match_at_a_dot_boundary_in_id_order(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let engine = setup.engine().await;
    let written = [
        "uk.nhs.patient.2",
        "uk.nhs",
        "uk.nhs.patient.1",
        "uk.nhs.a",
        "uk.nhs.gone",
        "uk.nhsx.1",
        "uk.nhs-x",
        "uk.nhs/1",
        "uk.NHS.1",
        "uk.nh",
        "uk",
        "uk.nhs.patient",
    ];
    engine.submit_many(items(&written)).await.unwrap();
    engine.delete("uk.nhs.gone").await.unwrap();

    let all = ["uk.nhs", "uk.nhs.a", "uk.nhs.patient", "uk.nhs.patient.1", "uk.nhs.patient.2"];
    let found = engine.scan_prefix("uk.nhs", 100).await.unwrap();
    assert_eq!(ids_of(&found), all, "the id itself and its dotted descendants, live ones, by id");
    assert!(found.iter().all(|item| item.content.as_deref() == Some(item.id.as_bytes()) && item.version == 10));
    assert_eq!(engine.count_prefix("uk.nhs").await.unwrap(), 5);
    // One trailing dot is the same prefix.
    assert_eq!(ids_of(&engine.scan_prefix("uk.nhs.", 100).await.unwrap()), all);
    assert_eq!(engine.count_prefix("uk.nhs.").await.unwrap(), 5);

    // Limit and keyset pages.
    let first = engine.scan_prefix("uk.nhs", 2).await.unwrap();
    assert_eq!(ids_of(&first), &all[..2]);
    let second = engine.scan_prefix_after("uk.nhs", Some(&first[1].id), 2).await.unwrap();
    assert_eq!(ids_of(&second), &all[2..4]);
    let last = engine.scan_prefix_after("uk.nhs", Some(&second[1].id), 2).await.unwrap();
    assert_eq!(ids_of(&last), &all[4..]);
    assert!(engine.scan_prefix_after("uk.nhs", Some(&last[0].id), 2).await.unwrap().is_empty());
    assert!(engine.scan_prefix("uk.nhs", 0).await.unwrap().is_empty());

    // Deeper and shallower prefixes; ids are case-sensitive.
    assert_eq!(ids_of(&engine.scan_prefix("uk.nhs.patient", 10).await.unwrap()), &all[2..]);
    assert_eq!(engine.count_prefix("uk").await.unwrap(), written.len() as u64 - 1);
    assert_eq!(ids_of(&engine.scan_prefix("uk.NHS", 10).await.unwrap()), ["uk.NHS.1"]);
    assert_eq!(ids_of(&engine.scan_prefix("uk.nh", 10).await.unwrap()), ["uk.nh"]);
    assert_eq!(engine.count_prefix("uk.nhs.gone").await.unwrap(), 0, "a tombstone is not counted");
    assert_eq!(engine.count_prefix("nothing").await.unwrap(), 0);

    // An empty prefix (or a lone dot) is refused, never "everything".
    for refused in ["", "."] {
        assert!(matches!(engine.scan_prefix(refused, 10).await, Err(EngineError::InvalidArgument(_))));
        assert!(matches!(engine.count_prefix(refused).await, Err(EngineError::InvalidArgument(_))));
        assert!(matches!(engine.delete_prefix(refused).await, Err(EngineError::InvalidArgument(_))));
    }
    assert_eq!(engine.count_prefix("uk").await.unwrap(), written.len() as u64 - 1, "nothing was deleted");
    stop(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_match_at_a_dot_boundary_in_id_order_mysql() {
    prefixes_match_at_a_dot_boundary_in_id_order(L3::MySql, "prefix_dot_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_match_at_a_dot_boundary_in_id_order_sqlite() {
    prefixes_match_at_a_dot_boundary_in_id_order(L3::Sqlite, "prefix_dot_lite").await;
}

// ---- LIKE metacharacters in prefixes ----

async fn percent_and_underscore_in_a_prefix_are_plain_characters(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let engine = setup.engine().await;
    let written = ["a%b.1", "axb.1", "a_c.1", "abc.1", "a!d.1", "a!!d.1", "%.1", "_.1", "z.1", "a\\e.1", "aXe.1"];
    engine.submit_many(items(&written)).await.unwrap();

    let cases: [(&str, &[&str]); 8] = [
        ("a%b", &["a%b.1"]),
        ("a_c", &["a_c.1"]),
        ("%", &["%.1"]),
        ("_", &["_.1"]),
        ("a!d", &["a!d.1"]),
        ("a!!d", &["a!!d.1"]),
        ("a\\e", &["a\\e.1"]),
        ("abc", &["abc.1"]),
    ];
    for (prefix, want) in cases {
        assert_eq!(ids_of(&engine.scan_prefix(prefix, 100).await.unwrap()), want, "prefix {prefix:?}");
        assert_eq!(engine.count_prefix(prefix).await.unwrap(), want.len() as u64, "prefix {prefix:?}");
    }
    // Deleting under a prefix with a wildcard character deletes only its literal match.
    assert_eq!(engine.delete_prefix("a_c").await.unwrap(), 1);
    assert_eq!(engine.delete_prefix("%").await.unwrap(), 1);
    let left: Vec<&str> = written.iter().copied().filter(|id| !["a_c.1", "%.1"].contains(id)).collect();
    let found = engine.get_many(&written).await.unwrap();
    let mut found: Vec<&str> = found.keys().map(String::as_str).collect();
    found.sort_unstable();
    let mut want = left.clone();
    want.sort_unstable();
    assert_eq!(found, want);
    stop(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_and_underscore_in_a_prefix_are_plain_characters_mysql() {
    percent_and_underscore_in_a_prefix_are_plain_characters(L3::MySql, "prefix_like_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_and_underscore_in_a_prefix_are_plain_characters_sqlite() {
    percent_and_underscore_in_a_prefix_are_plain_characters(L3::Sqlite, "prefix_like_lite").await;
}

// ---- delete_prefix ----

async fn delete_prefix_tombstones_every_tier_and_a_newer_write_wins(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let engine = setup.engine().await;
    // More than two pages of ids under the prefix, the prefix's own id, and neighbours.
    let under: Vec<String> = (0..2100).map(|n| format!("big.{n:04}")).collect();
    let mut written: Vec<&str> = under.iter().map(String::as_str).collect();
    written.extend(["big", "bigger.1", "bi.g"]);
    let tiers = engine.submit_many(items(&written)).await.unwrap();
    assert!(tiers.iter().all(|tier| *tier == Tier::L3));
    // Accepted but not awaited: delete_prefix flushes it first, so it is deleted too.
    let pending = engine.enqueue(SyncItem::new("big.pending", b"p".to_vec()).with_version(10), Default::default());
    let pending = pending.await.unwrap();
    let before = now_ms();

    assert_eq!(engine.delete_prefix("big").await.unwrap(), 2102, "2100 + big + big.pending");
    assert_eq!(pending.await.unwrap(), Tier::L3);
    assert_eq!(engine.count_prefix("big").await.unwrap(), 0);
    assert!(engine.scan_prefix("big", 10).await.unwrap().is_empty());
    for id in ["big", "big.0000", "big.1999", "big.2099", "big.pending"] {
        assert_eq!(engine.get(id).await.unwrap(), None, "{id} reads as deleted");
    }
    assert!(engine.get("bigger.1").await.unwrap().is_some() && engine.get("bi.g").await.unwrap().is_some());
    assert_eq!(engine.delete_prefix("big").await.unwrap(), 0, "nothing live is left");

    // L3: a tombstone row, versioned after the delete started, for every id under the prefix.
    let store = setup.l3().await;
    let rows = store.summaries().await.unwrap();
    assert_eq!(rows.len(), 2104);
    for row in &rows {
        let doomed = row.id == "big" || row.id.starts_with("big.");
        assert_eq!(row.deleted, doomed, "{}", row.id);
        assert!(!doomed || row.version >= before, "{} has tombstone version {}", row.id, row.version);
    }
    store.close().await;
    // L2: the tombstones too.
    let l2 = setup.l2().await;
    for id in ["big", "big.0000", "big.1500", "big.2099", "big.pending"] {
        let entry = l2.get(id).await.unwrap().unwrap_or_else(|| panic!("{id} is in L2"));
        assert!(entry.is_tombstone() && entry.version >= before, "{id}: {entry:?}");
    }
    assert!(!l2.get("bigger.1").await.unwrap().unwrap().is_tombstone());

    // Newest wins after the delete: an older write is refused, a newer one lands everywhere.
    engine.submit(SyncItem::new("big.0001", b"old".to_vec()).with_version(11)).await.unwrap();
    assert_eq!(engine.get("big.0001").await.unwrap(), None, "a replayed older write stays deleted");
    let newer = now_ms() + 60_000;
    engine.submit(SyncItem::new("big.0002", b"back".to_vec()).with_version(newer)).await.unwrap();
    stop(engine).await;

    let fresh = setup.engine().await;
    assert_eq!(fresh.get("big.0001").await.unwrap(), None);
    let back = fresh.get("big.0002").await.unwrap().expect("the newer write is live");
    assert_eq!((back.version, back.content.as_deref()), (newer, Some(&b"back"[..])));
    assert_eq!(ids_of(&fresh.scan_prefix("big", 10).await.unwrap()), ["big.0002"]);
    assert_eq!(fresh.count_prefix("big").await.unwrap(), 1);
    assert_eq!(l2.get("big.0002").await.unwrap().unwrap().version, newer);
    stop(fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_tombstones_every_tier_and_a_newer_write_wins_mysql() {
    delete_prefix_tombstones_every_tier_and_a_newer_write_wins(L3::MySql, "prefix_delete_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_tombstones_every_tier_and_a_newer_write_wins_sqlite() {
    delete_prefix_tombstones_every_tier_and_a_newer_write_wins(L3::Sqlite, "prefix_delete_lite").await;
}

// ---- the item state through every tier ----

async fn a_state_round_trips_through_every_tier(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let engine = setup.engine().await;
    let id = "uk.nhs.patient.7";
    engine.submit(SyncItem::new(id, b"{\"a\":1}".to_vec()).with_version(10).with_state("active")).await.unwrap();

    // L1 answers with the state.
    assert_eq!(engine.get(id).await.unwrap().unwrap().state.as_deref(), Some("active"));
    // L2 holds it as the field `s`, L3 in the column.
    assert_eq!(setup.l2_fields(id).await.get("s").map(Vec::as_slice), Some(&b"active"[..]));
    let l2 = setup.l2().await;
    assert_eq!(l2.get(id).await.unwrap().unwrap().state.as_deref(), Some("active"));
    let store = setup.l3().await;
    assert_eq!(store.get(id).await.unwrap().unwrap().state.as_deref(), Some("active"));
    stop(engine).await;

    // A fresh engine (empty L1) reads L2; with the L2 entry gone it reads L3 and fills L2.
    let reader = setup.engine().await;
    assert_eq!(reader.get(id).await.unwrap().unwrap().state.as_deref(), Some("active"));
    stop(reader).await;
    l2.invalidate(&[id]).await.unwrap();
    assert!(setup.l2_fields(id).await.is_empty());
    let reader = setup.engine().await;
    let many = reader.get_many(&[id]).await.unwrap();
    assert_eq!(many[id].state.as_deref(), Some("active"), "read from L3");
    assert_eq!(setup.l2_fields(id).await.get("s").map(Vec::as_slice), Some(&b"active"[..]), "L2 filled");

    // A state change is a new version; an older version cannot bring an old state back.
    reader.submit(SyncItem::new(id, b"{\"a\":1}".to_vec()).with_version(11).with_state("archived")).await.unwrap();
    reader.submit(SyncItem::new(id, b"{\"a\":1}".to_vec()).with_version(9).with_state("stale")).await.unwrap();
    assert_eq!(reader.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    assert_eq!(store.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    assert_eq!(l2.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    // Same version and content, other state, no origin: the stored one stays in every tier.
    reader.submit(SyncItem::new(id, b"{\"a\":1}".to_vec()).with_version(11).with_state("other")).await.unwrap();
    assert_eq!(store.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    assert_eq!(l2.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    assert_eq!(reader.get(id).await.unwrap().unwrap().state.as_deref(), Some("archived"));
    // A newer version without a state clears it: the L2 field goes, the column is NULL.
    reader.submit(SyncItem::new(id, b"{\"a\":2}".to_vec()).with_version(12)).await.unwrap();
    assert_eq!(reader.get(id).await.unwrap().unwrap().state, None);
    assert!(!setup.l2_fields(id).await.contains_key("s"));
    assert_eq!(store.get(id).await.unwrap().unwrap().state, None);
    assert_eq!(reader.count_state("archived").await.unwrap(), 0);

    // An invalid state is refused before anything is written.
    for bad in ["", "in review", "caf\u{e9}", &"x".repeat(65)] {
        let item = SyncItem::new("uk.bad", b"x".to_vec()).with_state(bad);
        assert!(matches!(reader.submit(item).await, Err(EngineError::InvalidItem(_))), "{bad:?}");
    }
    let batch = vec![SyncItem::new("uk.ok", b"x".to_vec()), SyncItem::new("uk.bad", b"x".to_vec()).with_state("a b")];
    assert!(matches!(reader.submit_many(batch).await, Err(EngineError::InvalidItem(_))));
    assert_eq!(reader.get("uk.ok").await.unwrap(), None, "an invalid state submits nothing of its batch");
    stop(reader).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_round_trips_through_every_tier_mysql() {
    a_state_round_trips_through_every_tier(L3::MySql, "state_tiers_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_round_trips_through_every_tier_sqlite() {
    a_state_round_trips_through_every_tier(L3::Sqlite, "state_tiers_lite").await;
}

// ---- state queries ----

async fn state_queries_select_live_items_by_id(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let engine = setup.engine().await;
    let mut batch = Vec::new();
    for n in 0..30 {
        let state = if n % 3 == 0 { "pending" } else { "active" };
        batch.push(SyncItem::new(format!("job.{n:02}"), b"x".to_vec()).with_version(10).with_state(state));
    }
    batch.push(SyncItem::new("job.none", b"x".to_vec()).with_version(10));
    batch.push(SyncItem::new("job.caps", b"x".to_vec()).with_version(10).with_state("Pending"));
    engine.submit_many(batch).await.unwrap();
    // A deleted item and one moved to another state leave "pending".
    engine.delete("job.00").await.unwrap();
    engine.submit(SyncItem::new("job.03", b"y".to_vec()).with_version(11).with_state("done")).await.unwrap();

    let pending: Vec<String> = (6..30).step_by(3).map(|n| format!("job.{n:02}")).collect();
    assert_eq!(engine.count_state("pending").await.unwrap(), pending.len() as u64);
    let found = engine.scan_state("pending", 100).await.unwrap();
    assert_eq!(ids_of(&found), pending.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(found.iter().all(|item| item.state.as_deref() == Some("pending")));
    // Pages by id.
    let first = engine.scan_state("pending", 3).await.unwrap();
    let rest = engine.scan_state_after("pending", Some(&first[2].id), 100).await.unwrap();
    let paged: Vec<&str> = ids_of(&first).into_iter().chain(ids_of(&rest)).collect();
    assert_eq!(paged, pending.iter().map(String::as_str).collect::<Vec<_>>());

    assert_eq!(engine.count_state("active").await.unwrap(), 20);
    assert_eq!(ids_of(&engine.scan_state("done", 10).await.unwrap()), ["job.03"]);
    assert_eq!(engine.scan_state("done", 10).await.unwrap()[0].version, 11);
    assert_eq!(ids_of(&engine.scan_state("Pending", 10).await.unwrap()), ["job.caps"], "states are case-sensitive");
    assert_eq!(engine.count_state("archived").await.unwrap(), 0);
    assert!(matches!(engine.scan_state("not valid", 10).await, Err(EngineError::InvalidArgument(_))));
    assert!(matches!(engine.count_state("").await, Err(EngineError::InvalidArgument(_))));
    stop(engine).await;

    // Without L3 there is nothing to query.
    let config = SyncEngineConfig { sql_url: None, ..setup.config.clone() };
    let mut no_l3 = SyncEngine::new(config.clone(), watch::channel(config).1);
    no_l3.start().await.unwrap();
    assert!(matches!(no_l3.scan_state("pending", 1).await, Err(EngineError::NeedsL3(_))));
    assert!(matches!(no_l3.count_prefix("job").await, Err(EngineError::NeedsL3(_))));
    stop(no_l3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_queries_select_live_items_by_id_mysql() {
    state_queries_select_live_items_by_id(L3::MySql, "state_query_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_queries_select_live_items_by_id_sqlite() {
    state_queries_select_live_items_by_id(L3::Sqlite, "state_query_lite").await;
}

// ---- migration of a table created before states ----

/// The table and ledger exactly as the version before item states created them.
const OLD_MYSQL: [&str; 3] = [
    "CREATE TABLE {table} (
        id VARBINARY(255) NOT NULL PRIMARY KEY,
        version BIGINT UNSIGNED NOT NULL,
        content LONGBLOB NULL,
        content_type VARCHAR(16) NOT NULL,
        content_hash BINARY(32) NOT NULL,
        deleted TINYINT(1) NOT NULL,
        updated_at_ms BIGINT UNSIGNED NOT NULL,
        origin_topic VARCHAR(255) NULL,
        origin_partition INT NULL,
        origin_offset BIGINT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE {table}_migrations (version BIGINT NOT NULL PRIMARY KEY, applied_at_ms BIGINT UNSIGNED NOT NULL)",
    "INSERT INTO {table}_migrations VALUES (1, 1)",
];

const OLD_SQLITE: [&str; 3] = [
    "CREATE TABLE {table} (
        id BLOB NOT NULL PRIMARY KEY,
        version INTEGER NOT NULL,
        content BLOB NULL,
        content_type TEXT NOT NULL,
        content_hash BLOB NOT NULL,
        deleted INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        origin_topic TEXT NULL,
        origin_partition INTEGER NULL,
        origin_offset INTEGER NULL
    )",
    "CREATE TABLE {table}_migrations (version INTEGER NOT NULL PRIMARY KEY, applied_at_ms INTEGER NOT NULL)",
    "INSERT INTO {table}_migrations VALUES (1, 1)",
];

/// An old row, as the old version wrote it: `old.1`, version 5, content `old`.
const OLD_ROW: &str = "INSERT INTO {table} VALUES (X'6f6c642e31', 5, X'6f6c64', 'binary', \
    X'0000000000000000000000000000000000000000000000000000000000000000', 0, 1, NULL, NULL, NULL)";

/// The names of the table's columns and indexes, read from the server's catalogue.
async fn columns_and_indexes(l3: L3, url: &str, table: &str) -> (Vec<String>, Vec<String>) {
    match l3 {
        L3::MySql => {
            let mut connection = sqlx::MySqlConnection::connect(url).await.unwrap();
            let columns: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position",
            )
            .bind(table)
            .fetch_all(&mut connection)
            .await
            .unwrap();
            let indexes: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(CONCAT(index_name, ':', column_name) AS CHAR) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? ORDER BY index_name, seq_in_index",
            )
            .bind(table)
            .fetch_all(&mut connection)
            .await
            .unwrap();
            (columns, indexes)
        }
        L3::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(url).await.unwrap();
            let columns: Vec<String> = sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(&mut connection)
                .await
                .unwrap();
            let indexes: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT il.name || ':' || ii.name FROM pragma_index_list('{table}') AS il, \
                 pragma_index_info(il.name) AS ii WHERE il.origin = 'c' ORDER BY il.name, ii.seqno"
            ))
            .fetch_all(&mut connection)
            .await
            .unwrap();
            (columns, indexes)
        }
    }
}

async fn an_old_table_gets_the_state_column_and_index(l3: L3, test: &str) {
    let setup = Setup::new(l3, test);
    let (url, table) = (setup.sql_url(), setup.names.table.clone());
    let statements: Vec<String> = match l3 {
        L3::MySql => OLD_MYSQL.iter().chain([&OLD_ROW]).map(|sql| sql.replace("{table}", &table)).collect(),
        L3::Sqlite => OLD_SQLITE.iter().chain([&OLD_ROW]).map(|sql| sql.replace("{table}", &table)).collect(),
    };
    match l3 {
        L3::MySql => {
            let mut connection = sqlx::MySqlConnection::connect(&url).await.unwrap();
            for statement in &statements {
                connection.execute(statement.as_str()).await.unwrap();
            }
        }
        L3::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
            for statement in &statements {
                connection.execute(statement.as_str()).await.unwrap();
            }
        }
    }
    let (columns, _) = columns_and_indexes(l3, &url, &table).await;
    assert!(!columns.contains(&"state".to_owned()), "the old layout has no state: {columns:?}");

    let engine = setup.engine().await;
    let (columns, indexes) = columns_and_indexes(l3, &url, &table).await;
    // Migration 2 adds `state`, then migration 3 the membership filter's `created_at_ms`.
    assert_eq!(columns[columns.len().saturating_sub(2)..], ["state", "created_at_ms"], "{columns:?}");
    let index = if l3 == L3::MySql { "state_id".to_owned() } else { format!("{table}_state_id") };
    assert!(
        indexes.windows(2).any(|pair| pair == [format!("{index}:state"), format!("{index}:id")]),
        "an index on (state, id): {indexes:?}"
    );
    // The old row reads as before, without a state; new rows carry theirs.
    let old = engine.get("old.1").await.unwrap().expect("the old row is readable");
    assert_eq!((old.version, old.content.as_deref(), old.state.as_deref()), (5, Some(&b"old"[..]), None));
    assert_eq!(ids_of(&engine.scan_prefix("old", 10).await.unwrap()), ["old.1"]);
    engine.submit(SyncItem::new("old.1", b"new".to_vec()).with_version(6).with_state("migrated")).await.unwrap();
    assert_eq!(ids_of(&engine.scan_state("migrated", 10).await.unwrap()), ["old.1"]);
    stop(engine).await;

    // Starting again finds the migration done and changes nothing.
    let again = setup.engine().await;
    assert_eq!(again.count_state("migrated").await.unwrap(), 1);
    stop(again).await;
    assert_eq!(columns_and_indexes(l3, &url, &table).await, (columns, indexes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_table_gets_the_state_column_and_index_mysql() {
    an_old_table_gets_the_state_column_and_index(L3::MySql, "state_migrate_my").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_table_gets_the_state_column_and_index_sqlite() {
    an_old_table_gets_the_state_column_and_index(L3::Sqlite, "state_migrate_lite").await;
}

// ---- the state through the write-ahead log ----

/// An item with a state that settles in the WAL (its L3 write times out behind a table lock)
/// reaches L3 with its state when the WAL drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_travels_through_the_wal_into_l3() {
    let setup = Setup::new(L3::MySql, "state_wal");
    let config = SyncEngineConfig {
        sql_write_timeout: Duration::from_millis(1_000),
        wal_dir: Some(setup.names.wal_dir()),
        breaker_failures: 1,
        breaker_cool_down: Duration::from_millis(300),
        ..setup.config.clone()
    };
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.unwrap();
    engine.submit(SyncItem::new("wal.warmup", b"w".to_vec())).await.unwrap();
    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", setup.names.table).as_str()).await.unwrap();
    let item = SyncItem::new("wal.item", b"x".to_vec()).with_version(7).with_state("queued");
    let tier = tokio::time::timeout(Duration::from_secs(15), engine.submit(item)).await.expect("not stuck").unwrap();
    assert_eq!(tier, Tier::Wal, "the write timed out into the WAL");
    locker.execute("UNLOCK TABLES").await.unwrap();

    let store = setup.l3().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut drained = None;
    while std::time::Instant::now() < deadline {
        drained = store.get("wal.item").await.unwrap();
        if drained.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = drained.expect("the WAL drains into L3");
    assert_eq!((drained.version, drained.state.as_deref()), (7, Some("queued")));
    assert_eq!(ids_of(&engine.scan_state("queued", 10).await.unwrap()), ["wal.item"]);
    store.close().await;
    engine.shutdown_within(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(setup.names.wal_dir());
}
