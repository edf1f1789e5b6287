//! sync-engine: a tiered store, L1 (moka) → L2 (Redis, standalone or Cluster) → L3 (MySQL or
//! SQLite), and the Kafka ingestion worker built on it.
//!
//! # Module map
//!
//! | module | owns |
//! | --- | --- |
//! | `config` | the `SYNC_*` env-var config tree, validated as a whole; `Secret` |
//! | `item` | `SyncItem`, `ContentType`, `Origin`, the newest-wins ordering |
//! | `options` | `SubmitOptions` (tiers, `CacheTtl`) |
//! | `decode` | one Kafka record → item + options, or a dead-letter reason (pure) |
//! | `batch` | the hybrid batcher: count, bytes, age (pure, time passed in) |
//! | `pressure` | memory budget, `BackpressureLevel` thresholds with hysteresis, pause/resume decisions (pure) |
//! | `cache` | L1 over moka, bounded by bytes, version-guarded |
//! | `storage` | the roles `CacheStore` (L2) and `ArchiveStore` (L3); Redis (`redis`), MySQL and SQLite (`sql`), in-memory (`memory`); version-guarded writes |
//! | `engine` | `SyncEngine`: submit, get, delete, flush, shutdown; batch, flush, WAL drain, L2 repair and L1 relief tasks; memory pressure (`MemoryPressure`) |
//! | `resilience` | the write-ahead log, circuit breakers, retry backoff |
//! | `kafka` | the consumer thread, offsets tracker, the worker loop, dead-letter producer |
//! | `merkle` | the merkle tree over L3's rows split on dots (`PathMerkle`, `MerkleBatch`, `MerkleNode`, `MerkleDiff`): hashing, incremental `apply`, top-down diff (pure; L3's slots are `storage::sql_merkle`) |
//! | `metrics` | every metric name and its description |
//! | `http` | the endpoint: `/metrics`, `/health/live`, `/health/ready` |
//! | `http_merkle` | `GET /merkle/<path>` on its own listener behind a bearer token (off by default), and `HttpSlots`, a peer's tree read through it |
//! | `workload` | the generated workload (updates, deletes, poison) and its L3 check, for the demo, the benchmark and tests |
//! | `reload` | the worker's env file (`SYNC_ENV_FILE`) and what a SIGHUP may change live |
//! | `rfc3339` | RFC 3339 times ↔ epoch milliseconds, for `replay --to-datetime` |
//!
//! The command's subcommands (`run`, `demo`, `produce`, `offsets`, `replay`, `ceiling`) are
//! the binary's `src/cli/`, not part of the library.
//!
//! # Glossary
//!
//! - **item**: one id with a version and content bytes, or a versioned tombstone.
//! - **origin**: the topic, partition and offset an item was read from; breaks version ties.
//! - **settled**: durable in its last tier (L3 committed, or fsynced to the write-ahead log
//!   while L3 is down, or L2/L1 for items routed without L3), or acknowledged by the
//!   dead-letter topic.
//! - **committable**: the offset after the highest contiguous settled offset of a partition.
//!
//! # The life of one message
//!
//! 1. `kafka::consumer` polls librdkafka on its own thread and sends each record, converted
//!    to our `RawRecord`, to the worker; it pauses partitions from the engine's Throttle
//!    backpressure level (`pressure`) and keeps polling.
//! 2. `kafka::worker` tracks the offset, decodes the record (`decode`), and either enqueues
//!    the item in the engine or sends the record to the dead-letter topic (`kafka::dlq`).
//! 3. `engine` writes the item to L1, batches it, writes the batch to L2 and L3, and
//!    acknowledges it with the tier that made it durable.
//! 4. The worker marks the offset settled; `kafka::offsets` advances the partition's
//!    contiguous watermark, and the consumer thread commits it.

pub mod batch;
pub mod cache;
pub mod config;
pub mod decode;
pub mod engine;
pub mod filter;
pub mod http;
pub mod http_merkle;
pub mod item;
pub mod kafka;
pub mod merkle;
pub mod metrics;
pub mod options;
pub mod pressure;
pub mod reload;
pub mod resilience;
pub mod rfc3339;
pub mod storage;
pub mod workload;

// What a library user needs, at the root (README "From the seed" maps the original names).
pub use batch::{Batch, BatchConfig, FlushReason, HybridBatcher, SizedItem};
pub use config::{Config, SyncEngineConfig};
pub use engine::{EngineError, EngineState, ItemStatus, SettleError, SettleReceipt, SyncEngine, Tier};
pub use filter::{FilterConfig, FilterManager, FilterStats, FilterTrust};
pub use item::{ContentType, Origin, SyncItem};
pub use merkle::{MerkleBatch, MerkleDiff, MerkleNode, PathMerkle};
pub use metrics::LatencyTimer;
pub use options::{CacheTtl, OptionsKey, SubmitOptions, Tiers};
pub use pressure::{BackpressureLevel, BackpressureThresholds};
pub use resilience::circuit_breaker::{BackendCircuits, CircuitBreaker, CircuitConfig, CircuitError};
pub use resilience::retry::RetryConfig;
pub use resilience::wal::{WalStats, WriteAheadLog};
pub use storage::memory::{MemoryArchiveStore, MemoryCacheStore};
/// The seed's name for `StoreError`.
pub use storage::StoreError as StorageError;
pub use storage::StoreError;
pub use storage::{ArchiveStore, CacheStore};
