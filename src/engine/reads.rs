//! Multi-id reads, writes and inspection on `SyncEngine`: `get_many`, `contains`,
//! `submit_many`, `delete_many`, `get_verified`, `len`, `status`.
//!
//! `get_many` costs one round trip per tier, not one per id: L1 lookups, then the L2 misses
//! as one pipeline per Redis node, then the remaining misses as `IN (…)` queries on L3 (a
//! thousand ids per statement). Hits in a slower tier fill the faster tiers exactly as `get`
//! does: L2 through its version-guarded script, L1 with `put_if_newer`, so a fill never
//! replaces a newer version (invariant 2).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{EngineError, Queued, SyncEngine, Tier};
use crate::item::{now_ms, SyncItem};
use crate::options::SubmitOptions;

/// Where an id stands, fastest answer first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemStatus {
    /// Accepted by `enqueue`/`submit` and not yet settled (its receipt has not resolved).
    Pending,
    /// Settled, and L1 holds the live item.
    InL1,
    /// L2 holds the live item, L1 does not.
    InL2,
    /// Only L3 holds the live item.
    InL3,
    /// No tier holds a live item: never written, deleted (a tombstone), or evicted from a
    /// tier that was its only one.
    Missing,
}

impl SyncEngine {
    /// The live items among `ids` (a deleted or unknown id is left out), each from the
    /// fastest tier that has it; duplicates in `ids` are read once.
    pub async fn get_many(&self, ids: &[&str]) -> Result<HashMap<String, Arc<SyncItem>>, EngineError> {
        let mut found = self.get_many_any(ids).await?;
        found.retain(|_, item| !item.is_tombstone());
        Ok(found)
    }

    /// Like `get_many`, tombstones included (what `delete_many` versions its tombstones after).
    async fn get_many_any(&self, ids: &[&str]) -> Result<HashMap<String, Arc<SyncItem>>, EngineError> {
        self.admit_read()?;
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let mut found = HashMap::with_capacity(unique.len());
        let mut missing = Vec::new();
        for id in unique {
            match self.l1.get(id).await {
                Some(item) => {
                    found.insert(id.to_owned(), item);
                }
                None => missing.push(id),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        if let Some(l2) = &stores.l2 {
            // Ids L2 could not answer for are left out of its reply and read from L3.
            for (id, stored) in l2.get_many(&missing).await {
                let item = Arc::new(stored.item);
                self.l1.put_if_newer(item.clone()).await;
                found.insert(id, item);
            }
            missing.retain(|id| !found.contains_key(*id));
        }
        let Some(l3) = &stores.l3 else { return Ok(found) };
        missing.retain(|id| !super::filter_task::l3_surely_lacks(stores, id));
        if missing.is_empty() {
            return Ok(found);
        }
        let items: Vec<Arc<SyncItem>> = l3.get_many(&missing).await?.into_iter().map(|s| Arc::new(s.item)).collect();
        if let Some(l2) = &stores.l2 {
            let fills: Vec<(&SyncItem, u64)> =
                items.iter().map(|item| (item.as_ref(), stores.redis_ttl_secs())).collect();
            // A failed fill only costs a later L3 read.
            for (id, error) in l2.write_batch(&fills).await {
                tracing::warn!(id, %error, "L2 fill after an L3 read failed");
            }
        }
        for item in items {
            self.l1.put_if_newer(item.clone()).await;
            found.insert(item.id.clone(), item);
        }
        Ok(found)
    }

    /// Whether a live item exists, reading no content: L1, then L2's version and tombstone
    /// fields, then L3's tombstone flag. Fills nothing.
    pub async fn contains(&self, id: &str) -> Result<bool, EngineError> {
        self.admit_read()?;
        if let Some(item) = self.l1.get(id).await {
            return Ok(!item.is_tombstone());
        }
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        if let Some(l2) = &stores.l2 {
            match l2.live(id).await {
                Ok(Some(live)) => return Ok(live),
                Ok(None) => {}
                // L3 holds what L2 would (invariant 6): it can answer instead.
                Err(error) => tracing::warn!(%error, "L2 read failed, falling back to L3"),
            }
        }
        if super::filter_task::l3_surely_lacks(stores, id) {
            return Ok(false);
        }
        match &stores.l3 {
            Some(l3) => Ok(l3.live(id).await?.unwrap_or(false)),
            None => Ok(false),
        }
    }

    /// Enqueues every item (default options), then waits for all of them: they travel in
    /// the same batches, not one batch after another. Ids are validated first, so an invalid
    /// one submits nothing. Returns each item's tier, in order, or the first failure (the
    /// others may still have settled; use `enqueue` for per-item outcomes).
    pub async fn submit_many(&self, items: Vec<SyncItem>) -> Result<Vec<Tier>, EngineError> {
        for item in &items {
            crate::decode::validate_id(item.id.as_bytes())
                .map_err(|reason| EngineError::InvalidItem(format!("{:?}: {reason}", item.id)))?;
            if let Some(state) = &item.state {
                crate::item::validate_state(state)
                    .map_err(|reason| EngineError::InvalidItem(format!("{:?}: {reason}", item.id)))?;
            }
        }
        let mut receipts = Vec::with_capacity(items.len());
        for item in items {
            receipts.push(self.enqueue(item, SubmitOptions::default()).await?);
        }
        // Close the open batch now instead of at its age limit: the caller is waiting for it.
        // Nobody waits on the marker itself (flush waiters whose receiver is gone are dropped).
        if let Some(queue_tx) = &self.queue_tx {
            let (done, _) = oneshot::channel();
            let _ = queue_tx.send(Queued::Flush(done)).await;
        }
        let mut tiers = Vec::with_capacity(receipts.len());
        for result in futures::future::join_all(receipts).await {
            tiers.push(result?);
        }
        Ok(tiers)
    }

    /// Deletes each id with a versioned tombstone newer than anything seen for it (as
    /// `delete`), reading the current versions with one `get_many`-style pass. Returns the
    /// tier of each id's tombstone, in the order of `ids`.
    pub async fn delete_many(&self, ids: &[&str]) -> Result<Vec<Tier>, EngineError> {
        let current = self.get_many_any(ids).await?;
        let now = now_ms();
        let mut unique = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        let tombstones: Vec<SyncItem> = unique
            .iter()
            .map(|id| {
                let seen = current.get(*id).map_or(0, |item| item.version);
                SyncItem::tombstone(*id, now.max(seen.saturating_add(1)))
            })
            .collect();
        let tiers: HashMap<&str, Tier> = unique.iter().copied().zip(self.submit_many(tombstones).await?).collect();
        Ok(ids.iter().map(|id| tiers[id]).collect())
    }

    /// The live item, read from a tier that stores a content hash and checked against it:
    /// L2 (its `h` field), else L3 (`content_hash`). A mismatch is `EngineError::Corrupt`
    /// and counts in `sync_corrupt_reads_total{tier}`; nothing is filled from a corrupt read.
    ///
    /// L1 is not consulted: it stores no hash, and may hold a copy a plain `get` took from a
    /// tier that was already corrupt. So an item not yet flushed (pending), or routed to L1
    /// only, is not found here. An L2 entry written before L2 stored hashes is read from L3
    /// instead, or returned unchecked when there is no L3. An engine with neither L2 nor L3
    /// answers from L1, unchecked: nothing is stored to check against.
    pub async fn get_verified(&self, id: &str) -> Result<Option<Arc<SyncItem>>, EngineError> {
        self.admit_read()?;
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        if stores.l2.is_none() && stores.l3.is_none() {
            return self.get(id).await;
        }
        if let Some(l2) = &stores.l2 {
            match l2.get_stored(id).await {
                Ok(Some(stored)) if stored.hash_matches() == Some(false) => return Err(corrupt(id, Tier::L2)),
                Ok(Some(stored)) if stored.hash_matches() == Some(true) || stores.l3.is_none() => {
                    let item = Arc::new(stored.item);
                    self.l1.put_if_newer(item.clone()).await;
                    return Ok(Some(item).filter(|item| !item.is_tombstone()));
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "L2 read failed, falling back to L3"),
            }
        }
        let Some(l3) = &stores.l3 else { return Ok(None) };
        let Some(stored) = l3.get_stored(id).await? else { return Ok(None) };
        if stored.hash_matches() == Some(false) {
            return Err(corrupt(id, Tier::L3));
        }
        let item = Arc::new(stored.item);
        if let Some(l2) = &stores.l2 {
            for (id, error) in l2.write_batch(&[(&item, stores.redis_ttl_secs())]).await {
                tracing::warn!(id, %error, "L2 fill after an L3 read failed");
            }
        }
        self.l1.put_if_newer(item.clone()).await;
        Ok(Some(item).filter(|item| !item.is_tombstone()))
    }

    /// Entries in L1, tombstones included. Approximate: moka's pending work is run first,
    /// but concurrent writes and evictions can change the count as it is read.
    pub async fn len(&self) -> u64 {
        self.l1.entry_count().await
    }

    /// Whether L1 holds no entries (approximate, as `len`).
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Where the id stands: `Pending` while an enqueued write of it has not settled, else
    /// the fastest tier holding its live item. Reads no content and fills nothing; an L2 or
    /// L3 failure is an error (falling through would name the wrong tier). Answered at every
    /// backpressure level: it adds nothing to L1.
    pub async fn status(&self, id: &str) -> Result<ItemStatus, EngineError> {
        if self.pending.contains(id) {
            return Ok(ItemStatus::Pending);
        }
        if let Some(item) = self.l1.get(id).await {
            return Ok(if item.is_tombstone() { ItemStatus::Missing } else { ItemStatus::InL1 });
        }
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        if let Some(l2) = &stores.l2 {
            match l2.live(id).await? {
                Some(true) => return Ok(ItemStatus::InL2),
                Some(false) => return Ok(ItemStatus::Missing),
                None => {}
            }
        }
        let live = match &stores.l3 {
            Some(l3) => l3.live(id).await?,
            None => None,
        };
        Ok(if live == Some(true) { ItemStatus::InL3 } else { ItemStatus::Missing })
    }
}

/// Counts and logs a corrupt read and builds its error.
fn corrupt(id: &str, tier: Tier) -> EngineError {
    metrics::counter!(crate::metrics::CORRUPT_READS, "tier" => tier.as_str()).increment(1);
    tracing::error!(id, tier = tier.as_str(), "stored content does not match its stored SHA-256");
    EngineError::Corrupt { id: id.to_owned(), tier }
}
