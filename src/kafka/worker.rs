//! The worker loop: consumer events in, engine and dead-letter writes out, offsets committed
//! only up to what has settled (invariant 1).
//!
//! One async task owns the offset tracker. It selects, in this order of priority, on: the
//! commit timer and the stop signal (rarely ready, so they cannot starve the rest), settled
//! items (acknowledgements are handled before new input, so memory drains first), and
//! consumer events (records, revokes, assignments).
//! A record is tracked before it is handed to the engine or the dead-letter producer; its
//! bytes leave the in-flight count when it settles, which is what lets the consumer thread
//! resume paused partitions.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, ConsumerCommand, ConsumerEvent, ConsumerHandle, RebalanceEvent};
use super::dlq::DeadLetterProducer;
use super::offsets::{OffsetTracker, TopicPartition};
use crate::config::KafkaConfig;
use crate::decode::{decode, DeadLetterReason, DecodeLimits, RawRecord};
use crate::engine::{SettleError, SyncEngine};
use crate::item::now_ms;
use crate::metrics as m;
use crate::resilience::circuit_breaker::SharedBreaker;

/// Counters a caller can watch (the demo's progress bar, tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub consumed: AtomicU64,
    pub stored: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub commits: AtomicU64,
    /// Times the consumer paused its partitions for memory pressure.
    pub pauses: AtomicU64,
    /// Revokes this worker settled and answered.
    pub revokes: AtomicU64,
    /// Partitions currently assigned to this worker.
    pub assigned_partitions: AtomicU64,
    /// Highest bytes-in-flight seen by the consumer thread.
    pub peak_bytes_in_flight: AtomicU64,
}

enum Outcome {
    Stored,
    DeadLettered(&'static str),
    /// L3 refused the content: dead-letter it next.
    Rejected(DeadLetterReason),
    /// The dead-letter topic did not take it: try again.
    DeadLetterFailed(DeadLetterReason, String),
    /// Not written (engine stopping): leave the offset unsettled, Kafka redelivers it.
    Abandoned,
}

struct Settled {
    record: RawRecord,
    outcome: Outcome,
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
    revoke_deadline: Duration,
    stats: Arc<WorkerStats>,
    /// Failing dead-letter produces: state exported like the stores' breakers.
    dlq_breaker: SharedBreaker,
}

/// Retry delay for a dead letter while the dead-letter breaker is open.
const DLQ_RETRY_WHEN_OPEN: Duration = Duration::from_secs(5);

/// Runs a worker until `stop` is cancelled, then drains within `grace` and leaves the group.
/// Returns an error if the drain did not complete (some items were left unsettled).
pub async fn run(
    kafka: KafkaConfig,
    engine: Arc<SyncEngine>,
    stop: CancellationToken,
    grace: Duration,
    stats: Arc<WorkerStats>,
) -> anyhow::Result<()> {
    let bytes_in_flight = Arc::new(AtomicU64::new(0));
    let ConsumerHandle { mut events_rx, mut rebalance_rx, commands_tx, thread } =
        consumer::start(&kafka, bytes_in_flight.clone(), stats.clone())?;
    let mut worker = Worker {
        engine,
        dlq: DeadLetterProducer::new(&kafka)?,
        tracker: OffsetTracker::default(),
        inflight: FuturesUnordered::new(),
        backlog: VecDeque::new(),
        bytes_in_flight,
        limits: DecodeLimits { max_item_bytes: kafka.max_item_bytes },
        revoke_deadline: kafka.revoke_deadline,
        stats,
        dlq_breaker: SharedBreaker::new("dlq", 3, DLQ_RETRY_WHEN_OPEN),
    };
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
            event = events_rx.recv() => match event {
                Some(event) => worker.on_event(event).await,
                None => break,
            },
        }
    }
    tracing::info!("stopping: draining in-flight items");
    let _ = commands_tx.send(ConsumerCommand::StopFetching);
    let drained = worker.drain(&mut events_rx, grace).await;
    worker.commit(&commands_tx, true);
    let _ = commands_tx.send(ConsumerCommand::Stop);
    worker.dlq.flush(Duration::from_secs(5));
    tokio::task::spawn_blocking(move || thread.join()).await.ok();
    if drained {
        tracing::info!("worker stopped cleanly");
        Ok(())
    } else {
        anyhow::bail!("grace period ended with unsettled items; they were not committed and will be redelivered")
    }
}

impl Worker {
    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Record(record) => self.on_record(record).await,
            ConsumerEvent::Assigned(partitions) => {
                self.stats.assigned_partitions.store(partitions.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Revoke or loss. The consumer thread is blocked in its rebalance callback, so the
    /// events channel holds everything it will deliver before the rebalance: records of the
    /// departing partitions are dropped unstarted (uncommitted, the next owner gets them), the
    /// rest is kept, in order, for after.
    async fn on_rebalance(&mut self, event: RebalanceEvent, events_rx: &mut UnboundedReceiver<ConsumerEvent>) {
        let partitions = match &event {
            RebalanceEvent::Revoked { partitions, .. } | RebalanceEvent::Lost(partitions) => partitions.clone(),
        };
        self.stats.assigned_partitions.store(0, Ordering::Relaxed);
        while let Ok(queued) = events_rx.try_recv() {
            match queued {
                ConsumerEvent::Record(record) if partitions.contains(&(record.topic.clone(), record.partition)) => {
                    self.release(&record)
                }
                other => self.backlog.push_back(other),
            }
        }
        match event {
            RebalanceEvent::Revoked { partitions, reply } => {
                let offsets = self.settle_partitions(&partitions).await;
                self.stats.revokes.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(offsets);
            }
            RebalanceEvent::Lost(partitions) => {
                self.tracker.remove(&partitions);
                self.engine.drop_partitions_from_l1(partitions);
            }
        }
    }

    /// Tracks the record, then hands it to the engine or to the dead-letter topic.
    pub async fn on_record(&mut self, record: RawRecord) {
        self.stats.consumed.fetch_add(1, Ordering::Relaxed);
        if !self.tracker.track(&record.topic, record.partition, record.offset) {
            // A redelivery below the watermark: already settled once.
            self.release(&record);
            return;
        }
        match decode(&record, self.limits) {
            Ok((item, options)) => match self.engine.enqueue(item, options).await {
                Ok(receipt) => self.inflight.push(
                    async move {
                        let outcome = match receipt.await {
                            Ok(_) => Outcome::Stored,
                            Err(SettleError::Rejected(why)) => {
                                Outcome::Rejected(DeadLetterReason::RejectedByStore(why))
                            }
                            Err(SettleError::Abandoned) => Outcome::Abandoned,
                        };
                        Settled { record, outcome }
                    }
                    .boxed(),
                ),
                Err(error) => {
                    tracing::warn!(%error, "engine refused the item, leaving it unsettled");
                    self.release(&record);
                }
            },
            Err(reason) => self.dead_letter(record, reason, Duration::ZERO),
        }
    }

    fn dead_letter(&mut self, record: RawRecord, reason: DeadLetterReason, delay: Duration) {
        // While the dead-letter topic keeps failing, wait out the breaker's cool-down.
        let delay = if self.dlq_breaker.allows() { delay } else { delay.max(DLQ_RETRY_WHEN_OPEN) };
        let dlq = self.dlq.clone();
        self.inflight.push(
            async move {
                tokio::time::sleep(delay).await;
                let outcome = match dlq.send(&record, &reason).await {
                    Ok(()) => Outcome::DeadLettered(reason.code()),
                    Err(error) => Outcome::DeadLetterFailed(reason, error),
                };
                Settled { record, outcome }
            }
            .boxed(),
        );
    }

    fn on_settled(&mut self, settled: Settled) {
        let Settled { record, outcome } = settled;
        match outcome {
            Outcome::Stored => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::DeadLettered(code) => {
                self.dlq_breaker.record(true);
                tracing::info!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = code, "record dead-lettered");
                metrics::counter!(m::DEAD_LETTERED, "reason" => code).increment(1);
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Rejected(reason) => return self.dead_letter(record, reason, Duration::ZERO),
            Outcome::DeadLetterFailed(reason, error) => {
                self.dlq_breaker.record(false);
                tracing::warn!(%error, partition = record.partition, offset = record.offset, "dead-letter produce failed, retrying");
                return self.dead_letter(record, reason, Duration::from_secs(1));
            }
            Outcome::Abandoned => {
                self.release(&record);
                return;
            }
        }
        if let Some(timestamp_ms) = record.timestamp_ms {
            let latency_ms = now_ms().saturating_sub(timestamp_ms.max(0) as u64);
            metrics::histogram!(m::SETTLE_LATENCY_SECONDS).record(latency_ms as f64 / 1000.0);
        }
        self.tracker.settle(&record.topic, record.partition, record.offset);
        self.release(&record);
    }

    /// The record's bytes no longer count against the memory budget.
    fn release(&self, record: &RawRecord) {
        self.bytes_in_flight.fetch_sub(record.size_bytes() as u64, Ordering::SeqCst);
    }

    fn commit(&mut self, commands_tx: &std::sync::mpsc::Sender<ConsumerCommand>, sync: bool) {
        let offsets = self.tracker.take_commits();
        if !offsets.is_empty() {
            self.stats.commits.fetch_add(1, Ordering::Relaxed);
            let _ = commands_tx.send(ConsumerCommand::Commit { offsets, sync });
        }
    }

    /// Revoke: flush, wait (up to the deadline) for these partitions to settle, forget them
    /// and their L1 entries, and return their committable offsets.
    async fn settle_partitions(&mut self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let deadline = Instant::now() + self.revoke_deadline;
        self.settle_until(deadline, |worker| worker.tracker.unsettled_in(partitions) == 0).await;
        let abandoned = self.tracker.unsettled_in(partitions);
        if abandoned > 0 {
            tracing::warn!(abandoned, "revoke deadline passed, abandoning unsettled items of revoked partitions");
        }
        let offsets = self.tracker.remove(partitions);
        self.engine.drop_partitions_from_l1(partitions.to_vec());
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

    /// Shutdown: drop records not yet started (they stay uncommitted), then settle the rest.
    async fn drain(&mut self, events_rx: &mut UnboundedReceiver<ConsumerEvent>, grace: Duration) -> bool {
        events_rx.close();
        let queued = std::iter::from_fn(|| events_rx.try_recv().ok());
        for event in std::mem::take(&mut self.backlog).into_iter().chain(queued) {
            if let ConsumerEvent::Record(record) = event {
                self.release(&record);
            }
        }
        let deadline = Instant::now() + grace;
        self.settle_until(deadline, |worker| worker.inflight.is_empty()).await;
        self.inflight.is_empty()
    }
}
