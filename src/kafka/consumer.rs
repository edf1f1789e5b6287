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
//! - commits the offsets the worker sends, and on stop commits synchronously, leaves the
//!   group and drops the consumer here, off the async runtime (dropping blocks).

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
use crate::kafka::offsets::TopicPartition;
use crate::kafka::worker::WorkerStats;
use crate::metrics as m;
use crate::pressure::{Pressure, PressureDecision};

const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// What the consumer thread tells the worker, in consumption order.
pub enum ConsumerEvent {
    Record(RawRecord),
    Assigned(Vec<TopicPartition>),
}

/// Partitions going away. These travel on their own channel so they overtake the records
/// queued before them: the worker drops those records (they stay uncommitted) instead of
/// working through them while the rebalance waits.
pub enum RebalanceEvent {
    /// Settle these partitions and reply with their committable offsets before the deadline.
    Revoked { partitions: Vec<TopicPartition>, reply: std_mpsc::SyncSender<Vec<(TopicPartition, i64)>> },
    /// Partitions taken away without a chance to commit: forget them.
    Lost(Vec<TopicPartition>),
}

/// What the worker tells the consumer thread.
pub enum ConsumerCommand {
    Commit {
        offsets: Vec<(TopicPartition, i64)>,
        sync: bool,
    },
    /// Pause everything and drop further records (they stay uncommitted): shutdown begins.
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let partitions = partitions_of(list);
        if self.closing.load(Ordering::SeqCst) || partitions.is_empty() {
            return;
        }
        if consumer.assignment_lost() {
            metrics::counter!(m::REBALANCES, "kind" => "lost").increment(1);
            tracing::warn!(partitions = partitions.len(), "partitions lost, committing nothing for them");
            let _ = self.rebalance_tx.send(RebalanceEvent::Lost(partitions));
            return;
        }
        metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
        let (reply_tx, reply_rx) = std_mpsc::sync_channel(1);
        if self.rebalance_tx.send(RebalanceEvent::Revoked { partitions, reply: reply_tx }).is_err() {
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
                self.assigned.store(true, Ordering::SeqCst);
                let _ = self.events_tx.send(ConsumerEvent::Assigned(assigned));
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
                    let in_flight = self.bytes_in_flight.fetch_add(record.size_bytes() as u64, Ordering::SeqCst);
                    self.stats
                        .peak_bytes_in_flight
                        .fetch_max(in_flight + record.size_bytes() as u64, Ordering::Relaxed);
                    metrics::counter!(m::RECORDS_CONSUMED, "topic" => message.topic().to_owned()).increment(1);
                    if self.events_tx.send(ConsumerEvent::Record(record)).is_err() {
                        break;
                    }
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

    /// Returns false when the thread must stop.
    fn handle_commands(&mut self) -> bool {
        while let Ok(command) = self.commands_rx.try_recv() {
            match command {
                ConsumerCommand::Commit { offsets, sync } => {
                    let mode = if sync { CommitMode::Sync } else { CommitMode::Async };
                    if let Err(error) = commit(&self.consumer, &offsets, mode) {
                        metrics::counter!(m::COMMIT_ERRORS).increment(1);
                        tracing::warn!(%error, "offset commit failed");
                    }
                }
                ConsumerCommand::StopFetching => {
                    self.fetching = false;
                    self.consumer.context().closing.store(true, Ordering::SeqCst);
                    self.set_paused(true);
                }
                ConsumerCommand::Stop => return false,
            }
        }
        true
    }

    fn apply_pressure(&mut self) {
        if !self.fetching {
            return;
        }
        if self.consumer.context().assigned.swap(false, Ordering::SeqCst) {
            // An eager rebalance handed out fresh, unpaused partitions.
            self.paused = false;
            metrics::gauge!(m::PAUSED_PARTITIONS).set(0.0);
        }
        let in_flight = self.bytes_in_flight.load(Ordering::SeqCst);
        metrics::gauge!(m::BYTES_IN_FLIGHT).set(in_flight as f64);
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

    fn set_paused(&mut self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else { return };
        let result = if paused { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        match result {
            Ok(()) => {
                self.paused = paused;
                let count = if paused { assignment.count() } else { 0 };
                metrics::gauge!(m::PAUSED_PARTITIONS).set(count as f64);
            }
            Err(error) => tracing::warn!(%error, paused, "pause/resume failed"),
        }
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
