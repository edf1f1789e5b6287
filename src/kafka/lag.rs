//! Consumer lag of the partitions this worker owns, in records and in seconds: the
//! autoscaling signal.
//!
//! - Records: librdkafka's statistics (high watermark − committed offset), every 5 s.
//! - Seconds: now − the timestamp of the oldest record not yet committed. The worker knows
//!   the timestamp of every record it consumed and has not settled; when it holds none but
//!   the partition still has records lag (paused, or fetching), the next unread record is
//!   younger than the last one consumed, so now − that one's timestamp is an upper bound.
//!   A partition with records lag 0 has 0 s. Before a partition's first record no age is
//!   known and no seconds series is exported for it.
//!
//! These are rendered straight from the owned set on every scrape instead of through
//! `metrics` gauges, which live for ever: a partition this worker no longer owns has no
//! series at all (a stale gauge would keep an autoscaler scaling on another pod's lag).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::kafka::offsets::TopicPartition;
use crate::metrics as m;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PartitionLag {
    /// High watermark − committed offset, from the latest statistics.
    records: Option<i64>,
    /// Timestamp (ms since the epoch) of the oldest record consumed and not settled.
    oldest_unsettled_ms: Option<i64>,
    /// Timestamp of the last record consumed.
    last_consumed_ms: Option<i64>,
}

impl PartitionLag {
    fn seconds(&self, now_ms: i64) -> Option<f64> {
        if self.records == Some(0) {
            return Some(0.0);
        }
        let timestamp = self.oldest_unsettled_ms.or(self.last_consumed_ms)?;
        Some((now_ms - timestamp).max(0) as f64 / 1000.0)
    }
}

/// The owned partitions and their lag; shared by the consumer thread (ownership, records
/// lag), the worker (timestamps) and the metrics endpoint (rendering).
#[derive(Debug, Default)]
pub struct LagBoard {
    partitions: Mutex<BTreeMap<TopicPartition, PartitionLag>>,
}

/// What the worker knows of one partition's consumed records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumedTimes {
    pub oldest_unsettled_ms: Option<i64>,
    pub last_consumed_ms: Option<i64>,
}

impl LagBoard {
    /// These partitions were assigned to this worker (the others it owns stay).
    pub fn own(&self, partitions: &[TopicPartition]) {
        let mut owned = self.lock();
        for tp in partitions {
            owned.entry(tp.clone()).or_default();
        }
    }

    /// These partitions left this worker: their series disappear.
    pub fn disown(&self, partitions: &[TopicPartition]) {
        let mut owned = self.lock();
        for tp in partitions {
            owned.remove(tp);
        }
    }

    /// Records lag from librdkafka's statistics (negative: unknown, e.g. nothing committed
    /// yet); partitions not owned are ignored.
    pub fn set_records(&self, tp: &TopicPartition, records: i64) {
        if let Some(lag) = self.lock().get_mut(tp) {
            lag.records = (records >= 0).then_some(records);
        }
    }

    /// The worker's view of a partition's consumed records; partitions not owned are ignored.
    pub fn set_consumed(&self, tp: &TopicPartition, times: ConsumedTimes) {
        if let Some(lag) = self.lock().get_mut(tp) {
            lag.oldest_unsettled_ms = times.oldest_unsettled_ms;
            if times.last_consumed_ms.is_some() {
                lag.last_consumed_ms = times.last_consumed_ms;
            }
        }
    }

    /// The owned partitions' lag in the Prometheus text format.
    pub fn render(&self, now_ms: i64) -> String {
        let owned = self.lock();
        let mut text = String::new();
        let _ = writeln!(text, "# HELP {} High watermark minus committed offset, per owned partition", m::CONSUMER_LAG);
        let _ = writeln!(text, "# TYPE {} gauge", m::CONSUMER_LAG);
        for ((topic, partition), lag) in owned.iter() {
            if let Some(records) = lag.records {
                let _ = writeln!(text, "{}{{{}}} {records}", m::CONSUMER_LAG, labels(topic, *partition));
            }
        }
        let _ = writeln!(
            text,
            "# HELP {} Age of the oldest record not yet committed, per owned partition (0 when caught up)",
            m::CONSUMER_LAG_SECONDS
        );
        let _ = writeln!(text, "# TYPE {} gauge", m::CONSUMER_LAG_SECONDS);
        for ((topic, partition), lag) in owned.iter() {
            if let Some(seconds) = lag.seconds(now_ms) {
                let _ = writeln!(text, "{}{{{}}} {seconds:.3}", m::CONSUMER_LAG_SECONDS, labels(topic, *partition));
            }
        }
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TopicPartition, PartitionLag>> {
        // A panic while holding the lock leaves plain numbers behind: still usable.
        self.partitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Topic names are broker-validated ([a-zA-Z0-9._-]), but escape as the format asks anyway.
fn labels(topic: &str, partition: i32) -> String {
    let topic = topic.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("topic=\"{topic}\",partition=\"{partition}\"")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        (Arc::from("items"), partition)
    }

    #[test]
    fn a_partition_no_longer_owned_has_no_series() {
        let board = LagBoard::default();
        board.own(&[tp(0), tp(1)]);
        board.set_records(&tp(0), 10);
        board.set_records(&tp(1), 20);
        board.disown(&[tp(1)]);
        board.set_records(&tp(1), 30); // late statistics for a partition that moved on
        let text = board.render(0);
        assert!(text.contains("sync_consumer_lag_records{topic=\"items\",partition=\"0\"} 10"), "{text}");
        assert!(!text.contains("partition=\"1\""), "{text}");
    }

    #[test]
    fn seconds_come_from_the_oldest_unsettled_record_then_the_last_consumed() {
        let board = LagBoard::default();
        board.own(&[tp(0)]);
        board.set_records(&tp(0), 5);
        assert!(!board.render(10_000).contains("sync_consumer_lag_seconds{"), "no age known yet");
        board.set_consumed(&tp(0), ConsumedTimes { oldest_unsettled_ms: Some(4_000), last_consumed_ms: Some(7_000) });
        assert!(board.render(10_000).contains("partition=\"0\"} 6.000"));
        // Everything consumed settled, records still behind: bounded by the last consumed.
        board.set_consumed(&tp(0), ConsumedTimes { oldest_unsettled_ms: None, last_consumed_ms: None });
        assert!(board.render(10_000).contains("partition=\"0\"} 3.000"));
        board.set_records(&tp(0), 0);
        assert!(board.render(10_000).contains("sync_consumer_lag_seconds{topic=\"items\",partition=\"0\"} 0.000"));
    }

    #[test]
    fn an_unknown_records_lag_is_not_reported_as_caught_up() {
        let board = LagBoard::default();
        board.own(&[tp(3)]);
        board.set_records(&tp(3), -1); // librdkafka: nothing committed yet
        board.set_consumed(&tp(3), ConsumedTimes { oldest_unsettled_ms: Some(1_000), last_consumed_ms: Some(1_000) });
        let text = board.render(3_000);
        assert!(!text.contains("sync_consumer_lag_records{"), "{text}");
        assert!(text.contains("sync_consumer_lag_seconds{topic=\"items\",partition=\"3\"} 2.000"), "{text}");
    }
}
