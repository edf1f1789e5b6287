//! The Kafka consumer thread: the only place that polls librdkafka.
//!
//! rdkafka runs on one dedicated thread; the async worker talks to it over channels (events
//! out, commands in). The thread:
//! - converts each message to our `RawRecord` at this edge and adds its size to the shared
//!   bytes-in-flight counter before handing it over;
//! - pauses every assigned partition above the memory high watermark and resumes below the
//!   low one, and keeps polling while paused (or the group would evict it);
//! - on revoke, blocks the rebalance (rebalance callbacks run synchronously on this thread)
//!   until the worker has settled what it can of those partitions within the deadline, then
//!   commits their settled watermark synchronously, and only then returns (invariant 5).
//!   Lost partitions commit nothing;
//! - counts assignment generations (one per assign) and tags every record and rebalance
//!   event with the generation it belongs to, so the worker can tell a late revoke of an old
//!   assignment from the partitions' current one;
//! - after every assign, applies the current pause decision to the whole assignment:
//!   librdkafka clears only its own pause flag when partitions are unassigned, not the
//!   application's, so partitions paused before a rebalance come back paused while the thread
//!   may have "resumed" the empty assignment in between; they would never fetch again;
//! - commits the offsets the worker sends and reports each successful commit back (an
//!   offset counts as committed only then); at shutdown it stops fetching, keeps serving
//!   commands (the final commit) and only leaves the group on `Stop`, dropping the consumer
//!   here, off the async runtime (dropping blocks).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
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
use crate::kafka::offsets::{Generation, TopicPartition};
use crate::kafka::worker::WorkerStats;
use crate::metrics as m;
use crate::pressure::{Pressure, PressureDecision};

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
    /// The current assignment generation, incremented on every assign.
    generation: AtomicU64,
}

impl ClientContext for WorkerContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                // Tansu can report a high watermark that is too low: lag is clamped at zero.
                if *partition >= 0 && partition_stats.consumer_lag >= 0 {
                    metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(partition_stats.consumer_lag as f64);
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
        if self.closing.load(Ordering::SeqCst) || partitions.is_empty() {
            return;
        }
        let generation = self.generation.load(Ordering::SeqCst);
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
                // Records polled from here on belong to the new generation.
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
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
pub fn start(
    kafka: &KafkaConfig,
    bytes_in_flight: Arc<AtomicU64>,
    stats: Arc<WorkerStats>,
) -> KafkaResult<ConsumerHandle> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (rebalance_tx, rebalance_rx) = mpsc::unbounded_channel();
    let (commands_tx, commands_rx) = std_mpsc::channel();
    let context = WorkerContext {
        events_tx: events_tx.clone(),
        rebalance_tx,
        revoke_deadline: kafka.revoke_deadline,
        closing: AtomicBool::new(false),
        assigned: AtomicBool::new(false),
        generation: AtomicU64::new(0),
    };
    let consumer: BaseConsumer<WorkerContext> = super::client::consumer_config(kafka).create_with_context(context)?;
    let topics: Vec<&str> = kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let pressure = Pressure::from_budget(kafka.memory_budget_bytes);
    metrics::gauge!(m::MEMORY_BUDGET).set(kafka.memory_budget_bytes as f64);
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
    bytes_in_flight: Arc<AtomicU64>,
    stats: Arc<WorkerStats>,
    pressure: Pressure,
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
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
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
                    self.fetching = false;
                    self.consumer.context().closing.store(true, Ordering::SeqCst);
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

    fn apply_pressure(&mut self) {
        let in_flight = self.bytes_in_flight.load(Ordering::SeqCst);
        metrics::gauge!(m::BYTES_IN_FLIGHT).set(in_flight as f64);
        if self.consumer.context().assigned.swap(false, Ordering::SeqCst) {
            // Reassigned partitions may come back with the application's pause flag still set
            // (librdkafka keeps it): apply the current decision to all of them, explicitly.
            let pause = !self.fetching || pause_wanted(&self.pressure, in_flight, self.paused);
            tracing::debug!(in_flight, pause, "new assignment, applying the pause decision to all of it");
            if !self.set_paused(pause) {
                self.consumer.context().assigned.store(true, Ordering::SeqCst); // try again next round
            }
            return;
        }
        if !self.fetching {
            return;
        }
        match self.pressure.decide(in_flight, self.paused) {
            PressureDecision::Pause => {
                metrics::counter!(m::PAUSES).increment(1);
                self.stats.pauses.fetch_add(1, Ordering::Relaxed);
                tracing::info!(in_flight, high = self.pressure.high_bytes, "memory high watermark, pausing partitions");
                self.set_paused(true);
            }
            PressureDecision::Resume => {
                tracing::info!(
                    in_flight,
                    low = self.pressure.low_bytes,
                    "memory below low watermark, resuming partitions"
                );
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
fn pause_wanted(pressure: &Pressure, in_flight: u64, paused: bool) -> bool {
    match pressure.decide(in_flight, paused) {
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
