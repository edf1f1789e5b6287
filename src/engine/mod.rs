//! `SyncEngine`: the library's front door. Submit items, read them back, delete them.
//!
//! The life of a submitted item: `enqueue` validates it, writes it to L1 (version-guarded),
//! and queues it with a settle acknowledgement. The batch task (`batching.rs`) groups queued
//! items by count, bytes and age; the flush task (`flushing.rs`) writes each batch to L2 and
//! L3 concurrently, one batch at a time, and then resolves every item's acknowledgement with
//! the tier that made it durable. The Kafka worker awaits these acknowledgements to know what
//! it may commit; library users simply await `submit`.
//!
//! When L3 is unavailable (or its circuit breaker is open) a batch is appended and fsynced to
//! the local write-ahead log instead and settles there (`wal_drain.rs`); a drain task replays the
//! log into L3 once it answers again.
//!
//! Reads go L1 → L2 → L3 and fill the faster tiers on a hit. Shutdown closes the queue,
//! flushes what was accepted, and waits for the flush to finish: nothing accepted is lost.
//!
//! Memory pressure (`backpressure.rs`) puts the engine at a `BackpressureLevel`: from
//! Throttle library submits are slowed, from Critical refused, at Shutdown reads are refused
//! too; L1 gives way from Warn. The Kafka worker's writes are never refused
//! (`enqueue_admitted`): it pauses its partitions instead.

mod backpressure;
mod batching;
mod filter_task;
mod flushing;
mod l2_audit;
mod l2_repair;
mod merkle_task;
mod pending;
mod prefix;
mod reads;
mod reconfigure;
mod state;
mod wal_drain;

pub use backpressure::MemoryPressure;
pub use l2_audit::{audit_pass, AuditOptions, AuditReport};
pub use reads::ItemStatus;
pub use state::EngineState;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::L1Cache;
use crate::config::SyncEngineConfig;
use crate::item::{now_ms, SyncItem};
use crate::options::SubmitOptions;
use crate::pressure::BackpressureLevel;
use crate::resilience::circuit_breaker::BackendCircuits;
use crate::storage::redis::RedisStore;
use crate::storage::sql::SqlStore;
use crate::storage::{ArchiveStore, CacheStore, StoreError};

/// The tier that made an item durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
    L3,
    /// Appended and fsynced to the local write-ahead log while L3 was unavailable.
    Wal,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::L3 => "l3",
            Tier::Wal => "wal",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// The store refuses this item's content: the caller should dead-letter it.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The engine stopped before the item became durable; it was not written.
    #[error("engine stopped before the item settled")]
    Abandoned,
}

pub type SettleResult = Result<Tier, SettleError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine is not started")]
    NotStarted,
    #[error("engine is shutting down")]
    ShuttingDown,
    #[error("invalid item: {0}")]
    InvalidItem(String),
    /// A query argument the engine refuses (an empty prefix, an invalid state).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The call reads L3 and this engine has none (no `sql_url`).
    #[error("{0} needs L3, and this engine has no sql_url")]
    NeedsL3(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the write-ahead log: {0}")]
    Wal(crate::resilience::wal::WalError),
    #[error(transparent)]
    Settle(#[from] SettleError),
    /// A verified read found content that does not match the hash stored with it.
    #[error("stored content of {id:?} in {} does not match its stored hash", .tier.as_str())]
    Corrupt { id: String, tier: Tier },
    /// Refused for memory pressure: a write from Critical up, a read at Shutdown. Retry
    /// once the level has come down (`SyncEngine::backpressure_receiver`).
    #[error("refused under memory pressure (backpressure level {0})")]
    Backpressure(BackpressureLevel),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

/// Resolves when the item is settled.
pub struct SettleReceipt(oneshot::Receiver<SettleResult>);

impl Future for SettleReceipt {
    type Output = SettleResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SettleResult> {
        Pin::new(&mut self.0).poll(cx).map(|result| result.unwrap_or(Err(SettleError::Abandoned)))
    }
}

/// What the queue carries to the batch task.
enum Queued {
    Item(Pending),
    /// Close the open batch now; answer once everything before it has settled.
    Flush(oneshot::Sender<()>),
}

struct Pending {
    item: Arc<SyncItem>,
    enqueued_at: std::time::Instant,
    options: SubmitOptions,
    ack: pending::Ack,
}

/// An item L3 rejected for its content while the write-ahead log drained: it had settled in
/// the WAL and its offset may be committed, so whoever runs the engine dead-letters it from
/// here (`SyncEngine::take_late_rejections`).
#[derive(Debug)]
pub struct LateRejection {
    pub item: SyncItem,
    pub reason: String,
}

/// What `/health/ready` shows of the engine's backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// Circuit breaker per backend (`l3`, `l2`).
    pub breakers: Vec<(&'static str, crate::resilience::circuit_breaker::BreakerState)>,
    /// Bytes in the write-ahead log, waiting to drain into L3.
    pub wal_bytes: u64,
    /// Ids whose L2 write failed, waiting for repair from L3.
    pub l2_stale_ids: u64,
    /// The memory pressure level.
    pub backpressure: BackpressureLevel,
    /// The membership filter's trust (`None` without a filter).
    pub filter: Option<crate::filter::FilterTrust>,
}

/// The tiers, the L3 write-ahead log, L2 repair and the circuit breakers.
pub(crate) struct Stores {
    /// L1, so that flushes and the WAL drain can drop entries L3 refused.
    pub l1: L1Cache,
    pub l2: Option<Arc<dyn CacheStore>>,
    pub l3: Option<Arc<dyn ArchiveStore>>,
    pub wal: Option<wal_drain::SharedWal>,
    /// Ids whose L2 write failed: repaired from L3 when Redis answers.
    pub l2_dirty: l2_repair::DirtyIds,
    pub circuits: BackendCircuits,
    /// The default L2 TTL (0: none); changes live (`reconfigure.rs`).
    pub redis_ttl_secs: std::sync::atomic::AtomicU64,
    pub sql_write_timeout: std::time::Duration,
    pub late_rejections: mpsc::UnboundedSender<LateRejection>,
    /// The membership filter over L3's ids (`filter_task.rs`); `None` without L3 or when off.
    pub filter: Option<Arc<crate::filter::FilterManager>>,
}

impl Stores {
    pub fn redis_ttl_secs(&self) -> u64 {
        self.redis_ttl_secs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub struct SyncEngine {
    config: SyncEngineConfig,
    config_rx: watch::Receiver<SyncEngineConfig>,
    l1: L1Cache,
    /// Ids enqueued and not yet settled (`status`), and their bytes.
    pending: pending::PendingIds,
    pressure: MemoryPressure,
    stores: Option<Arc<Stores>>,
    /// Stores handed in before `start` (`with_cache_store`, `with_archive_store`), used
    /// instead of connecting to `redis_url`/`sql_url`.
    given_l2: Option<Arc<dyn CacheStore>>,
    given_l3: Option<Arc<dyn ArchiveStore>>,
    queue_tx: Option<mpsc::Sender<Queued>>,
    /// Graceful stop: close the queue, flush, finish.
    stopping: CancellationToken,
    /// Hard stop: give up retrying an unavailable store.
    aborting: CancellationToken,
    tasks: TaskTracker,
    late_rejections: std::sync::Mutex<Option<mpsc::UnboundedReceiver<LateRejection>>>,
    state: state::StateCell,
}

impl SyncEngine {
    /// `config_rx` carries live updates (keep its sender): batch limits are re-read for every
    /// batch, the default L2 TTL applies to writes from then on (`reconfigure.rs`).
    pub fn new(config: SyncEngineConfig, config_rx: watch::Receiver<SyncEngineConfig>) -> SyncEngine {
        let l1 = L1Cache::new(config.l1_max_bytes);
        let pending = pending::PendingIds::default();
        let pressure =
            MemoryPressure::new(config.memory_budget_bytes, config.backpressure, l1.clone(), pending.clone());
        SyncEngine {
            l1,
            pending,
            pressure,
            config,
            config_rx,
            stores: None,
            given_l2: None,
            given_l3: None,
            queue_tx: None,
            stopping: CancellationToken::new(),
            aborting: CancellationToken::new(),
            tasks: TaskTracker::new(),
            late_rejections: std::sync::Mutex::new(None),
            state: state::StateCell::new(),
        }
    }

    /// Uses this store as L2 instead of connecting to the configured Redis: a
    /// `storage::memory::MemoryCacheStore`, or any other `CacheStore`.
    pub fn with_cache_store(mut self, store: Arc<dyn CacheStore>) -> SyncEngine {
        self.given_l2 = Some(store);
        self
    }

    /// Uses this store as L3 instead of connecting to the configured SQL database: a
    /// `storage::memory::MemoryArchiveStore`, or any other `ArchiveStore`.
    pub fn with_archive_store(mut self, store: Arc<dyn ArchiveStore>) -> SyncEngine {
        self.given_l3 = Some(store);
        self
    }

    /// Where the engine is in its life (see `EngineState`).
    pub fn state(&self) -> EngineState {
        self.state.get()
    }

    /// Every state change from now on, for a caller that waits for one.
    pub fn state_receiver(&self) -> watch::Receiver<EngineState> {
        self.state.subscribe()
    }

    /// Connects L2 and L3 (running L3 migrations) and starts the batch and flush tasks.
    pub async fn start(&mut self) -> Result<(), EngineError> {
        self.state.set(EngineState::Connecting);
        let started = self.connect_and_spawn().await;
        // A failed start leaves nothing running: it may be tried again.
        self.state.set(if started.is_ok() { EngineState::Running } else { EngineState::Created });
        started
    }

    async fn connect_and_spawn(&mut self) -> Result<(), EngineError> {
        self.config.backpressure.validate().map_err(EngineError::InvalidConfig)?;
        let urls = self.config.redis_urls();
        let l2: Option<Arc<dyn CacheStore>> = match &self.given_l2 {
            Some(store) => Some(store.clone()),
            None if urls.is_empty() => None,
            None => Some(Arc::new(RedisStore::connect(&urls, &self.config.redis_prefix).await?)),
        };
        let l3: Option<Arc<dyn ArchiveStore>> = match (&self.given_l3, &self.config.sql_url) {
            (Some(store), _) => Some(store.clone()),
            (None, Some(url)) => Some(Arc::new(SqlStore::connect(url.expose(), &self.config.sql_table).await?)),
            (None, None) => None,
        };
        if let Some(l3) = l3.as_deref().and_then(|l3| l3.as_sql()) {
            // Marks ride in every L3 write's transaction; with them off the tree is stale.
            l3.set_merkle_marks(self.config.merkle);
            if !self.config.merkle {
                l3.merkle_invalidate().await?;
            }
        }
        let wal = match (&l3, &self.config.wal_dir) {
            (Some(_), Some(dir)) => {
                Some(wal_drain::open(dir.clone(), self.config.wal_max_bytes).await.map_err(EngineError::Wal)?)
            }
            _ => None,
        };
        if let (Some(l3), Some(limit)) = (&l3, self.config.max_item_bytes) {
            if let Some(l3_limit) = l3.max_item_bytes().filter(|l3_limit| *l3_limit < limit) {
                tracing::warn!(
                    max_item_bytes = limit,
                    l3_max_item_bytes = l3_limit,
                    "SYNC_MAX_ITEM_BYTES is above what MySQL's max_allowed_packet lets one row carry: \
                     items larger than l3_max_item_bytes will be rejected by L3 and dead-lettered \
                     (raise max_allowed_packet on the server, or lower SYNC_MAX_ITEM_BYTES)"
                );
            }
        }
        let filter = (l3.is_some() && self.config.filter.enabled)
            .then(|| Arc::new(crate::filter::FilterManager::new(self.config.filter.clone())));
        let (late_tx, late_rx) = mpsc::unbounded_channel();
        *self.late_rejections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(late_rx);
        let stores = Arc::new(Stores {
            l1: self.l1.clone(),
            l2,
            l3,
            wal,
            l2_dirty: Default::default(),
            circuits: BackendCircuits::new(self.config.circuit_config()),
            redis_ttl_secs: self.config.redis_ttl_secs.into(),
            sql_write_timeout: self.config.sql_write_timeout,
            late_rejections: late_tx,
            filter,
        });
        // The queue holds two batches' worth of items and the batch channel two batches:
        // enough to keep batching while earlier batches are written, and no more.
        let (queue_tx, queue_rx) = mpsc::channel(self.config.batch.max_items.max(1) * 2);
        let (batch_tx, batch_rx) = mpsc::channel(2);
        self.tasks.spawn(batching::run(queue_rx, batch_tx, self.config_rx.clone(), self.stopping.clone()));
        self.tasks.spawn(flushing::run(batch_rx, stores.clone(), self.aborting.clone()));
        self.tasks.spawn(wal_drain::run_drain(stores.clone(), self.stopping.clone()));
        self.tasks.spawn(l2_repair::run(stores.clone(), self.stopping.clone()));
        self.tasks.spawn(filter_task::run(stores.clone(), self.stopping.clone()));
        self.tasks.spawn(l2_audit::run(stores.clone(), self.config.audit_keys_per_sec, self.stopping.clone()));
        if self.config.merkle {
            self.tasks.spawn(merkle_task::run(stores.clone(), self.pending.clone(), self.stopping.clone()));
        }
        self.tasks.spawn(reconfigure::run(
            stores.clone(),
            self.pressure.clone(),
            self.config_rx.clone(),
            self.stopping.clone(),
        ));
        self.tasks.spawn(backpressure::run_relief(self.pressure.clone(), self.stopping.clone()));
        self.tasks.close();
        self.stores = Some(stores);
        self.queue_tx = Some(queue_tx);
        Ok(())
    }

    /// The tiers this engine has: L1 always, L2 and L3 when configured and connected.
    /// An item routed only to tiers it lacks would settle with nothing written: callers
    /// (the Kafka worker) refuse such items instead.
    pub fn tiers_available(&self) -> crate::options::Tiers {
        let stores = self.stores.as_deref();
        crate::options::Tiers {
            l1: true,
            l2: stores.is_some_and(|stores| stores.l2.is_some()),
            l3: stores.is_some_and(|stores| stores.l3.is_some()),
        }
    }

    /// The live state of the backends, read directly (for `/health/ready`): breakers of the
    /// tiers this engine has, WAL bytes and ids waiting for L2 repair.
    pub fn backend_state(&self) -> BackendState {
        let Some(stores) = self.stores.as_deref() else { return BackendState::default() };
        let mut breakers = Vec::new();
        if stores.l3.is_some() {
            breakers.push(("l3", stores.circuits.l3.state()));
        }
        if stores.l2.is_some() {
            breakers.push(("l2", stores.circuits.l2.state()));
        }
        let wal_bytes = self.wal_stats().map_or(0, |stats| stats.bytes);
        BackendState {
            breakers,
            wal_bytes,
            l2_stale_ids: stores.l2_dirty.len() as u64,
            backpressure: self.pressure.refresh(),
            filter: stores.filter.as_ref().map(|filter| filter.trust()),
        }
    }

    /// The memory pressure level now (recomputed from the bytes held).
    pub fn backpressure_level(&self) -> BackpressureLevel {
        self.pressure.refresh()
    }

    /// Every backpressure level change from now on, for a caller that waits for the level
    /// to come down before it writes again.
    pub fn backpressure_receiver(&self) -> watch::Receiver<BackpressureLevel> {
        self.pressure.subscribe()
    }

    /// The bytes the engine holds, as its pressure counts them: unsettled items + L1 + a
    /// Kafka worker's records in flight.
    pub fn memory_bytes(&self) -> u64 {
        self.pressure.bytes()
    }

    /// L1's byte capacity now in force (`l1_max_bytes`, which changes live).
    pub fn l1_max_bytes(&self) -> u64 {
        self.l1.max_bytes()
    }

    /// The pressure handle, shared with the Kafka consumer thread.
    pub fn memory_pressure(&self) -> MemoryPressure {
        self.pressure.clone()
    }

    /// From Critical up a library write is refused; at Throttle it waits a little, longer
    /// the closer the bytes are to Critical, so the flush can catch up.
    async fn admit_write(&self) -> Result<(), EngineError> {
        let bytes = self.pressure.bytes();
        let (level, bounds) = self.pressure.refresh_with(bytes);
        if level >= BackpressureLevel::Critical {
            return Err(EngineError::Backpressure(level));
        }
        if level == BackpressureLevel::Throttle {
            tokio::time::sleep(bounds.throttle_delay(bytes)).await;
        }
        Ok(())
    }

    /// At Shutdown a read is refused: it would fill L1 with more bytes.
    fn admit_read(&self) -> Result<(), EngineError> {
        match self.pressure.refresh() {
            BackpressureLevel::Shutdown => Err(EngineError::Backpressure(BackpressureLevel::Shutdown)),
            _ => Ok(()),
        }
    }

    /// What the write-ahead log holds (`None` without a WAL, or before `start`).
    pub fn wal_stats(&self) -> Option<crate::resilience::wal::WalStats> {
        let wal = self.stores.as_ref()?.wal.as_ref()?;
        wal.lock().ok().map(|log| log.stats())
    }

    /// Items L3 rejected while the write-ahead log drained (once; `None` after the first
    /// call or before `start`). The Kafka worker dead-letters them.
    pub fn take_late_rejections(&self) -> Option<mpsc::UnboundedReceiver<LateRejection>> {
        self.late_rejections.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    /// Writes to L1 and queues the item; the receipt resolves once it is settled. Under
    /// memory pressure it is slowed (Throttle) or refused (`EngineError::Backpressure`, from
    /// Critical up).
    pub async fn enqueue(&self, item: SyncItem, options: SubmitOptions) -> Result<SettleReceipt, EngineError> {
        if self.queue_tx.is_none() {
            return Err(EngineError::NotStarted);
        }
        if self.stopping.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        crate::decode::validate_id(item.id.as_bytes())
            .map_err(|reason| EngineError::InvalidItem(reason.to_string()))?;
        self.admit_write().await?;
        self.enqueue_admitted(item, options).await
    }

    /// `enqueue` without the backpressure checks: the Kafka worker never refuses a record
    /// (it pauses its partitions instead), and its records already count in the pressure.
    pub(crate) async fn enqueue_admitted(
        &self,
        item: SyncItem,
        options: SubmitOptions,
    ) -> Result<SettleReceipt, EngineError> {
        let queue_tx = self.queue_tx.as_ref().ok_or(EngineError::NotStarted)?;
        if self.stopping.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        crate::decode::validate_id(item.id.as_bytes())
            .map_err(|reason| EngineError::InvalidItem(reason.to_string()))?;
        if let Some(state) = &item.state {
            crate::item::validate_state(state).map_err(EngineError::InvalidItem)?;
        }
        let item = Arc::new(item);
        let (ack, receipt) = oneshot::channel();
        let below_l1 = (options.tiers.l2 && stores.l2.is_some()) || (options.tiers.l3 && stores.l3.is_some());
        if !below_l1 {
            if options.tiers.l1 {
                self.l1.put_if_newer(item.clone()).await;
            }
            metrics::counter!(crate::metrics::ITEMS_SETTLED, "tier" => "l1").increment(1);
            let _ = ack.send(Ok(Tier::L1));
            return Ok(SettleReceipt(receipt));
        }
        // Pending before it is in L1: L1 relief never evicts a pending id, so a read keeps
        // finding this version in L1 until it is durable below.
        let ack = self.pending.track(&item.id, item.size_bytes() as u64, ack);
        if options.tiers.l1 {
            self.l1.put_if_newer(item.clone()).await;
        }
        queue_tx
            .send(Queued::Item(Pending { item, enqueued_at: std::time::Instant::now(), options, ack }))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(SettleReceipt(receipt))
    }

    /// Submits with default options and waits until the item is settled.
    pub async fn submit(&self, item: SyncItem) -> Result<Tier, EngineError> {
        self.submit_with(item, SubmitOptions::default()).await
    }

    pub async fn submit_with(&self, item: SyncItem, options: SubmitOptions) -> Result<Tier, EngineError> {
        Ok(self.enqueue(item, options).await?.await?)
    }

    /// Deletes with a versioned tombstone newer than anything seen for the id.
    pub async fn delete(&self, id: &str) -> Result<Tier, EngineError> {
        let current = self.get_any(id).await?.map_or(0, |item| item.version);
        self.submit(SyncItem::tombstone(id, now_ms().max(current.saturating_add(1)))).await
    }

    /// The live item (a deleted id reads as `None`), from the fastest tier that has it.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<SyncItem>>, EngineError> {
        Ok(self.get_any(id).await?.filter(|item| !item.is_tombstone()))
    }

    /// Like `get`, but a tombstone is returned too.
    async fn get_any(&self, id: &str) -> Result<Option<Arc<SyncItem>>, EngineError> {
        self.admit_read()?;
        if let Some(item) = self.l1.get(id).await {
            return Ok(Some(item));
        }
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        if let Some(l2) = &stores.l2 {
            match l2.get(id).await {
                Ok(Some(item)) => {
                    let item = Arc::new(item);
                    self.l1.put_if_newer(item.clone()).await;
                    return Ok(Some(item));
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "L2 read failed, falling back to L3"),
            }
        }
        if filter_task::l3_surely_lacks(stores, id) {
            return Ok(None);
        }
        let Some(l3) = &stores.l3 else { return Ok(None) };
        let Some(item) = l3.get(id).await? else { return Ok(None) };
        let item = Arc::new(item);
        if let Some(l2) = &stores.l2 {
            // A failed fill only costs a later L3 read.
            for (id, error) in l2.write_batch(&[(&item, stores.redis_ttl_secs())]).await {
                tracing::warn!(id, %error, "L2 fill after an L3 read failed");
            }
        }
        self.l1.put_if_newer(item.clone()).await;
        Ok(Some(item))
    }

    /// Resolves once everything enqueued before the call has settled.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let queue_tx = self.queue_tx.as_ref().ok_or(EngineError::NotStarted)?;
        let (done_tx, done_rx) = oneshot::channel();
        queue_tx.send(Queued::Flush(done_tx)).await.map_err(|_| EngineError::ShuttingDown)?;
        done_rx.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Drops L1 entries of revoked partitions: another pod owns those ids now.
    pub fn drop_partitions_from_l1(&self, partitions: Vec<(Arc<str>, i32)>) {
        self.l1.drop_partitions(partitions);
    }

    /// Stops accepting, flushes everything accepted, and waits up to the configured
    /// `shutdown_grace` (see `shutdown_within`).
    pub async fn shutdown(&self) {
        self.shutdown_within(self.config.shutdown_grace).await
    }

    /// Stops accepting, flushes everything accepted, and waits. If a store stays unavailable
    /// past `grace`, unsettled items are abandoned (their acknowledgements say so, so a
    /// Kafka worker does not commit them and they are redelivered).
    pub async fn shutdown_within(&self, grace: std::time::Duration) {
        self.state.set(EngineState::Draining);
        self.stopping.cancel();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!("engine flush exceeded the grace period, abandoning unsettled items");
            self.aborting.cancel();
            self.tasks.wait().await;
        }
        if let Some(stores) = &self.stores {
            if let Some(l3) = &stores.l3 {
                l3.close().await;
            }
        }
        self.state.set(EngineState::Stopped);
    }

    /// L3, for verification tools.
    pub fn l3(&self) -> Option<&dyn ArchiveStore> {
        self.stores.as_ref().and_then(|stores| stores.l3.as_deref())
    }

    /// L2, for verification tools.
    pub fn l2(&self) -> Option<&dyn CacheStore> {
        self.stores.as_ref().and_then(|stores| stores.l2.as_deref())
    }
}
