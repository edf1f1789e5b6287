//! The worker loop: consumer events in, engine and dead-letter writes out, offsets committed
//! only up to what has settled (invariant 1).
//!
//! One async task owns the offset tracker. It selects, in this order of priority, on: the
//! commit timer and the stop signal (rarely ready, so they cannot starve the rest), settled
//! items (acknowledgements are handled before new input, so memory drains first), and
//! consumer events (records, revokes, assignments, commit confirmations).
//! A record is tracked before it is handed to the engine or the dead-letter producer; its
//! bytes leave the in-flight count when it settles, which is what lets the consumer thread
//! resume paused partitions.
//!
//! Every record and rebalance event carries the assignment generation the consumer thread
//! gave it. A revoke or a loss may be handled late, after its partitions were assigned back
//! to this worker: it then forgets only records and offsets of its own or older generations.
//!
//! Shutdown: stop fetching, settle what was started (within the grace), commit the settled
//! watermark and wait for the broker to confirm it, and only then leave the group. The whole
//! of it ends at the grace deadline, with an error if anything was left unsettled.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, ConsumerCommand, ConsumerEvent, ConsumerHandle, RebalanceEvent};
use super::dlq::{DeadLetterError, DeadLetterProducer};
use super::offsets::{Generation, OffsetTracker, TopicPartition};
use crate::config::KafkaConfig;
use crate::decode::{decode, require_tiers, DeadLetterReason, DecodeLimits, RawRecord};
use crate::engine::{LateRejection, SettleError, SyncEngine};
use crate::item::{now_ms, SyncItem};
use crate::kafka::lag::LagBoard;
use crate::metrics as m;
use crate::options::{SubmitOptions, Tiers};
use crate::resilience::circuit_breaker::{CircuitConfig, SharedBreaker};

/// Counters a caller can watch (the demo's progress bar, tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub consumed: AtomicU64,
    pub stored: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Dead letters the dead-letter topic refused for good, even without their value.
    pub dead_letters_dropped: AtomicU64,
    pub commits: AtomicU64,
    /// Times the consumer paused its partitions for memory pressure.
    pub pauses: AtomicU64,
    /// Revokes this worker settled and answered.
    pub revokes: AtomicU64,
    /// Partitions currently assigned to this worker.
    pub assigned_partitions: AtomicU64,
    /// Highest bytes-in-flight seen by the consumer thread.
    pub peak_bytes_in_flight: AtomicU64,
    /// Lag of the owned partitions, rendered on `/metrics`.
    pub lag: LagBoard,
}

/// A record on its way to the dead-letter topic.
#[derive(Clone, Debug)]
struct DeadLetter {
    reason: DeadLetterReason,
    /// False once the topic refused the full record for good: only key and headers go.
    with_value: bool,
}

impl DeadLetter {
    fn new(reason: DeadLetterReason) -> DeadLetter {
        DeadLetter { reason, with_value: true }
    }
}

enum Outcome {
    Stored,
    DeadLettered(DeadLetter),
    /// L3 refused the content: dead-letter it next.
    Rejected(DeadLetterReason),
    /// The dead-letter topic did not take it.
    DeadLetterFailed(DeadLetter, DeadLetterError),
    /// Not written (engine stopping): leave the offset unsettled, Kafka redelivers it.
    Abandoned,
}

struct Settled {
    record: RawRecord,
    /// The assignment generation the record was consumed in.
    generation: Generation,
    outcome: Outcome,
}

/// What to do after a failed dead-letter produce.
enum AfterFailure {
    Retry(DeadLetter, Duration),
    /// Refused for good even without its value: logged, counted, settled.
    Drop,
}

pub struct Worker {
    engine: Arc<SyncEngine>,
    dlq: DeadLetterProducer,
    tracker: OffsetTracker,
    inflight: FuturesUnordered<BoxFuture<'static, Settled>>,
    /// Consumer events set aside while a rebalance drained the channel.
    backlog: VecDeque<ConsumerEvent>,
    bytes_in_flight: Arc<AtomicU64>,
    limits: DecodeLimits,
    /// The tiers the engine has: a `sync-tiers` header naming another is a dead letter.
    tiers: Tiers,
    revoke_deadline: Duration,
    stats: Arc<WorkerStats>,
    /// Failing dead-letter produces: state exported like the stores' breakers.
    dlq_breaker: SharedBreaker,
    /// The latest assignment this worker handled: its generation and partitions.
    assignment: (Generation, Vec<TopicPartition>),
}

/// Retry delay for a dead letter while the dead-letter breaker is open.
const DLQ_RETRY_WHEN_OPEN: Duration = Duration::from_secs(5);

/// Retry delay for a dead letter after a transient produce error.
const DLQ_RETRY: Duration = Duration::from_secs(1);

/// The generation of dead letters that are not Kafka records of this worker's assignment
/// (items L3 rejected from the write-ahead log, long committed): the consumer thread starts
/// counting at 1, so they never settle a tracked offset.
const UNTRACKED: Generation = 0;

/// At shutdown, the part of the grace kept for the final commit (at most a quarter of it).
const FINAL_COMMIT_RESERVE: Duration = Duration::from_secs(2);

/// How long the final commit waits for its confirmation before committing again.
const FINAL_COMMIT_RETRY: Duration = Duration::from_millis(500);

/// Runs a worker until `stop` is cancelled, then drains within `grace` and leaves the group.
/// Returns an error if the drain did not complete (some items were left unsettled) or the
/// final commit was not confirmed; either way it returns by the end of the grace.
pub async fn run(
    kafka: KafkaConfig,
    engine: Arc<SyncEngine>,
    stop: CancellationToken,
    grace: Duration,
    stats: Arc<WorkerStats>,
) -> anyhow::Result<()> {
    // One budget for the records in flight, the engine's queue and L1: the worker's.
    let pressure = engine.memory_pressure();
    pressure.set_budget(kafka.memory_budget_bytes);
    let bytes_in_flight = pressure.kafka_bytes();
    let ConsumerHandle { mut events_rx, mut rebalance_rx, commands_tx, thread } =
        consumer::start(&kafka, pressure, stats.clone())?;
    let dlq = DeadLetterProducer::new(&kafka)?;
    let mut late_rejections = engine.take_late_rejections();
    let mut worker = Worker::new(&kafka, engine, dlq, stats, bytes_in_flight);
    let mut commit_timer = tokio::time::interval(kafka.commit_interval);
    commit_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Events set aside during a rebalance come before newer ones.
        if let Some(event) = worker.backlog.pop_front() {
            worker.on_event(event).await;
            continue;
        }
        tokio::select! {
            // The timer and the stop signal come first: they are rarely ready, and with a
            // backlog the branches below always are, so they would starve behind them.
            biased;
            _ = commit_timer.tick() => worker.commit(&commands_tx, false),
            _ = stop.cancelled() => break,
            Some(event) = rebalance_rx.recv() => worker.on_rebalance(event, &mut events_rx).await,
            Some(settled) = worker.inflight.next(), if !worker.inflight.is_empty() => worker.on_settled(settled),
            rejection = next_late_rejection(&mut late_rejections) => match rejection {
                Some(rejection) => worker.on_late_rejection(rejection),
                None => late_rejections = None,
            },
            event = events_rx.recv() => match event {
                Some(event) => worker.on_event(event).await,
                None => break,
            },
        }
    }
    tracing::info!("stopping: draining in-flight items");
    let deadline = Instant::now() + grace;
    let settle_by = deadline - FINAL_COMMIT_RESERVE.min(grace / 4);
    let clean = worker.shut_down(&mut events_rx, &mut rebalance_rx, &commands_tx, settle_by, deadline).await;
    // Leave the group only now: the final commit above needed the membership.
    let _ = commands_tx.send(ConsumerCommand::Stop);
    worker.dlq.flush(deadline.saturating_duration_since(Instant::now()));
    if !consumer_thread_ended_by(thread, deadline).await {
        tracing::warn!("the consumer did not leave the group within the grace period");
    }
    if clean {
        tracing::info!("worker stopped cleanly");
        Ok(())
    } else {
        anyhow::bail!(
            "grace period ended with unsettled items or an unconfirmed final commit; \
             what was not committed will be redelivered"
        )
    }
}

async fn next_late_rejection(rejections: &mut Option<UnboundedReceiver<LateRejection>>) -> Option<LateRejection> {
    match rejections {
        Some(rejections) => rejections.recv().await,
        None => std::future::pending().await,
    }
}

/// The record an item came from, rebuilt for the dead-letter topic: its origin, key, value
/// and the headers that carry its version, operation and content type.
fn record_of(item: &SyncItem) -> RawRecord {
    let (topic, partition, offset) = match &item.origin {
        Some(origin) => (origin.topic.clone(), origin.partition, origin.offset),
        None => (Arc::from(""), -1, -1),
    };
    let header = |name: &str, value: &str| (name.to_owned(), Some(bytes::Bytes::copy_from_slice(value.as_bytes())));
    let op = if item.is_tombstone() { "delete" } else { "upsert" };
    let mut headers = vec![
        header(crate::decode::HEADER_VERSION, &item.version.to_string()),
        header(crate::decode::HEADER_OP, op),
        header(crate::decode::HEADER_CONTENT_TYPE, item.content_type.as_str()),
    ];
    if let Some(state) = &item.state {
        headers.push(header(crate::decode::HEADER_STATE, state));
    }
    RawRecord {
        topic,
        partition,
        offset,
        timestamp_ms: None,
        key: Some(bytes::Bytes::copy_from_slice(item.id.as_bytes())),
        value: item.content.clone(),
        headers,
    }
}

impl Worker {
    pub fn new(
        kafka: &KafkaConfig,
        engine: Arc<SyncEngine>,
        dlq: DeadLetterProducer,
        stats: Arc<WorkerStats>,
        bytes_in_flight: Arc<AtomicU64>,
    ) -> Worker {
        Worker {
            tiers: engine.tiers_available(),
            engine,
            dlq,
            tracker: OffsetTracker::default(),
            inflight: FuturesUnordered::new(),
            backlog: VecDeque::new(),
            bytes_in_flight,
            limits: DecodeLimits { max_item_bytes: kafka.max_item_bytes },
            revoke_deadline: kafka.revoke_deadline,
            stats,
            dlq_breaker: SharedBreaker::new(
                "dlq",
                CircuitConfig { failure_threshold: 3, cool_down: DLQ_RETRY_WHEN_OPEN },
            ),
            assignment: (0, Vec::new()),
        }
    }

    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Record { record, generation } => self.on_record(record, generation).await,
            ConsumerEvent::Assigned { partitions, generation } => {
                self.set_assigned_partitions(partitions.len());
                self.assignment = (generation, partitions);
            }
            ConsumerEvent::Committed(offsets) => self.tracker.confirm(&offsets),
        }
    }

    fn set_assigned_partitions(&self, count: usize) {
        self.stats.assigned_partitions.store(count as u64, Ordering::Relaxed);
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(count as f64);
    }

    /// Revoke or loss. Records of the departing assignment not started yet are dropped
    /// (uncommitted, the next owner gets them); everything else is kept, in order, for after.
    /// Handled late, the partitions may already be back with this worker in a newer
    /// generation: those records and offsets are not touched.
    async fn on_rebalance(&mut self, event: RebalanceEvent, events_rx: &mut UnboundedReceiver<ConsumerEvent>) {
        let (partitions, generation) = event.partitions();
        let partitions = partitions.to_vec();
        self.set_aside_queued(events_rx, &partitions, generation);
        if self.assignment.0 <= generation {
            self.set_assigned_partitions(0);
        }
        match event {
            RebalanceEvent::Revoked { reply, .. } => {
                let offsets = self.settle_partitions(&partitions, generation).await;
                self.stats.revokes.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(offsets);
            }
            RebalanceEvent::Lost { .. } => {
                self.tracker.remove(&partitions, generation);
                self.forget_in_l1(&partitions, generation);
            }
        }
    }

    /// Moves the queued events to the backlog, dropping unstarted records of `partitions`
    /// consumed in `generation` or before.
    fn set_aside_queued(
        &mut self,
        events_rx: &mut UnboundedReceiver<ConsumerEvent>,
        partitions: &[TopicPartition],
        generation: Generation,
    ) {
        let queued: Vec<ConsumerEvent> = std::iter::from_fn(|| events_rx.try_recv().ok()).collect();
        for event in std::mem::take(&mut self.backlog).into_iter().chain(queued) {
            match event {
                ConsumerEvent::Record { record, generation: consumed_in }
                    if consumed_in <= generation && partitions.contains(&(record.topic.clone(), record.partition)) =>
                {
                    self.release(&record)
                }
                other => self.backlog.push_back(other),
            }
        }
    }

    /// Drops the L1 entries of departed partitions, except those assigned back to this
    /// worker since (their entries may already come from the newer assignment).
    fn forget_in_l1(&self, partitions: &[TopicPartition], generation: Generation) {
        let reassigned = |tp: &TopicPartition| {
            self.tracker.tracked_after(tp, generation)
                || (self.assignment.0 > generation && self.assignment.1.contains(tp))
                || self.backlog.iter().any(|event| {
                    matches!(event, ConsumerEvent::Assigned { partitions, generation: assigned }
                        if *assigned > generation && partitions.contains(tp))
                })
        };
        let gone: Vec<TopicPartition> = partitions.iter().filter(|tp| !reassigned(tp)).cloned().collect();
        if !gone.is_empty() {
            self.engine.drop_partitions_from_l1(gone);
        }
    }

    /// Tracks the record, then hands it to the engine or to the dead-letter topic.
    async fn on_record(&mut self, record: RawRecord, generation: Generation) {
        self.stats.consumed.fetch_add(1, Ordering::Relaxed);
        if !self.tracker.track(&record.topic, record.partition, record.offset, record.timestamp_ms, generation) {
            // A redelivery below the watermark (already settled once), or a record of an
            // assignment this worker has since been given again.
            self.release(&record);
            return;
        }
        match self.decode(&record) {
            Ok((item, options)) => match self.engine.enqueue_admitted(item, options).await {
                Ok(receipt) => self.inflight.push(
                    async move {
                        let outcome = match receipt.await {
                            Ok(_) => Outcome::Stored,
                            Err(SettleError::Rejected(why)) => {
                                Outcome::Rejected(DeadLetterReason::RejectedByStore(why))
                            }
                            Err(SettleError::Abandoned) => Outcome::Abandoned,
                        };
                        Settled { record, generation, outcome }
                    }
                    .boxed(),
                ),
                Err(error) => {
                    tracing::warn!(%error, "engine refused the item, leaving it unsettled");
                    self.release(&record);
                }
            },
            Err(reason) => self.dead_letter(record, generation, DeadLetter::new(reason), Duration::ZERO),
        }
    }

    /// L3 rejected an item replayed from the write-ahead log. Its offset was committed when
    /// it settled in the log, so it is dead-lettered without tracking.
    fn on_late_rejection(&mut self, rejection: LateRejection) {
        let record = record_of(&rejection.item);
        self.bytes_in_flight.fetch_add(record.size_bytes() as u64, Ordering::SeqCst);
        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = %rejection.reason, "L3 rejected an item of the write-ahead log, dead-lettering it");
        let reason = DeadLetterReason::RejectedByStore(rejection.reason);
        self.dead_letter(record, UNTRACKED, DeadLetter::new(reason), Duration::ZERO);
    }

    /// Decodes the record for this worker: routed to a tier it does not have, it is a dead
    /// letter (it would otherwise settle with nothing written where the producer asked).
    fn decode(&self, record: &RawRecord) -> Result<(SyncItem, SubmitOptions), DeadLetterReason> {
        let (item, options) = decode(record, self.limits)?;
        require_tiers(record, options.tiers, self.tiers)?;
        Ok((item, options))
    }

    fn dead_letter(&mut self, record: RawRecord, generation: Generation, letter: DeadLetter, delay: Duration) {
        // While the dead-letter topic keeps failing, wait out the breaker's cool-down.
        let delay = if self.dlq_breaker.allows() { delay } else { delay.max(DLQ_RETRY_WHEN_OPEN) };
        let dlq = self.dlq.clone();
        self.inflight.push(
            async move {
                tokio::time::sleep(delay).await;
                let outcome = match dlq.send(&record, &letter.reason, letter.with_value).await {
                    Ok(()) => Outcome::DeadLettered(letter),
                    Err(error) => Outcome::DeadLetterFailed(letter, error),
                };
                Settled { record, generation, outcome }
            }
            .boxed(),
        );
    }

    fn on_settled(&mut self, settled: Settled) {
        let Settled { record, generation, outcome } = settled;
        match outcome {
            Outcome::Stored => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::DeadLettered(letter) => {
                self.dlq_breaker.record(true);
                let code = letter.reason.code();
                tracing::info!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = code, with_value = letter.with_value, "record dead-lettered");
                metrics::counter!(m::DEAD_LETTERED, "reason" => code).increment(1);
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Rejected(reason) => {
                return self.dead_letter(record, generation, DeadLetter::new(reason), Duration::ZERO)
            }
            Outcome::DeadLetterFailed(letter, error) => match self.after_failed_dead_letter(&record, letter, error) {
                AfterFailure::Retry(letter, delay) => return self.dead_letter(record, generation, letter, delay),
                AfterFailure::Drop => {}
            },
            Outcome::Abandoned => {
                self.release(&record);
                return;
            }
        }
        if let Some(timestamp_ms) = record.timestamp_ms {
            let latency_ms = now_ms().saturating_sub(timestamp_ms.max(0) as u64);
            metrics::histogram!(m::SETTLE_LATENCY_SECONDS).record(latency_ms as f64 / 1000.0);
        }
        self.tracker.settle(&record.topic, record.partition, record.offset, generation);
        self.release(&record);
    }

    /// Transient errors are retried. A record the topic can never take goes again without
    /// its value; refused for good even so, it is dropped (logged with its origin, counted)
    /// so that it cannot hold its partition for ever.
    fn after_failed_dead_letter(
        &mut self,
        record: &RawRecord,
        letter: DeadLetter,
        error: DeadLetterError,
    ) -> AfterFailure {
        let (topic, partition, offset) = (&record.topic, record.partition, record.offset);
        let code = letter.reason.code();
        if !error.permanent {
            self.dlq_breaker.record(false);
            tracing::warn!(%error, %topic, partition, offset, reason = code, "dead-letter produce failed, retrying");
            return AfterFailure::Retry(letter, DLQ_RETRY);
        }
        if letter.with_value {
            tracing::warn!(%error, %topic, partition, offset, reason = code, "the dead-letter topic cannot take this record, sending it without its value");
            return AfterFailure::Retry(DeadLetter { with_value: false, ..letter }, Duration::ZERO);
        }
        tracing::error!(%error, %topic, partition, offset, reason = code, dead_letter_reason = %letter.reason, "the dead-letter topic cannot take this record even without its value: dropped, not dead-lettered");
        metrics::counter!(m::DEAD_LETTER_DROPPED, "reason" => code).increment(1);
        self.stats.dead_letters_dropped.fetch_add(1, Ordering::Relaxed);
        AfterFailure::Drop
    }

    /// The record's bytes no longer count against the memory budget.
    fn release(&self, record: &RawRecord) {
        self.bytes_in_flight.fetch_sub(record.size_bytes() as u64, Ordering::SeqCst);
    }

    /// Offers every committable offset the broker has not confirmed yet (a failed commit is
    /// simply offered again next time).
    /// Sends the offsets due (and refreshes the lag in seconds, on the same cadence).
    fn commit(&mut self, commands_tx: &Sender<ConsumerCommand>, sync: bool) {
        for (tp, times) in self.tracker.consumed_times() {
            self.stats.lag.set_consumed(&tp, times);
        }
        let offsets = self.tracker.commits_due();
        if !offsets.is_empty() {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            let _ = commands_tx.send(ConsumerCommand::Commit { offsets, sync });
        }
    }

    /// Revoke: flush, wait (up to the deadline) for these partitions to settle, forget them
    /// and their L1 entries, and return their committable offsets.
    async fn settle_partitions(
        &mut self,
        partitions: &[TopicPartition],
        generation: Generation,
    ) -> Vec<(TopicPartition, i64)> {
        let deadline = Instant::now() + self.revoke_deadline;
        self.settle_until(deadline, |worker| worker.tracker.unsettled_in(partitions, generation) == 0).await;
        let abandoned = self.tracker.unsettled_in(partitions, generation);
        if abandoned > 0 {
            tracing::warn!(abandoned, "revoke deadline passed, abandoning unsettled items of revoked partitions");
        }
        let offsets = self.tracker.remove(partitions, generation);
        self.forget_in_l1(partitions, generation);
        offsets
    }

    /// Flushes the engine and handles settlements until `done` or the deadline.
    async fn settle_until(&mut self, deadline: Instant, done: impl Fn(&Worker) -> bool) {
        let engine = self.engine.clone();
        let mut flush = std::pin::pin!(async move { engine.flush().await }.fuse());
        while !done(self) {
            tokio::select! {
                _ = &mut flush => {}
                Some(settled) = self.inflight.next(), if !self.inflight.is_empty() => self.on_settled(settled),
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Shutdown: stop fetching, drop records not yet started (they stay uncommitted), settle
    /// the rest until `settle_by`, then commit the settled watermark and wait until
    /// `deadline` for the broker to confirm it. Returns whether both completed.
    async fn shut_down(
        &mut self,
        events_rx: &mut UnboundedReceiver<ConsumerEvent>,
        rebalance_rx: &mut UnboundedReceiver<RebalanceEvent>,
        commands_tx: &Sender<ConsumerCommand>,
        settle_by: Instant,
        deadline: Instant,
    ) -> bool {
        let _ = commands_tx.send(ConsumerCommand::StopFetching);
        for event in std::mem::take(&mut self.backlog) {
            self.on_shutdown_event(event);
        }
        let engine = self.engine.clone();
        let mut flush = std::pin::pin!(async move { engine.flush().await }.fuse());
        while !self.inflight.is_empty() {
            tokio::select! {
                _ = &mut flush => {}
                Some(settled) = self.inflight.next() => self.on_settled(settled),
                Some(event) = events_rx.recv() => self.on_shutdown_event(event),
                Some(event) = rebalance_rx.recv() => self.on_shutdown_rebalance(event),
                _ = tokio::time::sleep_until(settle_by) => break,
            }
        }
        let settled = self.inflight.is_empty();
        if !settled {
            tracing::warn!(unsettled = self.inflight.len(), "grace period ending with unsettled items");
        }
        let committed = self.final_commit(events_rx, rebalance_rx, commands_tx, deadline).await;
        settled && committed
    }

    /// A revoke that arrived before the consumer thread stopped asking: it blocks that thread
    /// (and so the final commit) until answered. Answered at once with what has settled.
    fn on_shutdown_rebalance(&mut self, event: RebalanceEvent) {
        let (partitions, generation) = event.partitions();
        let offsets = self.tracker.remove(partitions, generation);
        if let RebalanceEvent::Revoked { reply, .. } = event {
            let _ = reply.send(offsets);
        }
    }

    /// While shutting down, records are dropped unstarted; commit confirmations still count.
    fn on_shutdown_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Record { record, .. } => self.release(&record),
            ConsumerEvent::Committed(offsets) => self.tracker.confirm(&offsets),
            ConsumerEvent::Assigned { .. } => {}
        }
    }

    /// Commits the settled watermark of every partition synchronously and waits for the
    /// consumer thread to confirm it.
    async fn final_commit(
        &mut self,
        events_rx: &mut UnboundedReceiver<ConsumerEvent>,
        rebalance_rx: &mut UnboundedReceiver<RebalanceEvent>,
        commands_tx: &Sender<ConsumerCommand>,
        deadline: Instant,
    ) -> bool {
        let offsets = self.tracker.all_committable();
        if offsets.is_empty() {
            return true;
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        if commands_tx.send(ConsumerCommand::Commit { offsets, sync: true }).is_err() {
            tracing::warn!("the consumer thread is gone, the final commit is lost");
            return false;
        }
        // A commit refused by the coordinator (a rebalance under way, another member leaving)
        // is never confirmed: offer what is still due again until it is, or the deadline.
        let mut retry = tokio::time::interval_at(Instant::now() + FINAL_COMMIT_RETRY, FINAL_COMMIT_RETRY);
        while !self.tracker.commits_due().is_empty() {
            tokio::select! {
                event = events_rx.recv() => match event {
                    Some(event) => self.on_shutdown_event(event),
                    None => break,
                },
                Some(event) = rebalance_rx.recv() => self.on_shutdown_rebalance(event),
                _ = retry.tick() => {
                    let offsets = self.tracker.commits_due();
                    tracing::info!(partitions = offsets.len(), "final commit not confirmed yet, committing again");
                    if commands_tx.send(ConsumerCommand::Commit { offsets, sync: true }).is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let unconfirmed = self.tracker.commits_due();
        if !unconfirmed.is_empty() {
            tracing::warn!(partitions = unconfirmed.len(), "the final commit was not confirmed");
        }
        unconfirmed.is_empty()
    }
}

/// Waits, until `deadline`, for the consumer thread to end (it leaves the group as it drops
/// the consumer, which may block); true if it did. It looks every 20 ms rather than joining on
/// a blocking task: a runtime waits for its blocking tasks when it is dropped, so a consumer
/// whose close never completes would otherwise keep the process alive past the grace period.
/// A thread still running is left behind; the process's exit ends it.
async fn consumer_thread_ended_by(thread: std::thread::JoinHandle<()>, deadline: Instant) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = thread.join();
    true
}

#[cfg(test)]
mod tests {
    //! The worker's bookkeeping driven with hand-made consumer events: a real in-memory
    //! engine (L1 only, items settle at once) and no broker.

    use std::sync::mpsc as std_mpsc;

    use bytes::Bytes;
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::config::SyncEngineConfig;

    async fn in_memory_worker() -> Worker {
        let config = SyncEngineConfig::in_memory();
        let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
        engine.start().await.expect("the in-memory engine starts");
        let kafka = KafkaConfig {
            // Never reached: dead letters stay in flight, which is what the grace test needs.
            brokers: "127.0.0.1:9".into(),
            topics: vec!["items".into()],
            group_id: "g".into(),
            dlq_topic: "dlq".into(),
            passthrough: Default::default(),
            commit_interval: Duration::from_millis(100),
            revoke_deadline: Duration::from_millis(300),
            memory_budget_bytes: 64 << 20,
            max_item_bytes: 1 << 20,
            instance_id: None,
        };
        let dlq = DeadLetterProducer::new(&kafka).expect("dead-letter producer");
        Worker::new(&kafka, Arc::new(engine), dlq, Arc::default(), Arc::new(AtomicU64::new(0)))
    }

    fn tp() -> TopicPartition {
        (Arc::from("items"), 0)
    }

    /// A record as the consumer thread hands it over: its bytes counted in flight.
    fn record_event(worker: &Worker, offset: i64, generation: Generation) -> ConsumerEvent {
        let record = RawRecord {
            topic: tp().0,
            partition: 0,
            offset,
            timestamp_ms: Some(1_000 + offset),
            key: Some(Bytes::from(format!("id-{offset}"))),
            value: Some(Bytes::from_static(b"{}")),
            headers: Vec::new(),
        };
        worker.bytes_in_flight.fetch_add(record.size_bytes() as u64, Ordering::SeqCst);
        ConsumerEvent::Record { record, generation }
    }

    fn assigned(generation: Generation) -> ConsumerEvent {
        ConsumerEvent::Assigned { partitions: vec![tp()], generation }
    }

    async fn settle_all(worker: &mut Worker) {
        while let Some(settled) = worker.inflight.next().await {
            worker.on_settled(settled);
        }
    }

    async fn handle_backlog(worker: &mut Worker) {
        while let Some(event) = worker.backlog.pop_front() {
            worker.on_event(event).await;
        }
    }

    /// The offsets the worker's next commit offers.
    fn next_commit(worker: &mut Worker) -> Vec<(TopicPartition, i64)> {
        let (commands_tx, commands_rx) = std_mpsc::channel();
        worker.commit(&commands_tx, false);
        match commands_rx.try_recv() {
            Ok(ConsumerCommand::Commit { offsets, .. }) => offsets,
            _ => Vec::new(),
        }
    }

    // The consumer thread gave up waiting for the revoke of generation 1, was handed the
    // partition again (generation 2) and delivered its records before the worker got to the
    // revoke. The revoke must not drop them: they are tracked, settled and committed.
    #[tokio::test]
    async fn a_revoke_handled_after_the_partition_came_back_keeps_the_new_records_and_commits_them() {
        let mut worker = in_memory_worker().await;
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        worker.on_event(assigned(1)).await;
        for offset in 0..3 {
            let event = record_event(&worker, offset, 1);
            worker.on_event(event).await;
        }
        settle_all(&mut worker).await;
        events_tx.send(assigned(2)).unwrap();
        for offset in 0..5 {
            events_tx.send(record_event(&worker, offset, 2)).unwrap();
        }

        let (reply, answer) = std_mpsc::sync_channel(1);
        let revoke = RebalanceEvent::Revoked { partitions: vec![tp()], generation: 1, reply };
        worker.on_rebalance(revoke, &mut events_rx).await;
        assert_eq!(answer.try_recv().unwrap(), vec![(tp(), 3)], "the revoke answers for generation 1 only");
        handle_backlog(&mut worker).await;
        settle_all(&mut worker).await;

        assert_eq!(next_commit(&mut worker), vec![(tp(), 5)], "generation 2's records are committed");
        assert_eq!(worker.stats.stored.load(Ordering::Relaxed), 8);
        assert_eq!(worker.stats.assigned_partitions.load(Ordering::Relaxed), 1);
        assert_eq!(worker.bytes_in_flight.load(Ordering::SeqCst), 0, "every record released exactly once");
    }

    // A loss of generation 1 handled after generation 2's records were already tracked: the
    // newer state stays; generation 1's late settlements neither settle nor commit anything.
    #[tokio::test]
    async fn a_loss_handled_after_new_records_were_tracked_keeps_them_and_commits_them() {
        let mut worker = in_memory_worker().await;
        let (_events_tx, mut events_rx) = mpsc::unbounded_channel();
        worker.on_event(assigned(1)).await;
        for offset in 0..2 {
            let event = record_event(&worker, offset, 1);
            worker.on_event(event).await; // handed to the engine, not settled yet
        }
        worker.on_event(assigned(2)).await;
        for offset in 0..4 {
            let event = record_event(&worker, offset, 2);
            worker.on_event(event).await;
        }
        worker.on_rebalance(RebalanceEvent::Lost { partitions: vec![tp()], generation: 1 }, &mut events_rx).await;
        settle_all(&mut worker).await;

        assert_eq!(next_commit(&mut worker), vec![(tp(), 4)]);
        assert_eq!(worker.stats.assigned_partitions.load(Ordering::Relaxed), 1, "the partition is still ours");
        assert_eq!(worker.bytes_in_flight.load(Ordering::SeqCst), 0);
    }

    // An offset counts as committed only when the consumer thread confirms it.
    #[tokio::test]
    async fn an_unconfirmed_commit_is_offered_again_and_a_confirmed_one_is_not() {
        let mut worker = in_memory_worker().await;
        worker.on_event(assigned(1)).await;
        let event = record_event(&worker, 0, 1);
        worker.on_event(event).await;
        settle_all(&mut worker).await;
        assert_eq!(next_commit(&mut worker), vec![(tp(), 1)]);
        assert_eq!(next_commit(&mut worker), vec![(tp(), 1)], "no confirmation yet: offered again");
        worker.on_event(ConsumerEvent::Committed(vec![(tp(), 1)])).await;
        assert!(next_commit(&mut worker).is_empty());
    }

    #[tokio::test]
    async fn a_tiers_header_naming_a_tier_this_worker_lacks_is_a_dead_letter() {
        let worker = in_memory_worker().await; // L1 only
        let ConsumerEvent::Record { mut record, .. } = record_event(&worker, 0, 1) else { unreachable!() };
        record.headers.push(("sync-tiers".into(), Some(Bytes::from_static(b"l1,l3"))));
        let reason = worker.decode(&record).unwrap_err();
        assert_eq!(reason.code(), "bad_header");
        assert!(reason.to_string().contains("routes to l3, which this worker does not have"), "{reason}");
        record.headers[0].1 = Some(Bytes::from_static(b"l1"));
        assert!(worker.decode(&record).is_ok());
    }

    // A dead letter that cannot be delivered (the broker is unreachable) and a final commit
    // nobody confirms: shutdown still ends at the grace deadline, and says it did not drain.
    #[tokio::test]
    async fn shutdown_ends_at_the_grace_deadline_even_with_items_that_cannot_settle() {
        let mut worker = in_memory_worker().await;
        let (_events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (_rebalance_tx, mut rebalance_rx) = mpsc::unbounded_channel();
        let (commands_tx, commands_rx) = std_mpsc::channel();
        worker.on_event(assigned(1)).await;
        let settled = record_event(&worker, 0, 1);
        worker.on_event(settled).await;
        settle_all(&mut worker).await;
        let ConsumerEvent::Record { mut record, .. } = record_event(&worker, 1, 1) else { unreachable!() };
        record.key = None; // dead letter, never delivered
        worker.on_record(record, 1).await;

        let started = Instant::now();
        let clean = worker
            .shut_down(
                &mut events_rx,
                &mut rebalance_rx,
                &commands_tx,
                started + Duration::from_millis(300),
                started + Duration::from_millis(600),
            )
            .await;
        let took = started.elapsed();
        assert!(!clean);
        assert!(took >= Duration::from_millis(600) && took < Duration::from_millis(900), "took {took:?}");
        assert!(matches!(commands_rx.try_recv(), Ok(ConsumerCommand::StopFetching)));
        match commands_rx.try_recv() {
            Ok(ConsumerCommand::Commit { offsets, sync: true }) => assert_eq!(offsets, vec![(tp(), 1)]),
            _ => panic!("the settled watermark is committed synchronously at shutdown"),
        }
    }

    // A revoke asked before the consumer thread saw `StopFetching` blocks that thread, and
    // with it the final commit: shutdown answers it at once with the settled watermark.
    #[tokio::test]
    async fn a_revoke_pending_at_shutdown_is_answered_at_once() {
        let mut worker = in_memory_worker().await;
        let (_events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (rebalance_tx, mut rebalance_rx) = mpsc::unbounded_channel();
        let (commands_tx, _commands_rx) = std_mpsc::channel();
        worker.on_event(assigned(1)).await;
        let event = record_event(&worker, 0, 1);
        worker.on_event(event).await;
        settle_all(&mut worker).await;
        let ConsumerEvent::Record { mut record, .. } = record_event(&worker, 1, 1) else { unreachable!() };
        record.key = None; // a dead letter that never settles keeps the shutdown busy
        worker.on_record(record, 1).await;
        let (reply, answer) = std_mpsc::sync_channel(1);
        rebalance_tx.send(RebalanceEvent::Revoked { partitions: vec![tp()], generation: 1, reply }).unwrap();

        let started = Instant::now();
        let shutdown = worker.shut_down(
            &mut events_rx,
            &mut rebalance_rx,
            &commands_tx,
            started + Duration::from_secs(2),
            started + Duration::from_secs(3),
        );
        let waiter = tokio::task::spawn_blocking(move || answer.recv_timeout(Duration::from_secs(1)));
        let (_, answered) = tokio::join!(shutdown, waiter);
        assert_eq!(answered.unwrap(), Ok(vec![(tp(), 1)]), "answered within a second, with the settled watermark");
    }

    #[tokio::test]
    async fn an_item_l3_rejected_from_the_wal_goes_to_the_dead_letter_topic_with_its_origin() {
        let mut worker = in_memory_worker().await;
        let item = SyncItem {
            origin: Some(crate::item::Origin { topic: Arc::from("items"), partition: 3, offset: 77 }),
            ..SyncItem::new("an-id", &b"{\"a\":1}"[..])
        };
        let record = record_of(&item);
        assert_eq!((record.topic.as_ref(), record.partition, record.offset), ("items", 3, 77));
        assert_eq!(record.key.as_deref(), Some(&b"an-id"[..]));
        assert_eq!(record.value, item.content);
        let header = |name: &str| record.headers.iter().find(|(key, _)| key == name).and_then(|(_, v)| v.clone());
        assert_eq!(header("sync-version"), Some(Bytes::from(item.version.to_string())));
        assert_eq!(header("sync-op"), Some(Bytes::from_static(b"upsert")));
        assert_eq!(header("sync-content-type"), Some(Bytes::from_static(b"json")));
        assert_eq!(header("sync-state"), None, "no state, no header");
        let with_state = item.clone().with_state("active");
        let state_record = record_of(&with_state);
        let state_header =
            state_record.headers.iter().find(|(key, _)| key == "sync-state").and_then(|(_, v)| v.clone());
        assert_eq!(state_header, Some(Bytes::from_static(b"active")));
        let limits = crate::decode::DecodeLimits { max_item_bytes: 1 << 20 };
        assert_eq!(crate::decode::decode(&state_record, limits).unwrap().0.state.as_deref(), Some("active"));
        // The dead letter goes out (and stays in flight: no broker here), its bytes counted.
        worker.on_late_rejection(LateRejection { item, reason: "too large".into() });
        assert_eq!(worker.inflight.len(), 1);
        assert_eq!(worker.bytes_in_flight.load(Ordering::SeqCst), record.size_bytes() as u64);
    }

    /// A consumer whose close never completes (librdkafka's close waits on the group
    /// coordinator, and rdkafka's drop polls until it does) must not hold the process after the
    /// grace period: a runtime waits for its blocking tasks when it is dropped, so the wait
    /// must not be one. Seen in `tests/chaos_kafka.rs`: the test had finished, its broker was
    /// gone, and the test binary hung in the runtime's drop on the consumer thread's join.
    #[test]
    fn a_consumer_thread_stuck_past_the_deadline_does_not_hold_the_runtime_open() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let stuck = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(5)));
        let ended = runtime
            .block_on(async { consumer_thread_ended_by(stuck, Instant::now() + Duration::from_millis(100)).await });
        assert!(!ended, "the thread is still running at the deadline");
        let dropping = std::time::Instant::now();
        drop(runtime);
        assert!(
            dropping.elapsed() < Duration::from_secs(1),
            "the runtime waited {:?} for the thread",
            dropping.elapsed()
        );
    }

    #[test]
    fn a_consumer_thread_that_ends_in_time_is_reported_as_ended() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let quick = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(50)));
        assert!(runtime.block_on(consumer_thread_ended_by(quick, Instant::now() + Duration::from_secs(5))));
    }
}
