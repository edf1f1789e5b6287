//! The batch task: drains the engine's queue into the hybrid batcher and hands closed
//! batches to the flush task. It owns no I/O beyond channels.

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pending, Queued};
use crate::batch::{Batch, FlushReason, HybridBatcher, SizedItem};
use crate::config::SyncEngineConfig;

/// A closed batch on its way to the flush task, and who to tell once it is written.
pub(super) struct FlushBatch {
    pub items: Vec<Pending>,
    pub done: Option<oneshot::Sender<()>>,
}

impl FlushBatch {
    fn closed(batch: Batch<Pending>, done: Option<oneshot::Sender<()>>) -> FlushBatch {
        metrics::counter!(crate::metrics::BATCH_FLUSHES, "reason" => batch.reason.as_str()).increment(1);
        FlushBatch { items: batch.items, done }
    }
}

impl SizedItem for Pending {
    fn size_bytes(&self) -> usize {
        self.item.size_bytes()
    }
}

pub(super) async fn run(
    mut queue_rx: mpsc::Receiver<Queued>,
    batch_tx: mpsc::Sender<FlushBatch>,
    config_rx: watch::Receiver<SyncEngineConfig>,
    stopping: CancellationToken,
) {
    let mut batcher: HybridBatcher<Pending> = HybridBatcher::new(config_rx.borrow().batch);
    let mut stop_seen = false;
    loop {
        let deadline = batcher.deadline().map(Instant::from_std);
        let closed = tokio::select! {
            biased;
            _ = stopping.cancelled(), if !stop_seen => {
                // Refuse new items but keep draining what was already queued.
                stop_seen = true;
                queue_rx.close();
                None
            }
            queued = queue_rx.recv() => match queued {
                Some(Queued::Item(pending)) => {
                    batcher.push(pending, std::time::Instant::now()).map(|batch| FlushBatch::closed(batch, None))
                }
                Some(Queued::Flush(done)) => Some(FlushBatch::closed(batcher.take(FlushReason::Explicit), Some(done))),
                None => {
                    let _ = batch_tx.send(FlushBatch::closed(batcher.take(FlushReason::Explicit), None)).await;
                    return;
                }
            },
            _ = sleep_until_opt(deadline) => batcher.poll_due(std::time::Instant::now()).map(|batch| FlushBatch::closed(batch, None)),
        };
        if let Some(batch) = closed {
            if batch_tx.send(batch).await.is_err() {
                return;
            }
            batcher.set_config(config_rx.borrow().batch);
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
