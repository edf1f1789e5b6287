//! L3: MySQL or SQLite, one schema, version-guarded multi-row upserts (invariant 2).
//!
//! A batch is written in one transaction, as multi-row upserts in chunks of a few fixed
//! sizes (so prepared statements are reused) and under a byte cap (so a statement stays
//! under `max_allowed_packet`). The guard lives in SQL: a row changes only when the incoming
//! version is higher, or equal with a later offset of the same topic-partition. Deletes are
//! rows with `deleted = 1` and no content, so an older upsert replayed later cannot
//! resurrect them. The table name comes from config and is validated as an identifier
//! before it is ever interpolated; every value is a bound parameter.
//!
//! Inside the same transaction, a write reads back what each row holds after the guard
//! (`HeldRow`): the caches above L3 take an item only if L3 holds exactly that item, so a
//! version L3 refused never reaches L1 or L2 (docs/DESIGN.md, invariant 6). Every write has
//! a deadline (`SYNC_SQL_WRITE_TIMEOUT_MS`): a hung connection or a long lock wait counts as
//! unavailable, and the batch goes to the write-ahead log.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use crate::item::{ContentType, Origin, SyncItem};
use crate::storage::{sql_mysql, sql_sqlite, ArchiveStore, RowSummary, StoreError, StoreFuture, Stored};

/// Rows per statement, largest first; a batch is cut greedily into these sizes.
pub const CHUNK_SIZES: [usize; 4] = [1000, 100, 10, 1];
/// Ids per `SELECT … WHERE id IN (…)` of a multi-id read: one statement per thousand ids keeps
/// a read of any size to a few round trips, far below MySQL's 65,535 placeholders.
pub const READ_CHUNK_IDS: usize = 1000;
/// IN-list lengths a read chunk is padded up to (with its last id repeated, which `IN` ignores),
/// so reads prepare at most four statements per connection instead of one per length.
const READ_SHAPES: [usize; 4] = [1, 10, 100, READ_CHUNK_IDS];
/// Bytes of content per statement, well under MariaDB's default 16 MiB max_allowed_packet.
pub const CHUNK_MAX_BYTES: usize = 4 << 20;

pub enum SqlStore {
    MySql(sql_mysql::MySqlStore),
    Sqlite(sql_sqlite::SqliteStore),
}

/// What L3 holds for an id right after a write: enough to tell whether it is a given item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRow {
    pub version: u64,
    pub origin: Option<Origin>,
    pub content_hash: [u8; 32],
    pub deleted: bool,
    pub state: Option<String>,
}

impl HeldRow {
    /// True if L3 holds exactly this item (not an older or newer one, not other content or
    /// another state).
    pub fn is(&self, item: &SyncItem) -> bool {
        self.version == item.version
            && self.origin == item.origin
            && self.deleted == item.is_tombstone()
            && self.content_hash == item.content_hash()
            && self.state == item.state
    }
}

/// What a scan or count selects among the live rows (tombstones are never selected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection<'a> {
    /// The id itself and every id under it at a dot boundary: `uk.nhs` selects `uk.nhs` and
    /// `uk.nhs.…`, never `uk.nhsx`. The caller normalizes the prefix (no trailing dot).
    Prefix(&'a str),
    /// Rows whose `state` column is exactly this (byte for byte, so case-sensitive).
    State(&'a str),
}

/// The escape character of prefix `LIKE` patterns: `!` rather than a backslash, whose meaning
/// inside an SQL string literal differs between MySQL and SQLite.
pub const LIKE_ESCAPE: char = '!';

/// `text` as a literal inside a `LIKE … ESCAPE '!'` pattern: `%`, `_` and `!` escaped.
pub fn like_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if matches!(c, '%' | '_') || c == LIKE_ESCAPE {
            out.push(LIKE_ESCAPE);
        }
        out.push(c);
    }
    out
}

impl Selection<'_> {
    /// The `WHERE` condition and its bound values, in order. A prefix is the exact id, or the
    /// byte range `[prefix + ".", prefix + "/")` ('/' is the byte after '.'), which is what
    /// lets the primary key index answer; the escaped `LIKE prefix.%` inside the range says
    /// the same thing in the form a reader of the SQL expects.
    pub fn condition(&self) -> (String, Vec<Vec<u8>>) {
        match self {
            Selection::Prefix(prefix) => (
                format!("(id = ? OR (id >= ? AND id < ? AND id LIKE ? ESCAPE '{LIKE_ESCAPE}'))"),
                vec![
                    prefix.as_bytes().to_vec(),
                    format!("{prefix}.").into_bytes(),
                    format!("{prefix}/").into_bytes(),
                    format!("{}.%", like_literal(prefix)).into_bytes(),
                ],
            ),
            Selection::State(state) => ("state = ?".to_owned(), vec![state.as_bytes().to_vec()]),
        }
    }
}

/// Columns a scan reads: what `item_from_row` needs.
const ITEM_COLUMNS: &str = "id, version, content, content_type, origin_topic, origin_partition, origin_offset, state";

/// `SELECT` of the live rows a selection holds after the id bound to the last `?` but one,
/// ordered by id, at most the number bound to the last `?` (keyset pagination). `ids_only`
/// reads just the ids.
pub fn scan_sql(table: &str, selection: &Selection, ids_only: bool) -> String {
    let (condition, _) = selection.condition();
    let columns = if ids_only { "id" } else { ITEM_COLUMNS };
    format!("SELECT {columns} FROM {table} WHERE deleted = 0 AND {condition} AND id > ? ORDER BY id LIMIT ?")
}

/// `SELECT` of the ids of rows created at or after the first `?`, after the key
/// `(created_at_ms, id)` bound to the next three, in key order, at most the last `?`.
pub fn ids_created_since_sql(table: &str) -> String {
    format!(
        "SELECT created_at_ms, id FROM {table} WHERE created_at_ms >= ? \
         AND (created_at_ms > ? OR (created_at_ms = ? AND id > ?)) ORDER BY created_at_ms, id LIMIT ?"
    )
}

/// `SELECT COUNT(*)` of the live rows a selection holds.
pub fn count_sql(table: &str, selection: &Selection) -> String {
    let (condition, _) = selection.condition();
    format!("SELECT COUNT(*) FROM {table} WHERE deleted = 0 AND {condition}")
}

/// After a write, the row each written id holds, by id.
pub type HeldRows = HashMap<String, HeldRow>;

impl SqlStore {
    /// Connects and runs the migrations. `url` is `mysql://…` or `sqlite:…`.
    pub async fn connect(url: &str, table: &str) -> Result<SqlStore, StoreError> {
        if !crate::config::is_sql_identifier(table) {
            return Err(StoreError::Rejected(format!("invalid table name {table:?}")));
        }
        let store = if url.starts_with("mysql://") {
            SqlStore::MySql(sql_mysql::MySqlStore::connect(url, table).await?)
        } else if url.starts_with("sqlite:") {
            SqlStore::Sqlite(sql_sqlite::SqliteStore::connect(url, table).await?)
        } else {
            return Err(StoreError::Rejected("unsupported SQL URL scheme".into()));
        };
        Ok(store)
    }

    /// Makes MariaDB writes read their rows back with a separate `SELECT … FOR UPDATE`, as on
    /// MySQL, instead of `INSERT … RETURNING`: for tests of that path. SQLite: no effect.
    #[doc(hidden)]
    pub fn read_back_with_select(&self) {
        if let SqlStore::MySql(store) = self {
            store.returning.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl ArchiveStore for SqlStore {
    fn as_sql(&self) -> Option<&SqlStore> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        match self {
            SqlStore::MySql(_) => "mysql",
            SqlStore::Sqlite(_) => "sqlite",
        }
    }

    /// One transaction. Dropping the write on timeout rolls it back; if the commit itself was
    /// already sent, it may still land, which the version guard makes harmless on replay.
    fn write_batch<'a>(
        &'a self,
        items: &'a [&'a SyncItem],
        timeout: Duration,
    ) -> StoreFuture<'a, Result<HeldRows, StoreError>> {
        Box::pin(async move {
            let write = async {
                match self {
                    SqlStore::MySql(store) => store.write_batch(items).await,
                    SqlStore::Sqlite(store) => store.write_batch(items).await,
                }
            };
            match tokio::time::timeout(timeout, write).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(format!("L3 write timed out after {} ms", timeout.as_millis()))),
            }
        })
    }

    /// Larger than one statement may be (MySQL), or a version above 2^63-1 (SQLite).
    fn refuses(&self, item: &SyncItem) -> Option<String> {
        match self {
            SqlStore::MySql(store) => store.refuses(item),
            SqlStore::Sqlite(_) => sql_sqlite::refuses(item),
        }
    }

    /// MySQL's `max_allowed_packet` less room for the rest of the row; SQLite: unbounded.
    fn max_item_bytes(&self) -> Option<u64> {
        match self {
            SqlStore::MySql(store) => Some(store.max_item_bytes()),
            SqlStore::Sqlite(_) => None,
        }
    }

    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<SyncItem>, StoreError>> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.get(id).await,
                SqlStore::Sqlite(store) => store.get(id).await,
            }
        })
    }

    /// One statement per `READ_CHUNK_IDS` ids.
    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<Vec<Stored>, StoreError>> {
        Box::pin(async move {
            let mut stored = Vec::with_capacity(ids.len());
            for chunk in read_chunks(ids) {
                let rows = match self {
                    SqlStore::MySql(store) => store.stored_in(&chunk).await?,
                    SqlStore::Sqlite(store) => store.stored_in(&chunk).await?,
                };
                stored.extend(rows);
            }
            Ok(stored)
        })
    }

    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.live(id).await,
                SqlStore::Sqlite(store) => store.live(id).await,
            }
        })
    }

    fn read_statements(&self) -> u64 {
        let counter = match self {
            SqlStore::MySql(store) => &store.read_statements,
            SqlStore::Sqlite(store) => &store.read_statements,
        };
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn scan<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<SyncItem>, StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            match self {
                SqlStore::MySql(store) => store.scan(&selection, after.unwrap_or_default(), limit).await,
                SqlStore::Sqlite(store) => store.scan(&selection, after.unwrap_or_default(), limit).await,
            }
        })
    }

    fn scan_ids<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            match self {
                SqlStore::MySql(store) => store.scan_ids(&selection, after.unwrap_or_default(), limit).await,
                SqlStore::Sqlite(store) => store.scan_ids(&selection, after.unwrap_or_default(), limit).await,
            }
        })
    }

    fn ids_after<'a>(
        &'a self,
        after: Option<&'a [u8]>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
            let after = after.unwrap_or_default();
            match self {
                SqlStore::MySql(store) => store.ids_after(after, limit).await,
                SqlStore::Sqlite(store) => store.ids_after(after, limit).await,
            }
        })
    }

    fn clock_ms(&self) -> StoreFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.db_now_ms().await,
                SqlStore::Sqlite(store) => store.db_now_ms().await,
            }
        })
    }

    fn ids_created_since<'a>(
        &'a self,
        since: i64,
        after: Option<(i64, &'a [u8])>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<(i64, Vec<u8>)>, StoreError>> {
        Box::pin(async move {
            let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
            // `id > ''` holds for every valid id (1..=255 bytes).
            let (from, after_id) = after.unwrap_or((since, b""));
            match self {
                SqlStore::MySql(store) => store.ids_created_since(since, from, after_id, limit).await,
                SqlStore::Sqlite(store) => store.ids_created_since(since, from, after_id, limit).await,
            }
        })
    }

    fn count<'a>(&'a self, selection: Selection<'a>) -> StoreFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.count(&selection).await,
                SqlStore::Sqlite(store) => store.count(&selection).await,
            }
        })
    }

    fn summaries(&self) -> StoreFuture<'_, Result<Vec<RowSummary>, StoreError>> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.summaries().await,
                SqlStore::Sqlite(store) => store.summaries().await,
            }
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            match self {
                SqlStore::MySql(store) => store.close().await,
                SqlStore::Sqlite(store) => store.close().await,
            }
        })
    }
}

/// Cuts `items` into chunks of the fixed sizes, each under `max_bytes` of content.
pub fn chunks<'a, 'b>(items: &'b [&'a SyncItem], max_bytes: usize) -> Vec<&'b [&'a SyncItem]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let fits = CHUNK_SIZES
            .iter()
            .copied()
            .find(|&size| size <= rest.len() && content_bytes(&rest[..size]) <= max_bytes)
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(fits);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Cuts ids into IN-lists of at most `READ_CHUNK_IDS`, each padded to one of `READ_SHAPES`.
pub fn read_chunks<'a>(ids: &[&'a str]) -> Vec<Vec<&'a str>> {
    ids.chunks(READ_CHUNK_IDS)
        .map(|chunk| {
            let shape = READ_SHAPES.iter().copied().find(|&shape| shape >= chunk.len()).unwrap_or(chunk.len());
            let mut padded = chunk.to_vec();
            padded.resize(shape, chunk[chunk.len() - 1]);
            padded
        })
        .collect()
}

/// `SELECT` of the stored items of `ids` ids, with their hashes.
pub fn stored_items_sql(table: &str, ids: usize) -> String {
    let list = vec!["?"; ids].join(", ");
    format!(
        "SELECT id, version, content, content_type, content_hash, origin_topic, origin_partition, origin_offset, state \
         FROM {table} WHERE id IN ({list})"
    )
}

/// A `Stored` from a `stored_items_sql` row; the version is decoded by the caller.
pub fn stored_from_row<'r, R>(row: &'r R, version: u64) -> Result<Stored, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let hash: Vec<u8> = column(row, "content_hash")?;
    // A hash column of the wrong length cannot match any content: reported as a mismatch.
    let stored_hash = Some(hash.try_into().unwrap_or([0; 32]));
    Ok(Stored { item: item_from_row(row, version)?, stored_hash })
}

fn content_bytes(items: &[&SyncItem]) -> usize {
    items.iter().map(|item| item.size_bytes()).sum()
}

/// `(?, ?, …), (?, …)` for `rows` rows of `columns` placeholders.
pub fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

pub const COLUMNS: &str = "id, version, content, content_type, content_hash, deleted, updated_at_ms, \
    origin_topic, origin_partition, origin_offset, state";
pub const COLUMN_COUNT: usize = 11;
/// Columns an upsert assigns, in an order where `version` comes last (MySQL applies
/// assignments left to right and the guard reads `version` and the origin).
pub const ASSIGNED: [&str; 10] = [
    "content",
    "content_type",
    "content_hash",
    "deleted",
    "updated_at_ms",
    "origin_topic",
    "origin_partition",
    "origin_offset",
    "state",
    "version",
];

/// Connect and acquire timeout: short, so an outage reaches the WAL quickly (sqlx waits 30 s by default).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// MySQL error numbers that are about the statement's content, not the server's health.
const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
/// MySQL error numbers of a transaction that lost a lock race: retry it, the server is fine.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;

pub fn classify(error: sqlx::Error) -> StoreError {
    let sqlx::Error::Database(db) = &error else { return StoreError::Unavailable(error.to_string()) };
    let number = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|mysql| mysql.number());
    match number {
        Some(ER_NET_PACKET_TOO_LARGE) => {
            StoreError::Rejected(format!("larger than the server's max_allowed_packet: {}", db.message()))
        }
        Some(ER_LOCK_WAIT_TIMEOUT | ER_LOCK_DEADLOCK) => StoreError::Transient(db.message().to_owned()),
        // SQLSTATE class 22 (data exception) and 23 (integrity) are about the row itself.
        _ if db.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23")) => {
            StoreError::Rejected(db.message().to_owned())
        }
        _ => StoreError::Unavailable(error.to_string()),
    }
}

/// One column (by name or position), with sqlx's error sorted into ours.
fn column<'r, R, I, T>(row: &'r R, index: I) -> Result<T, StoreError>
where
    R: sqlx::Row,
    I: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get(index).map_err(classify)
}

/// The origin of the row's last write, if any, from the columns `origin_topic`,
/// `origin_partition` and `origin_offset` at these indexes (names or positions).
fn origin_from_row<'r, R, I>(row: &'r R, [topic, partition, offset]: [I; 3]) -> Result<Option<Origin>, StoreError>
where
    R: sqlx::Row,
    I: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let topic: Option<String> = column(row, topic)?;
    let partition: Option<i32> = column(row, partition)?;
    let offset: Option<i64> = column(row, offset)?;
    Ok(match (topic, partition, offset) {
        (Some(topic), Some(partition), Some(offset)) => Some(Origin { topic: topic.into(), partition, offset }),
        _ => None,
    })
}

/// The row's `state` at this index (stored as bytes; they are ASCII, checked when written).
fn state_from_row<'r, R, I>(row: &'r R, index: I) -> Result<Option<String>, StoreError>
where
    R: sqlx::Row,
    I: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let state: Option<Vec<u8>> = column(row, index)?;
    Ok(state.map(|state| String::from_utf8_lossy(&state).into_owned()))
}

/// An item from a `SELECT id, content, content_type, origin_*, state` row; the version is decoded by
/// the caller (MySQL stores it unsigned, SQLite signed).
pub fn item_from_row<'r, R>(row: &'r R, version: u64) -> Result<SyncItem, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: Vec<u8> = column(row, "id")?;
    let content: Option<Vec<u8>> = column(row, "content")?;
    let content_type: String = column(row, "content_type")?;
    let origin = origin_from_row(row, ["origin_topic", "origin_partition", "origin_offset"])?;
    Ok(SyncItem {
        id: String::from_utf8_lossy(&id).into_owned(),
        version,
        content: content.map(Bytes::from),
        content_type: ContentType::parse(&content_type).unwrap_or(ContentType::Binary),
        origin,
        state: state_from_row(row, "state")?,
    })
}

/// `SELECT` of what L3 holds for `rows` ids, read back inside the write's transaction;
/// `locking` adds `FOR UPDATE`, which InnoDB needs to read the latest committed rows rather
/// than the transaction's REPEATABLE READ snapshot (the rows are locked by the upsert anyway).
pub fn held_rows_sql(table: &str, rows: usize, locking: bool) -> String {
    let ids = vec!["?"; rows].join(", ");
    let lock = if locking { " FOR UPDATE" } else { "" };
    format!("SELECT {HELD_COLUMNS} FROM {table} WHERE id IN ({ids}){lock}")
}

/// The columns `held_row` reads, in the order it reads them.
pub const HELD_COLUMNS: &str =
    "id, version, content_hash, deleted, origin_topic, origin_partition, origin_offset, state";
/// The position of `version` in `HELD_COLUMNS`.
pub const HELD_VERSION: usize = 1;

/// A `HeldRow` from a row of `HELD_COLUMNS`, read by position: the rows of MariaDB's
/// `INSERT … RETURNING` reach sqlx without column names (the server's prepare reports no
/// result columns for an insert). The version (position `HELD_VERSION`) is decoded by the
/// caller.
pub fn held_row<'r, R>(row: &'r R, version: u64) -> Result<(String, HeldRow), StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: Vec<u8> = column(row, 0)?;
    let hash: Vec<u8> = column(row, 2)?;
    let held = HeldRow {
        version,
        origin: origin_from_row(row, [4, 5, 6])?,
        content_hash: hash.try_into().map_err(|_| StoreError::Rejected("bad hash length".into()))?,
        deleted: column(row, 3)?,
        state: state_from_row(row, 7)?,
    };
    Ok((String::from_utf8_lossy(&id).into_owned(), held))
}

/// A summary from a `SELECT id, content_hash, deleted` row; version and time come decoded.
pub fn summary_from_row<'r, R>(row: &'r R, version: u64, updated_at_ms: u64) -> Result<RowSummary, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: Vec<u8> = column(row, "id")?;
    let hash: Vec<u8> = column(row, "content_hash")?;
    Ok(RowSummary {
        id: String::from_utf8_lossy(&id).into_owned(),
        version,
        content_hash: hash.try_into().map_err(|_| StoreError::Rejected("bad hash length".into()))?,
        deleted: column(row, "deleted")?,
        updated_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn chunks_use_fixed_sizes_and_keep_every_item_once() {
        let item = SyncItem::new("a", Bytes::from_static(b"x"));
        let items: Vec<&SyncItem> = std::iter::repeat_n(&item, 623).collect();
        let sizes: Vec<usize> = chunks(&items, CHUNK_MAX_BYTES).iter().map(|chunk| chunk.len()).collect();
        assert_eq!(sizes, vec![100, 100, 100, 100, 100, 100, 10, 10, 1, 1, 1]);
        // A cap of ten items' bytes (66 each): chunks of ten, then singles for the rest.
        let capped: Vec<usize> = chunks(&items, 660).iter().map(|chunk| chunk.len()).collect();
        assert_eq!(capped, [vec![10; 62], vec![1; 3]].concat());
        assert_eq!(sizes.iter().sum::<usize>(), 623);
    }

    #[test]
    fn reads_take_a_thousand_ids_per_statement_padded_to_four_shapes() {
        let names: Vec<String> = (0..2500).map(|n| n.to_string()).collect();
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let chunks = read_chunks(&ids);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 1000, 1000]);
        // The last chunk is the last 500 ids, then the last id repeated.
        assert_eq!(chunks[2][..500], ids[2000..]);
        assert!(chunks[2][500..].iter().all(|id| *id == "2499"));
        assert_eq!(read_chunks(&ids[..7]).iter().map(Vec::len).collect::<Vec<_>>(), vec![10]);
        assert_eq!(read_chunks(&ids[..1])[0], vec!["0"]);
        assert!(read_chunks(&[]).is_empty());
    }

    #[test]
    fn like_literals_escape_wildcards_and_the_escape_character() {
        assert_eq!(like_literal("uk.nhs"), "uk.nhs");
        assert_eq!(like_literal("a%b_c!d"), "a!%b!_c!!d");
        let (condition, values) = Selection::Prefix("a_%").condition();
        assert_eq!(condition, "(id = ? OR (id >= ? AND id < ? AND id LIKE ? ESCAPE '!'))");
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        assert_eq!(values, [&b"a_%"[..], b"a_%.", b"a_%/", b"a!_!%.%"]);
        // The range is exactly the ids that start with the prefix and a dot.
        assert_eq!(b'.' + 1, b'/');
    }

    #[test]
    fn chunks_stay_under_the_byte_cap() {
        let item = SyncItem::new("a", Bytes::from(vec![0u8; 1 << 20]));
        let items: Vec<&SyncItem> = std::iter::repeat_n(&item, 12).collect();
        for chunk in chunks(&items, CHUNK_MAX_BYTES) {
            assert!(content_bytes(chunk) <= CHUNK_MAX_BYTES || chunk.len() == 1);
        }
    }
}
