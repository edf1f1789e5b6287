//! L2 repair: an L2 write failure never holds back a commit (L3 is the ground truth), but L2
//! must not stay stale. Ids whose L2 write failed are remembered here; once Redis answers,
//! each is rewritten from L3 through the same version guard (so a newer L2 value is never
//! replaced), or its L2 key is deleted when L3 does not have it (yet: it may be in the WAL),
//! so reads fall through to L3. After any Redis fault L2 converges to L3 without a restart.
//!
//! The set is bounded: past `MAX_DIRTY_IDS` the oldest knowledge is useless, so the whole
//! prefix is scheduled for invalidation instead (every key under it deleted).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Stores;
use crate::metrics as m;

const REPAIR_INTERVAL: Duration = Duration::from_millis(500);
const REPAIR_CHUNK: usize = 500;
pub const MAX_DIRTY_IDS: usize = 1_000_000;

/// Ids that may be stale in L2.
#[derive(Default)]
pub(crate) struct DirtyIds {
    // A std Mutex: held to insert or take ids, never across an await.
    inner: Mutex<Dirty>,
}

#[derive(Default)]
struct Dirty {
    ids: HashSet<String>,
    /// Too many to track: invalidate everything under the prefix.
    overflowed: bool,
}

impl DirtyIds {
    pub fn add(&self, ids: impl IntoIterator<Item = String>) {
        let Ok(mut dirty) = self.inner.lock() else { return };
        if dirty.overflowed {
            return;
        }
        dirty.ids.extend(ids);
        if dirty.ids.len() > MAX_DIRTY_IDS {
            tracing::error!(
                ids = dirty.ids.len(),
                "too many stale L2 ids to track, the whole L2 prefix will be invalidated"
            );
            dirty.ids = HashSet::new();
            dirty.overflowed = true;
        }
        metrics::gauge!(m::L2_STALE_IDS).set(dirty.ids.len() as f64);
    }

    fn take(&self, limit: usize) -> (Vec<String>, bool) {
        let Ok(mut dirty) = self.inner.lock() else { return (Vec::new(), false) };
        let overflowed = std::mem::take(&mut dirty.overflowed);
        let ids: Vec<String> = dirty.ids.iter().take(limit).cloned().collect();
        for id in &ids {
            dirty.ids.remove(id);
        }
        metrics::gauge!(m::L2_STALE_IDS).set(dirty.ids.len() as f64);
        (ids, overflowed)
    }

    fn put_back(&self, ids: Vec<String>, overflowed: bool) {
        if overflowed {
            if let Ok(mut dirty) = self.inner.lock() {
                dirty.overflowed = true;
            }
        }
        self.add(ids);
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|dirty| dirty.ids.len() + usize::from(dirty.overflowed)).unwrap_or(0)
    }
}

pub(super) async fn run(stores: Arc<Stores>, stopping: CancellationToken) {
    let Some(l2) = stores.l2.as_ref() else { return };
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(REPAIR_INTERVAL) => {}
        }
        // L3 is behind while the write-ahead log holds batches: repair from it afterwards.
        let wal_pending = stores.wal.as_ref().is_some_and(|wal| wal.lock().map(|log| !log.is_empty()).unwrap_or(true));
        while !wal_pending && stores.l2_dirty.len() > 0 && !stopping.is_cancelled() {
            let (ids, overflowed) = stores.l2_dirty.take(REPAIR_CHUNK);
            let taken = ids.len();
            match repair(&stores, l2.as_ref(), ids, overflowed).await {
                Ok(()) => metrics::counter!(m::L2_REPAIRED_IDS).increment(taken as u64),
                Err((error, unrepaired)) => {
                    tracing::warn!(%error, unrepaired = unrepaired.len(), of = taken, "L2 repair incomplete, will retry");
                    metrics::counter!(m::L2_REPAIRED_IDS).increment((taken - unrepaired.len()) as u64);
                    stores.l2_dirty.put_back(unrepaired, overflowed);
                    break;
                }
            }
        }
    }
}

/// Repairs what it can; on failure returns the error and the ids still to repair.
async fn repair(
    stores: &Stores,
    l2: &dyn crate::storage::CacheStore,
    ids: Vec<String>,
    overflowed: bool,
) -> Result<(), (String, Vec<String>)> {
    if overflowed {
        match l2.invalidate_prefix().await {
            Ok(deleted) => tracing::warn!(deleted, "invalidated the whole L2 prefix after losing track of stale ids"),
            Err(error) => return Err((error.to_string(), ids)),
        }
    }
    let mut rewrite = Vec::new();
    let mut invalidate = Vec::new();
    for id in &ids {
        let from_l3 = match stores.l3.as_ref() {
            Some(l3) => match l3.get(id).await {
                Ok(found) => found,
                Err(error) => return Err((error.to_string(), ids)),
            },
            None => None,
        };
        match from_l3 {
            Some(item) => rewrite.push(item),
            None => invalidate.push(id.as_str()),
        }
    }
    let items: Vec<_> = rewrite.iter().map(|item| (item, stores.redis_ttl_secs())).collect();
    let failed = l2.write_batch(&items).await;
    if let Err(error) = l2.invalidate(&invalidate).await {
        return Err((error.to_string(), ids));
    }
    match failed.first() {
        None => Ok(()),
        Some((_, error)) => Err((error.to_string(), failed.iter().map(|(id, _)| id.clone()).collect())),
    }
}
