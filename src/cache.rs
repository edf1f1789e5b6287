//! L1: the in-process cache (moka), bounded by bytes.
//!
//! Writes are version-guarded like every tier (invariant 2). Each entry remembers the Kafka
//! partition it came from, so a revoked partition's entries can be dropped: another pod now
//! owns those ids and a stale L1 must never answer a read (invariant 5). L1 is a cache, never
//! the only copy of an unsettled item: the batch queue holds its own reference.
//! moka's size is an estimate that lags until its pending tasks run, so it is not the gauge
//! that pauses Kafka; the worker counts bytes in flight itself.

use std::sync::Arc;

use moka::future::Cache;
use moka::ops::compute::Op;

use crate::item::{supersedes, SyncItem};
use crate::storage::sql::HeldRow;

#[derive(Clone)]
pub struct L1Cache {
    cache: Cache<String, Arc<SyncItem>>,
}

impl L1Cache {
    pub fn new(max_bytes: u64) -> L1Cache {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_id: &String, item: &Arc<SyncItem>| u32::try_from(item.size_bytes()).unwrap_or(u32::MAX))
            .support_invalidation_closures()
            .build();
        L1Cache { cache }
    }

    /// Stores the item unless L1 holds a version that it does not supersede.
    pub async fn put_if_newer(&self, item: Arc<SyncItem>) {
        self.cache
            .entry(item.id.clone())
            .and_compute_with(|current| {
                let replace = current.is_none_or(|entry| item.supersedes(entry.value()));
                std::future::ready(if replace { Op::Put(item) } else { Op::Nop })
            })
            .await;
    }

    /// Drops the id's entry unless it is L3's row or newer than it: an entry L3 refused (an
    /// older version, or other content at the same version) must not answer reads.
    pub async fn drop_if_behind(&self, id: &str, row: &HeldRow) {
        self.cache
            .entry(id.to_owned())
            .and_compute_with(|current| {
                let behind = current.is_some_and(|entry| {
                    let cached = entry.value();
                    let newer = supersedes(cached.version, cached.origin.as_ref(), row.version, row.origin.as_ref());
                    !newer && !row.is(cached)
                });
                std::future::ready(if behind { Op::Remove } else { Op::Nop })
            })
            .await;
    }

    /// Drops the entry if it is exactly this item (one L3 rejected for its content).
    pub async fn remove_exact(&self, item: &SyncItem) {
        self.cache
            .entry(item.id.clone())
            .and_compute_with(|current| {
                let same = current.is_some_and(|entry| entry.value().as_ref() == item);
                std::future::ready(if same { Op::Remove } else { Op::Nop })
            })
            .await;
    }

    pub async fn get(&self, id: &str) -> Option<Arc<SyncItem>> {
        self.cache.get(id).await
    }

    /// How many entries L1 holds, approximately: moka applies inserts, evictions and
    /// expiries in the background, so its pending tasks are run first, and concurrent writes
    /// can still move the count while it is read.
    pub async fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    /// Drops every entry that came from one of these topic-partitions.
    pub fn drop_partitions(&self, partitions: Vec<(Arc<str>, i32)>) {
        let predicate = move |_: &String, item: &Arc<SyncItem>| {
            item.origin.as_ref().is_some_and(|origin| {
                partitions.iter().any(|(topic, partition)| *topic == origin.topic && *partition == origin.partition)
            })
        };
        if let Err(error) = self.cache.invalidate_entries_if(predicate) {
            // Only possible if invalidation closures were not enabled at build time.
            tracing::error!(%error, "failed to drop revoked partitions from L1, clearing it");
            self.cache.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Origin;

    fn item(id: &str, version: u64, partition: i32) -> Arc<SyncItem> {
        let origin = Origin { topic: Arc::from("t"), partition, offset: version as i64 };
        Arc::new(SyncItem { origin: Some(origin), ..SyncItem::new(id, "x").with_version(version) })
    }

    #[tokio::test]
    async fn an_older_version_never_replaces_a_newer_one_in_l1() {
        let cache = L1Cache::new(1 << 20);
        cache.put_if_newer(item("a", 5, 0)).await;
        cache.put_if_newer(item("a", 3, 0)).await;
        assert_eq!(cache.get("a").await.unwrap().version, 5);
        cache.put_if_newer(item("a", 6, 0)).await;
        assert_eq!(cache.get("a").await.unwrap().version, 6);
    }

    #[tokio::test]
    async fn dropping_a_partition_removes_only_its_entries() {
        let cache = L1Cache::new(1 << 20);
        cache.put_if_newer(item("a", 1, 0)).await;
        cache.put_if_newer(item("b", 1, 1)).await;
        cache.drop_partitions(vec![(Arc::from("t"), 0)]);
        assert!(cache.get("a").await.is_none());
        assert!(cache.get("b").await.is_some());
    }
}
