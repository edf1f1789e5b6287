//! Decoding one Kafka record into an item, per the wire contract (docs/DESIGN.md §2).
//!
//! Pure: it takes our own `RawRecord` (the Kafka module converts rdkafka's message at its
//! edge) and returns either the item with its options, or the dead-letter reason. A malformed
//! known header is always a dead-letter, never a silent default: that includes a known header
//! given twice (which one the producer meant is a guess) and one with surrounding whitespace
//! (the contract's values are exact). Unknown headers are ignored.

use std::sync::Arc;

use bytes::Bytes;

use crate::item::{is_valid_json, validate_state, ContentType, Origin, SyncItem, MAX_ID_BYTES};
use crate::options::{CacheTtl, SubmitOptions, Tiers};

pub const HEADER_VERSION: &str = "sync-version";
pub const HEADER_OP: &str = "sync-op";
pub const HEADER_CONTENT_TYPE: &str = "sync-content-type";
pub const HEADER_TTL: &str = "sync-ttl-secs";
pub const HEADER_TIERS: &str = "sync-tiers";
pub const HEADER_STATE: &str = "sync-state";

/// Longest accepted `sync-ttl-secs`: ten years. Larger values are a producer bug.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// What the allocator adds to each allocation, as `RawRecord::size_bytes` counts it (glibc
/// and mimalloc round small blocks up to 16 bytes).
const PER_ALLOCATION: usize = 16;

/// A Kafka record as the worker sees it, free of rdkafka types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl RawRecord {
    /// Bytes held while this record is in flight (counted against the memory budget): the
    /// record itself, its key, value and header list, each allocation with the allocator's
    /// share. A flat 96 bytes of overhead used to stand for all but the payloads; heaptrack
    /// of a 400,000-item run showed the header lists alone holding about 220 bytes a record
    /// (14 MB at the peak), uncounted.
    pub fn size_bytes(&self) -> usize {
        let payload = |bytes: &Option<Bytes>| bytes.as_ref().map_or(0, |bytes| bytes.len() + PER_ALLOCATION);
        let headers: usize =
            self.headers.iter().map(|(name, value)| name.capacity() + PER_ALLOCATION + payload(value)).sum();
        let header_list = self.headers.capacity() * std::mem::size_of::<(String, Option<Bytes>)>() + PER_ALLOCATION;
        std::mem::size_of::<RawRecord>() + payload(&self.key) + payload(&self.value) + header_list + headers
    }

    pub fn origin(&self) -> Origin {
        Origin { topic: self.topic.clone(), partition: self.partition, offset: self.offset }
    }

    /// Every value of a header, in order.
    fn header_values<'r>(&'r self, name: &'r str) -> impl Iterator<Item = &'r Option<Bytes>> + 'r {
        self.headers.iter().filter(move |(key, _)| key == name).map(|(_, value)| value)
    }
}

/// Why a record was dead-lettered. `code()` is the machine-readable part of `sync-dlq-reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterReason {
    #[error("record has no key")]
    MissingKey,
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("bad header {name}: {message}")]
    BadHeader { name: &'static str, message: String },
    #[error("value of {size} bytes exceeds the limit of {max} bytes")]
    Oversize { size: usize, max: usize },
    #[error("declared json does not parse")]
    InvalidJson,
    #[error("no sync-version header and no record timestamp")]
    MissingVersion,
    #[error("rejected by L3: {0}")]
    RejectedByStore(String),
}

impl DeadLetterReason {
    pub fn code(&self) -> &'static str {
        match self {
            DeadLetterReason::MissingKey => "missing_key",
            DeadLetterReason::InvalidKey(_) => "invalid_key",
            DeadLetterReason::BadHeader { .. } => "bad_header",
            DeadLetterReason::Oversize { .. } => "oversize",
            DeadLetterReason::InvalidJson => "invalid_json",
            DeadLetterReason::MissingVersion => "missing_version",
            DeadLetterReason::RejectedByStore(_) => "rejected_by_store",
        }
    }

    /// `code: message`, the value of the `sync-dlq-reason` header.
    pub fn header_value(&self) -> String {
        format!("{}: {}", self.code(), self)
    }
}

/// Limits decoding needs from the config.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    pub max_item_bytes: usize,
}

/// Validates an id: UTF-8, 1..=255 bytes, no control characters.
pub fn validate_id(key: &[u8]) -> Result<&str, DeadLetterReason> {
    let id = std::str::from_utf8(key).map_err(|_| DeadLetterReason::InvalidKey("not utf-8".into()))?;
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(DeadLetterReason::InvalidKey(format!("{} bytes, expected 1..={MAX_ID_BYTES}", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(DeadLetterReason::InvalidKey("contains a control character".into()));
    }
    Ok(id)
}

pub fn decode(record: &RawRecord, limits: DecodeLimits) -> Result<(SyncItem, SubmitOptions), DeadLetterReason> {
    let key = record.key.as_ref().ok_or(DeadLetterReason::MissingKey)?;
    let id = validate_id(key)?.to_owned();
    let version = match header_text(record, HEADER_VERSION)? {
        Some(text) => parse_u64(HEADER_VERSION, text)?,
        None => match record.timestamp_ms {
            Some(ms) if ms >= 0 => ms as u64,
            _ => return Err(DeadLetterReason::MissingVersion),
        },
    };
    let is_delete = match header_text(record, HEADER_OP)? {
        None | Some("upsert") => record.value.is_none(),
        Some("delete") => true,
        Some(other) => return Err(bad_header(HEADER_OP, format!("{other:?}, expected upsert or delete"))),
    };
    let declared_type = match header_text(record, HEADER_CONTENT_TYPE)? {
        None => None,
        Some(text) => Some(
            ContentType::parse(text)
                .ok_or_else(|| bad_header(HEADER_CONTENT_TYPE, format!("{text:?}, expected json or binary")))?,
        ),
    };
    let redis_ttl = match header_text(record, HEADER_TTL)? {
        None => CacheTtl::Default,
        Some(text) => {
            let secs = parse_u64(HEADER_TTL, text)?;
            if secs > MAX_TTL_SECS {
                return Err(bad_header(HEADER_TTL, format!("{secs} exceeds {MAX_TTL_SECS}")));
            }
            CacheTtl::from_secs(secs)
        }
    };
    let tiers = match header_text(record, HEADER_TIERS)? {
        None => Tiers::default(),
        Some(text) => Tiers::parse(text).map_err(|message| bad_header(HEADER_TIERS, message))?,
    };
    let state = match header_text(record, HEADER_STATE)? {
        None => None,
        Some(text) => {
            validate_state(text).map_err(|message| bad_header(HEADER_STATE, message))?;
            Some(text.to_owned())
        }
    };
    let options = SubmitOptions { tiers, redis_ttl };
    let origin = Some(record.origin());
    if is_delete {
        return Ok((SyncItem { origin, state, ..SyncItem::tombstone(id, version) }, options));
    }
    let content = record.value.clone().unwrap_or_default();
    if content.len() > limits.max_item_bytes {
        return Err(DeadLetterReason::Oversize { size: content.len(), max: limits.max_item_bytes });
    }
    let content_type = match declared_type {
        Some(ContentType::Json) if !is_valid_json(&content) => return Err(DeadLetterReason::InvalidJson),
        Some(declared) => declared,
        None => ContentType::detect(&content),
    };
    Ok((SyncItem { id, version, content: Some(content), content_type, origin, state }, options))
}

fn bad_header(name: &'static str, message: String) -> DeadLetterReason {
    DeadLetterReason::BadHeader { name, message }
}

/// A known header's value as UTF-8. Malformed: given more than once, a null value, not
/// UTF-8, or whitespace around the value.
fn header_text<'r>(record: &'r RawRecord, name: &'static str) -> Result<Option<&'r str>, DeadLetterReason> {
    let mut values = record.header_values(name);
    let value = match values.next() {
        None => return Ok(None),
        Some(value) => value,
    };
    let repeats = values.count();
    if repeats > 0 {
        return Err(bad_header(name, format!("given {} times, expected once", repeats + 1)));
    }
    let bytes = value.as_ref().ok_or_else(|| bad_header(name, "null value".into()))?;
    let text = std::str::from_utf8(bytes).map_err(|_| bad_header(name, "not utf-8".into()))?;
    if text.trim() != text {
        return Err(bad_header(name, format!("{:?} has surrounding whitespace", truncate(text))));
    }
    Ok(Some(text))
}

/// A record whose `sync-tiers` header names a tier this worker does not have is a dead
/// letter: it would settle with nothing written where its producer asked. Without the header
/// the default routing applies (every tier the worker has).
pub fn require_tiers(record: &RawRecord, requested: Tiers, available: Tiers) -> Result<(), DeadLetterReason> {
    if record.header_values(HEADER_TIERS).next().is_none() {
        return Ok(());
    }
    let missing: Vec<&str> = [
        ("l1", requested.l1 && !available.l1),
        ("l2", requested.l2 && !available.l2),
        ("l3", requested.l3 && !available.l3),
    ]
    .into_iter()
    .filter_map(|(name, missing)| missing.then_some(name))
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(bad_header(HEADER_TIERS, format!("routes to {}, which this worker does not have", missing.join(" and "))))
}

fn parse_u64(name: &'static str, text: &str) -> Result<u64, DeadLetterReason> {
    // `u64::from_str` accepts a leading '+'; the contract says plain decimal digits.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_header(name, format!("{:?} is not an unsigned decimal", truncate(text))));
    }
    text.parse::<u64>().map_err(|_| bad_header(name, format!("{:?} does not fit in 64 bits", truncate(text))))
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(40) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests;
