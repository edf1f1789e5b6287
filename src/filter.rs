//! `FilterManager`: an approximate-membership filter (a quotient filter, `qfilter`) over the
//! ids L3 holds, consulted by reads after an L2 miss so that an id L3 surely lacks costs no
//! SQL query. `FilterTrust` says whether its "definitely not" may be believed.
//!
//! The filter has no false negatives for an id that was added, and a false positive only
//! costs the L3 query the read would have made anyway. Soundness is therefore about what has
//! been added, and trust is earned, never declared:
//!
//! - An id this process writes to L3 is added **before** the write is sent (`add`, called by
//!   the flush and the WAL drain), so its own writes are never missed, whatever the trust.
//!   A delete adds too (a tombstone is a row); adding an id twice changes nothing.
//! - Every other id enters through the filter task (`engine/filter_task.rs`): a warm-up that
//!   pages every id of L3 by key (tombstones included), then a tail of the rows other
//!   processes insert (an indexed `created_at_ms` column the database stamps on insert),
//!   re-read with an overlap that covers the longest transaction.
//! - `Trusted` only once the warm-up and the first tail poll after it are complete, and only
//!   while the last successful poll started less than `lag_bound` ago (else `Lagging`). Any
//!   other state answers "maybe" for every id: reads go to L3.
//!
//! The guarantee (README "Membership filter"): a trusted filter has no false negative for an
//! id whose L3 insert committed before the start of the last completed tail poll, hence for
//! every id committed more than `lag_bound` before the read; and none at all for ids this
//! process wrote.
//!
//! If the filter outgrows its largest size it is not allowed to drop ids: a fresh, larger one
//! replaces it, trust falls back to `WarmingUp`, and the task warms it up again from L3.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::metrics as m;

/// How the filter is sized and how fresh it must be to be trusted.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterConfig {
    /// Off: reads always go to L3 after an L2 miss, and no filter task runs.
    pub enabled: bool,
    /// Ids the filter holds before its first resize (it grows by doubling, `max_growth` times).
    pub initial_capacity: u64,
    /// How many times the filter may double before it is rebuilt (a rebuild warms up again).
    pub max_growth: u32,
    /// The false-positive rate when the filter is at its largest size (lower before).
    pub fp_rate: f64,
    /// How often the tail task reads the ids other processes inserted.
    pub poll_interval: Duration,
    /// Trusted only while the last completed tail poll started less than this ago.
    pub lag_bound: Duration,
    /// Added to `SYNC_SQL_WRITE_TIMEOUT_MS` to make the tail's overlap: how late after the
    /// write's deadline a commit the server already received may still become visible, plus
    /// the clock's resolution.
    pub commit_margin: Duration,
    /// Ids per statement of the warm-up and of the tail.
    pub page_ids: usize,
}

impl Default for FilterConfig {
    fn default() -> FilterConfig {
        FilterConfig {
            enabled: true,
            initial_capacity: 1 << 16,
            max_growth: 10,
            fp_rate: 0.001,
            poll_interval: Duration::from_secs(2),
            lag_bound: Duration::from_secs(5),
            commit_margin: Duration::from_secs(5),
            page_ids: 10_000,
        }
    }
}

/// Whether the filter's "definitely not in L3" may be believed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterTrust {
    /// Not warmed up (not started, the warm-up failed, or no L3): every read goes to L3.
    Untrusted { reason: String },
    /// Loading every L3 id (or rebuilt after outgrowing its size): every read goes to L3.
    WarmingUp,
    /// Warm, and the last tail poll is recent: a "definitely not" skips L3.
    Trusted,
    /// Warm, but the last completed tail poll started `lag_ms` ago, beyond the bound: other
    /// processes' recent inserts may be missing, so every read goes to L3.
    Lagging { lag_ms: u64 },
}

impl FilterTrust {
    pub fn is_trusted(&self) -> bool {
        matches!(self, FilterTrust::Trusted)
    }

    /// `sync_filter_trust`: 0 untrusted, 1 warming up, 2 lagging, 3 trusted.
    pub fn gauge_value(&self) -> f64 {
        match self {
            FilterTrust::Untrusted { .. } => 0.0,
            FilterTrust::WarmingUp => 1.0,
            FilterTrust::Lagging { .. } => 2.0,
            FilterTrust::Trusted => 3.0,
        }
    }
}

impl std::fmt::Display for FilterTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterTrust::Untrusted { reason } => write!(f, "untrusted ({reason})"),
            FilterTrust::WarmingUp => f.write_str("warming_up"),
            FilterTrust::Trusted => f.write_str("trusted"),
            FilterTrust::Lagging { lag_ms } => write!(f, "lagging ({lag_ms} ms behind)"),
        }
    }
}

/// Where the filter is in earning trust.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Untrusted(String),
    WarmingUp,
    /// Warm-up and the first tail poll after it done; trust now depends on the lag.
    Warm,
}

struct Inner {
    filter: qfilter::Filter,
    phase: Phase,
    /// Bumped when the filter is replaced: a warm-up of an older generation is void.
    generation: u64,
    /// When the last completed tail poll of this generation started.
    last_poll_started: Option<Instant>,
}

/// Sizes for the current filter: what it starts at, and the largest it may grow to.
fn new_filter(config: &FilterConfig, initial: u64) -> qfilter::Filter {
    let initial = initial.max(1024);
    let largest = initial.saturating_mul(1 << config.max_growth.min(20));
    qfilter::Filter::new_resizeable(initial, largest, config.fp_rate)
        .or_else(|_| qfilter::Filter::new_resizeable(initial, initial, config.fp_rate))
        .expect("a filter of the default size can always be built")
}

/// The membership filter and its trust (see the module documentation). Anyone may add ids
/// (an added id can only make the filter say "maybe"); only the engine's filter task moves its
/// trust, from what it read in L3.
pub struct FilterManager {
    config: FilterConfig,
    inner: RwLock<Inner>,
    saved: AtomicU64,
    /// Woken when the filter was replaced and must be warmed up again.
    rebuild: tokio::sync::Notify,
}

impl FilterManager {
    pub fn new(config: FilterConfig) -> FilterManager {
        let filter = new_filter(&config, config.initial_capacity);
        FilterManager {
            inner: RwLock::new(Inner {
                filter,
                phase: Phase::Untrusted("warm-up not started".into()),
                generation: 0,
                last_poll_started: None,
            }),
            config,
            saved: AtomicU64::new(0),
            rebuild: tokio::sync::Notify::new(),
        }
    }

    pub fn config(&self) -> &FilterConfig {
        &self.config
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The trust at `now` (time is passed in, so the state machine is testable).
    pub fn trust_at(&self, now: Instant) -> FilterTrust {
        trust_of(&self.read(), now, self.config.lag_bound)
    }

    /// The trust now; also refreshes `sync_filter_trust` and `sync_filter_tail_lag_ms`.
    pub fn trust(&self) -> FilterTrust {
        let (trust, lag) = {
            let inner = self.read();
            let now = Instant::now();
            (trust_of(&inner, now, self.config.lag_bound), inner.last_poll_started.map(|at| now - at))
        };
        metrics::gauge!(m::FILTER_TRUST).set(trust.gauge_value());
        if let Some(lag) = lag {
            metrics::gauge!(m::FILTER_TAIL_LAG_MS).set(lag.as_millis() as f64);
        }
        trust
    }

    /// True when L3 surely has no row for `id`: the filter is trusted now and does not hold
    /// it. Counts the query this saves. False means "ask L3".
    pub fn definitely_absent(&self, id: &str) -> bool {
        let absent = {
            let inner = self.read();
            trust_of(&inner, Instant::now(), self.config.lag_bound).is_trusted() && !inner.filter.contains(id)
        };
        if absent {
            self.saved.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FILTER_QUERIES_SAVED).increment(1);
        }
        absent
    }

    /// Whether the filter may hold `id` (true for every id it was given; false positives
    /// possible). Ignores trust: for tests and measurements.
    pub fn may_contain(&self, id: &str) -> bool {
        self.read().filter.contains(id)
    }

    /// Adds ids (from a write about to be sent to L3, the warm-up or the tail). If the filter
    /// is at its largest size, it is replaced by a larger empty one that must warm up again:
    /// an id is never dropped from a filter that is trusted.
    pub fn add<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.write();
        for id in ids {
            if inner.filter.insert(id).is_err() {
                let grown = inner.filter.max_capacity().saturating_mul(2);
                tracing::warn!(
                    ids = inner.filter.len(),
                    new_capacity = grown,
                    "the membership filter outgrew its size: rebuilding a larger one from L3 (reads go to L3 meanwhile)"
                );
                inner.filter = new_filter(&self.config, grown);
                inner.generation += 1;
                inner.phase = Phase::WarmingUp;
                inner.last_poll_started = None;
                // A fresh filter of twice the old one's size takes any one id.
                let _ = inner.filter.insert(id);
                self.rebuild.notify_one();
            }
        }
        metrics::gauge!(m::FILTER_IDS).set(inner.filter.len() as f64);
        metrics::gauge!(m::FILTER_BYTES).set(inner.filter.memory_usage() as f64);
    }

    /// The filter task starts a warm-up: returns its generation (`poll_completed` of an older
    /// one is ignored).
    pub(crate) fn begin_warm_up(&self) -> u64 {
        let mut inner = self.write();
        inner.phase = Phase::WarmingUp;
        inner.last_poll_started = None;
        inner.generation
    }

    /// The warm-up could not finish: untrusted, with why.
    pub(crate) fn warm_up_failed(&self, generation: u64, reason: String) {
        let mut inner = self.write();
        if inner.generation == generation {
            inner.phase = Phase::Untrusted(reason);
            inner.last_poll_started = None;
        }
    }

    /// The current generation (changes when the filter is rebuilt).
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// A tail poll that started at `started` completed. After a warm-up of the same
    /// generation, the first one makes the filter warm.
    pub(crate) fn poll_completed(&self, generation: u64, started: Instant) {
        let mut inner = self.write();
        if inner.generation != generation || matches!(inner.phase, Phase::Untrusted(_)) {
            return;
        }
        inner.phase = Phase::Warm;
        inner.last_poll_started = Some(inner.last_poll_started.map_or(started, |last| last.max(started)));
    }

    /// Resolves when the filter was replaced and needs a new warm-up.
    pub(crate) async fn rebuild_requested(&self) {
        self.rebuild.notified().await
    }

    /// What the filter holds and costs.
    pub fn stats(&self) -> FilterStats {
        let inner = self.read();
        FilterStats {
            ids: inner.filter.len(),
            memory_bytes: inner.filter.memory_usage() as u64,
            capacity: inner.filter.capacity(),
            max_capacity: inner.filter.max_capacity(),
            current_fp_rate: inner.filter.current_error_ratio(),
            queries_saved: self.saved.load(Ordering::Relaxed),
            generation: inner.generation,
        }
    }
}

fn trust_of(inner: &Inner, now: Instant, lag_bound: Duration) -> FilterTrust {
    match &inner.phase {
        Phase::Untrusted(reason) => FilterTrust::Untrusted { reason: reason.clone() },
        Phase::WarmingUp => FilterTrust::WarmingUp,
        Phase::Warm => {
            let lag = inner.last_poll_started.map_or(Duration::MAX, |at| now.saturating_duration_since(at));
            if lag <= lag_bound {
                FilterTrust::Trusted
            } else {
                FilterTrust::Lagging { lag_ms: lag.as_millis().min(u128::from(u64::MAX)) as u64 }
            }
        }
    }
}

/// A snapshot of the filter's size and use.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterStats {
    pub ids: u64,
    pub memory_bytes: u64,
    /// Ids before the next resize, and at the largest size before a rebuild.
    pub capacity: u64,
    pub max_capacity: u64,
    /// The estimated false-positive rate at the current occupancy.
    pub current_fp_rate: f64,
    /// L3 queries skipped because the filter said "definitely not".
    pub queries_saved: u64,
    /// How many times the filter was rebuilt after outgrowing its size.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(lag_bound_ms: u64) -> FilterManager {
        FilterManager::new(FilterConfig {
            lag_bound: Duration::from_millis(lag_bound_ms),
            initial_capacity: 1024,
            ..FilterConfig::default()
        })
    }

    #[test]
    fn trust_is_earned_by_a_warm_up_and_a_poll_and_lost_to_lag() {
        let filter = manager(1_000);
        let t0 = Instant::now();
        assert!(matches!(filter.trust_at(t0), FilterTrust::Untrusted { .. }));
        filter.add(["a"]);
        // Untrusted: even an id never added is "maybe", so reads go to L3.
        assert!(!filter.definitely_absent("never-added"));

        let generation = filter.begin_warm_up();
        assert_eq!(filter.trust_at(t0), FilterTrust::WarmingUp);
        assert!(!filter.definitely_absent("never-added"));

        filter.poll_completed(generation, t0);
        assert_eq!(filter.trust_at(t0 + Duration::from_millis(999)), FilterTrust::Trusted);
        assert_eq!(filter.trust_at(t0 + Duration::from_millis(1_500)), FilterTrust::Lagging { lag_ms: 1_500 });
        // A later poll brings it back; an older one never moves the mark back.
        filter.poll_completed(generation, t0 + Duration::from_millis(1_400));
        filter.poll_completed(generation, t0 + Duration::from_millis(100));
        assert_eq!(filter.trust_at(t0 + Duration::from_millis(1_500)), FilterTrust::Trusted);
    }

    #[test]
    fn a_failed_warm_up_is_untrusted_with_its_reason_and_a_poll_does_not_rescue_it() {
        let filter = manager(1_000);
        let generation = filter.begin_warm_up();
        filter.warm_up_failed(generation, "L3 unavailable".into());
        filter.poll_completed(generation, Instant::now());
        assert_eq!(filter.trust(), FilterTrust::Untrusted { reason: "L3 unavailable".into() });
        assert_eq!(filter.trust().gauge_value(), 0.0);
    }

    #[test]
    fn a_trusted_filter_never_denies_an_added_id_and_skips_unknown_ones() {
        let filter = manager(60_000);
        let names: Vec<String> = (0..5_000).map(|n| format!("uk.nhs.patient.{n}")).collect();
        filter.add(names.iter().map(String::as_str));
        filter.add(names.iter().map(String::as_str)); // duplicates change nothing
        assert_eq!(filter.stats().ids, 5_000);
        let generation = filter.begin_warm_up();
        filter.poll_completed(generation, Instant::now());
        assert!(filter.trust().is_trusted());
        assert!(names.iter().all(|id| !filter.definitely_absent(id)));
        let skipped = (0..1_000).filter(|n| filter.definitely_absent(&format!("uk.nhs.other.{n}"))).count();
        assert!(skipped > 990, "{skipped} of 1,000 unknown ids skipped");
        assert_eq!(filter.stats().queries_saved, skipped as u64);
    }

    #[test]
    fn outgrowing_the_largest_size_rebuilds_untrusted_and_keeps_what_is_added_after() {
        let filter = FilterManager::new(FilterConfig {
            initial_capacity: 1024,
            max_growth: 1,
            lag_bound: Duration::from_secs(60),
            ..FilterConfig::default()
        });
        let generation = filter.begin_warm_up();
        filter.poll_completed(generation, Instant::now());
        assert!(filter.trust().is_trusted());
        let names: Vec<String> = (0..5_000).map(|n| format!("id.{n}")).collect();
        filter.add(names.iter().map(String::as_str));
        // Replaced by a larger filter: warming up again, the old generation's poll is void.
        assert!(filter.generation() > generation);
        assert_eq!(filter.trust(), FilterTrust::WarmingUp);
        filter.poll_completed(generation, Instant::now());
        assert_eq!(filter.trust(), FilterTrust::WarmingUp);
        // Ids added since the rebuild are there; the warm-up brings back the others.
        assert!(filter.may_contain("id.4999"));
        let generation = filter.begin_warm_up();
        filter.add(names.iter().map(String::as_str));
        filter.poll_completed(generation, Instant::now());
        assert!(filter.trust().is_trusted());
        assert!(names.iter().all(|id| filter.may_contain(id)));
    }

    /// The false-positive rate and the memory per million ids, printed for the README
    /// (`cargo test --release --lib filter::tests::measure -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure_false_positives_and_memory_per_million_ids() {
        for count in [100_000u64, 1_000_000, 4_000_000] {
            let millions = count as f64 / 1e6;
            let filter = FilterManager::new(FilterConfig::default());
            let names: Vec<String> = (0..count).map(|n| format!("uk.nhs.patient.{n}")).collect();
            for chunk in names.chunks(10_000) {
                filter.add(chunk.iter().map(String::as_str));
            }
            assert!(names.iter().all(|id| filter.may_contain(id)), "no false negative");
            let probes = 1_000_000;
            let false_positives = (0..probes).filter(|n| filter.may_contain(&format!("uk.nhs.absent.{n}"))).count();
            let stats = filter.stats();
            println!(
                "{} ids: {} bytes ({:.2} MiB per million ids, {:.1} bits per id), false positives {} of {} ({:.4}%), capacity {} (largest {})",
                stats.ids,
                stats.memory_bytes,
                stats.memory_bytes as f64 / (1 << 20) as f64 / millions,
                stats.memory_bytes as f64 * 8.0 / stats.ids as f64,
                false_positives,
                probes,
                false_positives as f64 * 100.0 / probes as f64,
                stats.capacity,
                stats.max_capacity,
            );
        }
    }
}
