//! `SyncItem`: what the engine stores, and the "newest wins" ordering (invariant 2).
//!
//! An item is an id, a version and opaque bytes (or a tombstone). Where it came from in Kafka
//! (its `Origin`) breaks ties between equal versions: at equal version the later record of
//! the same partition wins, and a record compared with itself is a no-op. Items that did not
//! come from Kafka (library submits) have no origin, so at equal version the stored one stays.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Longest id in bytes (it is the L3 primary key).
pub const MAX_ID_BYTES: usize = 255;

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
        }
    }

    /// A versioned tombstone.
    pub fn tombstone(id: impl Into<String>, version: u64) -> SyncItem {
        SyncItem { id: id.into(), version, content: None, content_type: ContentType::Binary, origin: None }
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
        self.id.len() + self.content.as_ref().map_or(0, Bytes::len) + 64
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
