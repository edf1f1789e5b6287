//! The two roles below L1, as traits the engine holds (`Arc<dyn …>`): `CacheStore` (L2: Redis,
//! or `MemoryCacheStore`) and `ArchiveStore` (L3: MySQL/SQLite, or `MemoryArchiveStore`).
//!
//! Each trait is the surface the engine uses and nothing more: version-guarded batch writes
//! (invariant 2), reads by id and by many ids, and for L3 the held rows a write reports back
//! (invariant 6), scans and counts. Methods return boxed futures so the traits stay object
//! safe without a macro crate. A store built elsewhere is handed to the engine with
//! `SyncEngine::with_cache_store` / `with_archive_store` before `start`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::item::SyncItem;
use crate::storage::redis::L2Op;
use crate::storage::sql::{HeldRows, Selection};
use crate::storage::{RowSummary, StoreError, Stored};

/// What every store method returns: a boxed, sendable future borrowing the store.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a walk over a cache's ids stands (`CacheStore::scan_page`): which server (a Cluster
/// master, in address order) and the position on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCursor {
    pub node: usize,
    pub position: u64,
}

impl ScanCursor {
    pub const START: ScanCursor = ScanCursor { node: 0, position: 0 };
}

/// L2's role: a shared cache in front of L3. Every write goes through the same version guard
/// as L3's (`SyncItem::supersedes`); an entry may expire (its TTL) or be dropped at any time,
/// so a miss is never an answer on its own.
pub trait CacheStore: Send + Sync {
    /// What it is, for logs: `redis-cluster`, `redis-standalone`, `memory`.
    fn kind(&self) -> &'static str;

    /// Applies each change (guarded writes with their TTL in seconds, 0 = none; drops of
    /// entries behind an L3 row). Returns the ids that failed.
    fn apply<'a>(&'a self, ops: &'a [L2Op<'a>]) -> StoreFuture<'a, Vec<(String, StoreError)>>;

    /// Writes each `(item, ttl_secs)` through the guard. Returns the ids that failed.
    fn write_batch<'a>(&'a self, items: &'a [(&'a SyncItem, u64)]) -> StoreFuture<'a, Vec<(String, StoreError)>> {
        Box::pin(async move {
            let ops: Vec<L2Op> = items.iter().map(|(item, ttl)| L2Op::Write(item, *ttl)).collect();
            self.apply(&ops).await
        })
    }

    /// Removes these ids' entries (reads then fall through to L3).
    fn invalidate<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<(), StoreError>>;

    /// Removes every entry this store holds for the engine (its key prefix); returns how many.
    fn invalidate_prefix(&self) -> StoreFuture<'_, Result<u64, StoreError>>;

    /// The stored item with the hash stored beside it (a tombstone has `content: None`).
    fn get_stored<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Stored>, StoreError>>;

    /// The stored item (a tombstone has `content: None`).
    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<SyncItem>, StoreError>> {
        Box::pin(async move { Ok(self.get_stored(id).await?.map(|stored| stored.item)) })
    }

    /// The stored items of these ids, by id; an id it could not read is left out, as if
    /// missing (the caller reads it from L3).
    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, HashMap<String, Stored>>;

    /// `Some(true)` live, `Some(false)` a tombstone, `None` no entry.
    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>>;

    /// Whether any entry is stored under the id, readable or not.
    fn exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>>;

    /// One page (about `count` ids) of a walk over every id the store holds: start at
    /// `ScanCursor::START` and go on with the returned cursor until it is `None`. Redis walks
    /// each master with `SCAN`, so ids written or moved meanwhile may be missed or repeated.
    fn scan_page(
        &self,
        cursor: ScanCursor,
        count: usize,
    ) -> StoreFuture<'_, Result<(Vec<String>, Option<ScanCursor>), StoreError>>;
}

/// L3's role: the durable store and ground truth. A batch is written atomically through the
/// version guard and reports what each id holds afterwards (`HeldRows`), which decides what
/// the caches may take.
pub trait ArchiveStore: Send + Sync {
    /// What it is, for logs: `mysql`, `sqlite`, `memory`.
    fn kind(&self) -> &'static str;

    /// Writes a batch atomically within `timeout` (past it: `Unavailable`) and returns what
    /// each id holds afterwards. Items must be deduplicated by id by the caller.
    fn write_batch<'a>(
        &'a self,
        items: &'a [&'a SyncItem],
        timeout: Duration,
    ) -> StoreFuture<'a, Result<HeldRows, StoreError>>;

    /// Why this item would be refused for what it is, without asking the server.
    fn refuses(&self, item: &SyncItem) -> Option<String>;

    /// The largest single item one write can carry; `None` when unbounded.
    fn max_item_bytes(&self) -> Option<u64>;

    /// The stored item (a tombstone has `content: None`).
    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<SyncItem>, StoreError>>;

    /// The stored items (tombstones included) of these ids with their stored hashes; ids
    /// without a row are absent.
    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<Vec<Stored>, StoreError>>;

    /// The stored item with its row's hash.
    fn get_stored<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move { Ok(self.get_many(&[id]).await?.pop()) })
    }

    /// `Some(true)` live, `Some(false)` a tombstone, `None` no row.
    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>>;

    /// Read statements sent by `get_many` and `live` since connect (tests count them).
    fn read_statements(&self) -> u64;

    /// The live items a selection holds with an id above `after`, ordered by id, at most
    /// `limit` (keyset pagination: page on with the last id).
    fn scan<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<SyncItem>, StoreError>>;

    /// Like `scan`, only the ids.
    fn scan_ids<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<String>, StoreError>>;

    /// How many live items a selection holds.
    fn count<'a>(&'a self, selection: Selection<'a>) -> StoreFuture<'a, Result<u64, StoreError>>;

    /// Every id with a row (tombstones included) above `after`, in byte order, at most
    /// `limit`: keyset pages (`WHERE id > ? ORDER BY id LIMIT ?`, never `OFFSET`), the ids as
    /// stored bytes so a page's last id continues exactly. The membership filter's warm-up
    /// (`crate::filter`). A store that cannot list its ids keeps this default: `Rejected`, and
    /// the filter stays untrusted (every read goes to the store).
    fn ids_after<'a>(
        &'a self,
        after: Option<&'a [u8]>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<Vec<u8>>, StoreError>> {
        let _ = (after, limit);
        Box::pin(async move { Err(StoreError::Rejected(format!("the {} store does not list its ids", self.kind()))) })
    }

    /// The store's clock in ms since the epoch: the clock that stamps a row's creation.
    fn clock_ms(&self) -> StoreFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move { Err(StoreError::Rejected(format!("the {} store has no clock", self.kind()))) })
    }

    /// Ids of rows first inserted at or after `since` (the store's clock, stamped once, never
    /// changed by an update), after the key `(created, id)` (from the start when `None`),
    /// ordered by that key, at most `limit`, with their creation stamp. The membership
    /// filter's tail of other writers' inserts.
    fn ids_created_since<'a>(
        &'a self,
        since: i64,
        after: Option<(i64, &'a [u8])>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<(i64, Vec<u8>)>, StoreError>> {
        let _ = (since, after, limit);
        Box::pin(
            async move { Err(StoreError::Rejected(format!("the {} store does not list its inserts", self.kind()))) },
        )
    }

    /// Every row's id, version, hash and tombstone flag (verification).
    fn summaries(&self) -> StoreFuture<'_, Result<Vec<RowSummary>, StoreError>>;

    /// Closes connections; later calls fail.
    fn close(&self) -> StoreFuture<'_, ()>;

    /// The SQL store behind this archive, for what only SQL stores keep (the merkle tree over
    /// the rows, `storage/sql_merkle.rs`); `None` for others, which then have no tree.
    fn as_sql(&self) -> Option<&crate::storage::sql::SqlStore> {
        None
    }
}
