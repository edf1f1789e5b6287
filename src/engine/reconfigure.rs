//! The reconfigure task: applies live settings that arrive on the engine's `watch` receiver.
//!
//! Batch limits are re-read by the batch task for every batch; this task applies the rest:
//! the default L2 TTL (for items written from now on), the memory budget (the levels are
//! recomputed against it at once) and L1's byte capacity (a new moka cache, `L1Cache::resize`). Settings that shape connections (URLs,
//! table, prefix, WAL directory, breaker thresholds) are read once at `start` and need a new
//! engine.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{MemoryPressure, Stores};
use crate::config::SyncEngineConfig;

pub(super) async fn run(
    stores: Arc<Stores>,
    pressure: MemoryPressure,
    mut config_rx: watch::Receiver<SyncEngineConfig>,
    stopping: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            changed = config_rx.changed() => {
                if changed.is_err() {
                    return; // the sender is gone: no more updates
                }
                let config = config_rx.borrow_and_update().clone();
                apply(&stores, &pressure, &config).await;
            }
        }
    }
}

async fn apply(stores: &Stores, pressure: &MemoryPressure, config: &SyncEngineConfig) {
    pressure.set_budget(config.memory_budget_bytes);
    pressure.resize_l1(config.l1_max_bytes).await;
    pressure.refresh();
    let ttl = config.redis_ttl_secs.min(crate::decode::MAX_TTL_SECS);
    if stores.redis_ttl_secs.swap(ttl, Ordering::Relaxed) != ttl {
        tracing::info!(redis_ttl_secs = ttl, "default L2 TTL changed");
    }
}
