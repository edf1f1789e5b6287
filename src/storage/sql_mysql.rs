//! L3 on MySQL/MariaDB. See `sql.rs` for the guard and chunking rules.
//!
//! MariaDB has no `AS new` row alias, so the guard reads incoming values with `VALUES()`.

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlx::{ConnectOptions, Row};

use crate::item::{now_ms, SyncItem};
use crate::storage::sql::{self, chunks, classify, placeholders, HeldRows, ASSIGNED, COLUMNS, COLUMN_COUNT};
use crate::storage::{sql_merkle, StoreError};

pub struct MySqlStore {
    pub(super) pool: MySqlPool,
    pub(super) table: String,
    /// The server's `max_allowed_packet`, read at connect: statements must stay under it.
    max_allowed_packet: u64,
    /// `SELECT`s sent by `stored_in` and `live` (see `SqlStore::read_statements`).
    pub(super) read_statements: AtomicU64,
    /// Whether `write_batch` marks ids for the merkle tree (`sql_merkle.rs`).
    pub(super) merkle_marks: AtomicBool,
    /// Whether the upsert reports the rows it holds itself (`INSERT … RETURNING`, MariaDB 10.5
    /// and later), which spares a second lookup of every row; otherwise a `SELECT … FOR
    /// UPDATE` reads them back. Read from the server's version at connect.
    pub(super) returning: AtomicBool,
}

/// Room in a one-row statement for everything but the content (SQL text, id, hash, origin).
const ROW_OVERHEAD_BYTES: u64 = 16 << 10;

/// Migrations, in order; `{table}` is the validated table name.
const MIGRATIONS: [(i64, &str); 1] = [(
    1,
    "CREATE TABLE IF NOT EXISTS {table} (
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
)];

/// The migration that adds the `state` column and its `(state, id)` index (`add_state`):
/// code rather than one statement, so that it also works on MySQL, which lacks MariaDB's
/// `ADD COLUMN IF NOT EXISTS`, and on a table some other process migrated meanwhile.
const STATE_MIGRATION: i64 = 2;

/// The migration that adds `created_at_ms` (`add_created_at`): stamped by the database when
/// a row is first inserted (a column default, so every writer sets it, this version or not),
/// never changed by an update; indexed, so the membership filter's tail can read what other
/// processes inserted.
const CREATED_AT_MIGRATION: i64 = 3;

/// The database clock in ms since the epoch, independent of the session's time zone
/// (`UNIX_TIMESTAMP(NOW(3))` is not, across a daylight-saving change).
const NOW_MS: &str = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(3)) DIV 1000)";

const GUARD: &str = "VALUES(version) > version OR (VALUES(version) = version \
    AND VALUES(origin_topic) = origin_topic AND VALUES(origin_partition) = origin_partition \
    AND VALUES(origin_offset) > origin_offset)";

impl MySqlStore {
    pub async fn connect(url: &str, table: &str) -> Result<MySqlStore, StoreError> {
        let options: MySqlConnectOptions = url.parse().map_err(|_| StoreError::Rejected("invalid mysql url".into()))?;
        let options = options.disable_statement_logging();
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(sql::CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(classify)?;
        let max_allowed_packet: u64 =
            sqlx::query_scalar("SELECT @@max_allowed_packet").fetch_one(&pool).await.map_err(classify)?;
        let server_version: String = sqlx::query_scalar("SELECT VERSION()").fetch_one(&pool).await.map_err(classify)?;
        let store = MySqlStore {
            pool,
            table: table.to_owned(),
            max_allowed_packet,
            read_statements: AtomicU64::new(0),
            merkle_marks: AtomicBool::new(false),
            returning: AtomicBool::new(runs_insert_returning(&server_version)),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The largest content one row can carry in a statement under `max_allowed_packet`.
    pub fn max_item_bytes(&self) -> u64 {
        self.max_allowed_packet.saturating_sub(ROW_OVERHEAD_BYTES)
    }

    /// Refused here rather than by the server: far over the limit, the server may close the
    /// connection mid-send, which would look like an outage instead of a rejection.
    pub fn refuses(&self, item: &SyncItem) -> Option<String> {
        let (size, limit) = (item.content.as_ref().map_or(0, |c| c.len()) as u64, self.max_item_bytes());
        (size > limit).then(|| {
            format!("item of {size} bytes is larger than the server's max_allowed_packet allows ({limit} bytes)")
        })
    }

    /// Content bytes per multi-row statement: half the packet limit leaves room for the rest.
    fn chunk_max_bytes(&self) -> usize {
        (self.max_allowed_packet / 2).min(sql::CHUNK_MAX_BYTES as u64) as usize
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let ledger = format!("{}_migrations", self.table);
        let create_ledger =
            format!("CREATE TABLE IF NOT EXISTS {ledger} (version BIGINT NOT NULL PRIMARY KEY, applied_at_ms BIGINT UNSIGNED NOT NULL)");
        sqlx::query(&create_ledger).execute(&self.pool).await.map_err(classify)?;
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
                        for statement in sql_merkle::create_statements(&self.table, true) {
                            sqlx::query(&statement).execute(&self.pool).await.map_err(classify)?;
                        }
                    }
                }
                sqlx::query(&format!("INSERT IGNORE INTO {ledger} (version, applied_at_ms) VALUES (?, ?)"))
                    .bind(version)
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(classify)?;
            }
        }
        Ok(())
    }

    /// Adds the nullable `state` column and the `(state, id)` index unless the table has them
    /// (a table created before states existed gets them here; MariaDB adds a nullable column
    /// instantly, the index is built online), through `alter_unless_present`.
    async fn add_state(&self) -> Result<(), StoreError> {
        let table = &self.table;
        let steps = [
            (
                "SELECT COUNT(*) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = ? AND column_name = 'state'",
                format!("ALTER TABLE {table} ADD COLUMN state VARBINARY(64) NULL"),
            ),
            (
                "SELECT COUNT(*) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? AND index_name = 'state_id'",
                // Index names are per table in MySQL: no need to prefix it with the table's.
                format!("ALTER TABLE {table} ADD INDEX state_id (state, id)"),
            ),
        ];
        self.alter_unless_present(&steps).await
    }

    /// Adds `created_at_ms` (nullable: existing rows keep NULL, and adding it is instant),
    /// then its default (the database clock: metadata only), then its index (built online).
    /// Rows from before have NULL: the filter's warm-up pages every id, so it needs no stamp.
    async fn add_created_at(&self) -> Result<(), StoreError> {
        let table = &self.table;
        let steps = [
            (
                "SELECT COUNT(*) FROM information_schema.columns \
                 WHERE table_schema = DATABASE() AND table_name = ? AND column_name = 'created_at_ms'",
                format!("ALTER TABLE {table} ADD COLUMN created_at_ms BIGINT NULL"),
            ),
            (
                "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() \
                 AND table_name = ? AND column_name = 'created_at_ms' AND column_default IS NOT NULL \
                 AND column_default <> 'NULL'",
                format!("ALTER TABLE {table} ALTER COLUMN created_at_ms SET DEFAULT {NOW_MS}"),
            ),
            (
                "SELECT COUNT(*) FROM information_schema.statistics \
                 WHERE table_schema = DATABASE() AND table_name = ? AND index_name = 'created_at_ms'",
                format!("ALTER TABLE {table} ADD INDEX created_at_ms (created_at_ms)"),
            ),
        ];
        self.alter_unless_present(&steps).await
    }

    /// Runs each `ALTER` whose check counts nothing yet. Another process altering the table
    /// at the same time is fine: a failed `ALTER` is an error only if its check still fails.
    async fn alter_unless_present(&self, steps: &[(&str, String)]) -> Result<(), StoreError> {
        let table = &self.table;
        for (check, alter) in steps {
            let present = || async {
                let count: i64 = sqlx::query_scalar(check).bind(table).fetch_one(&self.pool).await.map_err(classify)?;
                Ok::<bool, StoreError>(count > 0)
            };
            if present().await? {
                continue;
            }
            if let Err(error) = sqlx::query(alter).execute(&self.pool).await {
                if !present().await? {
                    return Err(classify(error));
                }
            }
        }
        Ok(())
    }

    /// The guarded upsert of `rows` rows; with `returning`, it reports the rows it leaves.
    fn upsert_sql(&self, rows: usize, returning: bool) -> String {
        let assignments: Vec<String> =
            ASSIGNED.iter().map(|column| format!("{column} = IF({GUARD}, VALUES({column}), {column})")).collect();
        let returning_clause = if returning { format!(" RETURNING {}", sql::HELD_COLUMNS) } else { String::new() };
        format!(
            "INSERT INTO {} ({COLUMNS}) VALUES {} ON DUPLICATE KEY UPDATE {}{returning_clause}",
            self.table,
            placeholders(rows, COLUMN_COUNT),
            assignments.join(", ")
        )
    }

    pub async fn write_batch(&self, items: &[&SyncItem]) -> Result<HeldRows, StoreError> {
        if let Some(why) = items.iter().find_map(|item| self.refuses(item)) {
            return Err(StoreError::Rejected(why));
        }
        let updated_at_ms = now_ms();
        let mut transaction = self.pool.begin().await.map_err(classify)?;
        let mut held = HeldRows::with_capacity(items.len());
        // Read once: the statement and how its rows are read back must agree.
        let returning = self.returning.load(Ordering::Relaxed);
        for chunk in chunks(items, self.chunk_max_bytes()) {
            let statement = self.upsert_sql(chunk.len(), returning);
            let mut query = sqlx::query(&statement);
            for item in chunk {
                let origin = item.origin.as_ref();
                query = query
                    .bind(item.id.as_bytes())
                    .bind(item.version)
                    .bind(item.content.as_deref())
                    .bind(item.content_type.as_str())
                    .bind(item.content_hash().to_vec())
                    .bind(item.is_tombstone())
                    .bind(updated_at_ms)
                    .bind(origin.map(|o| o.topic.as_ref()))
                    .bind(origin.map(|o| o.partition))
                    .bind(origin.map(|o| o.offset))
                    .bind(item.state.as_deref().map(str::as_bytes));
            }
            let rows = if returning {
                // Each row as the upsert left it, under the lock it took: what this
                // transaction commits. MariaDB returns them in input order, so with an id
                // twice in a chunk the later row (the final state) is inserted last.
                query.fetch_all(&mut *transaction).await.map_err(classify)?
            } else {
                query.execute(&mut *transaction).await.map_err(classify)?;
                // Read back under the row locks the upsert holds: what this transaction commits.
                let select = sql::held_rows_sql(&self.table, chunk.len(), true);
                let mut query = sqlx::query(&select);
                for item in chunk {
                    query = query.bind(item.id.as_bytes());
                }
                query.fetch_all(&mut *transaction).await.map_err(classify)?
            };
            for row in rows {
                let (id, row) = sql::held_row(&row, row.try_get::<u64, _>(sql::HELD_VERSION).map_err(classify)?)?;
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

super::sql_reads::sql_reads!(MySqlStore, sqlx::MySql, unsigned, NOW_MS);

/// An unsigned column (a version, a time in ms) of a row read here.
fn unsigned(row: &sqlx::mysql::MySqlRow, column: &str) -> Result<u64, StoreError> {
    row.try_get::<u64, _>(column).map_err(classify)
}

/// True for MariaDB 10.5 and later (`SELECT VERSION()` reads like `10.11.19-MariaDB-deb12`),
/// whose `INSERT … ON DUPLICATE KEY UPDATE … RETURNING` reports each row as the statement
/// left it. MySQL has no `RETURNING`.
fn runs_insert_returning(server_version: &str) -> bool {
    if !server_version.contains("MariaDB") {
        return false;
    }
    // Some proxies prefix MariaDB's version with the "5.5.5-" its handshake once needed.
    let server_version = server_version.strip_prefix("5.5.5-").unwrap_or(server_version);
    let mut numbers = server_version.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (10, 5)
}

#[cfg(test)]
mod tests {
    use super::runs_insert_returning;

    #[test]
    fn insert_returning_is_used_on_mariadb_10_5_and_later_only() {
        assert!(runs_insert_returning("10.11.19-MariaDB-deb12"));
        assert!(runs_insert_returning("10.5.0-MariaDB"));
        assert!(runs_insert_returning("11.4.2-MariaDB-ubu2404"));
        assert!(!runs_insert_returning("10.4.34-MariaDB"));
        assert!(!runs_insert_returning("8.0.36"));
        assert!(runs_insert_returning("5.5.5-10.11.6-MariaDB"));
        assert!(!runs_insert_returning(""));
    }
}
