//! Memory pressure (invariant 3): the backpressure levels and their thresholds, and the
//! budget split for librdkafka's prefetch.
//!
//! Pure. The engine counts the bytes it holds (unsettled items, L1, the worker's Kafka
//! records in flight) and `LevelBounds::next` turns them into a `BackpressureLevel`, with
//! hysteresis so that a level does not flap; the engine and the worker act on the level
//! (`engine/backpressure.rs`, `kafka/consumer.rs`). The worker pauses its partitions from
//! Throttle up and resumes at Warn or below; the gap matters because a pause throws away
//! librdkafka's prefetched data. `Pressure` sizes the prefetch from the budget.

use std::time::Duration;

/// How hard the engine pushes back, from the bytes it holds against its memory budget
/// (`SyncEngineConfig::memory_budget_bytes`). Each level does everything the levels below it
/// do, and more:
///
/// - `Normal`: nothing.
/// - `Warn`: L1 gives way: durable entries are evicted, large cold ones first, until the
///   bytes are back below the level's exit threshold (never an entry not yet settled).
/// - `Throttle`: library submits are slowed (a sleep that grows with the pressure); the
///   Kafka worker pauses its partitions.
/// - `Critical`: library writes are refused with `EngineError::Backpressure` (the worker
///   never refuses a record: its partitions stay paused).
/// - `Emergency`: every durable L1 entry is dropped at once.
/// - `Shutdown`: reads that would fill L1 are refused too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackpressureLevel {
    #[default]
    Normal = 0,
    Warn = 1,
    Throttle = 2,
    Critical = 3,
    Emergency = 4,
    Shutdown = 5,
}

impl BackpressureLevel {
    pub const ALL: [BackpressureLevel; 6] = [
        BackpressureLevel::Normal,
        BackpressureLevel::Warn,
        BackpressureLevel::Throttle,
        BackpressureLevel::Critical,
        BackpressureLevel::Emergency,
        BackpressureLevel::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackpressureLevel::Normal => "normal",
            BackpressureLevel::Warn => "warn",
            BackpressureLevel::Throttle => "throttle",
            BackpressureLevel::Critical => "critical",
            BackpressureLevel::Emergency => "emergency",
            BackpressureLevel::Shutdown => "shutdown",
        }
    }

    /// The value of the `sync_backpressure_level` gauge, 0..=5.
    pub fn value(self) -> u8 {
        self as u8
    }

    fn below(self) -> BackpressureLevel {
        BackpressureLevel::ALL[(self as usize).saturating_sub(1)]
    }
}

impl std::fmt::Display for BackpressureLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where each level starts, in percent of the memory budget, and the hysteresis: a level is
/// entered at its threshold and left only once the bytes fall below its threshold minus
/// `hysteresis_percent`, so a load hovering at a threshold does not flap between levels
/// (each flap of the worker's level would pause or resume its partitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackpressureThresholds {
    pub warn_percent: u8,
    pub throttle_percent: u8,
    pub critical_percent: u8,
    pub emergency_percent: u8,
    pub shutdown_percent: u8,
    pub hysteresis_percent: u8,
}

impl Default for BackpressureThresholds {
    fn default() -> BackpressureThresholds {
        BackpressureThresholds {
            warn_percent: 50,
            throttle_percent: 70,
            critical_percent: 85,
            emergency_percent: 95,
            shutdown_percent: 100,
            hysteresis_percent: 10,
        }
    }
}

impl BackpressureThresholds {
    fn enter_percents(&self) -> [u8; 5] {
        [self.warn_percent, self.throttle_percent, self.critical_percent, self.emergency_percent, self.shutdown_percent]
    }

    /// Thresholds within 1..=100 and strictly increasing; the hysteresis at least 1 and
    /// below the warn threshold (Warn must be left before the bytes reach zero).
    pub fn validate(&self) -> Result<(), String> {
        let enter = self.enter_percents();
        if enter.iter().any(|percent| !(1..=100).contains(percent)) {
            return Err(format!("backpressure thresholds must be within 1..=100 percent, got {enter:?}"));
        }
        if enter.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(format!("backpressure thresholds must increase from warn to shutdown, got {enter:?}"));
        }
        if self.hysteresis_percent == 0 || self.hysteresis_percent >= self.warn_percent {
            return Err(format!(
                "backpressure hysteresis must be within 1..{} percent (below warn), got {}",
                self.warn_percent, self.hysteresis_percent
            ));
        }
        Ok(())
    }
}

/// The slowest a throttled library submit gets (just below Critical) and the least delay
/// (just at Throttle): enough to let the flush catch up, short enough to stay a slowdown.
pub const THROTTLE_MIN_DELAY: Duration = Duration::from_millis(2);
pub const THROTTLE_MAX_DELAY: Duration = Duration::from_millis(50);

/// The thresholds in bytes of one budget. Pure: the engine feeds it the bytes it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelBounds {
    pub budget_bytes: u64,
    /// Entry threshold of each level, indexed by `BackpressureLevel as usize` (Normal: 0).
    enter: [u64; 6],
    hysteresis_bytes: u64,
}

impl LevelBounds {
    pub fn new(budget_bytes: u64, thresholds: &BackpressureThresholds) -> LevelBounds {
        let of_budget = |percent: u8| (budget_bytes as u128 * percent as u128 / 100) as u64;
        let mut enter = [0; 6];
        for (slot, percent) in enter[1..].iter_mut().zip(thresholds.enter_percents()) {
            *slot = of_budget(percent);
        }
        LevelBounds { budget_bytes, enter, hysteresis_bytes: of_budget(thresholds.hysteresis_percent) }
    }

    pub fn enter_bytes(&self, level: BackpressureLevel) -> u64 {
        self.enter[level as usize]
    }

    /// Below this the level is left (Normal is never left).
    pub fn leave_bytes(&self, level: BackpressureLevel) -> u64 {
        match level {
            BackpressureLevel::Normal => 0,
            _ => self.enter_bytes(level).saturating_sub(self.hysteresis_bytes),
        }
    }

    /// The level after `current`, holding `bytes`: up at once to the highest threshold
    /// reached; down one level at a time, only while below the exit threshold of the level
    /// being left.
    pub fn next(&self, current: BackpressureLevel, bytes: u64) -> BackpressureLevel {
        let reached = BackpressureLevel::ALL
            .into_iter()
            .rev()
            .find(|level| bytes >= self.enter_bytes(*level))
            .unwrap_or(BackpressureLevel::Normal);
        let mut level = current;
        while level > reached && bytes < self.leave_bytes(level) {
            level = level.below();
        }
        level.max(reached)
    }

    /// How long a throttled submit sleeps: from `THROTTLE_MIN_DELAY` at the Throttle
    /// threshold to `THROTTLE_MAX_DELAY` at the Critical one, in proportion to the bytes.
    pub fn throttle_delay(&self, bytes: u64) -> Duration {
        let (from, to) = (self.enter_bytes(BackpressureLevel::Throttle), self.enter_bytes(BackpressureLevel::Critical));
        let fraction = bytes.saturating_sub(from) as f64 / to.saturating_sub(from).max(1) as f64;
        THROTTLE_MIN_DELAY + (THROTTLE_MAX_DELAY - THROTTLE_MIN_DELAY).mul_f64(fraction.clamp(0.0, 1.0))
    }

    /// What L1 relief aims for: the bytes at which Warn is left.
    pub fn relief_target_bytes(&self) -> u64 {
        self.leave_bytes(BackpressureLevel::Warn)
    }
}

/// Fractions of the budget, in percent: the prefetch is sized from the headroom above
/// `HIGH_WATERMARK_PERCENT`.
pub const HIGH_WATERMARK_PERCENT: u64 = 75;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pressure {
    pub budget_bytes: u64,
    pub high_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PressureDecision {
    Pause,
    Resume,
    Stay,
}

/// What the worker does with its partitions at `level`: pause from Throttle up, resume at
/// Warn or below. The level's own hysteresis keeps this from flapping.
pub fn pause_decision(level: BackpressureLevel, paused: bool) -> PressureDecision {
    if !paused && level >= BackpressureLevel::Throttle {
        PressureDecision::Pause
    } else if paused && level <= BackpressureLevel::Warn {
        PressureDecision::Resume
    } else {
        PressureDecision::Stay
    }
}

impl Pressure {
    pub fn from_budget(budget_bytes: u64) -> Pressure {
        Pressure { budget_bytes, high_bytes: budget_bytes / 100 * HIGH_WATERMARK_PERCENT }
    }

    /// librdkafka's prefetch queue per partition (`queued.max.messages.kbytes`), taken from
    /// the budget headroom above the high watermark and shared by up to `partitions_hint`
    /// partitions, never below 64 KiB.
    pub fn prefetch_kbytes_per_partition(&self, partitions_hint: u64) -> u64 {
        (self.headroom_bytes() / partitions_hint.max(1) / 1024).max(64)
    }

    /// librdkafka's `fetch.max.bytes`: a quarter of the headroom above the high watermark,
    /// between 1 MiB and 50 MiB. librdkafka keeps a fetch response's whole buffer until the
    /// last of its messages is polled, and fetches the next one while the current one drains,
    /// so two responses are held at once: with half the headroom per response, a 1,000,000
    /// item run held 67 MB of them (heaptrack) beside a 128 MiB budget, outside its count.
    pub fn fetch_max_bytes(&self) -> u64 {
        (self.headroom_bytes() / 4).clamp(1 << 20, 50 << 20)
    }

    /// The budget above the high watermark: what librdkafka's own buffers are sized from.
    fn headroom_bytes(&self) -> u64 {
        self.budget_bytes.saturating_sub(self.high_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use BackpressureLevel::*;

    fn bounds() -> LevelBounds {
        LevelBounds::new(1000, &BackpressureThresholds::default())
    }

    #[test]
    fn levels_are_entered_at_their_thresholds_and_left_below_them_minus_the_hysteresis() {
        let bounds = bounds();
        assert_eq!(bounds.next(Normal, 499), Normal);
        assert_eq!(bounds.next(Normal, 500), Warn);
        assert_eq!(bounds.next(Normal, 850), Critical, "up at once to the highest threshold reached");
        assert_eq!(bounds.next(Normal, 1000), Shutdown);
        assert_eq!(bounds.next(Critical, 760), Critical, "inside the band: stays");
        assert_eq!(bounds.next(Critical, 749), Throttle);
        assert_eq!(bounds.next(Critical, 100), Normal, "down through every level left behind");
        assert_eq!(bounds.next(Warn, 401), Warn);
        assert_eq!(bounds.next(Warn, 399), Normal);
    }

    #[test]
    fn the_worker_pauses_from_throttle_up_and_resumes_at_warn_or_below() {
        assert_eq!(pause_decision(Warn, false), PressureDecision::Stay);
        assert_eq!(pause_decision(Throttle, false), PressureDecision::Pause);
        assert_eq!(pause_decision(Throttle, true), PressureDecision::Stay);
        assert_eq!(pause_decision(Warn, true), PressureDecision::Resume);
        assert_eq!(pause_decision(Shutdown, true), PressureDecision::Stay);
    }

    #[test]
    fn the_throttle_delay_grows_with_the_pressure() {
        let bounds = bounds();
        assert_eq!(bounds.throttle_delay(700), THROTTLE_MIN_DELAY);
        assert!(bounds.throttle_delay(780) > bounds.throttle_delay(720));
        assert_eq!(bounds.throttle_delay(850), THROTTLE_MAX_DELAY);
        assert_eq!(bounds.throttle_delay(5000), THROTTLE_MAX_DELAY);
    }

    #[test]
    fn thresholds_must_increase_within_one_to_a_hundred() {
        assert_eq!(BackpressureThresholds::default().validate(), Ok(()));
        let valid = BackpressureThresholds::default();
        assert!(BackpressureThresholds { throttle_percent: 50, ..valid }.validate().is_err());
        assert!(BackpressureThresholds { shutdown_percent: 101, ..valid }.validate().is_err());
        assert!(BackpressureThresholds { warn_percent: 0, ..valid }.validate().is_err());
        assert!(BackpressureThresholds { hysteresis_percent: 0, ..valid }.validate().is_err());
        assert!(BackpressureThresholds { hysteresis_percent: 50, ..valid }.validate().is_err());
    }

    #[test]
    fn the_prefetch_comes_from_the_headroom_above_the_high_watermark() {
        let pressure = Pressure::from_budget(64 << 20);
        assert_eq!(pressure.prefetch_kbytes_per_partition(16), (16 << 20) / 16 / 1024);
        assert_eq!(Pressure::from_budget(1 << 20).prefetch_kbytes_per_partition(16), 64);
    }

    #[test]
    fn two_fetch_responses_fit_in_half_the_headroom() {
        let pressure = Pressure::from_budget(128 << 20);
        let quarter = (8 << 20)..(8 << 20) + 1024; // 75 % of the budget is rounded down to whole percents
        assert!(quarter.contains(&pressure.fetch_max_bytes()), "a quarter of the 32 MiB headroom");
        assert_eq!(Pressure::from_budget(2 << 20).fetch_max_bytes(), 1 << 20, "never below 1 MiB");
        assert_eq!(Pressure::from_budget(16 << 30).fetch_max_bytes(), 50 << 20, "never above 50 MiB");
    }

    proptest! {
        // Any sequence of byte counts: a level is only entered at its threshold, only left
        // below its exit threshold, and never flaps inside the band between the two.
        #[test]
        fn levels_follow_hysteresis(samples in proptest::collection::vec(0u64..1200, 1..200)) {
            let bounds = bounds();
            let mut level = Normal;
            for bytes in samples {
                let next = bounds.next(level, bytes);
                if next > level {
                    prop_assert!(bytes >= bounds.enter_bytes(next));
                    prop_assert!(next == Shutdown || bytes < bounds.enter_bytes(BackpressureLevel::ALL[next as usize + 1]));
                }
                if next < level {
                    // Every level left behind was below its exit threshold.
                    for left in BackpressureLevel::ALL.into_iter().filter(|l| *l > next && *l <= level) {
                        prop_assert!(bytes < bounds.leave_bytes(left), "{left:?} left at {bytes}");
                    }
                }
                if next == level && level != Normal {
                    prop_assert!(bytes >= bounds.leave_bytes(level));
                }
                // Whatever the history, the level is one the bytes justify.
                prop_assert!(next == Normal || bytes >= bounds.leave_bytes(next));
                level = next;
            }
        }

        // The worker's pause state, driven by the levels, changes only at Throttle+ (pause)
        // and Warn- (resume): it cannot flap while the bytes stay inside Throttle's band.
        #[test]
        fn pauses_follow_the_levels(samples in proptest::collection::vec(0u64..1200, 1..200)) {
            let bounds = bounds();
            let (mut level, mut paused) = (Normal, false);
            for bytes in samples {
                level = bounds.next(level, bytes);
                match pause_decision(level, paused) {
                    PressureDecision::Pause => { prop_assert!(bytes >= 700); paused = true; }
                    PressureDecision::Resume => { prop_assert!(bytes < 600); paused = false; }
                    PressureDecision::Stay => prop_assert!(paused == (level >= Throttle)),
                }
            }
        }
    }
}
