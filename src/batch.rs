//! The hybrid batcher: a batch closes when it reaches a count, a byte size, or an age.
//!
//! Pure: time is passed in, so tests need no sleeps. The engine's batch task owns one and
//! asks it for the next deadline to wait on. Generic over what it batches: anything that
//! knows its size (`SizedItem`).

use std::time::{Duration, Instant};

/// When a batch closes. Changeable while the engine runs (through the config `watch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_items: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
}

/// What the batcher needs to know of an item.
pub trait SizedItem {
    fn size_bytes(&self) -> usize;
}

/// Why a batch closed (a metric label: a batch that always closes by age means the count and
/// byte limits are never reached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    Count,
    Bytes,
    Age,
    /// Taken on demand: `flush()`, shutdown.
    Explicit,
}

impl FlushReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Count => "count",
            FlushReason::Bytes => "bytes",
            FlushReason::Age => "age",
            FlushReason::Explicit => "explicit",
        }
    }
}

/// A closed batch: its items in arrival order, their total size, and why it closed.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<T> {
    pub items: Vec<T>,
    pub bytes: usize,
    pub reason: FlushReason,
}

#[derive(Debug)]
pub struct HybridBatcher<T> {
    config: BatchConfig,
    items: Vec<T>,
    bytes: usize,
    opened_at: Option<Instant>,
}

impl<T: SizedItem> HybridBatcher<T> {
    pub fn new(config: BatchConfig) -> HybridBatcher<T> {
        HybridBatcher { config, items: Vec::new(), bytes: 0, opened_at: None }
    }

    /// Limits apply from the next push on (config can change while running).
    pub fn set_config(&mut self, config: BatchConfig) {
        self.config = config;
    }

    /// Adds an item; returns the batch if it is now full by count or bytes.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Batch<T>> {
        self.opened_at.get_or_insert(now);
        self.bytes += item.size_bytes();
        self.items.push(item);
        if self.items.len() >= self.config.max_items {
            Some(self.take(FlushReason::Count))
        } else if self.bytes >= self.config.max_bytes {
            Some(self.take(FlushReason::Bytes))
        } else {
            None
        }
    }

    /// When the open batch must be flushed by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.config.max_delay)
    }

    /// Returns the batch if it is due by age at `now`.
    pub fn poll_due(&mut self, now: Instant) -> Option<Batch<T>> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Some(self.take(FlushReason::Age)),
            _ => None,
        }
    }

    /// Takes whatever is open (possibly empty).
    pub fn take(&mut self, reason: FlushReason) -> Batch<T> {
        let bytes = std::mem::take(&mut self.bytes);
        self.opened_at = None;
        Batch { items: std::mem::take(&mut self.items), bytes, reason }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A test item: its number and its size.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Sized(usize, usize);

    impl SizedItem for Sized {
        fn size_bytes(&self) -> usize {
            self.1
        }
    }

    fn config() -> BatchConfig {
        BatchConfig { max_items: 3, max_bytes: 100, max_delay: Duration::from_millis(10) }
    }

    fn numbers(batch: Batch<Sized>) -> Vec<usize> {
        batch.items.iter().map(|item| item.0).collect()
    }

    #[test]
    fn a_batch_closes_at_the_count_limit() {
        let now = Instant::now();
        let mut batcher = HybridBatcher::new(config());
        assert!(batcher.push(Sized(1, 1), now).is_none());
        assert!(batcher.push(Sized(2, 1), now).is_none());
        let batch = batcher.push(Sized(3, 1), now).expect("full by count");
        assert_eq!((batch.reason, batch.bytes), (FlushReason::Count, 3));
        assert_eq!(numbers(batch), vec![1, 2, 3]);
        assert!(batcher.is_empty());
        assert_eq!(batcher.deadline(), None);
    }

    #[test]
    fn a_batch_closes_at_the_byte_limit() {
        let mut batcher = HybridBatcher::new(config());
        let batch = batcher.push(Sized(1, 100), Instant::now()).expect("full by bytes");
        assert_eq!(batch.reason, FlushReason::Bytes);
        assert_eq!(numbers(batch), vec![1]);
    }

    #[test]
    fn a_batch_closes_by_age_measured_from_its_first_item() {
        let start = Instant::now();
        let mut batcher = HybridBatcher::new(config());
        batcher.push(Sized(1, 1), start);
        batcher.push(Sized(2, 1), start + Duration::from_millis(8));
        assert_eq!(batcher.poll_due(start + Duration::from_millis(9)), None);
        assert_eq!(batcher.deadline(), Some(start + Duration::from_millis(10)));
        let batch = batcher.poll_due(start + Duration::from_millis(10)).expect("due by age");
        assert_eq!(batch.reason, FlushReason::Age);
        assert_eq!(numbers(batch), vec![1, 2]);
    }

    proptest! {
        #[test]
        fn no_item_is_lost_or_duplicated(sizes in proptest::collection::vec(0usize..60, 0..50)) {
            let now = Instant::now();
            let mut batcher = HybridBatcher::new(config());
            let mut out = Vec::new();
            for (index, size) in sizes.iter().enumerate() {
                if let Some(batch) = batcher.push(Sized(index, *size), now) {
                    prop_assert!(batch.items.len() <= 3);
                    out.extend(numbers(batch));
                }
            }
            out.extend(numbers(batcher.take(FlushReason::Explicit)));
            prop_assert_eq!(out, (0..sizes.len()).collect::<Vec<_>>());
        }
    }
}
