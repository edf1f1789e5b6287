//! The engine's memory pressure: the bytes it holds, the `BackpressureLevel` they put it
//! at, and the relief task that makes L1 give way.
//!
//! The bytes are counted per holder: items accepted and not yet settled (queued, in the
//! batcher, being flushed), L1's weighted size, and for the Kafka worker the bytes of the
//! records it has received and not yet settled. Holders can share one allocation (an
//! unsettled item is in the queue and in L1, and came from a Kafka record), so the sum is an
//! upper bound: pressure is reported early, never late.
//!
//! `MemoryPressure::refresh` recomputes the level (with `LevelBounds`'s hysteresis) and is
//! cheap and synchronous: `enqueue`, the reads and the Kafka consumer thread call it, and the
//! relief task every `RELIEF_INTERVAL`. Relief: from Warn up, durable L1 entries are evicted,
//! largest × coldest first, until the bytes are back below Warn's exit threshold; from
//! Emergency up, every durable entry goes. An entry whose id is still pending never goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::pending::PendingIds;
use crate::cache::L1Cache;
use crate::pressure::{BackpressureLevel, BackpressureThresholds, LevelBounds};

/// How often the relief task re-reads the bytes when nothing wakes it earlier: short enough
/// that L1 gives way before a burst of reads has filled it far past the target.
const RELIEF_INTERVAL: Duration = Duration::from_millis(20);

/// A handle on the engine's memory pressure, shared with the Kafka consumer thread.
#[derive(Clone)]
pub struct MemoryPressure(Arc<Monitor>);

struct Monitor {
    l1: L1Cache,
    pending: PendingIds,
    /// Bytes of Kafka records received and not yet settled (the worker counts them).
    kafka_bytes: Arc<AtomicU64>,
    thresholds: BackpressureThresholds,
    /// The bounds (the worker may replace the budget with its own) and the current level.
    state: Mutex<(LevelBounds, BackpressureLevel)>,
    level_tx: watch::Sender<BackpressureLevel>,
    /// Wakes the relief task when the level rises to Warn or above.
    wake: Notify,
}

impl MemoryPressure {
    pub(super) fn new(
        budget_bytes: u64,
        thresholds: BackpressureThresholds,
        l1: L1Cache,
        pending: PendingIds,
    ) -> MemoryPressure {
        metrics::gauge!(crate::metrics::BACKPRESSURE_LEVEL).set(0.0);
        metrics::gauge!(crate::metrics::MEMORY_BUDGET).set(budget_bytes as f64);
        MemoryPressure(Arc::new(Monitor {
            l1,
            pending,
            kafka_bytes: Arc::new(AtomicU64::new(0)),
            thresholds,
            state: Mutex::new((LevelBounds::new(budget_bytes, &thresholds), BackpressureLevel::Normal)),
            level_tx: watch::Sender::new(BackpressureLevel::Normal),
            wake: Notify::new(),
        }))
    }

    /// The bytes held now: unsettled items + L1 + the worker's Kafka records in flight.
    pub fn bytes(&self) -> u64 {
        self.0.pending.bytes() + self.0.l1.bytes() + self.0.kafka_bytes.load(Ordering::SeqCst)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.lock().0.budget_bytes
    }

    /// The level as last computed.
    pub fn level(&self) -> BackpressureLevel {
        self.lock().1
    }

    /// Recomputes the level from the bytes held now.
    pub fn refresh(&self) -> BackpressureLevel {
        self.refresh_with(self.bytes()).0
    }

    /// Recomputes the level for `bytes`; returns it with the bounds it was computed with.
    pub(super) fn refresh_with(&self, bytes: u64) -> (BackpressureLevel, LevelBounds) {
        let mut state = self.lock();
        let (bounds, previous) = *state;
        let level = bounds.next(previous, bytes);
        if level != previous {
            state.1 = level;
            drop(state);
            self.0.level_tx.send_replace(level);
            metrics::gauge!(crate::metrics::BACKPRESSURE_LEVEL).set(level.value() as f64);
            tracing::info!(from = %previous, to = %level, bytes, budget = bounds.budget_bytes, "backpressure level");
            if level >= BackpressureLevel::Warn {
                self.0.wake.notify_one();
            }
        }
        (level, bounds)
    }

    /// Every level change from now on.
    pub fn subscribe(&self) -> watch::Receiver<BackpressureLevel> {
        self.0.level_tx.subscribe()
    }

    /// The counter the Kafka worker adds its records' bytes to.
    pub(crate) fn kafka_bytes(&self) -> Arc<AtomicU64> {
        self.0.kafka_bytes.clone()
    }

    /// The worker's budget (`SYNC_MEMORY_BUDGET_BYTES`) replaces the engine's: one budget
    /// covers the records, the queue and L1.
    pub(crate) fn set_budget(&self, budget_bytes: u64) {
        let mut state = self.lock();
        if state.0.budget_bytes != budget_bytes {
            state.0 = LevelBounds::new(budget_bytes, &self.0.thresholds);
            metrics::gauge!(crate::metrics::MEMORY_BUDGET).set(budget_bytes as f64);
            tracing::info!(budget_bytes, "memory budget set");
        }
    }

    /// Changes L1's byte capacity live (`SYNC_L1_MAX_BYTES`): ids not yet durable always stay.
    pub(crate) async fn resize_l1(&self, max_bytes: u64) {
        if self.0.l1.max_bytes() != max_bytes {
            let pending = self.0.pending.clone();
            self.0.l1.resize(max_bytes, |id| pending.contains(id)).await;
            self.refresh();
        }
    }

    // Held only to read or swap two small values, never across an await.
    fn lock(&self) -> std::sync::MutexGuard<'_, (LevelBounds, BackpressureLevel)> {
        self.0.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Makes L1 give way while the level is Warn or above, until `stopping`.
pub(super) async fn run_relief(pressure: MemoryPressure, stopping: CancellationToken) {
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(RELIEF_INTERVAL) => {}
            _ = pressure.0.wake.notified() => {}
        }
        relieve(&pressure).await;
    }
}

/// One relief pass: evicts what the level asks for. Returns the bytes freed.
pub(super) async fn relieve(pressure: &MemoryPressure) -> u64 {
    let monitor = &pressure.0;
    // moka reports its own evictions at housekeeping: let it, so L1's count is current.
    monitor.l1.run_pending_tasks().await;
    let bytes = pressure.bytes();
    let (level, bounds) = pressure.refresh_with(bytes);
    let to_free = match level {
        BackpressureLevel::Normal => return 0,
        level if level >= BackpressureLevel::Emergency => u64::MAX,
        _ => bytes.saturating_sub(bounds.relief_target_bytes()),
    };
    let pending = monitor.pending.clone();
    let freed = monitor.l1.evict_large_and_cold(to_free, |id| pending.contains(id)).await;
    if freed > 0 {
        monitor.l1.run_pending_tasks().await;
        tracing::debug!(%level, freed, "L1 gave way to memory pressure");
        pressure.refresh();
    }
    freed
}
