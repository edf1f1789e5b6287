//! The storage tiers behind L1: L2 (a Redis Cluster or a standalone Redis, `redis.rs`) and L3 (MySQL or SQLite,
//! `sql.rs`), each playing a role the engine holds as a trait (`traits.rs`: `CacheStore`,
//! `ArchiveStore`), plus in-memory stores for both roles (`memory.rs`). Library types stop
//! here: the rest of the crate sees `SyncItem`s and `StoreError`.

pub mod memory;
pub mod redis;
mod redis_cluster;
mod redis_slots;
mod redis_standalone;
pub mod sql;
pub mod sql_merkle;
mod sql_mysql;
mod sql_reads;
mod sql_sqlite;
mod traits;

pub use traits::{ArchiveStore, CacheStore, ScanCursor, StoreFuture};

use crate::item::SyncItem;

/// Why a write or read failed, sorted for the caller (invariant 4).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Infrastructure trouble: retry, never dead-letter.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refuses this content: dead-letter the item.
    #[error("store rejected the item: {0}")]
    Rejected(String),
    /// The store is healthy but this attempt lost a race (an InnoDB deadlock or lock-wait
    /// timeout): retry soon; it says nothing about the store's health.
    #[error("transient store error: {0}")]
    Transient(String),
}

/// An item as a tier stores it, with the content hash stored beside it: L3's `content_hash`
/// column, L2's `h` field (`None` for an L2 entry written before `h` existed). What
/// `SyncEngine::get_verified` checks the content against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub item: SyncItem,
    pub stored_hash: Option<[u8; 32]>,
}

impl Stored {
    /// Whether the content matches the stored hash; `None` when there is no stored hash.
    pub fn hash_matches(&self) -> Option<bool> {
        self.stored_hash.map(|hash| hash == self.item.content_hash())
    }
}

/// One stored row, as read back for verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSummary {
    pub id: String,
    pub version: u64,
    pub content_hash: [u8; 32],
    pub deleted: bool,
    /// When the row was last written: unchanged by a replay, since the guard refuses it.
    pub updated_at_ms: u64,
}
