//! In-memory stores for both roles: `MemoryCacheStore` (L2) and `MemoryArchiveStore` (L3).
//!
//! They keep the contract the real stores keep, so the engine cannot tell them apart: the
//! same version guard (`item::supersedes`, which the SQL and Lua guards mirror), an atomic
//! batch write that reports the row each id holds afterwards, TTLs, prefix and state
//! selections with the dot boundary, keyset scans. `tests/store_contract.rs` runs one set of
//! checks against these and against MariaDB, SQLite and both kinds of Redis.
//!
//! Uses: the embedded demo's L2 (no Redis there), a library user's tests, and fault tests:
//! `set_available(false)` makes every call fail as `Unavailable`, like a store that went
//! away, without stopping a server. Nothing here is durable: a process exit loses it all.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::item::{now_ms, supersedes, SyncItem};
use crate::storage::redis::L2Op;
use crate::storage::sql::{HeldRow, HeldRows, Selection};
use crate::storage::{ArchiveStore, CacheStore, RowSummary, ScanCursor, StoreError, StoreFuture, Stored};

/// The switch `set_available` flips: off, every call fails as `Unavailable`.
struct Availability {
    on: AtomicBool,
    kind: &'static str,
}

impl Availability {
    fn new(kind: &'static str) -> Availability {
        Availability { on: AtomicBool::new(true), kind }
    }

    fn set(&self, available: bool) {
        self.on.store(available, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.on.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!("the in-memory {} store is set unavailable", self.kind)))
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent map (every change is one insert
    // or remove), so the data is still good.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a selection holds this live item: the id itself or an id under it at a dot
/// boundary, or the exact state.
fn selects(selection: &Selection, item: &SyncItem) -> bool {
    if item.is_tombstone() {
        return false;
    }
    match selection {
        Selection::Prefix(prefix) => {
            item.id == *prefix || item.id.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.'))
        }
        Selection::State(state) => item.state.as_deref() == Some(*state),
    }
}

struct CacheEntry {
    stored: Stored,
    expires_at: Option<Instant>,
}

/// L2 in memory: a map of id → item with its hash and expiry.
pub struct MemoryCacheStore {
    entries: Mutex<HashMap<String, CacheEntry>>,
    available: Availability,
}

impl Default for MemoryCacheStore {
    fn default() -> Self {
        MemoryCacheStore { entries: Mutex::new(HashMap::new()), available: Availability::new("cache") }
    }
}

impl MemoryCacheStore {
    pub fn new() -> MemoryCacheStore {
        MemoryCacheStore::default()
    }

    /// `false`: every call fails as `Unavailable` until set back.
    pub fn set_available(&self, available: bool) {
        self.available.set(available);
    }

    fn check(&self) -> Result<(), StoreError> {
        self.available.check()
    }

    /// Unexpired entries (expired ones are dropped first).
    pub fn len(&self) -> usize {
        let mut entries = lock(&self.entries);
        let now = Instant::now();
        entries.retain(|_, entry| entry.expires_at.is_none_or(|at| at > now));
        entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The unexpired entry of `id`, removing it when it has expired.
    fn current<'m>(entries: &'m mut HashMap<String, CacheEntry>, id: &str) -> Option<&'m CacheEntry> {
        if entries.get(id).is_some_and(|entry| entry.expires_at.is_some_and(|at| at <= Instant::now())) {
            entries.remove(id);
        }
        entries.get(id)
    }

    fn apply_one(entries: &mut HashMap<String, CacheEntry>, op: &L2Op) {
        match op {
            L2Op::Write(item, ttl_secs) => {
                if Self::current(entries, &item.id).is_some_and(|entry| !item.supersedes(&entry.stored.item)) {
                    return;
                }
                let expires_at = (*ttl_secs > 0).then(|| Instant::now() + Duration::from_secs(*ttl_secs));
                let stored = Stored { item: (*item).clone(), stored_hash: Some(item.content_hash()) };
                entries.insert(item.id.clone(), CacheEntry { stored, expires_at });
            }
            L2Op::DropIfBehind(id, row) => {
                let Some(entry) = Self::current(entries, id) else { return };
                let held = &entry.stored.item;
                let is_the_row = held.version == row.version && held.origin == row.origin;
                let newer = supersedes(held.version, held.origin.as_ref(), row.version, row.origin.as_ref());
                if !is_the_row && !newer {
                    entries.remove(*id);
                }
            }
        }
    }
}

impl CacheStore for MemoryCacheStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn apply<'a>(&'a self, ops: &'a [L2Op<'a>]) -> StoreFuture<'a, Vec<(String, StoreError)>> {
        Box::pin(async move {
            if let Err(error) = self.check() {
                return ops.iter().map(|op| (op.id().to_owned(), error.clone())).collect();
            }
            let mut entries = lock(&self.entries);
            for op in ops {
                Self::apply_one(&mut entries, op);
            }
            Vec::new()
        })
    }

    fn invalidate<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut entries = lock(&self.entries);
            for id in ids {
                entries.remove(*id);
            }
            Ok(())
        })
    }

    fn invalidate_prefix(&self) -> StoreFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut entries = lock(&self.entries);
            let removed = entries.len() as u64;
            entries.clear();
            Ok(removed)
        })
    }

    fn get_stored<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(Self::current(&mut lock(&self.entries), id).map(|entry| entry.stored.clone()))
        })
    }

    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, HashMap<String, Stored>> {
        Box::pin(async move {
            if self.check().is_err() {
                return HashMap::new();
            }
            let mut entries = lock(&self.entries);
            ids.iter()
                .filter_map(|id| Some(((*id).to_owned(), Self::current(&mut entries, id)?.stored.clone())))
                .collect()
        })
    }

    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(Self::current(&mut lock(&self.entries), id).map(|entry| !entry.stored.item.is_tombstone()))
        })
    }

    fn exists<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(Self::current(&mut lock(&self.entries), id).is_some())
        })
    }

    /// Ids in order; the position is how many came before.
    fn scan_page(
        &self,
        cursor: ScanCursor,
        count: usize,
    ) -> StoreFuture<'_, Result<(Vec<String>, Option<ScanCursor>), StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut ids: Vec<String> = lock(&self.entries).keys().cloned().collect();
            ids.sort_unstable();
            let start = usize::try_from(cursor.position).unwrap_or(usize::MAX).min(ids.len());
            let end = start.saturating_add(count.max(1)).min(ids.len());
            let next = (end < ids.len()).then_some(ScanCursor { node: 0, position: end as u64 });
            Ok((ids[start..end].to_vec(), next))
        })
    }
}

struct Row {
    item: SyncItem,
    updated_at_ms: u64,
    /// When the id was first inserted (L3's `created_at_ms`): kept by later writes.
    created_at_ms: i64,
}

impl Row {
    fn held(&self) -> HeldRow {
        HeldRow {
            version: self.item.version,
            origin: self.item.origin.clone(),
            content_hash: self.item.content_hash(),
            deleted: self.item.is_tombstone(),
            state: self.item.state.clone(),
        }
    }

    fn stored(&self) -> Stored {
        Stored { item: self.item.clone(), stored_hash: Some(self.item.content_hash()) }
    }
}

/// L3 in memory: rows ordered by id, each batch applied under one lock (atomically).
pub struct MemoryArchiveStore {
    rows: Mutex<BTreeMap<String, Row>>,
    available: Availability,
    read_statements: AtomicU64,
    max_item_bytes: Option<u64>,
}

impl Default for MemoryArchiveStore {
    fn default() -> Self {
        MemoryArchiveStore {
            rows: Mutex::new(BTreeMap::new()),
            available: Availability::new("archive"),
            read_statements: AtomicU64::new(0),
            max_item_bytes: None,
        }
    }
}

impl MemoryArchiveStore {
    pub fn new() -> MemoryArchiveStore {
        MemoryArchiveStore::default()
    }

    /// Refuses items with more content bytes than this, like MySQL's `max_allowed_packet`.
    pub fn with_max_item_bytes(mut self, max_item_bytes: u64) -> MemoryArchiveStore {
        self.max_item_bytes = Some(max_item_bytes);
        self
    }

    /// `false`: every call fails as `Unavailable` until set back.
    pub fn set_available(&self, available: bool) {
        self.available.set(available);
    }

    fn check(&self) -> Result<(), StoreError> {
        self.available.check()
    }

    /// Rows held, tombstones included.
    pub fn len(&self) -> usize {
        lock(&self.rows).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live items a selection holds after `after`, in id order, at most `limit`.
    fn selected(&self, selection: &Selection, after: Option<&str>, limit: usize) -> Result<Vec<SyncItem>, StoreError> {
        self.check()?;
        let rows = lock(&self.rows);
        let start = after.map_or(Bound::Unbounded, |after| Bound::Excluded(after.to_owned()));
        Ok(rows
            .range((start, Bound::Unbounded))
            .map(|(_, row)| &row.item)
            .filter(|item| selects(selection, item))
            .take(limit)
            .cloned()
            .collect())
    }
}

impl ArchiveStore for MemoryArchiveStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// Applied under one lock: all or nothing, like a transaction. A refused item fails the
    /// whole batch as `Rejected`, as L3 does (the engine then splits the batch).
    fn write_batch<'a>(
        &'a self,
        items: &'a [&'a SyncItem],
        _timeout: Duration,
    ) -> StoreFuture<'a, Result<HeldRows, StoreError>> {
        Box::pin(async move {
            self.check()?;
            if let Some(reason) = items.iter().find_map(|item| self.refuses(item)) {
                return Err(StoreError::Rejected(reason));
            }
            let mut rows = lock(&self.rows);
            let mut held = HeldRows::with_capacity(items.len());
            for item in items {
                let replace = rows.get(&item.id).is_none_or(|row| item.supersedes(&row.item));
                if replace {
                    let created_at_ms = rows.get(&item.id).map_or(now_ms() as i64, |row| row.created_at_ms);
                    rows.insert(item.id.clone(), Row { item: (*item).clone(), updated_at_ms: now_ms(), created_at_ms });
                }
                held.insert(item.id.clone(), rows[&item.id].held());
            }
            Ok(held)
        })
    }

    fn refuses(&self, item: &SyncItem) -> Option<String> {
        let limit = self.max_item_bytes?;
        let bytes = item.content.as_ref().map_or(0, |content| content.len() as u64);
        (bytes > limit).then(|| format!("{bytes} content bytes, above this store's {limit}"))
    }

    fn max_item_bytes(&self) -> Option<u64> {
        self.max_item_bytes
    }

    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<SyncItem>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(lock(&self.rows).get(id).map(|row| row.item.clone()))
        })
    }

    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<Vec<Stored>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.read_statements.fetch_add(1, Ordering::Relaxed);
            let rows = lock(&self.rows);
            let mut unique: Vec<&str> = ids.to_vec();
            unique.sort_unstable();
            unique.dedup();
            Ok(unique.into_iter().filter_map(|id| rows.get(id)).map(Row::stored).collect())
        })
    }

    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            self.read_statements.fetch_add(1, Ordering::Relaxed);
            Ok(lock(&self.rows).get(id).map(|row| !row.item.is_tombstone()))
        })
    }

    fn read_statements(&self) -> u64 {
        self.read_statements.load(Ordering::Relaxed)
    }

    fn scan<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<SyncItem>, StoreError>> {
        Box::pin(async move { self.selected(&selection, after, limit) })
    }

    fn scan_ids<'a>(
        &'a self,
        selection: Selection<'a>,
        after: Option<&'a str>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move { Ok(self.selected(&selection, after, limit)?.into_iter().map(|item| item.id).collect()) })
    }

    fn count<'a>(&'a self, selection: Selection<'a>) -> StoreFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(lock(&self.rows).values().filter(|row| selects(&selection, &row.item)).count() as u64)
        })
    }

    fn ids_after<'a>(
        &'a self,
        after: Option<&'a [u8]>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let after = after.unwrap_or_default();
            // String order is byte order: the map's order is L3's.
            Ok(lock(&self.rows)
                .keys()
                .filter(|id| id.as_bytes() > after)
                .take(limit.max(1))
                .map(|id| id.as_bytes().to_vec())
                .collect())
        })
    }

    fn clock_ms(&self) -> StoreFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(now_ms() as i64)
        })
    }

    fn ids_created_since<'a>(
        &'a self,
        since: i64,
        after: Option<(i64, &'a [u8])>,
        limit: usize,
    ) -> StoreFuture<'a, Result<Vec<(i64, Vec<u8>)>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let after = after.unwrap_or((since, b""));
            let mut created: Vec<(i64, Vec<u8>)> = lock(&self.rows)
                .iter()
                .filter(|(id, row)| row.created_at_ms >= since && (row.created_at_ms, id.as_bytes()) > after)
                .map(|(id, row)| (row.created_at_ms, id.as_bytes().to_vec()))
                .collect();
            created.sort_unstable();
            created.truncate(limit.max(1));
            Ok(created)
        })
    }

    fn summaries(&self) -> StoreFuture<'_, Result<Vec<RowSummary>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(lock(&self.rows)
                .values()
                .map(|row| RowSummary {
                    id: row.item.id.clone(),
                    version: row.item.version,
                    content_hash: row.item.content_hash(),
                    deleted: row.item.is_tombstone(),
                    updated_at_ms: row.updated_at_ms,
                })
                .collect())
        })
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async {})
    }
}
