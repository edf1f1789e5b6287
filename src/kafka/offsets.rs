//! The settled-offset tracker (invariant 1).
//!
//! Pure. For each partition it remembers the offsets handed to the pipeline, in the order they
//! were consumed, and which have settled. The committable offset is the highest contiguous
//! settled offset + 1: nothing at or below it is still unsettled. Offsets may have gaps
//! (compaction, transaction markers); only the order matters.
//!
//! Each partition's state belongs to one assignment generation (counted by the consumer
//! thread, one per assign). A rebalance event handled late must only forget state of its own
//! or older generations: the partition may already be assigned back to this worker, and the
//! newer state must survive, or its records would be skipped by the next commit.
//!
//! An offset counts as committed only once the consumer thread reports a successful commit
//! (`confirm`); until then every commit round offers it again, so a failed commit is retried.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::kafka::lag::ConsumedTimes;

/// Assignment generation: incremented by the consumer thread on every assign.
pub type Generation = u64;

/// A consumed offset not yet below the watermark.
#[derive(Debug, Clone, Copy)]
struct Pending {
    offset: i64,
    settled: bool,
    /// The record's timestamp (ms since the epoch), for the lag in seconds.
    timestamp_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Consumed offsets not yet below the watermark, ascending.
    pending: VecDeque<Pending>,
    /// Timestamp of the last record tracked.
    last_timestamp_ms: Option<i64>,
    /// Next offset to commit (last contiguous settled + 1).
    committable: Option<i64>,
    /// The highest offset the broker confirmed as committed.
    confirmed: Option<i64>,
}

impl PartitionOffsets {
    /// Records a consumed offset. Offsets at or below one already seen are ignored (a
    /// redelivery cannot move the watermark back).
    pub fn track(&mut self, offset: i64, timestamp_ms: Option<i64>) -> bool {
        let last_seen = self.pending.back().map(|last| last.offset).or(self.committable.map(|next| next - 1));
        if last_seen.is_some_and(|last| offset <= last) {
            return false;
        }
        self.pending.push_back(Pending { offset, settled: false, timestamp_ms });
        self.last_timestamp_ms = timestamp_ms.or(self.last_timestamp_ms);
        true
    }

    /// Marks an offset settled and advances the watermark over the contiguous settled prefix.
    pub fn settle(&mut self, offset: i64) {
        if let Ok(index) = self.pending.binary_search_by_key(&offset, |pending| pending.offset) {
            self.pending[index].settled = true;
        }
        while let Some(front) = self.pending.front().filter(|front| front.settled) {
            self.committable = Some(front.offset + 1);
            self.pending.pop_front();
        }
    }

    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// The committable offset if the broker has not confirmed it yet. It is not marked as
    /// committed here: only `confirm` does that, so a lost or failed commit is offered again.
    pub fn commit_due(&self) -> Option<i64> {
        match (self.committable, self.confirmed) {
            (Some(next), Some(confirmed)) if next <= confirmed => None,
            (next, _) => next,
        }
    }

    /// The broker confirmed `offset` as committed (confirmations may arrive out of order).
    pub fn confirm(&mut self, offset: i64) {
        self.confirmed = Some(self.confirmed.map_or(offset, |confirmed| confirmed.max(offset)));
    }

    pub fn unsettled(&self) -> usize {
        self.pending.iter().filter(|pending| !pending.settled).count()
    }

    /// The timestamps the lag in seconds is computed from (the front of `pending` is never
    /// settled: the settled prefix is popped).
    pub fn consumed_times(&self) -> ConsumedTimes {
        ConsumedTimes {
            oldest_unsettled_ms: self.pending.front().and_then(|front| front.timestamp_ms),
            last_consumed_ms: self.last_timestamp_ms,
        }
    }
}

pub type TopicPartition = (Arc<str>, i32);

/// One partition's offsets within one assignment generation.
#[derive(Debug, Default)]
struct Tracked {
    generation: Generation,
    offsets: PartitionOffsets,
}

/// Offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, Tracked>,
}

impl OffsetTracker {
    /// Tracks a record consumed in `generation`. Returns false if it must not be processed:
    /// a redelivery below the watermark, or a record of an assignment older than the one
    /// tracked. A record of a newer assignment replaces the older state: that assignment is
    /// over, whatever was pending in it is redelivered from the committed offset.
    pub fn track(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        generation: Generation,
    ) -> bool {
        let tracked = self
            .partitions
            .entry((topic.clone(), partition))
            .or_insert_with(|| Tracked { generation, offsets: PartitionOffsets::default() });
        if generation < tracked.generation {
            return false;
        }
        if generation > tracked.generation {
            *tracked = Tracked { generation, offsets: PartitionOffsets::default() };
        }
        tracked.offsets.track(offset, timestamp_ms)
    }

    /// Settles an offset; a partition no longer tracked, or tracked for another assignment
    /// generation, is ignored.
    pub fn settle(&mut self, topic: &Arc<str>, partition: i32, offset: i64, generation: Generation) {
        if let Some(tracked) = self.partitions.get_mut(&(topic.clone(), partition)) {
            if tracked.generation == generation {
                tracked.offsets.settle(offset);
            }
        }
    }

    /// Every partition whose committable offset the broker has not confirmed yet.
    pub fn commits_due(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(tp, tracked)| tracked.offsets.commit_due().map(|offset| (tp.clone(), offset)))
            .collect()
    }

    /// Every partition's committable offset, confirmed or not (the final commit).
    pub fn all_committable(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(tp, tracked)| tracked.offsets.committable().map(|offset| (tp.clone(), offset)))
            .collect()
    }

    /// The consumer thread reports committed offsets; partitions not tracked are ignored.
    pub fn confirm(&mut self, committed: &[(TopicPartition, i64)]) {
        for (tp, offset) in committed {
            if let Some(tracked) = self.partitions.get_mut(tp) {
                tracked.offsets.confirm(*offset);
            }
        }
    }

    /// Each tracked partition's record timestamps, for the lag in seconds.
    pub fn consumed_times(&self) -> Vec<(TopicPartition, ConsumedTimes)> {
        self.partitions.iter().map(|(tp, tracked)| (tp.clone(), tracked.offsets.consumed_times())).collect()
    }

    /// Unsettled records of these partitions in `generation` or older.
    pub fn unsettled_in(&self, partitions: &[TopicPartition], generation: Generation) -> usize {
        partitions
            .iter()
            .filter_map(|tp| self.partitions.get(tp))
            .filter(|tracked| tracked.generation <= generation)
            .map(|tracked| tracked.offsets.unsettled())
            .sum()
    }

    /// Whether this partition is tracked for an assignment newer than `generation`.
    pub fn tracked_after(&self, tp: &TopicPartition, generation: Generation) -> bool {
        self.partitions.get(tp).is_some_and(|tracked| tracked.generation > generation)
    }

    /// Stops tracking these partitions if their state is of `generation` or older; returns
    /// the committable offset of each removed one, whether or not it was committed before
    /// (a revoke must commit every revoked partition, even if a timer commit is in flight).
    pub fn remove(&mut self, partitions: &[TopicPartition], generation: Generation) -> Vec<(TopicPartition, i64)> {
        let mut removed = Vec::new();
        for tp in partitions {
            if self.partitions.get(tp).is_some_and(|tracked| tracked.generation <= generation) {
                let tracked = self.partitions.remove(tp).expect("checked above");
                removed.extend(tracked.offsets.committable().map(|offset| (tp.clone(), offset)));
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_watermark_waits_for_the_oldest_unsettled_offset() {
        let mut offsets = PartitionOffsets::default();
        for offset in [5, 6, 8] {
            offsets.track(offset, None);
        }
        offsets.settle(6);
        offsets.settle(8);
        assert_eq!(offsets.committable(), None);
        offsets.settle(5);
        assert_eq!(offsets.committable(), Some(9));
        assert_eq!(offsets.commit_due(), Some(9));
        offsets.confirm(9);
        assert_eq!(offsets.commit_due(), None);
    }

    #[test]
    fn a_redelivered_offset_cannot_move_the_watermark_back() {
        let mut offsets = PartitionOffsets::default();
        offsets.track(3, None);
        offsets.settle(3);
        assert!(!offsets.track(2, None));
        assert!(!offsets.track(3, None));
        assert_eq!(offsets.committable(), Some(4));
    }

    #[test]
    fn a_revoked_partition_returns_its_settled_watermark_and_forgets_the_rest() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        tracker.track(&topic, 0, 0, None, 1);
        tracker.track(&topic, 0, 1, None, 1);
        tracker.settle(&topic, 0, 0, 1);
        assert_eq!(tracker.unsettled_in(&[(topic.clone(), 0)], 1), 1);
        assert_eq!(tracker.remove(&[(topic.clone(), 0)], 1), vec![((topic.clone(), 0), 1)]);
        tracker.settle(&topic, 0, 1, 1);
        assert!(tracker.commits_due().is_empty());
    }

    #[test]
    fn a_commit_not_confirmed_is_offered_again_and_a_confirmed_one_is_not() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        tracker.track(&topic, 0, 0, None, 1);
        tracker.settle(&topic, 0, 0, 1);
        let due = vec![((topic.clone(), 0), 1)];
        assert_eq!(tracker.commits_due(), due);
        // The commit failed (no confirmation): the next round offers it again.
        assert_eq!(tracker.commits_due(), due);
        tracker.confirm(&due);
        assert!(tracker.commits_due().is_empty());
        // A late confirmation of an older offset does not hide a newer one.
        tracker.track(&topic, 0, 1, None, 1);
        tracker.settle(&topic, 0, 1, 1);
        tracker.confirm(&[((topic.clone(), 0), 1)]);
        assert_eq!(tracker.commits_due(), vec![((topic.clone(), 0), 2)]);
    }

    #[test]
    fn a_revoke_returns_every_committable_offset_even_if_a_timer_commit_took_it() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        tracker.track(&topic, 0, 0, None, 1);
        tracker.settle(&topic, 0, 0, 1);
        // A timer commit was handed to the consumer thread but is still queued behind the revoke.
        assert_eq!(tracker.commits_due().len(), 1);
        assert_eq!(tracker.remove(&[(topic.clone(), 0)], 1), vec![((topic.clone(), 0), 1)]);
        // Even once confirmed, the revoke's synchronous commit still gets the partition.
        tracker.track(&topic, 0, 1, None, 2);
        tracker.settle(&topic, 0, 1, 2);
        tracker.confirm(&[((topic.clone(), 0), 2)]);
        assert_eq!(tracker.remove(&[(topic.clone(), 0)], 2), vec![((topic.clone(), 0), 2)]);
    }

    #[test]
    fn a_late_rebalance_of_an_older_generation_keeps_the_newer_assignment() {
        let topic: Arc<str> = Arc::from("t");
        let tp = (topic.clone(), 0);
        let mut tracker = OffsetTracker::default();
        tracker.track(&topic, 0, 10, None, 1);
        // Reassigned (generation 2) before the revoke of generation 1 was handled: the
        // partition restarts from its committed offset.
        assert!(tracker.track(&topic, 0, 5, None, 2));
        assert!(tracker.track(&topic, 0, 6, None, 2));
        // A record of generation 1 still in flight neither tracks nor settles anything.
        assert!(!tracker.track(&topic, 0, 11, None, 1));
        tracker.settle(&topic, 0, 10, 1);
        assert_eq!(tracker.unsettled_in(std::slice::from_ref(&tp), 1), 0);
        assert!(tracker.remove(std::slice::from_ref(&tp), 1).is_empty());
        assert!(tracker.tracked_after(&tp, 1));
        tracker.settle(&topic, 0, 5, 2);
        tracker.settle(&topic, 0, 6, 2);
        assert_eq!(tracker.commits_due(), vec![(tp, 7)]);
    }

    proptest! {
        // Settle offsets in any order: the committable offset never passes an unsettled one,
        // and once everything settles it is the last offset + 1.
        #[test]
        fn it_never_commits_past_an_unsettled_offset(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 1..60),
        ) {
            let mut offset = 0;
            let consumed: Vec<i64> = gaps.iter().map(|gap| { offset += gap; offset }).collect();
            let mut offsets = PartitionOffsets::default();
            for &o in &consumed { offsets.track(o, None); }
            let mut unsettled = consumed.clone();
            for index in order {
                if unsettled.is_empty() { break; }
                let o = unsettled.remove(index.index(unsettled.len()));
                offsets.settle(o);
                if let (Some(commit), Some(min)) = (offsets.committable(), unsettled.iter().min()) {
                    prop_assert!(commit <= *min, "committed {} past unsettled {}", commit, min);
                }
            }
            for o in unsettled { offsets.settle(o); }
            prop_assert_eq!(offsets.committable(), Some(consumed.last().unwrap() + 1));
        }
    }
}
