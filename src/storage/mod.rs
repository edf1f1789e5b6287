//! The storage tiers behind L1: L2 (a Redis Cluster or a standalone Redis, `redis.rs`) and L3 (MySQL or SQLite,
//! `sql.rs`). Library types stop here: the rest of the crate sees `SyncItem`s and `StoreError`.

pub mod ceiling;
pub mod redis;
mod redis_cluster;
mod redis_slots;
mod redis_standalone;
pub mod sql;
mod sql_mysql;
mod sql_sqlite;

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
