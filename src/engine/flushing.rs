//! The flush task: writes each batch to L3 first, then brings L1 and L2 in line with what L3
//! now holds, then settles the batch's items.
//!
//! Per batch: the newest version of each id is written (older ones in the same batch are
//! superseded, which the stores' guards would make a no-op anyway). L3 is the ground truth:
//! its write reads back, in the same transaction, the row each id holds afterwards. An item
//! L3 holds goes on to L2 (through L2's own guard); an item L3 refused (an older replay) is
//! never written to L2, and any L1 or L2 entry that L3's row supersedes is dropped, so reads
//! fall through to L3 (invariant 6, docs/DESIGN.md). While L3 is unavailable (or its breaker
//! is open) a batch is appended to the write-ahead log and settles there, and L2 gets the
//! fresh items; the WAL drain applies L3's verdict later (`wal_drain.rs`). A batch L3 rejects is
//! split into single items, in their original order, so only the offending ones are rejected
//! (then dead-lettered by the worker, and removed from L1 and L2).
//!
//! L2 failures never hold back items that also go to L3 (their ids go to L2 repair). Items
//! whose last tier is L2 are retried apart from the batch (`retry_l2`), so a Redis outage
//! never stalls L3-bound items. Up to `CONCURRENT_BATCHES` batches are written at once; the
//! version guards make the final state independent of which lands first.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::batching::FlushBatch;
use super::{Pending, SettleError, SettleResult, Stores, Tier};
use crate::item::SyncItem;
use crate::metrics::{self as m, LatencyTimer};
use crate::resilience::retry::{Backoff, RetryConfig};
use crate::storage::redis::L2Op;
use crate::storage::sql::HeldRows;
use crate::storage::ArchiveStore;
use crate::storage::StoreError;

/// Batches written to L3 at once, and batches updating the caches at once. The stores'
/// version guards make the final state independent of the order batches land in, so two
/// batches may overlap: while one transaction commits (an fsync), the next is already
/// executing. Items are sorted by id inside each batch, so overlapping transactions take
/// row locks in the same order.
const CONCURRENT_BATCHES: usize = 2;

/// Retries of a batch that lost a lock race (deadlock, lock-wait timeout) before it counts
/// as an outage.
const MAX_TRANSIENT_RETRIES: u32 = 5;

/// How long one batch's L2 changes may take before they count as failed (and go to repair):
/// the client's own retries against a hung node would otherwise hold the batch for many
/// seconds before the L2 breaker opens.
const L2_ATTEMPT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

pub(super) async fn run(mut batch_rx: mpsc::Receiver<FlushBatch>, stores: Arc<Stores>, aborting: CancellationToken) {
    // Three stages, so that L3 never waits on Redis: batches being written to L3, batches
    // whose caches follow L3's verdict (then settle), and items ending at L2 whose write
    // failed (retried outside the batch slots). Batches are numbered; a flush waits for the
    // batches numbered before it, while later batches keep flowing (a flush must never stop
    // L3 writes, e.g. while L2-only items wait for Redis).
    let mut writing = FuturesUnordered::new();
    let mut finishing = FuturesUnordered::new();
    let mut retrying = FuturesUnordered::new();
    let mut unsettled: BTreeSet<u64> = BTreeSet::new();
    let mut next_batch: u64 = 0;
    let mut flush_waiters: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut closed = false;
    loop {
        let oldest_unsettled = unsettled.first().copied().unwrap_or(next_batch);
        // A waiter whose caller gave up (a revoke past its deadline) is dropped.
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut flush_waiters)
            .into_iter()
            .filter(|(_, done)| !done.is_closed())
            .partition(|(before, _)| *before <= oldest_unsettled);
        flush_waiters = waiting;
        for (_, done) in ready {
            let _ = done.send(());
        }
        if closed && unsettled.is_empty() {
            break;
        }
        let accepting = !closed && writing.len() < CONCURRENT_BATCHES && finishing.len() < CONCURRENT_BATCHES;
        tokio::select! {
            batch = batch_rx.recv(), if accepting => match batch {
                None => closed = true,
                Some(batch) => {
                    if !batch.items.is_empty() {
                        metrics::histogram!(m::BATCH_ITEMS).record(batch.items.len() as f64);
                        unsettled.insert(next_batch);
                        writing.push(write_l3_stage(&stores, next_batch, batch.items, &aborting));
                        next_batch += 1;
                    }
                    flush_waiters.extend(batch.done.map(|done| (next_batch, done)));
                }
            },
            Some((number, batch, l3)) = writing.next(), if !writing.is_empty() => {
                finishing.push(finish(&stores, number, batch, l3));
            }
            Some((number, left)) = finishing.next(), if !finishing.is_empty() => {
                retrying.push(retry_l2(&stores, number, left, &aborting));
            }
            Some(number) = retrying.next(), if !retrying.is_empty() => {
                unsettled.remove(&number);
            }
        }
    }
}

fn goes_to_l3(stores: &Stores, pending: &Pending) -> bool {
    pending.options.tiers.l3 && stores.l3.is_some()
}

fn ends_at_l2(stores: &Stores, pending: &Pending) -> bool {
    !goes_to_l3(stores, pending) && pending.options.tiers.l2 && stores.l2.is_some()
}

fn ttl(stores: &Stores, pending: &Pending) -> u64 {
    pending.options.redis_ttl.resolve_secs(stores.redis_ttl_secs())
}

/// Writes a batch's L3-bound items to L3 (or the WAL) and hands the batch on with the outcome.
async fn write_l3_stage(
    stores: &Stores,
    number: u64,
    batch: Vec<Pending>,
    aborting: &CancellationToken,
) -> (u64, Vec<Pending>, L3Outcome) {
    let to_l3: Vec<(usize, &Pending)> = batch.iter().enumerate().filter(|(_, p)| goes_to_l3(stores, p)).collect();
    let l3 = write_l3(stores, &to_l3, aborting).await;
    (number, batch, l3)
}

/// Brings the caches in line with L3's verdict and settles what it can. Returns the items
/// ending at L2 whose L2 write failed: they settle once `retry_l2` gets them in.
async fn finish(stores: &Stores, number: u64, batch: Vec<Pending>, l3: L3Outcome) -> (u64, Vec<Pending>) {
    let l2_failed = caches_follow_l3(stores, &batch, &l3).await;
    let mut left = Vec::new();
    for (index, pending) in batch.into_iter().enumerate() {
        let result = if goes_to_l3(stores, &pending) {
            l3.unsettled.get(&index).map_or(Ok(l3.tier), |error| Err(error.clone()))
        } else if ends_at_l2(stores, &pending) {
            if l2_failed.contains(pending.item.id.as_str()) {
                left.push(pending);
                continue;
            }
            Ok(Tier::L2)
        } else {
            Ok(Tier::L1)
        };
        settle(pending, result);
    }
    (number, left)
}

fn settle(pending: Pending, result: SettleResult) {
    if let Ok(tier) = &result {
        metrics::counter!(m::ITEMS_SETTLED, "tier" => tier.as_str()).increment(1);
        metrics::histogram!(m::ITEM_SETTLE_SECONDS).record(pending.enqueued_at.elapsed().as_secs_f64());
    }
    let _ = pending.ack.send(result);
}

/// The newest pending item per id, sorted by id (a stable lock order for concurrent writers).
fn newest_per_id<'a>(pending: impl Iterator<Item = &'a Pending>) -> Vec<&'a Pending> {
    let mut newest: HashMap<&str, &Pending> = HashMap::new();
    for p in pending {
        newest
            .entry(p.item.id.as_str())
            .and_modify(|kept| {
                if p.item.supersedes(&kept.item) {
                    *kept = p;
                }
            })
            .or_insert(p);
    }
    let mut items: Vec<&Pending> = newest.into_values().collect();
    items.sort_unstable_by(|a, b| a.item.id.cmp(&b.item.id));
    items
}

/// How the L3-bound items of a batch ended: the tier that took them, the batch positions of
/// those that did not settle (with why), and what L3 holds for each id afterwards (empty
/// when the batch went to the write-ahead log).
struct L3Outcome {
    tier: Tier,
    unsettled: HashMap<usize, SettleError>,
    held: HeldRows,
}

impl L3Outcome {
    fn settled(tier: Tier) -> L3Outcome {
        L3Outcome { tier, unsettled: HashMap::new(), held: HeldRows::new() }
    }
}

/// Writes to L3; while L3 is unavailable (or its breaker is open) the batch goes to the
/// write-ahead log instead. Without a WAL, or with a full one, it waits and retries. A lost
/// lock race is retried a few times before it counts against L3's health.
async fn write_l3(stores: &Stores, to_l3: &[(usize, &Pending)], aborting: &CancellationToken) -> L3Outcome {
    let Some(l3) = &stores.l3 else { return L3Outcome::settled(Tier::L3) };
    // Items L3 refuses for what they are (too large for one statement, a version it cannot
    // store) are rejected here, alone and without a round trip, even while L3 is down.
    let mut refused = HashMap::new();
    let accepted: Vec<(usize, &Pending)> = to_l3
        .iter()
        .filter(|(index, pending)| match l3.refuses(&pending.item) {
            Some(why) => {
                metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "rejected").increment(1);
                refused.insert(*index, SettleError::Rejected(why));
                false
            }
            None => true,
        })
        .copied()
        .collect();
    let mut outcome = write_l3_accepted(stores, l3.as_ref(), &accepted, aborting).await;
    outcome.unsettled.extend(refused);
    outcome
}

async fn write_l3_accepted(
    stores: &Stores,
    l3: &dyn ArchiveStore,
    to_l3: &[(usize, &Pending)],
    aborting: &CancellationToken,
) -> L3Outcome {
    if to_l3.is_empty() {
        return L3Outcome::settled(Tier::L3);
    }
    let timer = LatencyTimer::start(metrics::histogram!(m::FLUSH_SECONDS, "tier" => "l3"));
    let items: Vec<&SyncItem> = newest_per_id(to_l3.iter().map(|(_, p)| *p)).iter().map(|p| p.item.as_ref()).collect();
    // Into the membership filter before L3 can hold them (and before the WAL, which drains later).
    super::filter_task::note_l3_write(stores, &items);
    let mut backoff = Backoff::new(RetryConfig::default());
    let mut lock_races = 0;
    let outcome = loop {
        if stores.circuits.l3.allows() {
            match l3.write_batch(&items, stores.sql_write_timeout).await {
                Ok(held) => {
                    stores.circuits.l3.record(true);
                    break L3Outcome { tier: Tier::L3, unsettled: HashMap::new(), held };
                }
                Err(StoreError::Rejected(error)) => {
                    stores.circuits.l3.record(true);
                    tracing::warn!(%error, items = items.len(), "L3 rejected a batch, writing its items one by one");
                    break write_l3_one_by_one(stores, to_l3, aborting).await;
                }
                Err(StoreError::Transient(error)) if lock_races < MAX_TRANSIENT_RETRIES => {
                    lock_races += 1;
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "transient").increment(1);
                    tracing::info!(%error, attempt = lock_races, "L3 batch lost a lock race, retrying");
                    if !sleep_or_abort(&mut backoff, aborting).await {
                        break L3Outcome { tier: Tier::L3, unsettled: abandon_all(to_l3), held: HeldRows::new() };
                    }
                    continue;
                }
                Err(StoreError::Unavailable(error) | StoreError::Transient(error)) => {
                    stores.circuits.l3.record(false);
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "unavailable").increment(1);
                    tracing::warn!(%error, "L3 unavailable");
                }
            }
        }
        if let Some(wal) = &stores.wal {
            // Every L3-bound item, in batch order, not only the newest per id: if L3 later
            // rejects the newest, an older valid version must still land (as on the live path).
            let all: Vec<&SyncItem> = to_l3.iter().map(|(_, p)| p.item.as_ref()).collect();
            match super::wal_drain::append(wal, &all).await {
                Ok(()) => break L3Outcome::settled(Tier::Wal),
                Err(error) => tracing::warn!(%error, "cannot append to the write-ahead log, retrying"),
            }
        }
        if !sleep_or_abort(&mut backoff, aborting).await {
            break L3Outcome { tier: Tier::L3, unsettled: abandon_all(to_l3), held: HeldRows::new() };
        }
    };
    timer.observe();
    outcome
}

/// Isolates rejected items: every item alone, in batch order (not deduplicated, so an older
/// valid version still lands when a newer one is rejected).
async fn write_l3_one_by_one(stores: &Stores, to_l3: &[(usize, &Pending)], aborting: &CancellationToken) -> L3Outcome {
    let mut outcome = L3Outcome::settled(Tier::L3);
    let Some(l3) = &stores.l3 else { return outcome };
    for (position, (index, pending)) in to_l3.iter().enumerate() {
        let mut backoff = Backoff::new(RetryConfig::default());
        super::filter_task::note_l3_write(stores, &[pending.item.as_ref()]);
        loop {
            match l3.write_batch(&[pending.item.as_ref()], stores.sql_write_timeout).await {
                Ok(held) => {
                    outcome.held.extend(held);
                    break;
                }
                Err(StoreError::Rejected(error)) => {
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "rejected").increment(1);
                    outcome.unsettled.insert(*index, SettleError::Rejected(error));
                    break;
                }
                Err(StoreError::Unavailable(error) | StoreError::Transient(error)) => {
                    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "unavailable").increment(1);
                    tracing::warn!(%error, "L3 unavailable, retrying item");
                    if !sleep_or_abort(&mut backoff, aborting).await {
                        outcome.unsettled.extend(abandon_all(&to_l3[position..]));
                        return outcome;
                    }
                }
            }
        }
    }
    outcome
}

fn abandon_all(to_l3: &[(usize, &Pending)]) -> HashMap<usize, SettleError> {
    to_l3.iter().map(|(index, _)| (*index, SettleError::Abandoned)).collect()
}

/// Makes L1 and L2 follow L3's verdict on the batch, and writes the items that end at L2.
/// Returns the ids of L2-ending items whose write failed; failed writes of L3-bound items
/// go to L2 repair instead.
async fn caches_follow_l3(stores: &Stores, batch: &[Pending], l3: &L3Outcome) -> HashSet<String> {
    let mut ops: Vec<L2Op> = Vec::new();
    let mut rejected: Vec<&str> = Vec::new();
    let mut l3_bound = Vec::new();
    for (index, pending) in batch.iter().enumerate().filter(|(_, p)| goes_to_l3(stores, p)) {
        match l3.unsettled.get(&index) {
            Some(SettleError::Rejected(_)) => {
                // Never in L2 (L2 is written after L3), except from an earlier WAL'd batch.
                stores.l1.remove_exact(&pending.item).await;
                rejected.push(&pending.item.id);
            }
            Some(SettleError::Abandoned) => {}
            None => l3_bound.push(pending),
        }
    }
    for pending in newest_per_id(l3_bound.into_iter()) {
        let (item, tiers) = (pending.item.as_ref(), pending.options.tiers);
        if l3.tier == Tier::Wal {
            // No verdict yet: L2 gets the fresh item, the drain corrects it if L3 refuses it.
            if tiers.l2 {
                ops.push(L2Op::Write(item, ttl(stores, pending)));
            }
            continue;
        }
        let Some(row) = l3.held.get(&item.id) else { continue };
        let held = row.is(item);
        if held && tiers.l2 {
            ops.push(L2Op::Write(item, ttl(stores, pending)));
        } else {
            // L3 refused it (it holds something newer, or other content at the same
            // version), or the item skips L2: an L2 entry behind L3 must not outlive it.
            ops.push(L2Op::DropIfBehind(&item.id, row));
        }
        if !(held && tiers.l1) {
            stores.l1.drop_if_behind(&item.id, row).await;
        }
    }
    let ends_at_l2_ids: HashSet<&str> =
        batch.iter().filter(|p| ends_at_l2(stores, p)).map(|p| p.item.id.as_str()).collect();
    for pending in newest_per_id(batch.iter().filter(|p| ends_at_l2(stores, p))) {
        ops.push(L2Op::Write(&pending.item, ttl(stores, pending)));
    }
    invalidate_l2(stores, &rejected).await;
    let failed = apply_l2(stores, &ops).await;
    let mut failed_ending_at_l2 = HashSet::new();
    let mut dirty = Vec::new();
    for id in failed {
        if ends_at_l2_ids.contains(id.as_str()) {
            failed_ending_at_l2.insert(id);
        } else {
            dirty.push(id);
        }
    }
    // These items are durable in L3 (or the WAL); L2 may be stale for them until repaired.
    stores.l2_dirty.add(dirty);
    failed_ending_at_l2
}

/// Applies L2 changes through the L2 breaker; returns the ids that failed.
pub(super) async fn apply_l2(stores: &Stores, ops: &[L2Op<'_>]) -> Vec<String> {
    let Some(l2) = stores.l2.as_ref() else { return Vec::new() };
    if ops.is_empty() {
        return Vec::new();
    }
    let timer = LatencyTimer::start(metrics::histogram!(m::FLUSH_SECONDS, "tier" => "l2"));
    let failed: Vec<(String, StoreError)> = if stores.circuits.l2.allows() {
        let failed = match tokio::time::timeout(L2_ATTEMPT_DEADLINE, l2.apply(ops)).await {
            Ok(failed) => failed,
            Err(_) => {
                let late = StoreError::Unavailable(format!("L2 did not answer within {L2_ATTEMPT_DEADLINE:?}"));
                ops.iter().map(|op| (op.id().to_owned(), late.clone())).collect()
            }
        };
        stores.circuits.l2.record(failed.is_empty());
        failed
    } else {
        // Open breaker: skip the round trips that would time out; repair fixes L2 later.
        let open = StoreError::Unavailable("L2 circuit breaker open".into());
        ops.iter().map(|op| (op.id().to_owned(), open.clone())).collect()
    };
    timer.observe();
    if let Some((_, error)) = failed.first() {
        metrics::counter!(m::STORE_ERRORS, "tier" => "l2", "kind" => "unavailable").increment(failed.len() as u64);
        tracing::warn!(failed = failed.len(), %error, "L2 write failed");
    }
    failed.into_iter().map(|(id, _)| id).collect()
}

/// Deletes the L2 entries of items L3 rejected; failures are left to L2 repair.
pub(super) async fn invalidate_l2(stores: &Stores, ids: &[&str]) {
    let Some(l2) = stores.l2.as_ref() else { return };
    if ids.is_empty() {
        return;
    }
    let dropped = match tokio::time::timeout(L2_ATTEMPT_DEADLINE, l2.invalidate(ids)).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!("L2 did not answer within {L2_ATTEMPT_DEADLINE:?}"))),
    };
    if let Err(error) = dropped {
        tracing::warn!(%error, "could not drop rejected items from L2, repair will");
        stores.l2_dirty.add(ids.iter().map(|id| (*id).to_owned()));
    }
}

/// Retries items whose last tier is L2 until L2 takes them, then settles them (abandoned if
/// the engine aborts first).
async fn retry_l2(stores: &Stores, number: u64, mut left: Vec<Pending>, aborting: &CancellationToken) -> u64 {
    let mut backoff = Backoff::new(RetryConfig::default());
    while !left.is_empty() {
        if !sleep_or_abort(&mut backoff, aborting).await {
            for pending in left {
                settle(pending, Err(SettleError::Abandoned));
            }
            return number;
        }
        let newest = newest_per_id(left.iter());
        let ops: Vec<L2Op> = newest.iter().map(|p| L2Op::Write(&p.item, ttl(stores, p))).collect();
        let failed: HashSet<String> = apply_l2(stores, &ops).await.into_iter().collect();
        let (still, done): (Vec<Pending>, Vec<Pending>) =
            left.into_iter().partition(|p| failed.contains(p.item.id.as_str()));
        for pending in done {
            settle(pending, Ok(Tier::L2));
        }
        left = still;
    }
    number
}

/// Sleeps the next backoff delay; false if the engine is aborting.
async fn sleep_or_abort(backoff: &mut Backoff, aborting: &CancellationToken) -> bool {
    let sleep = backoff.next_delay();
    tokio::select! {
        _ = aborting.cancelled() => false,
        _ = tokio::time::sleep(sleep) => true,
    }
}
