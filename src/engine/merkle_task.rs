//! The merkle tree's drain: folds the dirty marks that L3 writes leave in their transactions
//! into the tree over L3 (`storage/sql_merkle.rs`), a step of up to `DRAIN_STEP_ROWS` mark rows
//! (a batch's ids each) at a time, in the background. It first makes sure the tree is complete (a new or stale tree
//! gets every row marked once). Idle, it looks again every `IDLE_INTERVAL`, so a busy worker's
//! marks are folded in steps of thousands: a wide node's buckets are rehashed once per step,
//! not once per id. A failed step is retried after `ERROR_BACKOFF`; marks are durable, so
//! nothing is lost to an error, a restart or a `kill -9`.
//!
//! The drain yields to ingestion: while the engine holds unsettled items it rests
//! `BUSY_REST_FACTOR` times as long as its last step took (so it uses at most a quarter of the
//! time, and of L3, for the tree), and it goes at full speed once the engine is idle. Under a
//! sustained full load the tree therefore trails the rows further (bounded by the load's
//! length, not lost); `sync-engine diff` drains every mark before it compares.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Stores;
use crate::metrics as m;
use crate::storage::sql_merkle::DRAIN_STEP_ROWS;

const IDLE_INTERVAL: Duration = Duration::from_millis(250);
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// While items are pending, rest this many times the last step's duration.
const BUSY_REST_FACTOR: u32 = 3;

pub(super) async fn run(stores: Arc<Stores>, pending: super::pending::PendingIds, stopping: CancellationToken) {
    let Some(l3) = stores.l3.as_deref().and_then(|l3| l3.as_sql()) else { return };
    let mut built = false;
    while !stopping.is_cancelled() {
        let pause = if !built {
            match l3.merkle_ensure_built().await {
                Ok(rebuilding) => {
                    if rebuilding {
                        tracing::info!("merkle tree not known to be complete: every L3 row is marked to rebuild it");
                    }
                    built = true;
                    Duration::ZERO
                }
                Err(error) => {
                    tracing::warn!(%error, "merkle tree: cannot check whether it is complete, retrying");
                    ERROR_BACKOFF
                }
            }
        } else {
            let started = std::time::Instant::now();
            match l3.merkle_drain_step(DRAIN_STEP_ROWS).await {
                Ok(step) => {
                    metrics::counter!(m::MERKLE_DRAINED_MARKS).increment(step.marks as u64);
                    let busy = pending.bytes() > 0;
                    if busy {
                        IDLE_INTERVAL.max(started.elapsed() * BUSY_REST_FACTOR)
                    } else if step.rows < DRAIN_STEP_ROWS {
                        IDLE_INTERVAL
                    } else {
                        Duration::ZERO
                    }
                }
                Err(error) => {
                    metrics::counter!(m::MERKLE_DRAIN_ERRORS).increment(1);
                    tracing::warn!(%error, "merkle drain step failed, retrying");
                    ERROR_BACKOFF
                }
            }
        };
        if pause.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
