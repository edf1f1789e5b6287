//! L1: the in-process cache (moka), bounded by bytes.
//!
//! Writes are version-guarded like every tier (invariant 2). Each entry remembers the Kafka
//! partition it came from, so a revoked partition's entries can be dropped: another pod now
//! owns those ids and a stale L1 must never answer a read (invariant 5). L1 is a cache, never
//! the only copy of an unsettled item: the batch queue holds its own reference.
//! moka's own size lags until its pending tasks run, so L1 counts its bytes itself for the
//! engine's memory pressure (`bytes`): counted before an insert, uncounted when moka reports
//! the removal. It can run ahead of moka (an eviction for size is reported at moka's next
//! housekeeping), never behind, so pressure is never under-reported.
//!
//! Under memory pressure L1 gives way by `evict_large_and_cold`, which changes *what* is
//! evicted: entries ranked by size × time since their last read, skipping the ids the caller
//! says are not yet durable. Each entry keeps its own last-access tick for this (a logical
//! clock, one tick per read or write), since moka's own policy is not visible.
//!
//! A write reads the id's entry, compares versions and writes while holding the id's stripe
//! lock (one of `STRIPES` mutexes, by a hash of the id), so two writers of one id cannot both
//! pass the guard. moka's own `and_compute_with` gave the same atomicity with a lock per key
//! in a side map; it cost about a third of the worker's CPU in `scripts/bench.sh`.
//!
//! moka's capacity is fixed when it is built, so a live change of `SYNC_L1_MAX_BYTES`
//! (`resize`) builds a new moka cache and carries the entries over, hottest first by the same
//! ranking, keeping those that fit and every id not yet durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moka::sync::Cache;

use crate::item::{supersedes, SyncItem};
use crate::storage::sql::HeldRow;

/// An item, when it was last read or written (a tick of `L1Cache::clock`), and how often
/// it was read since it was stored.
struct Entry {
    item: Arc<SyncItem>,
    last_access: AtomicU64,
    reads: AtomicU64,
}

impl Entry {
    fn size_bytes(&self) -> u64 {
        self.item.size_bytes() as u64
    }
}

type Moka = Cache<String, Arc<Entry>>;

/// Stripe locks for the version guard (see the module doc): enough that two ids rarely share
/// one on a few cores, few enough to stay in a cache line or two.
const STRIPES: usize = 64;

/// How long one ranking of `evict_large_and_cold` serves later calls. Ranking every entry on
/// every relief tick (20 ms) cost a fifth of the worker's CPU under pressure; a ranking this
/// old only misses entries written since, which are the hottest anyway.
const RANKING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// A ranking is also made again once the reads and writes since reach this share of the
/// entries L1 held when it was made: entries written since are not in it, so an old ranking
/// would spare them and evict better ones in their place.
const RERANK_AFTER_SHARE: u64 = 8;

/// A ranking, worst first from the end (`pop`). Weak references: an entry moka dropped
/// meanwhile is not kept alive by it. An entry read or written since (its access tick is past
/// `made_at_tick`) has a stale rank and is passed over.
struct Ranking {
    made_at: std::time::Instant,
    made_at_tick: u64,
    /// How many entries L1 held when it was made (kept ones included: ranking walks them all).
    held: u64,
    order: Vec<(Arc<String>, std::sync::Weak<Entry>)>,
}

impl Ranking {
    /// Too old, or too many reads and writes since (`clock` is L1's tick now).
    fn is_stale(&self, clock: u64) -> bool {
        self.made_at.elapsed() >= RANKING_MAX_AGE || clock - self.made_at_tick > self.held / RERANK_AFTER_SHARE
    }
}

#[derive(Clone)]
pub struct L1Cache {
    /// Replaced whole by `resize`; every other call works on the current one.
    cache: Arc<std::sync::RwLock<Moka>>,
    stripes: Arc<[std::sync::Mutex<()>; STRIPES]>,
    /// The last ranking of `evict_large_and_cold`, consumed across calls.
    ranking: Arc<std::sync::Mutex<Option<Ranking>>>,
    max_bytes: Arc<AtomicU64>,
    /// The bytes of the entries held (see the module doc).
    bytes: Arc<AtomicU64>,
    /// The logical clock of reads and writes, for coldness.
    clock: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

impl L1Cache {
    pub fn new(max_bytes: u64) -> L1Cache {
        let bytes = Arc::new(AtomicU64::new(0));
        L1Cache {
            cache: Arc::new(std::sync::RwLock::new(build(max_bytes, bytes.clone()))),
            stripes: Arc::new(std::array::from_fn(|_| std::sync::Mutex::new(()))),
            ranking: Default::default(),
            max_bytes: Arc::new(AtomicU64::new(max_bytes)),
            bytes,
            clock: Default::default(),
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    /// The moka cache now in use (a cheap handle: moka's caches are shared references).
    fn cache(&self) -> Moka {
        self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The guard lock of an id: held from reading its entry to writing it.
    fn lock_id(&self, id: &str) -> std::sync::MutexGuard<'_, ()> {
        let stripe = &self.stripes[crc32fast::hash(id.as_bytes()) as usize % STRIPES];
        stripe.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes the id's entry if `remove` says so of it; returns the entry removed.
    fn remove_if(&self, cache: &Moka, id: &str, remove: impl FnOnce(&Entry) -> bool) -> Option<Arc<Entry>> {
        let _guard = self.lock_id(id);
        let current = cache.get(id)?;
        if remove(&current) {
            cache.remove(id)
        } else {
            None
        }
    }

    /// The byte capacity now in force.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::SeqCst)
    }

    /// Changes the byte capacity live: a new moka cache of that capacity replaces the old one,
    /// and the old entries move over: first every id `keep` names (not yet durable), then the
    /// hottest (the ranking of `evict_large_and_cold`, reversed) as long as they fit. An
    /// entry written meanwhile lands in the new cache, and the version guard keeps an old
    /// entry from replacing it. Returns the bytes dropped.
    pub async fn resize(&self, max_bytes: u64, keep: impl Fn(&str) -> bool) -> u64 {
        let old = {
            let mut slot = self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            if self.max_bytes.swap(max_bytes, Ordering::SeqCst) == max_bytes {
                return 0;
            }
            std::mem::replace(&mut *slot, build(max_bytes, self.bytes.clone()))
        };
        let mut dropped = 0;
        let mut carried = 0u64;
        // Two passes: a call that took the old handle just before the swap may still have
        // written to it during the first.
        for _ in 0..2 {
            old.run_pending_tasks();
            // Kept ids first, then the hottest: all of them within the new capacity, so moka's
            // own eviction (which would not know which ids to spare) has nothing to do.
            let mut ranked = self.ranked(&old, |_| false);
            ranked.reverse();
            ranked.sort_by_key(|(_, id, _)| !keep(id));
            for (_, id, entry) in ranked {
                // Removing from the old cache uncounts its bytes (the eviction listener).
                old.remove(id.as_str());
                let size = entry.size_bytes();
                if keep(&id) || carried + size <= max_bytes {
                    carried += size;
                    self.put_entry(entry).await;
                } else {
                    dropped += size;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tracing::info!(l1_max_bytes = max_bytes, dropped_bytes = dropped, "L1 resized");
        dropped
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Stores the item unless L1 holds a version that it does not supersede.
    pub async fn put_if_newer(&self, item: Arc<SyncItem>) {
        self.put_entry(Arc::new(Entry { item, last_access: AtomicU64::new(self.tick()), reads: AtomicU64::new(0) }))
            .await;
    }

    async fn put_entry(&self, entry: Arc<Entry>) {
        let size = entry.size_bytes();
        // Counted before it can be removed, so the count never dips below what is held.
        self.bytes.fetch_add(size, Ordering::SeqCst);
        let cache = self.cache();
        let _guard = self.lock_id(&entry.item.id);
        let replace = cache.get(entry.item.id.as_str()).is_none_or(|current| entry.item.supersedes(&current.item));
        if replace {
            // A replaced entry is uncounted by the eviction listener.
            cache.insert(entry.item.id.clone(), entry);
        } else {
            self.bytes.fetch_sub(size, Ordering::SeqCst);
        }
    }

    /// Drops the id's entry unless it is L3's row or newer than it: an entry L3 refused (an
    /// older version, or other content at the same version) must not answer reads.
    pub async fn drop_if_behind(&self, id: &str, row: &HeldRow) {
        self.remove_if(&self.cache(), id, |entry| {
            let cached = &entry.item;
            let newer = supersedes(cached.version, cached.origin.as_ref(), row.version, row.origin.as_ref());
            !newer && !row.is(cached)
        });
    }

    /// Drops the entry if it is exactly this item (one L3 rejected for its content).
    pub async fn remove_exact(&self, item: &SyncItem) {
        self.remove_if(&self.cache(), &item.id, |entry| entry.item.as_ref() == item);
    }

    pub async fn get(&self, id: &str) -> Option<Arc<SyncItem>> {
        match self.cache().get(id) {
            Some(entry) => {
                entry.last_access.store(self.tick(), Ordering::Relaxed);
                entry.reads.fetch_add(1, Ordering::Relaxed);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.item.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether L1 holds the id, without counting as a read (no hit, no access tick).
    pub fn contains(&self, id: &str) -> bool {
        self.cache().contains_key(id)
    }

    /// Reads that L1 answered and reads it did not, since it was built.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// The bytes L1 holds, as counted by L1 itself (see the module doc).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Applies moka's pending inserts, evictions and expiries.
    pub async fn run_pending_tasks(&self) {
        self.cache().run_pending_tasks();
    }

    /// Evicts entries until `bytes_to_free` are freed (or nothing evictable is left),
    /// largest × coldest first: an entry's rank is its size × coldness, coldness being
    /// √(ticks since its last read or write) / (reads + 1). A small entry read often stays,
    /// a large one nobody reads goes first; the reads weigh more than the idle time (its
    /// square root), so a popular entry survives a lull, and the idle time still retires an
    /// entry that was popular once. (Size × idle ticks alone, an LRU by bytes, lost to moka's
    /// frequency-based policy on a Zipf-like workload: tests/backpressure.rs.) Never an entry whose id `keep` names (the engine's ids not
    /// yet settled: L1 must keep answering reads of those with the newest version), checked
    /// again at removal, and never an entry replaced since the ranking. A ranking serves the
    /// calls of the next `RANKING_MAX_AGE`. Returns bytes freed.
    pub async fn evict_large_and_cold(&self, bytes_to_free: u64, keep: impl Fn(&str) -> bool) -> u64 {
        if bytes_to_free == 0 {
            return 0;
        }
        let cache = self.cache();
        let mut slot = self.ranking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // A ranking too old is made again. One used up is not: under pressure from unsettled
        // items L1 often cannot free what is asked, and re-ranking it on every relief tick
        // would find the same kept ids again.
        if slot.as_ref().is_none_or(|ranking| ranking.is_stale(self.clock.load(Ordering::Relaxed))) {
            // The tick before ranking: an entry touched while the ranking is made may have been
            // ranked on its older access, so it counts as touched since.
            let made_at_tick = self.clock.load(Ordering::Relaxed);
            let mut order: Vec<_> =
                self.ranked(&cache, &keep).into_iter().map(|(_, id, entry)| (id, Arc::downgrade(&entry))).collect();
            order.reverse();
            let held = cache.entry_count();
            *slot = Some(Ranking { made_at: std::time::Instant::now(), made_at_tick, held, order });
        }
        let Ranking { order, made_at_tick, .. } = slot.as_mut().expect("ranked above when absent");
        let mut freed = 0u64;
        while freed < bytes_to_free {
            let Some((id, ranked_entry)) = order.pop() else { break };
            let Some(ranked_entry) = ranked_entry.upgrade() else { continue };
            if ranked_entry.last_access.load(Ordering::Relaxed) > *made_at_tick {
                continue;
            }
            let removed = self.remove_if(&cache, &id, |current| std::ptr::eq(current, &*ranked_entry) && !keep(&id));
            if removed.is_some() {
                freed += ranked_entry.size_bytes();
            }
        }
        freed
    }

    /// The entries `keep` does not name, largest × coldest first (see `evict_large_and_cold`).
    fn ranked(&self, cache: &Moka, keep: impl Fn(&str) -> bool) -> Vec<(u128, Arc<String>, Arc<Entry>)> {
        let now = self.clock.load(Ordering::Relaxed);
        let mut ranked: Vec<(u128, Arc<String>, Arc<Entry>)> = cache
            .iter()
            .filter(|(id, _)| !keep(id))
            .map(|(id, entry)| {
                let idle = now.saturating_sub(entry.last_access.load(Ordering::Relaxed));
                let reads = entry.reads.load(Ordering::Relaxed) + 1;
                let score = entry.size_bytes() as u128 * (idle.isqrt() + 1) as u128 / reads as u128;
                (score, id, entry)
            })
            .collect();
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        ranked
    }

    /// How many entries L1 holds, approximately: moka applies inserts, evictions and
    /// expiries in the background, so its pending tasks are run first, and concurrent writes
    /// can still move the count while it is read.
    pub async fn entry_count(&self) -> u64 {
        let cache = self.cache();
        cache.run_pending_tasks();
        cache.entry_count()
    }

    /// Drops every entry that came from one of these topic-partitions.
    pub fn drop_partitions(&self, partitions: Vec<(Arc<str>, i32)>) {
        let predicate = move |_: &String, entry: &Arc<Entry>| {
            entry.item.origin.as_ref().is_some_and(|origin| {
                partitions.iter().any(|(topic, partition)| *topic == origin.topic && *partition == origin.partition)
            })
        };
        let cache = self.cache();
        if let Err(error) = cache.invalidate_entries_if(predicate) {
            // Only possible if invalidation closures were not enabled at build time.
            tracing::error!(%error, "failed to drop revoked partitions from L1, clearing it");
            cache.invalidate_all();
        }
    }
}

/// A moka cache of `max_bytes`, weighing entries by size, that uncounts an entry's bytes
/// from `bytes` when it is removed for any reason.
fn build(max_bytes: u64, bytes: Arc<AtomicU64>) -> Moka {
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_id: &String, entry: &Arc<Entry>| u32::try_from(entry.size_bytes()).unwrap_or(u32::MAX))
        .eviction_listener(move |_id, entry: Arc<Entry>, _cause| {
            bytes.fetch_sub(entry.size_bytes(), Ordering::SeqCst);
        })
        .support_invalidation_closures()
        .build()
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

    // Four threads write one id with climbing, interleaved versions. The guard must be atomic:
    // after its own write, each writer must find its version or a newer one. Without the
    // stripe lock a writer that read an older entry could overwrite a newer one.
    #[test]
    fn concurrent_writers_of_one_id_never_leave_an_older_version() {
        let cache = L1Cache::new(1 << 20);
        std::thread::scope(|scope| {
            for writer in 0..4u64 {
                let cache = cache.clone();
                scope.spawn(move || {
                    for round in 0..5_000u64 {
                        let version = round * 4 + writer + 1;
                        futures::executor::block_on(cache.put_if_newer(item("a", version, 0)));
                        let held = futures::executor::block_on(cache.get("a")).expect("held").version;
                        assert!(held >= version, "writer {writer} put {version}, L1 holds {held}");
                    }
                });
            }
        });
        assert_eq!(futures::executor::block_on(cache.get("a")).unwrap().version, 20_000);
    }

    fn sized(id: &str, bytes: usize) -> Arc<SyncItem> {
        Arc::new(SyncItem::new(id, vec![b'x'; bytes]).with_version(1))
    }

    #[tokio::test]
    async fn pressure_eviction_takes_large_cold_entries_first_and_never_a_kept_id() {
        let cache = L1Cache::new(1 << 30);
        for id in ["small-hot", "small-cold"] {
            cache.put_if_newer(sized(id, 100)).await;
        }
        for id in ["large-cold", "large-pending", "large-hot"] {
            cache.put_if_newer(sized(id, 10_000)).await;
        }
        for _ in 0..50 {
            cache.get("small-hot").await;
            cache.get("large-hot").await;
        }
        cache.run_pending_tasks().await;
        let keep = |id: &str| id == "large-pending";
        // 10,000 bytes to free: the large cold entry alone ranks highest and covers it.
        let freed = cache.evict_large_and_cold(10_000, keep).await;
        assert_eq!(freed, 10_000 + "large-cold".len() as u64 + 64, "one large entry: {freed}");
        assert!(!cache.contains("large-cold"));
        for id in ["small-hot", "small-cold", "large-pending", "large-hot"] {
            assert!(cache.contains(id), "{id} must stay");
        }
        // Everything evictable: the pending id is still never evicted.
        cache.evict_large_and_cold(u64::MAX, keep).await;
        cache.run_pending_tasks().await;
        assert!(cache.contains("large-pending"));
        assert_eq!(cache.entry_count().await, 1);
        assert_eq!(cache.bytes(), 10_000 + "large-pending".len() as u64 + 64);
    }

    #[tokio::test]
    async fn l1_counts_its_bytes_through_inserts_replacements_removals_and_evictions() {
        let cache = L1Cache::new(50_000);
        cache.put_if_newer(sized("a", 1000)).await;
        assert_eq!(cache.bytes(), 1065, "counted at once, before moka's housekeeping");
        cache.put_if_newer(Arc::new(SyncItem::new("a", vec![b'y'; 2000]).with_version(2))).await;
        cache.put_if_newer(sized("a", 5000)).await; // older: refused, not counted
        cache.run_pending_tasks().await;
        assert_eq!(cache.bytes(), 2065);
        cache.remove_exact(&SyncItem::new("a", vec![b'y'; 2000]).with_version(2)).await;
        cache.run_pending_tasks().await;
        assert_eq!(cache.bytes(), 0);
        for n in 0..100 {
            cache.put_if_newer(sized(&format!("b{n}"), 1000)).await;
        }
        cache.run_pending_tasks().await;
        assert!(cache.bytes() <= 50_000, "moka's evictions for size are uncounted: {}", cache.bytes());
        assert_eq!(cache.bytes(), cache.cache().weighted_size());
    }

    #[tokio::test]
    async fn a_live_resize_keeps_the_hottest_entries_that_fit_and_every_kept_id() {
        let cache = L1Cache::new(1 << 20);
        for n in 0..100 {
            cache.put_if_newer(sized(&format!("e{n:02}"), 1000)).await;
        }
        for _ in 0..5 {
            for n in 0..10 {
                cache.get(&format!("e{n:02}")).await; // e00..e09 are hot
            }
        }
        let keep = |id: &str| id == "e99"; // cold, but not yet durable
        let dropped = cache.resize(20_000, keep).await;
        cache.run_pending_tasks().await;
        assert_eq!(cache.max_bytes(), 20_000);
        for n in 0..10 {
            assert!(cache.contains(&format!("e{n:02}")), "hot e{n:02} stays");
        }
        assert!(cache.contains("e99"), "a kept id stays");
        let held = cache.entry_count().await;
        assert!(held >= 11 && cache.bytes() <= 20_000 + 1067, "{held} entries, {} bytes", cache.bytes());
        assert_eq!(cache.bytes() + dropped, 100 * 1067, "every byte is either carried or dropped");
        assert_eq!(cache.bytes(), cache.cache().weighted_size(), "the count follows the new cache");

        // Grown back: the new capacity is in force for new entries.
        cache.resize(1 << 20, |_| false).await;
        for n in 0..200 {
            cache.put_if_newer(sized(&format!("f{n:03}"), 1000)).await;
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count().await > 150, "room for more than the 20 kB capacity held");
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
