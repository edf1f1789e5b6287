//! Memory pressure: when to pause and resume Kafka partitions (invariant 3).
//!
//! Pure. The worker counts the bytes held for unsettled records; above the high watermark it
//! pauses every assigned partition (and keeps polling), below the low watermark it resumes.
//! The gap between the two is the hysteresis that stops pause/resume flapping, which matters
//! because a pause throws away librdkafka's prefetched data.

/// Fractions of the budget, in percent.
pub const HIGH_WATERMARK_PERCENT: u64 = 75;
pub const LOW_WATERMARK_PERCENT: u64 = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pressure {
    pub budget_bytes: u64,
    pub high_bytes: u64,
    pub low_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PressureDecision {
    Pause,
    Resume,
    Stay,
}

impl Pressure {
    pub fn from_budget(budget_bytes: u64) -> Pressure {
        Pressure {
            budget_bytes,
            high_bytes: budget_bytes / 100 * HIGH_WATERMARK_PERCENT,
            low_bytes: budget_bytes / 100 * LOW_WATERMARK_PERCENT,
        }
    }

    pub fn decide(&self, bytes_in_flight: u64, paused: bool) -> PressureDecision {
        if !paused && bytes_in_flight >= self.high_bytes {
            PressureDecision::Pause
        } else if paused && bytes_in_flight <= self.low_bytes {
            PressureDecision::Resume
        } else {
            PressureDecision::Stay
        }
    }

    /// librdkafka's prefetch queue per partition (`queued.max.messages.kbytes`), taken from
    /// the budget headroom above the high watermark and shared by up to `partitions_hint`
    /// partitions, never below 64 KiB.
    pub fn prefetch_kbytes_per_partition(&self, partitions_hint: u64) -> u64 {
        let headroom = self.budget_bytes.saturating_sub(self.high_bytes);
        (headroom / partitions_hint.max(1) / 1024).max(64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pauses_above_high_and_resumes_below_low() {
        let pressure = Pressure::from_budget(1000);
        assert_eq!(pressure.decide(749, false), PressureDecision::Stay);
        assert_eq!(pressure.decide(750, false), PressureDecision::Pause);
        assert_eq!(pressure.decide(500, true), PressureDecision::Stay);
        assert_eq!(pressure.decide(400, true), PressureDecision::Resume);
    }

    proptest! {
        // Simulate any sequence of levels: the state never flaps inside the hysteresis band.
        #[test]
        fn decisions_follow_hysteresis(levels in proptest::collection::vec(0u64..1200, 1..200)) {
            let pressure = Pressure::from_budget(1000);
            let mut paused = false;
            for level in levels {
                match pressure.decide(level, paused) {
                    PressureDecision::Pause => { prop_assert!(level >= 750); paused = true; }
                    PressureDecision::Resume => { prop_assert!(level <= 400); paused = false; }
                    PressureDecision::Stay => prop_assert!(
                        (paused && level > 400) || (!paused && level < 750)
                    ),
                }
            }
        }
    }
}
