//! The flush task: writes batches to L2 and L3, then settles their items.
//!
//! Per batch: the newest version of each id is written (older ones in the same batch are
//! superseded, which the stores' guards would make a no-op anyway), L2 and L3 concurrently.
//! L3 is the ground truth: while L3 is unavailable (or its breaker is open) a batch is
//! appended to the write-ahead log and settles there (without a WAL it is retried), and a
//! batch L3 rejects is split into single items, in their original order, so only the
//! offending ones are rejected (and then dead-lettered by the worker). An L2 failure does not
//! hold back items that also go to L3 (their ids go to L2 repair); items whose last tier is
//! L2 are retried until L2 takes them. Up to `CONCURRENT_BATCHES` batches are written at
//! once; the version guards make the final state independent of which lands first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batching::Batch;
use super::{Pending, SettleError, SettleResult, Stores, Tier};
use crate::item::SyncItem;
use crate::metrics as m;
use crate::resilience::retry::{Backoff, RetryConfig};
use crate::storage::StoreError;

/// Batches written at once. The stores' version guards make the final state independent of
/// the order batches land in, so two batches may overlap: while one transaction commits
/// (an fsync), the next is already executing. Items are sorted by id inside each batch, so
/// overlapping transactions take row locks in the same order.
const CONCURRENT_BATCHES: usize = 2;

pub(super) async fn run(mut batch_rx: mpsc::Receiver<Batch>, stores: Arc<Stores>, aborting: CancellationToken) {
    let mut writing = FuturesUnordered::new();
    loop {
        tokio::select! {
            batch = batch_rx.recv(), if writing.len() < CONCURRENT_BATCHES => {
                let Some(batch) = batch else { break };
                if !batch.items.is_empty() {
                    metrics::histogram!(m::BATCH_ITEMS).record(batch.items.len() as f64);
                    writing.push(write_batch(&stores, batch.items, &aborting));
                }
                if let Some(done) = batch.done {
                    // A flush answers only once every earlier batch has settled.
                    while writing.next().await.is_some() {}
                    let _ = done.send(());
                }
            }
            Some(()) = writing.next(), if !writing.is_empty() => {}
        }
    }
    while writing.next().await.is_some() {}
}

async fn write_batch(stores: &Stores, batch: Vec<Pending>, aborting: &CancellationToken) {
    let to_l3: Vec<(usize, &Pending)> =
        batch.iter().enumerate().filter(|(_, p)| p.options.tiers.l3 && stores.l3.is_some()).collect();
    let to_l2: Vec<&Pending> = batch.iter().filter(|p| p.options.tiers.l2 && stores.l2.is_some()).collect();
    let (l3_outcome, l2_failed) = tokio::join!(write_l3(stores, &to_l3, aborting), write_l2(stores, &to_l2, aborting));
    for (index, pending) in batch.into_iter().enumerate() {
        let result = settle_result(stores, &pending, &l3_outcome, index, &l2_failed);
        if let Ok(tier) = &result {
            metrics::counter!(m::ITEMS_SETTLED, "tier" => tier.as_str()).increment(1);
            metrics::histogram!(m::ITEM_SETTLE_SECONDS).record(pending.enqueued_at.elapsed().as_secs_f64());
        }
        let _ = pending.ack.send(result);
    }
}

/// The outcome of one item, from its last tier.
fn settle_result(
    stores: &Stores,
    pending: &Pending,
    l3: &L3Outcome,
    index: usize,
    l2_failed: &Option<SettleError>,
) -> SettleResult {
    let tiers = pending.options.tiers;
    if tiers.l3 && stores.l3.is_some() {
        return l3.unsettled.get(&index).map_or(Ok(l3.tier), |error| Err(error.clone()));
    }
    if tiers.l2 && stores.l2.is_some() {
        return l2_failed.as_ref().map_or(Ok(Tier::L2), |error| Err(error.clone()));
    }
    Ok(Tier::L1)
}

/// The newest item per id, sorted by id (a stable lock order for concurrent writers).
fn newest_per_id<'a>(pending: impl Iterator<Item = &'a Pending>) -> Vec<&'a SyncItem> {
    let mut newest: HashMap<&str, &SyncItem> = HashMap::new();
    for item in pending.map(|p| p.item.as_ref()) {
        newest
            .entry(item.id.as_str())
            .and_modify(|kept| {
                if item.supersedes(kept) {
                    *kept = item;
                }
            })
            .or_insert(item);
    }
    let mut items: Vec<&SyncItem> = newest.into_values().collect();
    items.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    items
}

/// How the L3-bound items of a batch ended: the tier that took them, and the batch positions
/// of those that did not settle, with why.
struct L3Outcome {
    tier: Tier,
    unsettled: HashMap<usize, SettleError>,
}

/// Writes to L3; while L3 is unavailable (or its breaker is open) the batch goes to the
/// write-ahead log instead. Without a WAL, or with a full one, it waits and retries.
async fn write_l3(stores: &Stores, to_l3: &[(usize, &Pending)], aborting: &CancellationToken) -> L3Outcome {
    let settled = |tier| L3Outcome { tier, unsettled: HashMap::new() };
    let Some(l3) = &stores.l3 else { return settled(Tier::L3) };
    if to_l3.is_empty() {
        return settled(Tier::L3);
    }
    let started = Instant::now();
    let items = newest_per_id(to_l3.iter().map(|(_, p)| *p));
    let mut backoff = Backoff::new(RetryConfig::default());
    let outcome = loop {
        if stores.l3_breaker.allows() {
            match l3.write_batch(&items).await {
                Ok(()) => {
                    stores.l3_breaker.record(true);
                    break settled(Tier::L3);
                }
                Err(StoreError::Rejected(error)) => {
                    stores.l3_breaker.record(true);
                    tracing::warn!(%error, items = items.len(), "L3 rejected a batch, writing its items one by one");
                    break L3Outcome { tier: Tier::L3, unsettled: write_l3_one_by_one(stores, to_l3, aborting).await };
                }
                Err(StoreError::Unavailable(error)) => {
                    stores.l3_breaker.record(false);
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "unavailable").increment(1);
                    tracing::warn!(%error, "L3 unavailable");
                }
            }
        }
        if let Some(wal) = &stores.wal {
            match super::wal::append(wal, &items).await {
                Ok(()) => break settled(Tier::Wal),
                Err(error) => tracing::warn!(%error, "cannot append to the write-ahead log, retrying"),
            }
        }
        if !sleep_or_abort(&mut backoff, aborting).await {
            break L3Outcome { tier: Tier::L3, unsettled: abandon_all(to_l3) };
        }
    };
    metrics::histogram!(m::FLUSH_SECONDS, "tier" => "l3").record(started.elapsed().as_secs_f64());
    outcome
}

/// Isolates rejected items: every item alone, in batch order (not deduplicated, so an older
/// valid version still lands when a newer one is rejected).
async fn write_l3_one_by_one(
    stores: &Stores,
    to_l3: &[(usize, &Pending)],
    aborting: &CancellationToken,
) -> HashMap<usize, SettleError> {
    let Some(l3) = &stores.l3 else { return HashMap::new() };
    let mut rejected = HashMap::new();
    for (position, (index, pending)) in to_l3.iter().enumerate() {
        let mut backoff = Backoff::new(RetryConfig::default());
        loop {
            match l3.write_batch(&[pending.item.as_ref()]).await {
                Ok(()) => break,
                Err(StoreError::Rejected(error)) => {
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "rejected").increment(1);
                    rejected.insert(*index, SettleError::Rejected(error));
                    break;
                }
                Err(StoreError::Unavailable(error)) => {
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "unavailable").increment(1);
                    tracing::warn!(%error, "L3 unavailable, retrying item");
                    if !sleep_or_abort(&mut backoff, aborting).await {
                        rejected.extend(abandon_all(&to_l3[position..]));
                        return rejected;
                    }
                }
            }
        }
    }
    rejected
}

fn abandon_all(to_l3: &[(usize, &Pending)]) -> HashMap<usize, SettleError> {
    to_l3.iter().map(|(index, _)| (*index, SettleError::Abandoned)).collect()
}

/// Writes to L2. Failures are logged and counted; if any item ends at L2, the failed ids
/// are retried until they succeed (or the engine aborts, returning the error).
async fn write_l2(stores: &Stores, to_l2: &[&Pending], aborting: &CancellationToken) -> Option<SettleError> {
    let l2 = stores.l2.as_ref()?;
    if to_l2.is_empty() {
        return None;
    }
    let started = Instant::now();
    let ttl = |p: &Pending| p.options.redis_ttl.resolve_secs(stores.redis_ttl_secs);
    let ttl_by_id: HashMap<&str, u64> = to_l2.iter().map(|p| (p.item.id.as_str(), ttl(p))).collect();
    let mut items: Vec<(&SyncItem, u64)> =
        newest_per_id(to_l2.iter().copied()).into_iter().map(|item| (item, ttl_by_id[item.id.as_str()])).collect();
    let ends_at_l2 = to_l2.iter().any(|p| !(p.options.tiers.l3 && stores.l3.is_some()));
    let mut backoff = Backoff::new(RetryConfig::default());
    let outcome = loop {
        let failed = if stores.l2_breaker.allows() {
            let failed = l2.write_batch(&items).await;
            stores.l2_breaker.record(failed.is_empty());
            failed
        } else {
            // Open breaker: skip the round trips that would time out; repair fixes L2 later.
            let open = StoreError::Unavailable("L2 circuit breaker open".into());
            items.iter().map(|(item, _)| (item.id.clone(), open.clone())).collect()
        };
        if failed.is_empty() {
            break None;
        }
        metrics::counter!(m::STORE_ERRORS, "tier" => "l2", "kind" => "unavailable").increment(failed.len() as u64);
        tracing::warn!(failed = failed.len(), error = %failed[0].1, "L2 write failed");
        if !ends_at_l2 {
            // These items are durable in L3; L2 may now be stale for them until repaired.
            stores.l2_dirty.add(failed.into_iter().map(|(id, _)| id));
            break None;
        }
        if !sleep_or_abort(&mut backoff, aborting).await {
            break Some(SettleError::Abandoned);
        }
        items.retain(|(item, _)| failed.iter().any(|(id, _)| *id == item.id));
    };
    metrics::histogram!(m::FLUSH_SECONDS, "tier" => "l2").record(started.elapsed().as_secs_f64());
    outcome
}

/// Sleeps the next backoff delay; false if the engine is aborting.
async fn sleep_or_abort(backoff: &mut Backoff, aborting: &CancellationToken) -> bool {
    let sleep = backoff.next_delay();
    tokio::select! {
        _ = aborting.cancelled() => false,
        _ = tokio::time::sleep(sleep) => true,
    }
}
