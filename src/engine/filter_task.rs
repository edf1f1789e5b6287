//! The membership filter's side of the engine (`crate::filter`): the hooks the flush, the WAL
//! drain and the reads call, and the task that earns the filter's trust and keeps it.
//!
//! The task, per generation of the filter:
//!
//! 1. **Warm-up.** `T0` = the database clock; then every id of L3, tombstones included, is
//!    paged by key (`ArchiveStore::ids_after`). Every row committed before the first page's
//!    snapshot (hence before `T0` was read) is in one of the pages: ids are never removed,
//!    and a row's place in the key order never changes.
//! 2. **Tail.** Each poll reads the database clock `T`, then every row with
//!    `created_at_ms >= since`, paged by `(created_at_ms, id)`; the next poll's `since` is
//!    `T - overlap`. `created_at_ms` is the database clock at the inserting statement's
//!    start, and an insert commits at most `overlap` after it (`overlap` =
//!    `SYNC_SQL_WRITE_TIMEOUT_MS`, past which our writers roll back, + `commit_margin`). So a
//!    row that commits after a poll's snapshot has `created_at_ms > T - overlap`: the next
//!    poll reads it. Rows committed before the warm-up's `T0` are in the warm-up; the first
//!    poll starts at `since = T0 - overlap`.
//! 3. After the warm-up and one completed poll the filter is warm: trusted while the last
//!    completed poll started within `lag_bound` (every row committed before that start is in
//!    the filter). A poll that fails or hangs leaves the lag growing, and past the bound
//!    reads go to L3 again.
//!
//! Ids this process writes are added before each L3 write (`note_l3_write`), so they never
//! wait for the tail. If the filter outgrows its size it is replaced and warmed up again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Stores, SyncEngine};
use crate::filter::{FilterManager, FilterStats, FilterTrust};
use crate::item::SyncItem;
use crate::storage::{ArchiveStore, StoreError};

/// A poll that takes longer than this is abandoned (and retried): the lag keeps growing
/// meanwhile, so reads have gone to L3 long before.
const POLL_DEADLINE: Duration = Duration::from_secs(60);
/// Wait before retrying a warm-up that failed.
const WARM_UP_RETRY: Duration = Duration::from_secs(1);
/// While a poll runs, the trust and lag gauges are refreshed this often (a hung poll shows).
const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// Called before an L3 write is sent: its ids enter the filter first, so a read can never be
/// told "definitely not" about an id this process has written (or is writing).
pub(super) fn note_l3_write(stores: &Stores, items: &[&SyncItem]) {
    if let Some(filter) = &stores.filter {
        filter.add(items.iter().map(|item| item.id.as_str()));
    }
}

/// True when the trusted filter says L3 has no row for `id`: the read may skip L3.
pub(super) fn l3_surely_lacks(stores: &Stores, id: &str) -> bool {
    stores.filter.as_ref().is_some_and(|filter| filter.definitely_absent(id))
}

impl SyncEngine {
    /// The membership filter over L3's ids (`None` without L3, with the filter off, or
    /// before `start`).
    pub fn filter(&self) -> Option<Arc<FilterManager>> {
        self.stores.as_ref()?.filter.clone()
    }

    /// Whether the filter is trusted now, and if not why (`None` without a filter).
    pub fn filter_trust(&self) -> Option<FilterTrust> {
        self.stores.as_ref()?.filter.as_ref().map(|filter| filter.trust())
    }

    /// The filter's size and use (`None` without a filter).
    pub fn filter_stats(&self) -> Option<FilterStats> {
        self.stores.as_ref()?.filter.as_ref().map(|filter| filter.stats())
    }
}

/// Warms the filter up and tails other processes' inserts until the engine stops.
pub(super) async fn run(stores: Arc<Stores>, stopping: CancellationToken) {
    let (Some(filter), Some(l3)) = (stores.filter.clone(), stores.l3.as_deref()) else { return };
    let overlap = stores.sql_write_timeout + filter.config().commit_margin;
    let overlap_ms = i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX);
    loop {
        let generation = filter.begin_warm_up();
        let started = Instant::now();
        // A stop never waits for a query (a hung connection must not hold the shutdown).
        let warmed = tokio::select! {
            _ = stopping.cancelled() => return,
            warmed = warm_up(&filter, l3, generation, &stopping) => warmed,
        };
        let since = match warmed {
            Ok(Some(t0)) => t0.saturating_sub(overlap_ms),
            Ok(None) => {
                if stopping.is_cancelled() {
                    return;
                }
                continue; // rebuilt meanwhile: warm the new filter up
            }
            Err(StoreError::Rejected(why)) => {
                // This store cannot list its ids: the filter can never be trusted.
                tracing::info!(%why, "no membership filter for this L3 (reads go to L3)");
                filter.warm_up_failed(generation, why);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "membership filter warm-up failed, retrying (reads go to L3)");
                filter.warm_up_failed(generation, format!("warm-up failed: {error}"));
                if sleep_or_stop(WARM_UP_RETRY, &filter, &stopping).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(
            ids = filter.stats().ids,
            seconds = started.elapsed().as_secs_f64(),
            "membership filter warmed up from L3, tailing other writers' inserts"
        );
        if tail(&filter, l3, generation, since, overlap_ms, &stopping).await {
            return;
        }
    }
}

/// Pages every id of L3 into the filter. Returns the database clock read before the first
/// page, or `None` if the filter was rebuilt (or the engine stops) meanwhile.
async fn warm_up(
    filter: &FilterManager,
    l3: &dyn ArchiveStore,
    generation: u64,
    stopping: &CancellationToken,
) -> Result<Option<i64>, StoreError> {
    let t0 = l3.clock_ms().await?;
    let page = filter.config().page_ids;
    let mut after: Option<Vec<u8>> = None;
    loop {
        if stopping.is_cancelled() || filter.generation() != generation {
            return Ok(None);
        }
        let mut ids = l3.ids_after(after.as_deref(), page).await?;
        add_ids(filter, ids.iter());
        if ids.len() < page {
            return Ok(Some(t0));
        }
        after = ids.pop();
    }
}

/// Polls until the engine stops (true) or the filter is rebuilt (false).
async fn tail(
    filter: &FilterManager,
    l3: &dyn ArchiveStore,
    generation: u64,
    mut since: i64,
    overlap_ms: i64,
    stopping: &CancellationToken,
) -> bool {
    loop {
        if stopping.is_cancelled() {
            return true;
        }
        if filter.generation() != generation {
            return false;
        }
        let started = Instant::now();
        let polling = tokio::time::timeout(POLL_DEADLINE, poll(filter, l3, since));
        tokio::pin!(polling);
        let polled = loop {
            tokio::select! {
                _ = stopping.cancelled() => return true,
                polled = &mut polling => break polled,
                _ = tokio::time::sleep(GAUGE_REFRESH) => { filter.trust(); }
            }
        };
        match polled {
            Ok(Ok(now)) => {
                since = now.saturating_sub(overlap_ms);
                filter.poll_completed(generation, started);
            }
            Ok(Err(error)) => tracing::warn!(%error, "membership filter tail poll failed, retrying"),
            Err(_) => tracing::warn!(seconds = POLL_DEADLINE.as_secs(), "membership filter tail poll timed out"),
        }
        filter.trust(); // refreshes the trust and lag gauges
        if sleep_or_stop(filter.config().poll_interval, filter, stopping).await {
            return true;
        }
    }
}

/// One poll: the database clock, then every row created since `since`. Returns the clock.
async fn poll(filter: &FilterManager, l3: &dyn ArchiveStore, since: i64) -> Result<i64, StoreError> {
    let now = l3.clock_ms().await?;
    let page = filter.config().page_ids;
    let mut after: Option<(i64, Vec<u8>)> = None;
    loop {
        let rows = l3.ids_created_since(since, after.as_ref().map(|(at, id)| (*at, id.as_slice())), page).await?;
        add_ids(filter, rows.iter().map(|(_, id)| id));
        if rows.len() < page {
            return Ok(now);
        }
        after = rows.into_iter().next_back();
    }
}

/// Adds ids read from L3 (bytes; an id that is not UTF-8 cannot be asked for, and is added
/// as its lossy text).
fn add_ids<'a>(filter: &FilterManager, ids: impl Iterator<Item = &'a Vec<u8>>) {
    let ids: Vec<std::borrow::Cow<'a, str>> = ids.map(|id| String::from_utf8_lossy(id)).collect();
    filter.add(ids.iter().map(|id| id.as_ref()));
}

/// Sleeps, waking early for a rebuild; true if the engine is stopping.
async fn sleep_or_stop(delay: Duration, filter: &FilterManager, stopping: &CancellationToken) -> bool {
    tokio::select! {
        _ = stopping.cancelled() => true,
        _ = filter.rebuild_requested() => false,
        _ = tokio::time::sleep(delay) => false,
    }
}
