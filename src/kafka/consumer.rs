//! The Kafka consumer thread: the only place that polls librdkafka.
//!
//! rdkafka runs on one dedicated thread; the async worker talks to it over channels (events
//! out, commands in). The thread:
//! - converts each message to our `RawRecord` at this edge and adds its size to the shared
//!   bytes-in-flight counter before handing it over;
//! - pauses every assigned partition from the engine's Throttle backpressure level up and
//!   resumes at Warn or below, and keeps polling while paused (or the group would evict it);
//! - on revoke, blocks the rebalance (rebalance callbacks run synchronously on this thread)
//!   until the worker has settled what it can of those partitions within the deadline, then
//!   commits their settled watermark synchronously, and only then returns (invariant 5).
//!   Lost partitions commit nothing;
//! - counts assignment generations (one per assign) and tags every record and rebalance
//!   event with the generation it belongs to, so the worker can tell a late revoke of an old
//!   assignment from the partitions' current one. A partition keeps the generation it was
//!   assigned in for as long as it stays: with cooperative rebalancing an assign adds
//!   partitions without revoking the others, whose unsettled records must stay tracked;
//! - after every assign, applies the current pause decision to the whole assignment:
//!   librdkafka clears only its own pause flag when partitions are unassigned, not the
//!   application's, so partitions paused before a rebalance come back paused while the thread
//!   may have "resumed" the empty assignment in between; they would never fetch again;
//! - commits the offsets the worker sends and reports each successful commit back (an
//!   offset counts as committed only then); at shutdown it stops fetching, keeps serving
//!   commands (the final commit) and only leaves the group on `Stop`, dropping the consumer
//!   here, off the async runtime (dropping blocks). A static member (`group.instance.id`)
//!   closes without leaving: its partitions wait for it until the session timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc;

use crate::config::KafkaConfig;
use crate::decode::RawRecord;
use crate::engine::MemoryPressure;
use crate::kafka::offsets::{Generation, TopicPartition};
use crate::kafka::worker::WorkerStats;
use crate::metrics as m;
use crate::pressure::{pause_decision, BackpressureLevel, PressureDecision};

const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// What the consumer thread tells the worker, in consumption order.
pub enum ConsumerEvent {
    Record {
        record: RawRecord,
        generation: Generation,
    },
    Assigned {
        partitions: Vec<TopicPartition>,
        generation: Generation,
    },
    /// The broker confirmed these offsets as committed.
    Committed(Vec<(TopicPartition, i64)>),
}

/// Partitions going away. These travel on their own channel so they overtake the records
/// queued before them: the worker drops those records (they stay uncommitted) instead of
/// working through them while the rebalance waits.
pub enum RebalanceEvent {
    /// Settle these partitions and reply with their committable offsets before the deadline.
    Revoked {
        partitions: Vec<TopicPartition>,
        generation: Generation,
        reply: std_mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
    },
    /// Partitions taken away without a chance to commit: forget them.
    Lost { partitions: Vec<TopicPartition>, generation: Generation },
}

impl RebalanceEvent {
    /// The partitions going away and the assignment generation they are leaving.
    pub fn partitions(&self) -> (&[TopicPartition], Generation) {
        match self {
            RebalanceEvent::Revoked { partitions, generation, .. }
            | RebalanceEvent::Lost { partitions, generation } => (partitions, *generation),
        }
    }
}

/// What the worker tells the consumer thread.
pub enum ConsumerCommand {
    Commit {
        offsets: Vec<(TopicPartition, i64)>,
        sync: bool,
    },
    /// Pause everything and drop further records (they stay uncommitted): shutdown begins.
    /// Commands are still served after it, so the final commit still reaches the broker.
    StopFetching,
    /// Leave the group and end the thread.
    Stop,
}

struct WorkerContext {
    events_tx: mpsc::UnboundedSender<ConsumerEvent>,
    rebalance_tx: mpsc::UnboundedSender<RebalanceEvent>,
    revoke_deadline: Duration,
    /// Set at shutdown: the worker has committed and no longer answers revokes.
    closing: AtomicBool,
    /// Set after an assignment: the pause state must be re-applied to new partitions.
    assigned: AtomicBool,
    generations: Mutex<Generations>,
    stats: Arc<WorkerStats>,
}

/// Assignment generations: one counter, incremented on every assign, and the generation each
/// owned partition was assigned in.
#[derive(Debug, Default)]
struct Generations {
    current: Generation,
    partitions: HashMap<TopicPartition, Generation>,
}

impl Generations {
    /// An assign: `assignment` is the whole assignment after it. Partitions already owned keep
    /// their generation; new ones get a new generation, above any revoke sent before.
    fn assigned(&mut self, assignment: &[TopicPartition]) -> Generation {
        self.current += 1;
        let current = self.current;
        self.partitions.retain(|tp, _| assignment.contains(tp));
        for tp in assignment {
            self.partitions.entry(tp.clone()).or_insert(current);
        }
        current
    }

    /// A revoke or loss: returns the generation to tag it with. Every partition's state is
    /// of this generation or older, and any later assign is newer.
    fn revoked(&mut self, partitions: &[TopicPartition]) -> Generation {
        for tp in partitions {
            self.partitions.remove(tp);
        }
        self.current
    }

    fn of(&self, topic: &Arc<str>, partition: i32) -> Generation {
        // Not owned (a record polled in a rebalance's gap): the current generation, whose
        // state a later revoke still covers.
        self.partitions.get(&(topic.clone(), partition)).copied().unwrap_or(self.current)
    }
}

impl WorkerContext {
    fn generations(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for WorkerContext {
    /// Records lag per partition; the lag board ignores partitions this worker does not own.
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            let topic: Arc<str> = Arc::from(topic.as_str());
            for (partition, partition_stats) in &stats.partitions {
                if *partition >= 0 {
                    self.stats.lag.set_records(&(topic.clone(), *partition), partition_stats.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// Offsets count as committed only once the broker confirms them (async commits).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => report_committed(&self.events_tx, offsets),
            Err(error) => {
                metrics::counter!(m::COMMIT_ERRORS).increment(1);
                tracing::warn!(%error, "offset commit failed, it is retried with the next commit");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let partitions = partitions_of(list);
        if partitions.is_empty() {
            return;
        }
        self.stats.lag.disown(&partitions);
        let generation = self.generations().revoked(&partitions);
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        if consumer.assignment_lost() {
            metrics::counter!(m::REBALANCES, "kind" => "lost").increment(1);
            tracing::warn!(partitions = partitions.len(), "partitions lost, committing nothing for them");
            let _ = self.rebalance_tx.send(RebalanceEvent::Lost { partitions, generation });
            return;
        }
        metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
        let (reply_tx, reply_rx) = std_mpsc::sync_channel(1);
        if self.rebalance_tx.send(RebalanceEvent::Revoked { partitions, generation, reply: reply_tx }).is_err() {
            return;
        }
        // The worker answers within its deadline; the margin covers its final bookkeeping.
        match reply_rx.recv_timeout(self.revoke_deadline + Duration::from_secs(1)) {
            Ok(offsets) if !offsets.is_empty() => {
                if let Err(error) = commit(consumer, &offsets, CommitMode::Sync) {
                    tracing::warn!(%error, "commit of revoked partitions failed");
                }
            }
            Ok(_) => {}
            Err(_) => tracing::warn!("worker did not answer the revoke in time, committing nothing"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(_) => {
                let assigned = consumer.assignment().map(|list| partitions_of(&list)).unwrap_or_default();
                metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
                tracing::info!(partitions = assigned.len(), "partitions assigned");
                // Records of newly assigned partitions polled from here on belong to the new
                // generation.
                let generation = self.generations().assigned(&assigned);
                self.stats.lag.own(&assigned);
                self.assigned.store(true, Ordering::SeqCst);
                let _ = self.events_tx.send(ConsumerEvent::Assigned { partitions: assigned, generation });
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

pub struct ConsumerHandle {
    pub events_rx: mpsc::UnboundedReceiver<ConsumerEvent>,
    pub rebalance_rx: mpsc::UnboundedReceiver<RebalanceEvent>,
    pub commands_tx: std_mpsc::Sender<ConsumerCommand>,
    pub thread: JoinHandle<()>,
}

/// Creates the consumer, subscribes, and starts its thread.
pub fn start(kafka: &KafkaConfig, pressure: MemoryPressure, stats: Arc<WorkerStats>) -> KafkaResult<ConsumerHandle> {
    let bytes_in_flight = pressure.kafka_bytes();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (rebalance_tx, rebalance_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = std_mpsc::channel();
    let context = WorkerContext {
        events_tx: events_tx.clone(),
        rebalance_tx,
        revoke_deadline: kafka.revoke_deadline,
        closing: AtomicBool::new(false),
        assigned: AtomicBool::new(false),
        generations: Mutex::new(Generations::default()),
        stats: stats.clone(),
    };
    let consumer: BaseConsumer<WorkerContext> = super::client::consumer_config(kafka).create_with_context(context)?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let thread = std::thread::Builder::new()
        .name("kafka-consumer".into())
        .spawn(move || {
            PollLoop {
                consumer,
                events_tx,
                commands_rx,
                bytes_in_flight,
                stats,
                pressure,
                paused: false,
                fetching: true,
                topics: Vec::new(),
            }
            .run()
        })
        .map_err(|error| rdkafka::error::KafkaError::Subscription(error.to_string()))?;
    Ok(ConsumerHandle { events_rx, rebalance_rx, commands_tx, thread })
}

struct PollLoop {
    consumer: BaseConsumer<WorkerContext>,
    events_tx: mpsc::UnboundedSender<ConsumerEvent>,
    commands_rx: std_mpsc::Receiver<ConsumerCommand>,
    /// The worker's share of the engine's memory pressure (`pressure.kafka_bytes()`).
    bytes_in_flight: Arc<AtomicU64>,
    stats: Arc<WorkerStats>,
    /// The engine's pressure: its level decides pause and resume.
    pressure: MemoryPressure,
    paused: bool,
    fetching: bool,
    topics: Vec<Arc<str>>,
}

impl PollLoop {
    fn run(mut self) {
        loop {
            if !self.handle_commands() {
                break;
            }
            self.apply_pressure();
            match self.consumer.poll(POLL_TIMEOUT) {
                Some(Ok(message)) if self.fetching => {
                    let topic = intern(&mut self.topics, message.topic());
                    let record = to_raw_record(&message, topic);
                    drop(message); // it borrows the consumer
                    self.hand_over(record);
                }
                Some(Ok(_)) => {} // shutting down: left uncommitted, redelivered later
                Some(Err(error)) => tracing::warn!(%error, "kafka consumer error"),
                None => {}
            }
        }
        self.consumer.context().closing.store(true, Ordering::SeqCst);
        self.consumer.unsubscribe();
        tracing::info!("consumer stopped, leaving the group");
        // Dropping the consumer here (not on the runtime) leaves the group; it may block.
    }

    /// Counts the record's bytes and sends it to the worker, tagged with its generation.
    fn hand_over(&self, record: RawRecord) {
        let size = record.size_bytes() as u64;
        let in_flight = self.bytes_in_flight.fetch_add(size, Ordering::SeqCst);
        self.stats.peak_bytes_in_flight.fetch_max(in_flight + size, Ordering::Relaxed);
        metrics::counter!(m::RECORDS_CONSUMED, "topic" => record.topic.to_string()).increment(1);
        let generation = self.consumer.context().generations().of(&record.topic, record.partition);
        if self.events_tx.send(ConsumerEvent::Record { record, generation }).is_err() {
            // The worker stopped listening (shutdown): drop the record, it stays uncommitted.
            // The thread goes on serving commands: the final commit and `Stop` still come.
            self.bytes_in_flight.fetch_sub(size, Ordering::SeqCst);
        }
    }

    /// Returns false when the thread must stop.
    fn handle_commands(&mut self) -> bool {
        loop {
            let command = match self.commands_rx.try_recv() {
                Ok(command) => command,
                Err(std_mpsc::TryRecvError::Empty) => return true,
                // The worker is gone without saying `Stop`: leave the group all the same.
                Err(std_mpsc::TryRecvError::Disconnected) => return false,
            };
            match command {
                ConsumerCommand::Commit { offsets, sync } => self.commit(offsets, sync),
                ConsumerCommand::StopFetching => {
                    // Revokes are still sent to the worker: it answers them while it drains.
                    self.fetching = false;
                    self.set_paused(true);
                }
                ConsumerCommand::Stop => return false,
            }
        }
    }

    /// Async commits are confirmed by `commit_callback`; a sync one is confirmed here.
    fn commit(&mut self, offsets: Vec<(TopicPartition, i64)>, sync: bool) {
        let mode = if sync { CommitMode::Sync } else { CommitMode::Async };
        match commit(&self.consumer, &offsets, mode) {
            Ok(()) if sync => {
                let _ = self.consumer.context().events_tx.send(ConsumerEvent::Committed(offsets));
            }
            Ok(()) => {}
            Err(error) => {
                metrics::counter!(m::COMMIT_ERRORS).increment(1);
                tracing::warn!(%error, "offset commit failed, it is retried with the next commit");
            }
        }
    }

    /// Pauses from Throttle up and resumes at Warn or below: the engine's level counts the
    /// records in flight, the engine's unsettled items and L1, against the one budget.
    fn apply_pressure(&mut self) {
        let in_flight = self.bytes_in_flight.load(Ordering::SeqCst);
        metrics::gauge!(m::BYTES_IN_FLIGHT).set(in_flight as f64);
        let level = self.pressure.refresh();
        if self.consumer.context().assigned.swap(false, Ordering::SeqCst) {
            // Reassigned partitions may come back with the application's pause flag still set
            // (librdkafka keeps it): apply the current decision to all of them, explicitly.
            let pause = !self.fetching || pause_wanted(level, self.paused);
            tracing::debug!(in_flight, pause, %level, "new assignment, applying the pause decision to all of it");
            if !self.set_paused(pause) {
                self.consumer.context().assigned.store(true, Ordering::SeqCst); // try again next round
            }
            return;
        }
        if !self.fetching {
            return;
        }
        match pause_decision(level, self.paused) {
            PressureDecision::Pause => {
                metrics::counter!(m::PAUSES).increment(1);
                self.stats.pauses.fetch_add(1, Ordering::Relaxed);
                tracing::info!(in_flight, %level, "memory pressure, pausing partitions");
                self.set_paused(true);
            }
            PressureDecision::Resume => {
                tracing::info!(in_flight, %level, "memory pressure eased, resuming partitions");
                self.set_paused(false);
            }
            PressureDecision::Stay => {}
        }
    }

    /// Pauses or resumes the whole assignment; returns whether it worked.
    fn set_paused(&mut self, paused: bool) -> bool {
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(error) => {
                tracing::warn!(%error, paused, "cannot read the assignment to pause/resume it");
                return false;
            }
        };
        let result = if paused { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        match result {
            Ok(()) => {
                self.paused = paused;
                let count = if paused { assignment.count() } else { 0 };
                metrics::gauge!(m::PAUSED_PARTITIONS).set(count as f64);
                true
            }
            Err(error) => {
                tracing::warn!(%error, paused, "pause/resume failed");
                false
            }
        }
    }
}

/// Whether the partitions should be paused now, given the state before the rebalance.
fn pause_wanted(level: BackpressureLevel, paused: bool) -> bool {
    match pause_decision(level, paused) {
        PressureDecision::Pause => true,
        PressureDecision::Resume => false,
        PressureDecision::Stay => paused,
    }
}

fn commit(
    consumer: &BaseConsumer<WorkerContext>,
    offsets: &[(TopicPartition, i64)],
    mode: CommitMode,
) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.commit(&list, mode)?;
    metrics::counter!(m::OFFSETS_COMMITTED).increment(1);
    Ok(())
}

/// Sends the offsets of a successful commit to the worker (partitions with an error are left
/// out: they are offered again with the next commit).
fn report_committed(events_tx: &mpsc::UnboundedSender<ConsumerEvent>, list: &TopicPartitionList) {
    let committed: Vec<(TopicPartition, i64)> = list
        .elements()
        .iter()
        .filter(|element| element.error().is_ok())
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some(((Arc::from(element.topic()), element.partition()), offset)),
            _ => None,
        })
        .collect();
    if !committed.is_empty() {
        let _ = events_tx.send(ConsumerEvent::Committed(committed));
    }
}

/// One shared `Arc<str>` per topic name instead of an allocation per record.
fn intern(topics: &mut Vec<Arc<str>>, topic: &str) -> Arc<str> {
    if let Some(known) = topics.iter().find(|known| known.as_ref() == topic) {
        return known.clone();
    }
    let topic: Arc<str> = Arc::from(topic);
    topics.push(topic.clone());
    topic
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|element| (Arc::from(element.topic()), element.partition())).collect()
}

fn to_raw_record(message: &BorrowedMessage<'_>, topic: Arc<str>) -> RawRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers.iter().map(|header| (header.key.to_owned(), header.value.map(Bytes::copy_from_slice))).collect()
        })
        .unwrap_or_default();
    RawRecord {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(Bytes::copy_from_slice),
        value: message.payload().map(Bytes::copy_from_slice),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        (Arc::from("items"), partition)
    }

    // Cooperative rebalancing: an assign adds partitions without revoking the others. A kept
    // partition must keep its generation, or the worker would drop its unsettled records'
    // state at the next record and commit past them.
    #[test]
    fn a_partition_kept_across_an_incremental_assign_keeps_its_generation() {
        let mut generations = Generations::default();
        let first = generations.assigned(&[tp(0), tp(1)]);
        let second = generations.assigned(&[tp(0), tp(1), tp(2)]);
        assert!(second > first);
        assert_eq!(generations.of(&tp(0).0, 0), first);
        assert_eq!(generations.of(&tp(1).0, 1), first);
        assert_eq!(generations.of(&tp(2).0, 2), second);
    }

    // A late revoke must only touch state of its own generation or older: a partition that
    // comes back after it gets a newer generation.
    #[test]
    fn a_partition_assigned_back_after_a_revoke_gets_a_newer_generation() {
        let mut generations = Generations::default();
        generations.assigned(&[tp(0), tp(1)]);
        let revoke = generations.revoked(&[tp(1)]);
        assert!(generations.of(&tp(0).0, 0) <= revoke);
        let back = generations.assigned(&[tp(0), tp(1)]);
        assert!(back > revoke);
        assert_eq!(generations.of(&tp(1).0, 1), back);
        assert!(generations.of(&tp(0).0, 0) < back, "partition 0 stayed");
    }

    // Eager rebalancing revokes everything before every assign: every partition starts over.
    #[test]
    fn an_eager_rebalance_gives_every_partition_the_new_generation() {
        let mut generations = Generations::default();
        generations.assigned(&[tp(0), tp(1)]);
        generations.revoked(&[tp(0), tp(1)]);
        let next = generations.assigned(&[tp(0)]);
        assert_eq!(generations.of(&tp(0).0, 0), next);
        assert_eq!(generations.partitions.len(), 1);
    }
}
