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
use crate::storage::{sql_mysql, sql_sqlite, RowSummary, StoreError};

/// Rows per statement, largest first; a batch is cut greedily into these sizes.
pub const CHUNK_SIZES: [usize; 4] = [1000, 100, 10, 1];
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
}

impl HeldRow {
    /// True if L3 holds exactly this item (not an older or newer one, not other content).
    pub fn is(&self, item: &SyncItem) -> bool {
        self.version == item.version
            && self.origin == item.origin
            && self.deleted == item.is_tombstone()
            && self.content_hash == item.content_hash()
    }
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

    /// Writes a batch in one transaction, within `timeout`, and returns what each id holds
    /// afterwards. Items must be deduplicated by id by the caller.
    pub async fn write_batch(&self, items: &[&SyncItem], timeout: Duration) -> Result<HeldRows, StoreError> {
        let write = async {
            match self {
                SqlStore::MySql(store) => store.write_batch(items).await,
                SqlStore::Sqlite(store) => store.write_batch(items).await,
            }
        };
        // Dropping the write rolls its transaction back; if the commit itself was already
        // sent, it may still land, which the version guard makes harmless on replay.
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("L3 write timed out after {} ms", timeout.as_millis()))),
        }
    }

    /// Why L3 would refuse this item for what it is, without asking the server: larger than
    /// one statement may be (MySQL), or a version above 2^63-1 (SQLite).
    pub fn refuses(&self, item: &SyncItem) -> Option<String> {
        match self {
            SqlStore::MySql(store) => store.refuses(item),
            SqlStore::Sqlite(_) => sql_sqlite::refuses(item),
        }
    }

    /// The largest single item L3 can take in one statement (MySQL's `max_allowed_packet`
    /// less room for the rest of the row); `None` when unbounded.
    pub fn max_item_bytes(&self) -> Option<u64> {
        match self {
            SqlStore::MySql(store) => Some(store.max_item_bytes()),
            SqlStore::Sqlite(_) => None,
        }
    }

    /// The stored item (a tombstone comes back with `content: None`).
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StoreError> {
        match self {
            SqlStore::MySql(store) => store.get(id).await,
            SqlStore::Sqlite(store) => store.get(id).await,
        }
    }

    /// Every row's id, version, hash and tombstone flag (verification and the demo's check).
    pub async fn summaries(&self) -> Result<Vec<RowSummary>, StoreError> {
        match self {
            SqlStore::MySql(store) => store.summaries().await,
            SqlStore::Sqlite(store) => store.summaries().await,
        }
    }

    pub async fn close(&self) {
        match self {
            SqlStore::MySql(store) => store.close().await,
            SqlStore::Sqlite(store) => store.close().await,
        }
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

fn content_bytes(items: &[&SyncItem]) -> usize {
    items.iter().map(|item| item.size_bytes()).sum()
}

/// `(?, ?, …), (?, …)` for `rows` rows of `columns` placeholders.
pub fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

pub const COLUMNS: &str =
    "id, version, content, content_type, content_hash, deleted, updated_at_ms, origin_topic, origin_partition, origin_offset";
pub const COLUMN_COUNT: usize = 10;
/// Columns an upsert assigns, in an order where `version` comes last (MySQL applies
/// assignments left to right and the guard reads `version` and the origin).
pub const ASSIGNED: [&str; 9] = [
    "content",
    "content_type",
    "content_hash",
    "deleted",
    "updated_at_ms",
    "origin_topic",
    "origin_partition",
    "origin_offset",
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

/// One column, with sqlx's error sorted into ours.
fn column<'r, R, T>(row: &'r R, name: &str) -> Result<T, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    row.try_get(name).map_err(classify)
}

/// The origin of the row's last write (`origin_topic`, `_partition`, `_offset`), if any.
fn origin_from_row<'r, R>(row: &'r R) -> Result<Option<Origin>, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let topic: Option<String> = column(row, "origin_topic")?;
    let partition: Option<i32> = column(row, "origin_partition")?;
    let offset: Option<i64> = column(row, "origin_offset")?;
    Ok(match (topic, partition, offset) {
        (Some(topic), Some(partition), Some(offset)) => Some(Origin { topic: topic.into(), partition, offset }),
        _ => None,
    })
}

/// An item from a `SELECT id, content, content_type, origin_*` row; the version is decoded by
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
    let origin = origin_from_row(row)?;
    Ok(SyncItem {
        id: String::from_utf8_lossy(&id).into_owned(),
        version,
        content: content.map(Bytes::from),
        content_type: ContentType::parse(&content_type).unwrap_or(ContentType::Binary),
        origin,
    })
}

/// `SELECT` of what L3 holds for `rows` ids, read back inside the write's transaction;
/// `locking` adds `FOR UPDATE`, which InnoDB needs to read the latest committed rows rather
/// than the transaction's REPEATABLE READ snapshot (the rows are locked by the upsert anyway).
pub fn held_rows_sql(table: &str, rows: usize, locking: bool) -> String {
    let ids = vec!["?"; rows].join(", ");
    let lock = if locking { " FOR UPDATE" } else { "" };
    format!(
        "SELECT id, version, content_hash, deleted, origin_topic, origin_partition, origin_offset \
         FROM {table} WHERE id IN ({ids}){lock}"
    )
}

/// A `HeldRow` from a `held_rows_sql` row; the version is decoded by the caller.
pub fn held_row<'r, R>(row: &'r R, version: u64) -> Result<(String, HeldRow), StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: Vec<u8> = column(row, "id")?;
    let hash: Vec<u8> = column(row, "content_hash")?;
    let origin = origin_from_row(row)?;
    let held = HeldRow {
        version,
        origin,
        content_hash: hash.try_into().map_err(|_| StoreError::Rejected("bad hash length".into()))?,
        deleted: column(row, "deleted")?,
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
    fn chunks_stay_under_the_byte_cap() {
        let item = SyncItem::new("a", Bytes::from(vec![0u8; 1 << 20]));
        let items: Vec<&SyncItem> = std::iter::repeat_n(&item, 12).collect();
        for chunk in chunks(&items, CHUNK_MAX_BYTES) {
            assert!(content_bytes(chunk) <= CHUNK_MAX_BYTES || chunk.len() == 1);
        }
    }
}
