//! Queries over many ids on `SyncEngine`, answered by L3 (the tier that holds every item):
//! `scan_prefix`, `count_prefix`, `delete_prefix` over an id prefix, and `scan_state`,
//! `count_state` over the items' `state`.
//!
//! Ids are dotted paths, and a prefix matches at a dot boundary: `uk.nhs` selects `uk.nhs`
//! itself and every `uk.nhs.…`, never `uk.nhsx.1`. One trailing dot is accepted and ignored
//! (`uk.nhs.` is `uk.nhs`). An empty prefix (or a lone `.`) is refused with
//! `EngineError::InvalidArgument`: "everything" is never one typo away from `delete_prefix`.
//! `%` and `_` in a prefix are plain characters (escaped in the SQL, which binds every value).
//!
//! Results are live items (tombstones are left out) ordered by id, from L3 alone: an item still
//! pending, routed without L3, or waiting in the write-ahead log while L3 is down is not seen.
//! Scans fill no cache (a scan of thousands would evict the hot set of L1). Scans page by key:
//! `scan_prefix_after(prefix, Some(last_id), limit)` continues after the last id of a page.
//!
//! `delete_prefix` first flushes what was accepted before the call, then pages through L3's
//! live ids under the prefix a thousand at a time and deletes each page with `delete_many`:
//! versioned tombstones through the normal write path, so L1, L2 and L3 all get them and a
//! later write with a newer version wins as usual (invariant 2).

use std::sync::Arc;

use super::{EngineError, SyncEngine};
use crate::item::SyncItem;
use crate::storage::sql::Selection;
use crate::storage::ArchiveStore;

/// Ids `delete_prefix` reads and deletes per round: one L3 page, one batch of tombstones.
pub const DELETE_PAGE_IDS: usize = 1000;

/// The prefix a query uses: one trailing dot dropped; then 1..=255 bytes, no control character.
fn prefix_argument(prefix: &str) -> Result<&str, EngineError> {
    let trimmed = prefix.strip_suffix('.').unwrap_or(prefix);
    if trimmed.is_empty() {
        return Err(EngineError::InvalidArgument(format!(
            "prefix {prefix:?} is empty: give at least one path segment (an empty prefix would select every item)"
        )));
    }
    crate::decode::validate_id(trimmed.as_bytes())
        .map_err(|reason| EngineError::InvalidArgument(format!("prefix {prefix:?}: {reason}")))?;
    Ok(trimmed)
}

fn state_argument(state: &str) -> Result<&str, EngineError> {
    crate::item::validate_state(state).map_err(EngineError::InvalidArgument)?;
    Ok(state)
}

impl SyncEngine {
    fn l3_for(&self, call: &'static str) -> Result<&dyn ArchiveStore, EngineError> {
        let stores = self.stores.as_ref().ok_or(EngineError::NotStarted)?;
        stores.l3.as_deref().ok_or(EngineError::NeedsL3(call))
    }

    /// The first `limit` live items whose id is `prefix` or starts with `prefix.`, ordered
    /// by id, read from L3.
    pub async fn scan_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<Arc<SyncItem>>, EngineError> {
        self.scan_prefix_after(prefix, None, limit).await
    }

    /// Like `scan_prefix`, only ids after `after` (the last id of the previous page).
    pub async fn scan_prefix_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<SyncItem>>, EngineError> {
        let selection = Selection::Prefix(prefix_argument(prefix)?);
        let items = self.l3_for("scan_prefix")?.scan(selection, after, limit).await?;
        Ok(items.into_iter().map(Arc::new).collect())
    }

    /// How many live items L3 holds under `prefix` (at a dot boundary, as `scan_prefix`).
    pub async fn count_prefix(&self, prefix: &str) -> Result<u64, EngineError> {
        let selection = Selection::Prefix(prefix_argument(prefix)?);
        Ok(self.l3_for("count_prefix")?.count(selection).await?)
    }

    /// Deletes every live item under `prefix` with versioned tombstones (as `delete_many`),
    /// a page of `DELETE_PAGE_IDS` ids at a time; returns how many it deleted. Items
    /// accepted before the call are flushed first, so they are deleted too. On an error, the
    /// pages before it are deleted and the call may simply be repeated.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, EngineError> {
        let selection = Selection::Prefix(prefix_argument(prefix)?);
        let l3 = self.l3_for("delete_prefix")?;
        self.flush().await?;
        let mut deleted = 0u64;
        let mut after: Option<String> = None;
        loop {
            let ids = l3.scan_ids(selection, after.as_deref(), DELETE_PAGE_IDS).await?;
            if ids.is_empty() {
                break;
            }
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            self.delete_many(&refs).await?;
            deleted += ids.len() as u64;
            if ids.len() < DELETE_PAGE_IDS {
                break;
            }
            after = ids.into_iter().next_back();
        }
        Ok(deleted)
    }

    /// The first `limit` live items whose state is exactly `state`, ordered by id, from L3
    /// (its `(state, id)` index).
    pub async fn scan_state(&self, state: &str, limit: usize) -> Result<Vec<Arc<SyncItem>>, EngineError> {
        self.scan_state_after(state, None, limit).await
    }

    /// Like `scan_state`, only ids after `after` (the last id of the previous page).
    pub async fn scan_state_after(
        &self,
        state: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<SyncItem>>, EngineError> {
        let selection = Selection::State(state_argument(state)?);
        let items = self.l3_for("scan_state")?.scan(selection, after, limit).await?;
        Ok(items.into_iter().map(Arc::new).collect())
    }

    /// How many live items L3 holds in `state`.
    pub async fn count_state(&self, state: &str) -> Result<u64, EngineError> {
        let selection = Selection::State(state_argument(state)?);
        Ok(self.l3_for("count_state")?.count(selection).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_loses_one_trailing_dot_and_an_empty_one_is_refused() {
        assert_eq!(prefix_argument("uk.nhs").unwrap(), "uk.nhs");
        assert_eq!(prefix_argument("uk.nhs.").unwrap(), "uk.nhs");
        assert_eq!(prefix_argument("uk.nhs..").unwrap(), "uk.nhs.");
        assert_eq!(prefix_argument("a%_").unwrap(), "a%_");
        for refused in ["", ".", "a\nb"] {
            assert!(matches!(prefix_argument(refused), Err(EngineError::InvalidArgument(_))), "{refused:?}");
        }
        assert!(matches!(prefix_argument(&"a".repeat(256)), Err(EngineError::InvalidArgument(_))));
        assert!(matches!(state_argument("no way"), Err(EngineError::InvalidArgument(_))));
        assert_eq!(state_argument("active").unwrap(), "active");
    }
}
