//! The hybrid batcher: a batch closes when it reaches a count, a byte size, or an age.
//!
//! Pure: time is passed in, so tests need no sleeps. The engine's batch task owns one and
//! asks it for the next deadline to wait on.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_items: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
}

#[derive(Debug)]
pub struct Batcher<T> {
    limits: BatchLimits,
    items: Vec<T>,
    bytes: usize,
    opened_at: Option<Instant>,
}

impl<T> Batcher<T> {
    pub fn new(limits: BatchLimits) -> Batcher<T> {
        Batcher { limits, items: Vec::new(), bytes: 0, opened_at: None }
    }

    /// Limits apply from the next push on (config can change while running).
    pub fn set_limits(&mut self, limits: BatchLimits) {
        self.limits = limits;
    }

    /// Adds an item; returns the batch if it is now full by count or bytes.
    pub fn push(&mut self, item: T, size_bytes: usize, now: Instant) -> Option<Vec<T>> {
        self.opened_at.get_or_insert(now);
        self.items.push(item);
        self.bytes += size_bytes;
        let full = self.items.len() >= self.limits.max_items || self.bytes >= self.limits.max_bytes;
        full.then(|| self.take())
    }

    /// When the open batch must be flushed by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|opened| opened + self.limits.max_delay)
    }

    /// Returns the batch if it is due by age at `now`.
    pub fn poll_due(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(deadline) if now >= deadline => Some(self.take()),
            _ => None,
        }
    }

    /// Takes whatever is open (possibly empty).
    pub fn take(&mut self) -> Vec<T> {
        self.bytes = 0;
        self.opened_at = None;
        std::mem::take(&mut self.items)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> BatchLimits {
        BatchLimits { max_items: 3, max_bytes: 100, max_delay: Duration::from_millis(10) }
    }

    #[test]
    fn a_batch_closes_at_the_count_limit() {
        let now = Instant::now();
        let mut batcher = Batcher::new(limits());
        assert!(batcher.push(1, 1, now).is_none());
        assert!(batcher.push(2, 1, now).is_none());
        assert_eq!(batcher.push(3, 1, now), Some(vec![1, 2, 3]));
        assert!(batcher.is_empty());
        assert_eq!(batcher.deadline(), None);
    }

    #[test]
    fn a_batch_closes_at_the_byte_limit() {
        let mut batcher = Batcher::new(limits());
        assert_eq!(batcher.push(1, 100, Instant::now()), Some(vec![1]));
    }

    #[test]
    fn a_batch_closes_by_age_measured_from_its_first_item() {
        let start = Instant::now();
        let mut batcher = Batcher::new(limits());
        batcher.push(1, 1, start);
        batcher.push(2, 1, start + Duration::from_millis(8));
        assert_eq!(batcher.poll_due(start + Duration::from_millis(9)), None);
        assert_eq!(batcher.deadline(), Some(start + Duration::from_millis(10)));
        assert_eq!(batcher.poll_due(start + Duration::from_millis(10)), Some(vec![1, 2]));
    }

    proptest! {
        #[test]
        fn no_item_is_lost_or_duplicated(sizes in proptest::collection::vec(0usize..60, 0..50)) {
            let now = Instant::now();
            let mut batcher = Batcher::new(limits());
            let mut out = Vec::new();
            for (index, size) in sizes.iter().enumerate() {
                if let Some(batch) = batcher.push(index, *size, now) {
                    prop_assert!(batch.len() <= 3);
                    out.extend(batch);
                }
            }
            out.extend(batcher.take());
            prop_assert_eq!(out, (0..sizes.len()).collect::<Vec<_>>());
        }
    }
}
