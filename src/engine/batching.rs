//! The batch task: drains the engine's queue into the hybrid batcher and hands closed
//! batches to the flush task. It owns no I/O beyond channels.

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Pending, Queued};
use crate::batch::Batcher;
use crate::config::SyncEngineConfig;

/// A closed batch, and who to tell once it is written.
pub(super) struct Batch {
    pub items: Vec<Pending>,
    pub done: Option<oneshot::Sender<()>>,
}

pub(super) async fn run(
    mut queue_rx: mpsc::Receiver<Queued>,
    batch_tx: mpsc::Sender<Batch>,
    config_rx: watch::Receiver<SyncEngineConfig>,
    stopping: CancellationToken,
) {
    let mut batcher: Batcher<Pending> = Batcher::new(config_rx.borrow().batch);
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
                    let size = pending.item.size_bytes();
                    batcher.push(pending, size, std::time::Instant::now()).map(|items| Batch { items, done: None })
                }
                Some(Queued::Flush(done)) => Some(Batch { items: batcher.take(), done: Some(done) }),
                None => {
                    let _ = batch_tx.send(Batch { items: batcher.take(), done: None }).await;
                    return;
                }
            },
            _ = sleep_until_opt(deadline) => batcher.poll_due(std::time::Instant::now()).map(|items| Batch { items, done: None }),
        };
        if let Some(batch) = closed {
            if batch_tx.send(batch).await.is_err() {
                return;
            }
            batcher.set_limits(config_rx.borrow().batch);
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
