//! The membership filter over L3's ids (`FilterManager`, `FilterTrust`) against real MariaDB
//! (and SQLite): engines sharing one L3 table learn each other's inserts within the stated
//! bound with zero false negatives, a trusted filter saves the L3 statements of a miss
//! workload, and an untrusted filter (warming up, or a tail lagging beyond the bound) sends
//! every read to L3.
//!
//! The engines here have no L2, so every L1 miss is a question for the filter or L3.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqlx::{Connection, Executor};
use sync_engine::config::Secret;
use sync_engine::storage::sql::SqlStore;
use sync_engine::storage::ArchiveStore;
use sync_engine::{FilterConfig, FilterTrust, SyncEngine, SyncEngineConfig, SyncItem};
use tokio::sync::watch;

fn config(names: &Names, filter: FilterConfig) -> SyncEngineConfig {
    SyncEngineConfig { redis_url: None, filter, ..engine_config(names) }
}

/// Polls every 100 ms, trusted while the last poll started within a second.
fn quick() -> FilterConfig {
    FilterConfig { poll_interval: Duration::from_millis(100), lag_bound: Duration::from_secs(1), ..Default::default() }
}

async fn engine(config: SyncEngineConfig) -> SyncEngine {
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

async fn stop(engine: SyncEngine) {
    engine.shutdown_within(Duration::from_secs(5)).await;
}

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}.{n}")).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

fn items(ids: &[String]) -> Vec<SyncItem> {
    ids.iter().map(|id| SyncItem::new(id.as_str(), id.as_bytes().to_vec()).with_version(10)).collect()
}

async fn wait_trusted(engine: &SyncEngine) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let trust = engine.filter_trust().expect("the engine has a filter");
        if trust.is_trusted() {
            return;
        }
        assert!(Instant::now() < deadline, "the filter never became trusted: {trust}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Engine A writes 3,000 ids; engine B, on the same table, finds every one of them with
/// `get`, `get_many` and `contains` once the bound has passed (zero false negatives), and
/// its filter holds every one (learnt from the tail, not from L3 answering instead). A row
/// inserted by a transaction that stays open longer than B's lag bound is found too: the
/// tail re-reads an overlap as long as the longest transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_l3_learn_each_others_inserts_within_the_bound() {
    let names = Names::new("filter_two");
    let a = engine(config(&names, quick())).await;
    let b = engine(config(&names, quick())).await;
    wait_trusted(&a).await;
    wait_trusted(&b).await;

    let written = ids("uk.nhs.patient", 3_000);
    for chunk in written.chunks(500) {
        a.submit_many(items(chunk)).await.expect("A writes");
    }
    a.delete_many(&["uk.nhs.patient.7"]).await.expect("A deletes one");
    // A long transaction by another writer: its row's created_at_ms is stamped at its insert,
    // two seconds (longer than the lag bound, many polls) before it commits.
    let mut raw = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    raw.execute("BEGIN").await.unwrap();
    let late = format!(
        "INSERT INTO {} (id, version, content, content_type, content_hash, deleted, updated_at_ms) \
         VALUES ('uk.nhs.late.1', 1, 'x', 'binary', REPEAT('0', 32), 0, 0)",
        names.table
    );
    raw.execute(late.as_str()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    raw.execute("COMMIT").await.unwrap();
    let committed = Instant::now();

    // The stated bound: an id committed more than lag_bound before the read is in B's filter.
    tokio::time::sleep(quick().lag_bound + Duration::from_millis(100)).await;
    assert_eq!(b.filter_trust(), Some(FilterTrust::Trusted), "B's tail keeps up");
    let filter = b.filter().unwrap();
    let learnt = written.iter().filter(|id| filter.may_contain(id)).count();
    assert_eq!(learnt, written.len(), "B's filter learnt every id A inserted");
    assert!(
        filter.may_contain("uk.nhs.late.1"),
        "and the one committed {:?} ago after a long transaction",
        committed.elapsed()
    );

    let mut false_negatives = 0;
    for id in &written[..1_000] {
        if b.get(id).await.unwrap().is_none() && id != "uk.nhs.patient.7" {
            false_negatives += 1;
        }
    }
    for id in &written[1_000..2_000] {
        if !b.contains(id).await.unwrap() && id != "uk.nhs.patient.7" {
            false_negatives += 1;
        }
    }
    let found = b.get_many(&refs(&written[2_000..])).await.unwrap();
    false_negatives += 1_000 - found.len();
    assert_eq!(false_negatives, 0, "no false negative among 3,000 ids written by the other engine");
    assert!(b.get("uk.nhs.patient.7").await.unwrap().is_none(), "a tombstone reads as deleted");
    assert!(b.contains("uk.nhs.late.1").await.unwrap());
    // And the filter answers for ids nobody wrote.
    let saved = b.filter_stats().unwrap().queries_saved;
    assert!(!b.contains("uk.nhs.nobody").await.unwrap());
    assert!(b.filter_stats().unwrap().queries_saved > saved, "an unknown id skipped L3");
    stop(a).await;
    stop(b).await;
}

/// 100,000 misses on a trusted filter issue a handful of L3 statements (one per false
/// positive); the same misses without the filter issue one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_workload_on_a_trusted_filter_issues_almost_no_l3_statements() {
    let names = Names::new("filter_miss");
    let with = engine(config(&names, quick())).await;
    let written = ids("present", 10_000);
    for chunk in written.chunks(1_000) {
        with.submit_many(items(chunk)).await.unwrap();
    }
    wait_trusted(&with).await;
    let l3 = with.l3().unwrap();

    let misses = 100_000;
    let before = l3.read_statements();
    let started = Instant::now();
    for n in 0..misses {
        assert!(!with.contains(&format!("absent.{n}")).await.unwrap());
    }
    let with_elapsed = started.elapsed();
    let with_statements = l3.read_statements() - before;
    let stats = with.filter_stats().unwrap();
    assert!(with_statements < 500, "{with_statements} L3 statements for {misses} misses");
    assert_eq!(stats.queries_saved, misses - with_statements);

    let without = engine(config(&names, FilterConfig { enabled: false, ..quick() })).await;
    assert_eq!(without.filter_trust(), None);
    let l3 = without.l3().unwrap();
    let sample = 5_000;
    let before = l3.read_statements();
    let started = Instant::now();
    for n in 0..sample {
        assert!(!without.contains(&format!("absent.{n}")).await.unwrap());
    }
    let without_elapsed = started.elapsed();
    assert_eq!(l3.read_statements() - before, sample, "without the filter every miss is a statement");
    println!(
        "misses: {misses} with a trusted filter of {} ids ({} bytes): {with_statements} L3 statements, {:.0} ms; \
         without the filter: {sample} misses, {sample} statements, {:.0} ms ({:.0} ms per 100,000)",
        stats.ids,
        stats.memory_bytes,
        with_elapsed.as_secs_f64() * 1e3,
        without_elapsed.as_secs_f64() * 1e3,
        without_elapsed.as_secs_f64() * 1e3 * 100_000.0 / sample as f64,
    );
    stop(with).await;
    stop(without).await;
}

/// Until the warm-up has paged every L3 id, reads go to L3; after it, the filter holds every
/// row that was there before the engine started (tombstones included) and saves misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_l3_until_the_warm_up_has_paged_every_id() {
    let names = Names::new("filter_warm");
    let before_start = ids("old", 50_000);
    {
        let store = SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
        let all = items(&before_start);
        for chunk in all.chunks(1_000) {
            let refs: Vec<&SyncItem> = chunk.iter().collect();
            store.write_batch(&refs, Duration::from_secs(30)).await.unwrap();
        }
        let tombstone = SyncItem::tombstone("old.tombstone", 20);
        store.write_batch(&[&tombstone], Duration::from_secs(30)).await.unwrap();
        store.close().await;
    }
    // Small pages make the warm-up take a hundred statements.
    let reader = engine(config(&names, FilterConfig { page_ids: 500, ..quick() })).await;
    let l3 = reader.l3().unwrap();
    let trust = reader.filter_trust().unwrap();
    assert!(!trust.is_trusted(), "not trusted before the warm-up: {trust}");
    let statements = l3.read_statements();
    assert!(!reader.contains("never.written").await.unwrap());
    let trust_after = reader.filter_trust().unwrap();
    assert!(!trust_after.is_trusted(), "the read happened during the warm-up: {trust_after}");
    assert_eq!(l3.read_statements() - statements, 1, "an untrusted filter sends the read to L3");

    wait_trusted(&reader).await;
    let filter = reader.filter().unwrap();
    assert!(before_start.iter().all(|id| filter.may_contain(id)), "every row from before the start");
    assert!(filter.may_contain("old.tombstone"), "tombstones are rows");
    let statements = l3.read_statements();
    assert!(!reader.contains("never.written").await.unwrap());
    assert_eq!(l3.read_statements(), statements, "a trusted filter skips L3 for an unknown id");
    assert!(reader.contains("old.49999").await.unwrap());
    stop(reader).await;
}

/// A tail that has not completed a poll within the bound is not trusted: reads go to L3 and
/// find what another engine wrote meanwhile; `/health/ready`'s state says it lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_lagging_beyond_the_bound_sends_reads_to_l3() {
    let names = Names::new("filter_lag");
    // One poll after the warm-up, then none for an hour: the lag grows past 300 ms.
    let lagging = FilterConfig {
        poll_interval: Duration::from_secs(3600),
        lag_bound: Duration::from_millis(300),
        ..Default::default()
    };
    let b = engine(config(&names, lagging)).await;
    wait_trusted(&b).await;
    let a = engine(config(&names, quick())).await;
    a.submit(SyncItem::new("written.by.a", b"x".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let trust = b.filter_trust().unwrap();
    assert!(matches!(trust, FilterTrust::Lagging { lag_ms } if lag_ms >= 300), "{trust}");
    assert!(matches!(b.backend_state().filter, Some(FilterTrust::Lagging { .. })));
    assert!(!b.filter().unwrap().may_contain("written.by.a"), "B's tail has not seen it");

    let l3 = b.l3().unwrap();
    let statements = l3.read_statements();
    assert!(b.contains("written.by.a").await.unwrap(), "found in L3 despite the filter");
    assert!(!b.contains("written.by.nobody").await.unwrap());
    assert_eq!(l3.read_statements() - statements, 2, "both reads went to L3");
    assert!(b.get("written.by.a").await.unwrap().is_some());
    stop(a).await;
    stop(b).await;
}

/// The same on SQLite: two engines on one database file, ids stamped by the upsert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_sqlite_file_learn_each_others_inserts() {
    let names = Names::new("filter_lite");
    let file = tempfile::NamedTempFile::new().unwrap();
    let config = SyncEngineConfig {
        sql_url: Some(Secret::new(format!("sqlite://{}?mode=rwc", file.path().display()))),
        ..config(&names, quick())
    };
    let a = engine(config.clone()).await;
    let b = engine(config).await;
    wait_trusted(&b).await;
    let written = ids("lite", 1_000);
    a.submit_many(items(&written)).await.unwrap();
    tokio::time::sleep(quick().lag_bound + Duration::from_millis(100)).await;
    assert!(b.filter_trust().unwrap().is_trusted());
    let filter = b.filter().unwrap();
    assert!(written.iter().all(|id| filter.may_contain(id)), "B learnt every id A inserted");
    assert_eq!(b.get_many(&refs(&written)).await.unwrap().len(), 1_000);
    stop(a).await;
    stop(b).await;
}

/// A table from before `created_at_ms` gets the column, its database default and its index
/// at start (migration 3); its old rows (NULL) are found by the warm-up, and a row inserted
/// afterwards by a writer that does not name the column is stamped by the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_table_is_migrated_and_its_old_rows_are_found_by_the_warm_up() {
    let names = Names::new("filter_mig");
    let table = &names.table;
    let mut raw = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    let old_schema = [
        format!(
            "CREATE TABLE {table} (id VARBINARY(255) NOT NULL PRIMARY KEY, version BIGINT UNSIGNED NOT NULL, \
             content LONGBLOB NULL, content_type VARCHAR(16) NOT NULL, content_hash BINARY(32) NOT NULL, \
             deleted TINYINT(1) NOT NULL, updated_at_ms BIGINT UNSIGNED NOT NULL, origin_topic VARCHAR(255) NULL, \
             origin_partition INT NULL, origin_offset BIGINT NULL, state VARBINARY(64) NULL, \
             INDEX state_id (state, id)) ENGINE=InnoDB"
        ),
        format!("CREATE TABLE {table}_migrations (version BIGINT NOT NULL PRIMARY KEY, applied_at_ms BIGINT UNSIGNED NOT NULL)"),
        format!("INSERT INTO {table}_migrations VALUES (1, 0), (2, 0)"),
        format!(
            "INSERT INTO {table} (id, version, content, content_type, content_hash, deleted, updated_at_ms) \
             VALUES ('old.1', 1, 'x', 'binary', REPEAT('0', 32), 0, 0), ('old.2', 1, NULL, 'binary', REPEAT('0', 32), 1, 0)"
        ),
    ];
    for statement in &old_schema {
        raw.execute(statement.as_str()).await.unwrap();
    }
    let reader = engine(config(&names, quick())).await;
    wait_trusted(&reader).await;
    let filter = reader.filter().unwrap();
    assert!(filter.may_contain("old.1") && filter.may_contain("old.2"));
    let stamped: Option<i64> = sqlx::query_scalar(&format!("SELECT created_at_ms FROM {table} WHERE id = 'old.1'"))
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(stamped, None, "rows from before the migration keep NULL");
    // An old-version writer names its columns and never created_at_ms: the default stamps it.
    raw.execute(
        format!(
            "INSERT INTO {table} (id, version, content, content_type, content_hash, deleted, updated_at_ms) \
             VALUES ('new.by.old.writer', 1, 'x', 'binary', REPEAT('0', 32), 0, 0)"
        )
        .as_str(),
    )
    .await
    .unwrap();
    let stamped: Option<i64> =
        sqlx::query_scalar(&format!("SELECT created_at_ms FROM {table} WHERE id = 'new.by.old.writer'"))
            .fetch_one(&mut raw)
            .await
            .unwrap();
    assert!(stamped.is_some_and(|ms| ms > 1_700_000_000_000), "stamped by the database: {stamped:?}");
    tokio::time::sleep(quick().lag_bound + Duration::from_millis(100)).await;
    assert!(filter.may_contain("new.by.old.writer"), "the tail reads what an old writer inserts");
    assert!(reader.contains("new.by.old.writer").await.unwrap());
    stop(reader).await;
}

/// What the warm-up and one tail poll cost on 200,000 rows, printed for the README
/// (`cargo test --test filter measure -- --ignored --nocapture`): the tail re-reads every row
/// inserted within the overlap (`SYNC_SQL_WRITE_TIMEOUT_MS` + the commit margin) on every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_warm_up_and_tail_poll_cost() {
    let names = Names::new("filter_cost");
    let store = SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
    let rows = 200_000;
    let all = items(&ids("uk.nhs.patient.record", rows));
    for chunk in all.chunks(1_000) {
        let refs: Vec<&SyncItem> = chunk.iter().collect();
        store.write_batch(&refs, Duration::from_secs(30)).await.unwrap();
    }
    for _ in 0..2 {
        let started = Instant::now();
        let (mut after, mut read) = (None::<Vec<u8>>, 0);
        loop {
            let page = store.ids_after(after.as_deref(), 10_000).await.unwrap();
            read += page.len();
            if page.len() < 10_000 {
                break;
            }
            after = page.last().cloned();
        }
        let warm = started.elapsed();
        let started = Instant::now();
        let (mut after, mut tailed) = (None::<(i64, Vec<u8>)>, 0);
        loop {
            let page =
                store.ids_created_since(0, after.as_ref().map(|(at, id)| (*at, id.as_slice())), 10_000).await.unwrap();
            tailed += page.len();
            if page.len() < 10_000 {
                break;
            }
            after = page.last().cloned();
        }
        let tail = started.elapsed();
        println!(
            "warm-up: {read} ids in {:.0} ms ({:.0} ids/s); a tail poll re-reading {tailed} ids: {:.0} ms ({:.0} ids/s)",
            warm.as_secs_f64() * 1e3,
            read as f64 / warm.as_secs_f64(),
            tail.as_secs_f64() * 1e3,
            tailed as f64 / tail.as_secs_f64(),
        );
    }
    store.close().await;
}

/// The warm-up pages by the stored bytes: a row whose id is not UTF-8 (written by hand) does
/// not make the next page skip the ids after it (`aé` sorts between `a\x80` and its lossy
/// text `a\u{FFFD}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_pages_by_bytes_past_an_id_that_is_not_utf8() {
    let names = Names::new("filter_bytes");
    let store = SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
    let valid = items(&["a.1".to_owned(), "aé".to_owned(), "b".to_owned()]);
    store.write_batch(&valid.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await.unwrap();
    store.close().await;
    let mut raw = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    let odd = format!(
        "INSERT INTO {} (id, version, content, content_type, content_hash, deleted, updated_at_ms) \
         VALUES (X'6180', 1, 'x', 'binary', REPEAT('0', 32), 0, 0)",
        names.table
    );
    raw.execute(odd.as_str()).await.unwrap();
    let reader = engine(config(&names, FilterConfig { page_ids: 1, ..quick() })).await;
    wait_trusted(&reader).await;
    let filter = reader.filter().unwrap();
    for id in ["a.1", "aé", "b"] {
        assert!(filter.may_contain(id), "{id} was paged");
    }
    stop(reader).await;
}

/// Items that settled in the write-ahead log while L3 was down enter the filter when a later
/// engine drains them (the drain adds ids before its write), not only when its tail would
/// next poll: here the tail polls once an hour, so only the drain's hook can add them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_drained_from_the_wal_by_a_restarted_engine_enter_its_filter() {
    let wal = tempfile::tempdir().unwrap();
    let l3 = std::sync::Arc::new(sync_engine::MemoryArchiveStore::new());
    let config = SyncEngineConfig {
        wal_dir: Some(wal.path().to_path_buf()),
        filter: FilterConfig {
            poll_interval: Duration::from_secs(3600),
            lag_bound: Duration::from_secs(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut first = SyncEngine::new(config.clone(), watch::channel(config.clone()).1).with_archive_store(l3.clone());
    first.start().await.unwrap();
    l3.set_available(false);
    let ids = ids("wal", 20);
    for item in items(&ids) {
        assert_eq!(first.submit(item).await.unwrap(), sync_engine::Tier::Wal);
    }
    first.shutdown_within(Duration::from_secs(5)).await;
    l3.set_available(true);

    // The restarted engine warms up (L3 is still empty), polls once, then drains the WAL.
    let mut second = SyncEngine::new(config.clone(), watch::channel(config).1).with_archive_store(l3.clone());
    second.start().await.unwrap();
    wait_trusted(&second).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while l3.len() < ids.len() {
        assert!(Instant::now() < deadline, "the WAL drained into L3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let filter = second.filter().unwrap();
    assert!(ids.iter().all(|id| filter.may_contain(id)), "drained ids are in the filter");
    assert_eq!(second.filter_trust(), Some(FilterTrust::Trusted));
    assert_eq!(second.get_many(&refs(&ids)).await.unwrap().len(), ids.len(), "and every read finds them");
    second.shutdown_within(Duration::from_secs(5)).await;
}
