//! The L2 auditor: walks every L2 entry, compares it with L3 and repairs what differs.
//!
//! L2 is written after L3 and only with what L3 holds (invariant 6), but Redis is shared: an
//! operator's hand, a restore of an old RDB file, a bug or a bit flip can leave entries that
//! disagree with L3, and reads would serve them until they expire. A pass walks L2 a page at a
//! time (`SCAN` on each master, `CacheStore::scan_page`), at most `keys_per_sec`, reads each
//! page from both tiers in one round trip each, and sorts every entry:
//!
//! - **agreeing**: L2 holds L3's row exactly (version, origin, content hash, tombstone);
//! - **stale**: L3's row supersedes it, or it is a version L3 refused (same version, other
//!   origin): dropped behind L3's row and rewritten from it through the version guard;
//! - **corrupt**: its content does not match its own stored hash, or differs from L3's at the
//!   same version and origin: deleted and rewritten from L3;
//! - **unreadable**: a key without the fields of an entry (or one gone since the scan):
//!   deleted, and rewritten from L3 when L3 has the id;
//! - **ahead of L3**: newer than L3's row (L3 is behind: a write-ahead log still draining):
//!   left alone, and the background auditor does not run while the WAL holds batches;
//! - **only in L2**: no L3 row (items routed without L3): reported, never deleted.
//!
//! A stale or unreadable verdict is checked again a few seconds later before it counts: the
//! flush writes L2 just after L3, so an entry seen between the two is not drift, and neither
//! is a key that vanished since the scan (expired, or dropped behind L3).
//!
//! The background task (`run`) repeats passes while the engine runs; `sync-engine verify
//! --l2 [--repair]` runs one on demand. A rewrite is a guarded write, so a newer version
//! written meanwhile by the flush always wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Stores;
use crate::item::SyncItem;
use crate::metrics as m;
use crate::storage::redis::L2Op;
use crate::storage::sql::HeldRow;
use crate::storage::{ArchiveStore, CacheStore, ScanCursor, StoreError, Stored};

/// Ids per page: one `SCAN` count, one L2 pipeline and one L3 `IN (…)` query.
const PAGE: usize = 500;

/// When the first background pass starts, and the rest between two passes.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(5);
const PAUSE_BETWEEN_PASSES: Duration = Duration::from_secs(60);

/// How long a stale or missing entry is given before it counts: longer than the flush takes
/// to bring L2 in line with an L3 commit (its L2 attempt deadline is 3 s).
const RECHECK_AFTER: Duration = Duration::from_secs(4);

/// Ids of each kind kept in a report (counts are exact; lists stop here).
const LISTED: usize = 1000;

#[derive(Clone, Copy, Debug)]
pub struct AuditOptions {
    /// Entries read per second at most; 0: as fast as the stores answer.
    pub keys_per_sec: u64,
    /// Repair what differs (else only report).
    pub repair: bool,
    /// TTL of rewritten entries, seconds (0: none).
    pub ttl_secs: u64,
}

/// What one pass found. Counts are exact; the id lists keep the first thousand of each kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub scanned: u64,
    pub agreeing: u64,
    pub stale: u64,
    pub corrupt: u64,
    pub unreadable: u64,
    pub ahead_of_l3: u64,
    pub only_in_l2: u64,
    pub repaired: u64,
    /// Divergent ids (stale, corrupt, unreadable), the first thousand.
    pub divergent_ids: Vec<String>,
    pub duration: Duration,
}

impl AuditReport {
    /// Entries that disagree with L3.
    pub fn drift(&self) -> u64 {
        self.stale + self.corrupt + self.unreadable
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Agreeing,
    Stale,
    Corrupt,
    Unreadable,
    AheadOfL3,
    OnlyInL2,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Stale => "stale",
            Verdict::Corrupt => "corrupt",
            Verdict::Unreadable => "unreadable",
            _ => "none",
        }
    }
}

/// The verdict on one L2 entry (`None`: unreadable) against L3's row of the id.
fn judge(l2: Option<&Stored>, l3: Option<&Stored>) -> Verdict {
    let Some(cached) = l2 else { return Verdict::Unreadable };
    if cached.hash_matches() == Some(false) {
        return Verdict::Corrupt;
    }
    let Some(row) = l3 else { return Verdict::OnlyInL2 };
    let (cached, row) = (&cached.item, &row.item);
    if cached.version == row.version && cached.origin == row.origin {
        let same = cached.content_hash() == row.content_hash() && cached.is_tombstone() == row.is_tombstone();
        return if same { Verdict::Agreeing } else { Verdict::Corrupt };
    }
    if cached.supersedes(row) {
        Verdict::AheadOfL3
    } else {
        Verdict::Stale
    }
}

fn held_row(item: &SyncItem) -> HeldRow {
    HeldRow {
        version: item.version,
        origin: item.origin.clone(),
        content_hash: item.content_hash(),
        deleted: item.is_tombstone(),
        state: item.state.clone(),
    }
}

/// One pass over all of L2. Fails only if a page cannot be scanned or read from L3.
pub async fn audit_pass(
    l2: &dyn CacheStore,
    l3: &dyn ArchiveStore,
    options: AuditOptions,
    stopping: &CancellationToken,
) -> Result<AuditReport, StoreError> {
    let started = Instant::now();
    let mut report = AuditReport::default();
    let mut cursor = Some(ScanCursor::START);
    while let Some(at) = cursor {
        if stopping.is_cancelled() {
            break;
        }
        let page_started = Instant::now();
        let (ids, next) = l2.scan_page(at, PAGE).await?;
        cursor = next;
        if !ids.is_empty() {
            audit_page(l2, l3, &ids, options, &mut report).await?;
        }
        if options.keys_per_sec > 0 {
            let due = Duration::from_secs_f64(ids.len() as f64 / options.keys_per_sec as f64);
            tokio::time::sleep(due.saturating_sub(page_started.elapsed())).await;
        }
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// One id's verdict, with what each tier held when it was judged.
struct Judged {
    id: String,
    verdict: Verdict,
    /// L3's row, when it has one.
    row: Option<Stored>,
    /// The L2 entry, when it has one.
    entry: Option<Stored>,
}

/// Each id's verdict: one L2 pipeline, one L3 query.
async fn judged(l2: &dyn CacheStore, l3: &dyn ArchiveStore, ids: &[&str]) -> Result<Vec<Judged>, StoreError> {
    let mut cached = l2.get_many(ids).await;
    let mut rows: HashMap<String, Stored> =
        l3.get_many(ids).await?.into_iter().map(|stored| (stored.item.id.clone(), stored)).collect();
    Ok(ids
        .iter()
        .map(|id| {
            let (row, entry) = (rows.remove(*id), cached.remove(*id));
            Judged { id: (*id).to_owned(), verdict: judge(entry.as_ref(), row.as_ref()), row, entry }
        })
        .collect())
}

/// The verdict on a suspect looked at again: stale only if the entry is still behind the row
/// L3 held at the first look, the row it has had the whole wait to catch up with. An entry
/// that caught up with that row while L3 moved on again is a write in flight once more (an id
/// updated steadily), not drift: it counts as agreeing, and the next pass looks at it afresh.
fn rechecked(again: &Judged, first_row: Option<&Stored>) -> Verdict {
    let caught_up = || matches!(judge(again.entry.as_ref(), first_row), Verdict::Agreeing | Verdict::AheadOfL3);
    if again.verdict == Verdict::Stale && first_row.is_some() && caught_up() {
        Verdict::Agreeing
    } else {
        again.verdict
    }
}

async fn audit_page(
    l2: &dyn CacheStore,
    l3: &dyn ArchiveStore,
    ids: &[String],
    options: AuditOptions,
    report: &mut AuditReport,
) -> Result<(), StoreError> {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (mut verdicts, suspects): (Vec<_>, Vec<_>) = judged(l2, l3, &refs)
        .await?
        .into_iter()
        .partition(|judged| !matches!(judged.verdict, Verdict::Stale | Verdict::Unreadable));
    // A stale or missing entry may be a write in flight (L3 committed, L2 not yet written, or
    // an entry dropped behind L3 since the scan): look again once such a write is over.
    if !suspects.is_empty() {
        tokio::time::sleep(RECHECK_AFTER).await;
        let suspect_ids: Vec<&str> = suspects.iter().map(|judged| judged.id.as_str()).collect();
        let first_rows: HashMap<&str, Option<&Stored>> =
            suspects.iter().map(|judged| (judged.id.as_str(), judged.row.as_ref())).collect();
        for mut again in judged(l2, l3, &suspect_ids).await? {
            let gone = again.verdict == Verdict::Unreadable && !l2.exists(&again.id).await.unwrap_or(true);
            if !gone {
                again.verdict = rechecked(&again, first_rows.get(again.id.as_str()).copied().flatten());
                verdicts.push(again);
            }
        }
    }
    let mut to_drop = Vec::new();
    let mut to_write = Vec::new();
    for Judged { id, verdict, row, .. } in verdicts {
        report.scanned += 1;
        match verdict {
            Verdict::Agreeing => report.agreeing += 1,
            Verdict::AheadOfL3 => report.ahead_of_l3 += 1,
            Verdict::OnlyInL2 => report.only_in_l2 += 1,
            Verdict::Stale | Verdict::Corrupt | Verdict::Unreadable => {
                match verdict {
                    Verdict::Stale => report.stale += 1,
                    Verdict::Corrupt => report.corrupt += 1,
                    _ => report.unreadable += 1,
                }
                metrics::counter!(m::L2_AUDIT_DRIFT, "kind" => verdict.label()).increment(1);
                if report.divergent_ids.len() < LISTED {
                    report.divergent_ids.push(id.clone());
                }
                // A stale entry is dropped behind L3's row (so a newer one written meanwhile
                // stays); a corrupt or unreadable one is deleted outright.
                if verdict != Verdict::Stale || row.is_none() {
                    to_drop.push(id);
                }
                if let Some(row) = row {
                    to_write.push(row.item);
                }
            }
        }
    }
    metrics::counter!(m::L2_AUDIT_KEYS).increment(ids.len() as u64);
    if options.repair && (!to_drop.is_empty() || !to_write.is_empty()) {
        let to_drop: Vec<&str> = to_drop.iter().map(String::as_str).collect();
        report.repaired += repair(l2, &to_drop, &to_write, options.ttl_secs).await;
    }
    Ok(())
}

/// Deletes `to_drop`, then drops what is behind each L3 row and writes the row through the
/// guard. Returns the ids repaired.
async fn repair(l2: &dyn CacheStore, to_drop: &[&str], rows: &[SyncItem], ttl_secs: u64) -> u64 {
    if let Err(error) = l2.invalidate(to_drop).await {
        tracing::warn!(%error, "L2 audit could not delete divergent entries; the next pass retries");
        return 0;
    }
    let held: Vec<HeldRow> = rows.iter().map(held_row).collect();
    let mut ops: Vec<L2Op> = rows.iter().zip(&held).map(|(row, held)| L2Op::DropIfBehind(&row.id, held)).collect();
    ops.extend(rows.iter().map(|row| L2Op::Write(row, ttl_secs)));
    let failed = l2.apply(&ops).await;
    let mut failed_ids: Vec<&str> = failed.iter().map(|(id, _)| id.as_str()).collect();
    failed_ids.sort_unstable();
    failed_ids.dedup();
    let mut repaired: Vec<&str> = to_drop.iter().copied().chain(rows.iter().map(|row| row.id.as_str())).collect();
    repaired.sort_unstable();
    repaired.dedup();
    let count = repaired.iter().filter(|id| failed_ids.binary_search(id).is_err()).count() as u64;
    metrics::counter!(m::L2_AUDIT_REPAIRED).increment(count);
    count
}

/// Audits L2 against L3 while the engine runs: a pass, a pause, again, at most
/// `keys_per_sec` entries a second (0 turns the auditor off). Skips while the write-ahead log
/// holds batches, since L3 is behind then.
pub(super) async fn run(stores: Arc<Stores>, keys_per_sec: u64, stopping: CancellationToken) {
    let (Some(l2), Some(l3)) = (stores.l2.clone(), stores.l3.clone()) else { return };
    if keys_per_sec == 0 {
        return;
    }
    let mut pause = FIRST_PASS_AFTER;
    loop {
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = PAUSE_BETWEEN_PASSES;
        let wal_pending = stores.wal.as_ref().is_some_and(|wal| wal.lock().map(|log| !log.is_empty()).unwrap_or(true));
        if wal_pending {
            continue;
        }
        let options = AuditOptions { keys_per_sec, repair: true, ttl_secs: stores.redis_ttl_secs() };
        match audit_pass(l2.as_ref(), l3.as_ref(), options, &stopping).await {
            Ok(report) => {
                metrics::gauge!(m::L2_AUDIT_PASS_SECONDS).set(report.duration.as_secs_f64());
                if report.drift() > 0 {
                    tracing::warn!(
                        scanned = report.scanned,
                        stale = report.stale,
                        corrupt = report.corrupt,
                        unreadable = report.unreadable,
                        repaired = report.repaired,
                        "L2 audit found entries that disagree with L3"
                    );
                } else {
                    tracing::debug!(scanned = report.scanned, "L2 audit pass: L2 agrees with L3");
                }
            }
            Err(error) => tracing::warn!(%error, "L2 audit pass failed; the next pass starts over"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::Origin;

    fn stored(version: u64, content: &str, offset: i64) -> Stored {
        let origin = Origin { topic: Arc::from("t"), partition: 0, offset };
        let item = SyncItem::new("a", content.as_bytes().to_vec()).with_version(version).with_origin(origin);
        Stored { stored_hash: Some(item.content_hash()), item }
    }

    #[test]
    fn each_disagreement_gets_its_verdict() {
        let row = stored(2, "two", 10);
        assert_eq!(judge(Some(&row), Some(&row)), Verdict::Agreeing);
        assert_eq!(judge(Some(&stored(1, "one", 5)), Some(&row)), Verdict::Stale);
        assert_eq!(
            judge(Some(&stored(2, "other origin", 99).clone()), Some(&stored(2, "two", 98))),
            Verdict::AheadOfL3
        );
        assert_eq!(judge(Some(&stored(3, "three", 11)), Some(&row)), Verdict::AheadOfL3);
        assert_eq!(judge(Some(&stored(2, "flipped", 10)), Some(&row)), Verdict::Corrupt, "same version, other bytes");
        let mut bad_hash = row.clone();
        bad_hash.stored_hash = Some([0; 32]);
        assert_eq!(judge(Some(&bad_hash), None), Verdict::Corrupt, "its own hash fails, even without L3");
        assert_eq!(judge(None, Some(&row)), Verdict::Unreadable);
        assert_eq!(judge(Some(&row), None), Verdict::OnlyInL2);
        let mut tombstone = row.clone();
        tombstone.item.content = None;
        tombstone.stored_hash = None;
        assert_eq!(judge(Some(&tombstone), Some(&row)), Verdict::Corrupt, "a tombstone where L3 is live");
    }
}
