//! Ids accepted by `enqueue` and not yet settled, for `SyncEngine::status`.
//!
//! An id is counted in when its item is queued and counted out when its acknowledgement is
//! resolved: `Ack::send`, at the flush task's one settle call site, counts out *before* it
//! sends, so a caller whose `submit` has returned never sees its id as pending. An `Ack`
//! dropped unsent (the engine stopped, the queue was closed) counts out too. A count, not a
//! flag, because the same id can be in flight more than once.
//!
//! The bytes of the items in flight are counted the same way: they are the engine's share
//! of its memory pressure (`backpressure.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::SettleResult;

#[derive(Clone, Default)]
pub(super) struct PendingIds(Arc<Inner>);

#[derive(Default)]
struct Inner {
    counts: Mutex<HashMap<String, u32>>,
    bytes: AtomicU64,
}

impl PendingIds {
    pub(super) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Bytes of the items accepted and not yet settled.
    pub(super) fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::SeqCst)
    }

    /// Counts the id and its bytes in; the returned acknowledgement counts them out when
    /// sent or dropped.
    pub(super) fn track(&self, id: &str, bytes: u64, sender: oneshot::Sender<SettleResult>) -> Ack {
        *self.lock().entry(id.to_owned()).or_insert(0) += 1;
        self.0.bytes.fetch_add(bytes, Ordering::SeqCst);
        Ack { sender: Some(sender), id: id.to_owned(), bytes, pending: self.clone() }
    }

    fn release(&self, id: &str, bytes: u64) {
        self.0.bytes.fetch_sub(bytes, Ordering::SeqCst);
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(id);
            }
        }
    }

    // Held only for one map operation, never across an await; a panic elsewhere cannot
    // leave the map half-updated, so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A queued item's settle acknowledgement, counted in `PendingIds` until resolved.
pub(super) struct Ack {
    /// `None` once sent.
    sender: Option<oneshot::Sender<SettleResult>>,
    id: String,
    bytes: u64,
    pending: PendingIds,
}

impl Ack {
    /// Counts the id out, then resolves the receipt (as `oneshot::Sender::send`).
    pub(super) fn send(mut self, result: SettleResult) -> Result<(), SettleResult> {
        self.pending.release(&self.id, self.bytes);
        let sender = self.sender.take().expect("an Ack is sent once: send takes self");
        sender.send(result)
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.pending.release(&self.id, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{SettleError, Tier};

    #[test]
    fn an_id_is_pending_until_every_ack_for_it_is_sent_or_dropped() {
        let pending = PendingIds::default();
        let (first, first_receipt) = oneshot::channel();
        let (second, _second_receipt) = oneshot::channel();
        let first = pending.track("a", 10, first);
        let second = pending.track("a", 5, second);
        assert!(pending.contains("a"));
        assert_eq!(pending.bytes(), 15);
        first.send(Ok(Tier::L3)).unwrap();
        assert_eq!(first_receipt.blocking_recv().unwrap(), Ok(Tier::L3));
        assert!(pending.contains("a"), "a second enqueue of the id is still in flight");
        assert_eq!(pending.bytes(), 5);
        drop(second);
        assert!(!pending.contains("a"));
        assert_eq!(pending.bytes(), 0);
        assert!(pending.lock().is_empty());
    }

    #[test]
    fn an_ack_whose_receipt_is_gone_still_counts_the_id_out() {
        let pending = PendingIds::default();
        let (sender, receipt) = oneshot::channel();
        let ack = pending.track("b", 7, sender);
        drop(receipt);
        // The receiver is gone: send fails, and the id is still counted out.
        assert_eq!(ack.send(Err(SettleError::Abandoned)), Err(Err(SettleError::Abandoned)));
        assert!(!pending.contains("b"));
        assert_eq!(pending.bytes(), 0);
    }
}
