//! The settled-offset tracker (invariant 1).
//!
//! Pure. For each partition it remembers the offsets handed to the pipeline, in the order they
//! were consumed, and which have settled. The committable offset is the highest contiguous
//! settled offset + 1: nothing at or below it is still unsettled. Offsets may have gaps
//! (compaction, transaction markers); only the order matters.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct PartitionOffsets {
    /// Consumed offsets not yet below the watermark, ascending, with their settled flag.
    pending: VecDeque<(i64, bool)>,
    /// Next offset to commit (last contiguous settled + 1).
    committable: Option<i64>,
    /// What was last handed out for committing.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// Records a consumed offset. Offsets at or below one already seen are ignored (a
    /// redelivery cannot move the watermark back).
    pub fn track(&mut self, offset: i64) -> bool {
        let last_seen = self.pending.back().map(|(last, _)| *last).or(self.committable.map(|next| next - 1));
        if last_seen.is_some_and(|last| offset <= last) {
            return false;
        }
        self.pending.push_back((offset, false));
        true
    }

    /// Marks an offset settled and advances the watermark over the contiguous settled prefix.
    pub fn settle(&mut self, offset: i64) {
        if let Ok(index) = self.pending.binary_search_by_key(&offset, |(pending, _)| *pending) {
            self.pending[index].1 = true;
        }
        while let Some(&(front, true)) = self.pending.front() {
            self.committable = Some(front + 1);
            self.pending.pop_front();
        }
    }

    pub fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// The committable offset if it moved since the last call.
    pub fn take_commit(&mut self) -> Option<i64> {
        if self.committable != self.committed {
            self.committed = self.committable;
            return self.committable;
        }
        None
    }

    pub fn unsettled(&self) -> usize {
        self.pending.iter().filter(|(_, settled)| !settled).count()
    }
}

pub type TopicPartition = (Arc<str>, i32);

/// Offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionOffsets>,
}

impl OffsetTracker {
    pub fn track(&mut self, topic: &Arc<str>, partition: i32, offset: i64) -> bool {
        self.partitions.entry((topic.clone(), partition)).or_default().track(offset)
    }

    /// Settles an offset; a partition no longer tracked (revoked) is ignored.
    pub fn settle(&mut self, topic: &Arc<str>, partition: i32, offset: i64) {
        if let Some(offsets) = self.partitions.get_mut(&(topic.clone(), partition)) {
            offsets.settle(offset);
        }
    }

    /// Every partition whose watermark moved since its last commit.
    pub fn take_commits(&mut self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter_mut()
            .filter_map(|(tp, offsets)| offsets.take_commit().map(|offset| (tp.clone(), offset)))
            .collect()
    }

    pub fn unsettled_in(&self, partitions: &[TopicPartition]) -> usize {
        partitions.iter().filter_map(|tp| self.partitions.get(tp)).map(PartitionOffsets::unsettled).sum()
    }

    /// Stops tracking partitions; returns their final committable offsets.
    pub fn remove(&mut self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        partitions
            .iter()
            .filter_map(|tp| {
                let mut offsets = self.partitions.remove(tp)?;
                offsets.take_commit().map(|offset| (tp.clone(), offset))
            })
            .collect()
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
            offsets.track(offset);
        }
        offsets.settle(6);
        offsets.settle(8);
        assert_eq!(offsets.committable(), None);
        offsets.settle(5);
        assert_eq!(offsets.committable(), Some(9));
        assert_eq!(offsets.take_commit(), Some(9));
        assert_eq!(offsets.take_commit(), None);
    }

    #[test]
    fn a_redelivered_offset_cannot_move_the_watermark_back() {
        let mut offsets = PartitionOffsets::default();
        offsets.track(3);
        offsets.settle(3);
        assert!(!offsets.track(2));
        assert!(!offsets.track(3));
        assert_eq!(offsets.committable(), Some(4));
    }

    #[test]
    fn a_revoked_partition_returns_its_settled_watermark_and_forgets_the_rest() {
        let topic: Arc<str> = Arc::from("t");
        let mut tracker = OffsetTracker::default();
        tracker.track(&topic, 0, 0);
        tracker.track(&topic, 0, 1);
        tracker.settle(&topic, 0, 0);
        assert_eq!(tracker.unsettled_in(&[(topic.clone(), 0)]), 1);
        assert_eq!(tracker.remove(&[(topic.clone(), 0)]), vec![((topic.clone(), 0), 1)]);
        tracker.settle(&topic, 0, 1);
        assert!(tracker.take_commits().is_empty());
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
            for &o in &consumed { offsets.track(o); }
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
