//! L3 on SQLite, for a single node and the embedded demo. See `sql.rs` for the guard rules.
//!
//! SQLite integers are signed 64-bit: a version above `i64::MAX` is rejected (and so
//! dead-lettered) rather than stored wrapped. One connection: SQLite has one writer, and
//! `synchronous = FULL` because offsets are committed on this durability.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row};

use crate::item::{now_ms, SyncItem};
use crate::storage::sql::{self, chunks, classify, HeldRows, ASSIGNED, COLUMNS, COLUMN_COUNT};
use crate::storage::{sql_merkle, StoreError};

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    pub(super) table: String,
    /// `SELECT`s sent by `stored_in` and `live` (see `SqlStore::read_statements`).
    pub(super) read_statements: AtomicU64,
    /// Whether `write_batch` marks ids for the merkle tree (`sql_merkle.rs`).
    pub(super) merkle_marks: AtomicBool,
}

const MIGRATIONS: [(i64, &str); 1] = [(
    1,
    "CREATE TABLE IF NOT EXISTS {table} (
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
)];

/// The migration that adds the `state` column and its `(state, id)` index (`add_state`):
/// SQLite has no `ADD COLUMN IF NOT EXISTS`, so the table's columns are checked first.
const STATE_MIGRATION: i64 = 2;

/// The migration that adds `created_at_ms` and its index (`add_created_at`). SQLite cannot
/// add a column whose default is an expression, so the upsert stamps it: set on insert,
/// never assigned on conflict.
const CREATED_AT_MIGRATION: i64 = 3;

/// The database clock in ms since the epoch (`created_at_ms`).
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// SQLite integers are signed: a version above `i64::MAX` cannot be stored as is.
pub fn refuses(item: &SyncItem) -> Option<String> {
    i64::try_from(item.version)
        .is_err()
        .then(|| format!("version {} exceeds sqlite's signed 64-bit range", item.version))
}

/// WAL pages between automatic checkpoints (see `connect`).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

impl SqliteStore {
    pub async fn connect(url: &str, table: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|_| StoreError::Rejected("invalid sqlite url".into()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .disable_statement_logging();
        // Checkpoint the WAL every 10,000 pages (~40 MiB) rather than SQLite's 1,000: with
        // batches of random ids nearly every commit passed 1,000 pages, so each one paid a
        // checkpoint, and a page changed by several batches was copied back several times.
        // The embedded demo: 14,400 -> 16,200 items/s (3 runs each).
        let options = options.pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(sql::CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(classify)?;
        let store = SqliteStore {
            pool,
            table: table.to_owned(),
            read_statements: AtomicU64::new(0),
            merkle_marks: AtomicBool::new(false),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let ledger = format!("{}_migrations", self.table);
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (version INTEGER NOT NULL PRIMARY KEY, applied_at_ms INTEGER NOT NULL)"
        ))
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        let versions = MIGRATIONS.iter().map(|(version, _)| *version).chain([
            STATE_MIGRATION,
            CREATED_AT_MIGRATION,
            sql_merkle::MERKLE_MIGRATION,
        ]);
        for version in versions {
            let done: Option<i64> = sqlx::query_scalar(&format!("SELECT version FROM {ledger} WHERE version = ?"))
                .bind(version)
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
            if done.is_none() {
                match MIGRATIONS.iter().find(|(number, _)| *number == version) {
                    Some((_, template)) => {
                        let statement = template.replace("{table}", &self.table);
                        sqlx::query(&statement).execute(&self.pool).await.map_err(classify)?;
                    }
                    None if version == CREATED_AT_MIGRATION => self.add_created_at().await?,
                    None if version == STATE_MIGRATION => self.add_state().await?,
                    None => {
                        for statement in sql_merkle::create_statements(&self.table, false) {
                            sqlx::query(&statement).execute(&self.pool).await.map_err(classify)?;
                        }
                    }
                }
                sqlx::query(&format!("INSERT OR IGNORE INTO {ledger} (version, applied_at_ms) VALUES (?, ?)"))
                    .bind(version)
                    .bind(now_ms() as i64)
                    .execute(&self.pool)
                    .await
                    .map_err(classify)?;
            }
        }
        Ok(())
    }

    /// Adds the nullable `state` column and the `(state, id)` index. Index names are per
    /// database in SQLite: it is `<table>_state_id`.
    async fn add_state(&self) -> Result<(), StoreError> {
        self.add_column_with_index("state", "BLOB", "state_id", "state, id").await
    }

    /// Adds `created_at_ms` and its index `<table>_created_at_ms`. Rows from before keep
    /// NULL: the filter's warm-up pages every id.
    async fn add_created_at(&self) -> Result<(), StoreError> {
        self.add_column_with_index("created_at_ms", "INTEGER", "created_at_ms", "created_at_ms").await
    }

    /// Adds a nullable column unless `pragma table_info` lists it, then the index
    /// `<table>_<index>` on `columns` unless it exists.
    async fn add_column_with_index(
        &self,
        column: &str,
        column_type: &str,
        index: &str,
        columns: &str,
    ) -> Result<(), StoreError> {
        let table = &self.table;
        let present: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?"))
                .bind(column)
                .fetch_one(&self.pool)
                .await
                .map_err(classify)?;
        if present == 0 {
            sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {column_type} NULL"))
                .execute(&self.pool)
                .await
                .map_err(classify)?;
        }
        sqlx::query(&format!("CREATE INDEX IF NOT EXISTS {table}_{index} ON {table} ({columns})"))
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    fn upsert_sql(&self, rows: usize) -> String {
        let table = &self.table;
        let assignments: Vec<String> = ASSIGNED.iter().map(|column| format!("{column} = excluded.{column}")).collect();
        // Each row's values, then the insert's `created_at_ms` (not among the assigned columns:
        // an update keeps the first insert's stamp).
        let row = format!("({}, {NOW_MS})", vec!["?"; COLUMN_COUNT].join(", "));
        let values = vec![row; rows].join(", ");
        format!(
            "INSERT INTO {table} ({COLUMNS}, created_at_ms) VALUES {values} ON CONFLICT(id) DO UPDATE SET {} \
             WHERE excluded.version > {table}.version OR (excluded.version = {table}.version \
             AND excluded.origin_topic = {table}.origin_topic AND excluded.origin_partition = {table}.origin_partition \
             AND excluded.origin_offset > {table}.origin_offset)",
            assignments.join(", ")
        )
    }

    pub async fn write_batch(&self, items: &[&SyncItem]) -> Result<HeldRows, StoreError> {
        if let Some(why) = items.iter().find_map(|item| refuses(item)) {
            return Err(StoreError::Rejected(why));
        }
        let updated_at_ms = now_ms() as i64;
        let mut transaction = self.pool.begin().await.map_err(classify)?;
        let mut held = HeldRows::with_capacity(items.len());
        for chunk in chunks(items, sql::CHUNK_MAX_BYTES) {
            let statement = self.upsert_sql(chunk.len());
            let mut query = sqlx::query(&statement);
            for item in chunk {
                let origin = item.origin.as_ref();
                query = query
                    .bind(item.id.as_bytes())
                    .bind(item.version as i64)
                    .bind(item.content.as_deref())
                    .bind(item.content_type.as_str())
                    .bind(item.content_hash().to_vec())
                    .bind(item.is_tombstone())
                    .bind(updated_at_ms)
                    .bind(origin.map(|o| o.topic.to_string()))
                    .bind(origin.map(|o| o.partition))
                    .bind(origin.map(|o| o.offset))
                    .bind(item.state.as_deref().map(str::as_bytes));
            }
            query.execute(&mut *transaction).await.map_err(classify)?;
            // SQLite has one writer: the read-back sees exactly what this transaction commits.
            let select = sql::held_rows_sql(&self.table, chunk.len(), false);
            let mut query = sqlx::query(&select);
            for item in chunk {
                query = query.bind(item.id.as_bytes());
            }
            for row in query.fetch_all(&mut *transaction).await.map_err(classify)? {
                let (id, row) =
                    sql::held_row(&row, row.try_get::<i64, _>(sql::HELD_VERSION).map_err(classify)? as u64)?;
                held.insert(id, row);
            }
        }
        // The merkle tree's durable dirty marks, with the leaf of what this transaction commits
        // (sql_merkle.rs): one row per thousand ids, after every upsert took its row lock.
        if self.merkle_marks.load(Ordering::Relaxed) {
            let statement = sql_merkle::mark_sql(&self.table);
            for marks in sql_merkle::batch_mark_rows(items, &held) {
                sqlx::query(&statement).bind(marks).execute(&mut *transaction).await.map_err(classify)?;
            }
        }
        transaction.commit().await.map_err(classify)?;
        Ok(held)
    }
}

super::sql_reads::sql_reads!(SqliteStore, sqlx::Sqlite, unsigned, NOW_MS);

/// An unsigned column (a version, a time in ms) of a row read here: SQLite stores it signed.
fn unsigned(row: &sqlx::sqlite::SqliteRow, column: &str) -> Result<u64, StoreError> {
    Ok(row.try_get::<i64, _>(column).map_err(classify)? as u64)
}
