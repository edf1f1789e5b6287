//! `SyncItem`: what the engine stores, and the "newest wins" ordering (invariant 2).
//!
//! An item is an id, a version and opaque bytes (or a tombstone), with an optional `state`: a
//! short application label ("pending", "active", …) that L3 indexes for `scan_state`. A state
//! change is a new version of the item like any other change. Where it came from in Kafka
//! (its `Origin`) breaks ties between equal versions: at equal version the later record of
//! the same partition wins, and a record compared with itself is a no-op. Items that did not
//! come from Kafka (library submits) have no origin, so at equal version the stored one stays.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Longest id in bytes (it is the L3 primary key).
pub const MAX_ID_BYTES: usize = 255;

/// Longest `state` in bytes (the L3 column is `VARBINARY(64)`).
pub const MAX_STATE_BYTES: usize = 64;

/// Validates an item state: 1..=64 bytes of `[A-Za-z0-9_.-]`. The error says what is wrong.
pub fn validate_state(state: &str) -> Result<(), String> {
    if state.is_empty() || state.len() > MAX_STATE_BYTES {
        return Err(format!("state of {} bytes, expected 1..={MAX_STATE_BYTES}", state.len()));
    }
    match state.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        Some(bad) => Err(format!("state contains {bad:?}: only A-Z, a-z, 0-9, '_', '.' and '-' are allowed")),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentType {
    Json,
    Binary,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "json",
            ContentType::Binary => "binary",
        }
    }

    pub fn parse(text: &str) -> Option<ContentType> {
        match text {
            "json" => Some(ContentType::Json),
            "binary" => Some(ContentType::Binary),
            _ => None,
        }
    }

    /// A valid JSON object or array is json; anything else is binary.
    pub fn detect(content: &[u8]) -> ContentType {
        let first = content.iter().find(|b| !b.is_ascii_whitespace());
        if matches!(first, Some(b'{') | Some(b'[')) && is_valid_json(content) {
            ContentType::Json
        } else {
            ContentType::Binary
        }
    }
}

pub fn is_valid_json(content: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(content).is_ok()
}

/// Where a Kafka record came from: the tie-breaker at equal versions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// One item operation: an upsert (content is `Some`) or a versioned tombstone (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncItem {
    pub id: String,
    pub version: u64,
    pub content: Option<Bytes>,
    pub content_type: ContentType,
    pub origin: Option<Origin>,
    /// An application label, indexed in L3 (`scan_state`); see `validate_state`.
    pub state: Option<String>,
}

impl SyncItem {
    /// An upsert versioned with the current time in milliseconds; the type is detected.
    pub fn new(id: impl Into<String>, content: impl Into<Bytes>) -> SyncItem {
        let content = content.into();
        SyncItem {
            id: id.into(),
            version: now_ms(),
            content_type: ContentType::detect(&content),
            content: Some(content),
            origin: None,
            state: None,
        }
    }

    /// A JSON upsert versioned with the current time in milliseconds. Takes the value or a
    /// reference to it. (`id` is a `String`, not `impl Into<String>`, so the seed's
    /// `SyncItem::from_json("…".into(), json!(…))` infers its type.)
    pub fn from_json(id: String, value: impl std::borrow::Borrow<serde_json::Value>) -> SyncItem {
        SyncItem {
            id,
            version: now_ms(),
            content: Some(Bytes::from(value.borrow().to_string())),
            content_type: ContentType::Json,
            origin: None,
            state: None,
        }
    }

    /// A versioned tombstone.
    pub fn tombstone(id: impl Into<String>, version: u64) -> SyncItem {
        SyncItem { id: id.into(), version, content: None, content_type: ContentType::Binary, origin: None, state: None }
    }

    /// The item with this state. Checked (`validate_state`) when the item is submitted: an
    /// invalid state is `EngineError::InvalidItem`. To change an item's state, submit it again
    /// with a newer version (newest wins, invariant 2).
    pub fn with_state(mut self, state: impl Into<String>) -> SyncItem {
        self.state = Some(state.into());
        self
    }

    /// The item with its `origin` set (where a Kafka record came from).
    pub fn with_origin(mut self, origin: Origin) -> SyncItem {
        self.origin = Some(origin);
        self
    }

    pub fn with_version(mut self, version: u64) -> SyncItem {
        self.version = version;
        self
    }

    pub fn is_tombstone(&self) -> bool {
        self.content.is_none()
    }

    /// The content parsed as JSON, if it is JSON.
    pub fn content_as_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(self.content.as_ref()?).ok()
    }

    /// Bytes this item holds in memory, for budgets and batch limits.
    pub fn size_bytes(&self) -> usize {
        self.id.len() + self.content.as_ref().map_or(0, Bytes::len) + self.state.as_ref().map_or(0, String::len) + 64
    }

    /// SHA-256 of the content (of the empty string for a tombstone).
    pub fn content_hash(&self) -> [u8; 32] {
        content_hash(self.content.as_deref().unwrap_or_default())
    }

    /// Invariant 2: does `self` replace `stored`?
    pub fn supersedes(&self, stored: &SyncItem) -> bool {
        supersedes(self.version, self.origin.as_ref(), stored.version, stored.origin.as_ref())
    }
}

/// Invariant 2 as one function, mirrored by the SQL and Lua guards: a higher version wins; at
/// equal version only a later offset of the same topic-partition wins.
pub fn supersedes(
    new_version: u64,
    new_origin: Option<&Origin>,
    old_version: u64,
    old_origin: Option<&Origin>,
) -> bool {
    if new_version != old_version {
        return new_version > old_version;
    }
    match (new_origin, old_origin) {
        (Some(new), Some(old)) => new.topic == old.topic && new.partition == old.partition && new.offset > old.offset,
        _ => false,
    }
}

pub fn content_hash(content: &[u8]) -> [u8; 32] {
    Sha256::digest(content).into()
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn origin(partition: i32, offset: i64) -> Origin {
        Origin { topic: Arc::from("t"), partition, offset }
    }

    #[test]
    fn higher_version_wins_and_lower_never_does() {
        assert!(supersedes(2, None, 1, None));
        assert!(!supersedes(1, None, 2, None));
        assert!(!supersedes(1, Some(&origin(0, 99)), 2, Some(&origin(0, 1))));
    }

    #[test]
    fn equal_version_later_offset_of_same_partition_wins() {
        assert!(supersedes(5, Some(&origin(0, 2)), 5, Some(&origin(0, 1))));
        assert!(!supersedes(5, Some(&origin(0, 1)), 5, Some(&origin(0, 2))));
        assert!(!supersedes(5, Some(&origin(1, 9)), 5, Some(&origin(0, 1))));
    }

    #[test]
    fn a_record_compared_with_itself_is_a_no_op() {
        let o = origin(3, 7);
        assert!(!supersedes(5, Some(&o), 5, Some(&o)));
        assert!(!supersedes(5, None, 5, None));
    }

    #[test]
    fn a_state_is_short_and_made_of_safe_characters() {
        assert_eq!(validate_state("active"), Ok(()));
        assert_eq!(validate_state("Pending_review.v2-b"), Ok(()));
        assert_eq!(validate_state(&"a".repeat(MAX_STATE_BYTES)), Ok(()));
        assert!(validate_state(&"a".repeat(MAX_STATE_BYTES + 1)).unwrap_err().contains("65 bytes"));
        assert!(validate_state("").unwrap_err().contains("0 bytes"));
        assert!(validate_state("has space").unwrap_err().contains("' '"));
        assert!(validate_state("caf\u{e9}").is_err());
        assert!(validate_state("a%b").is_err());
        let item = SyncItem::new("a", "x").with_state("active");
        assert_eq!(item.state.as_deref(), Some("active"));
        assert!(item.size_bytes() > SyncItem::new("a", "x").size_bytes());
    }

    #[test]
    fn detection_prefers_json_objects_and_arrays() {
        assert_eq!(ContentType::detect(br#" {"a":1}"#), ContentType::Json);
        assert_eq!(ContentType::detect(b"[1,2]"), ContentType::Json);
        assert_eq!(ContentType::detect(b"42"), ContentType::Binary);
        assert_eq!(ContentType::detect(b"{not json"), ContentType::Binary);
    }

    proptest! {
        // Replaying records in any order converges to the same winner: the order is total
        // and antisymmetric over records of one partition.
        #[test]
        fn ordering_is_antisymmetric(v1 in 0u64..4, v2 in 0u64..4, o1 in 0i64..4, o2 in 0i64..4) {
            let (a, b) = (origin(0, o1), origin(0, o2));
            let ab = supersedes(v1, Some(&a), v2, Some(&b));
            let ba = supersedes(v2, Some(&b), v1, Some(&a));
            prop_assert!(!(ab && ba));
            if (v1, o1) != (v2, o2) { prop_assert!(ab || ba); }
        }
    }
}
