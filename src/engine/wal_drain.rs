//! The engine's side of the write-ahead log: appending a batch when L3 is unavailable, and
//! the drain task that replays the log into L3 once L3 answers again.
//!
//! File I/O (and its fsync) runs on the blocking pool, never on an async worker thread. The
//! log sits behind a std Mutex, held only for one append or one bookkeeping step: sealed
//! segments are read without it, one frame at a time, so draining never blocks appends for
//! long and never loads the whole log into memory. The L3 circuit breaker is the drain's
//! probe: a failed drain keeps it open, a successful one closes it.
//!
//! Each replayed frame gets L3's verdict like a live batch: L1 and L2 entries that L3's rows
//! supersede are dropped (invariant 6). A frame L3 rejects is written item by item; an item
//! L3 rejects for its content is dropped from L1 and L2 and handed to whoever runs the engine
//! to dead-letter (`LateRejection`), so one bad item never blocks the drain. A stop request
//! ends the drain between frames: what is left is replayed at the next start.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::flushing::{apply_l2, invalidate_l2};
use super::{LateRejection, Stores};
use crate::item::SyncItem;
use crate::metrics as m;
use crate::resilience::circuit_breaker::CircuitError;
use crate::resilience::wal::{Failpoints, RecoveryReport, Scanned, SegmentReader, WalConfig, WalError, WriteAheadLog};
use crate::storage::redis::L2Op;
use crate::storage::sql::HeldRows;
use crate::storage::ArchiveStore;
use crate::storage::StoreError;

/// Retries of a replayed frame that lost a lock race (deadlock, lock-wait timeout).
const LOCK_RACE_RETRIES: u32 = 5;

const DRAIN_INTERVAL: Duration = Duration::from_millis(500);
/// Segments roll over at this size, so drained space is given back in steps.
const SEGMENT_BYTES: u64 = 64 << 20;

pub(crate) type SharedWal = Arc<Mutex<WriteAheadLog>>;

/// Opens (and recovers) the log, reporting what recovery found.
pub(super) async fn open(dir: PathBuf, max_bytes: u64) -> Result<SharedWal, WalError> {
    let config = WalConfig { dir, max_bytes, segment_bytes: SEGMENT_BYTES.min(max_bytes) };
    let (log, report) = tokio::task::spawn_blocking(move || WriteAheadLog::open(config, Failpoints::default()))
        .await
        .map_err(|error| WalError::Io(std::io::Error::other(error)))??;
    report_recovery(&report);
    metrics::gauge!(m::WAL_BYTES).set(log.total_bytes() as f64);
    Ok(Arc::new(Mutex::new(log)))
}

fn report_recovery(report: &RecoveryReport) {
    if report.segments > 0 {
        tracing::warn!(
            segments = report.segments,
            records = report.records,
            bytes = report.bytes,
            "write-ahead log holds batches from before the start, draining them into L3"
        );
    }
    if report.torn_bytes > 0 {
        metrics::counter!(m::WAL_TORN_BYTES).increment(report.torn_bytes);
        tracing::warn!(
            bytes = report.torn_bytes,
            "cut a torn write-ahead log tail (never settled: Kafka redelivers it)"
        );
    }
    for record in &report.corrupt {
        metrics::counter!(m::WAL_CORRUPT_RECORDS).increment(1);
        tracing::error!(segment = %record.segment.display(), position = record.position, items = ?record.items, "corrupt write-ahead log record skipped");
    }
}

/// Appends a batch and fsyncs it; the batch is settled once this returns `Ok`.
pub(super) async fn append(wal: &SharedWal, items: &[&SyncItem]) -> Result<(), WalError> {
    let owned: Vec<SyncItem> = items.iter().map(|item| (*item).clone()).collect();
    let wal = wal.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut log = wal.lock().map_err(|_| WalError::Io(std::io::Error::other("wal lock poisoned")))?;
        let refs: Vec<&SyncItem> = owned.iter().collect();
        log.append(&refs).map(|_| log.total_bytes())
    })
    .await
    .map_err(|error| WalError::Io(std::io::Error::other(error)))?;
    match result {
        Ok(total_bytes) => {
            metrics::gauge!(m::WAL_BYTES).set(total_bytes as f64);
            metrics::counter!(m::WAL_APPENDED_ITEMS).increment(items.len() as u64);
            Ok(())
        }
        Err(error) => {
            metrics::counter!(m::WAL_ERRORS, "operation" => "append").increment(1);
            Err(error)
        }
    }
}

/// Replays the log into L3 whenever it holds anything and the L3 breaker lets a call through.
pub(super) async fn run_drain(stores: Arc<Stores>, stopping: CancellationToken) {
    let (Some(wal), Some(_)) = (stores.wal.clone(), stores.l3.as_ref()) else { return };
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(DRAIN_INTERVAL) => {}
        }
        let empty = wal.lock().map(|log| log.is_empty()).unwrap_or(true);
        if empty {
            continue;
        }
        // The drain is the L3 breaker's probe: skipped while it is open, and its outcome
        // closes or reopens it.
        match stores.circuits.l3.call(drain(&stores, &wal, &stopping)).await {
            Ok(()) | Err(CircuitError::Open(_)) => {}
            Err(CircuitError::Failed(error)) => {
                metrics::counter!(m::WAL_ERRORS, "operation" => "drain").increment(1);
                tracing::warn!(%error, "write-ahead log drain stopped, will retry");
            }
        }
    }
}

/// Drains every sealed segment (sealing the active one when nothing else is left), until
/// done or asked to stop.
async fn drain(stores: &Stores, wal: &SharedWal, stopping: &CancellationToken) -> Result<(), StoreError> {
    let Some(l3) = stores.l3.as_ref() else { return Ok(()) };
    loop {
        if stopping.is_cancelled() {
            return Ok(());
        }
        let next = lock(wal)?.next_to_drain();
        let Some(path) = next else { return Ok(()) };
        let started = Instant::now();
        let (frames_tx, mut frames_rx) = mpsc::channel::<Scanned>(2);
        let failpoints = lock(wal)?.failpoints().clone();
        let reading_path = path.clone();
        let reader = tokio::task::spawn_blocking(move || -> Result<(), WalError> {
            let Some(mut reader) = SegmentReader::open(&reading_path, &failpoints)? else { return Ok(()) };
            while let Some(scanned) = reader.next_frame()? {
                if frames_tx.blocking_send(scanned).is_err() {
                    break; // the drain stopped (L3 failed): the segment stays for next time
                }
            }
            Ok(())
        });
        let mut drained = 0u64;
        while let Some(scanned) = frames_rx.recv().await {
            if stopping.is_cancelled() {
                tracing::info!("stopping: the rest of the write-ahead log drains at the next start");
                return Ok(());
            }
            match scanned {
                Scanned::Batch(items) => {
                    let refs: Vec<&SyncItem> = items.iter().collect();
                    let held = write_frame(stores, l3.as_ref(), &refs).await?;
                    caches_follow_drained(stores, &refs, &held).await;
                    drained += items.len() as u64;
                    metrics::counter!(m::WAL_DRAINED_ITEMS).increment(items.len() as u64);
                }
                Scanned::Corrupt(record) => {
                    metrics::counter!(m::WAL_CORRUPT_RECORDS).increment(1);
                    tracing::error!(segment = %record.segment.display(), position = record.position, items = ?record.items, "corrupt write-ahead log record skipped");
                }
            }
        }
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(StoreError::Unavailable(format!("reading the write-ahead log: {error}"))),
            Err(error) => return Err(StoreError::Unavailable(format!("write-ahead log reader: {error}"))),
        }
        let total = {
            let mut log = lock(wal)?;
            log.remove_drained(&path).map_err(|error| StoreError::Unavailable(error.to_string()))?;
            log.total_bytes()
        };
        metrics::gauge!(m::WAL_BYTES).set(total as f64);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            items = drained,
            seconds,
            items_per_sec = drained as f64 / seconds.max(1e-6),
            "drained a write-ahead log segment into L3"
        );
    }
}

/// Writes one replayed frame: the newest item per id in one transaction; a rejected frame is
/// written item by item in its original order (so an older valid version still lands), and
/// each item L3 rejects is reported instead of blocking the drain. Lost lock races are retried
/// here: they say nothing about L3's health.
async fn write_frame(stores: &Stores, l3: &dyn ArchiveStore, items: &[&SyncItem]) -> Result<HeldRows, StoreError> {
    // Into the membership filter before L3 can hold them (a restart's filter is empty).
    super::filter_task::note_l3_write(stores, items);
    let newest = newest_per_id(items);
    match write_with_retries(stores, l3, &newest).await {
        Err(StoreError::Rejected(error)) => {
            tracing::warn!(%error, items = items.len(), "L3 rejected a write-ahead log frame, writing it item by item");
        }
        other => return other,
    }
    let mut held = HeldRows::new();
    for item in items {
        match write_with_retries(stores, l3, &[*item]).await {
            Ok(rows) => held.extend(rows),
            Err(StoreError::Rejected(reason)) => reject_late(stores, item, reason).await,
            Err(other) => return Err(other),
        }
    }
    Ok(held)
}

/// One L3 write, retried a few times when it loses a lock race.
async fn write_with_retries(
    stores: &Stores,
    l3: &dyn ArchiveStore,
    items: &[&SyncItem],
) -> Result<HeldRows, StoreError> {
    let mut attempt = 0;
    loop {
        match l3.write_batch(items, stores.sql_write_timeout).await {
            Err(StoreError::Transient(error)) if attempt < LOCK_RACE_RETRIES => {
                attempt += 1;
                metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "transient").increment(1);
                tracing::info!(%error, attempt, "write-ahead log drain lost a lock race, retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// The newest item per id, in first-seen order (a frame holds a whole batch, duplicates too).
fn newest_per_id<'a>(items: &[&'a SyncItem]) -> Vec<&'a SyncItem> {
    let mut position: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut newest: Vec<&SyncItem> = Vec::with_capacity(items.len());
    for item in items {
        match position.get(item.id.as_str()) {
            Some(&at) if item.supersedes(newest[at]) => newest[at] = item,
            Some(_) => {}
            None => {
                position.insert(&item.id, newest.len());
                newest.push(item);
            }
        }
    }
    newest
}

/// An item L3 will never take: out of the caches, counted, and handed over for dead-lettering.
async fn reject_late(stores: &Stores, item: &SyncItem, reason: String) {
    metrics::counter!(m::WAL_REJECTED_ITEMS).increment(1);
    metrics::counter!(m::STORE_ERRORS, "tier" => "l3", "kind" => "rejected").increment(1);
    let origin = item.origin.as_ref();
    tracing::error!(
        id = %item.id,
        version = item.version,
        topic = origin.map(|o| o.topic.as_ref()),
        partition = origin.map(|o| o.partition),
        offset = origin.map(|o| o.offset),
        %reason,
        "L3 rejected an item from the write-ahead log; it is dead-lettered, not stored"
    );
    stores.l1.remove_exact(item).await;
    invalidate_l2(stores, &[item.id.as_str()]).await;
    if stores.late_rejections.send(LateRejection { item: item.clone(), reason }).is_err() {
        tracing::error!(id = %item.id, "nobody takes late rejections: the item is only logged");
    }
}

/// Drops every L1 and L2 entry that the rows L3 now holds supersede (WAL'd items reached L1
/// and L2 before L3 had its say).
async fn caches_follow_drained(stores: &Stores, items: &[&SyncItem], held: &HeldRows) {
    let mut ops = Vec::with_capacity(items.len());
    for item in items {
        if let Some(row) = held.get(&item.id) {
            stores.l1.drop_if_behind(&item.id, row).await;
            ops.push(L2Op::DropIfBehind(&item.id, row));
        }
    }
    let failed = apply_l2(stores, &ops).await;
    stores.l2_dirty.add(failed);
}

fn lock(wal: &SharedWal) -> Result<std::sync::MutexGuard<'_, WriteAheadLog>, StoreError> {
    wal.lock().map_err(|_| StoreError::Unavailable("wal lock poisoned".into()))
}
