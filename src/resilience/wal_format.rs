//! The write-ahead log's byte format, pure: encoding a batch of items into a record payload,
//! framing it with its length and checksum, and reading frames back.
//!
//! Segment file: the 8-byte magic `SYNCWAL1`, then frames. A frame is
//! `[u32 LE payload length][u32 LE CRC-32 of the payload][payload]`. A payload is one batch:
//! `u32 item count`, then per item `u16 id length, id, u64 version, u8 flags (1 = tombstone,
//! 2 = json, 4 = has a state), u32 content length, content, u16 topic length (0xFFFF = no
//! origin), topic, i32 partition, i64 offset`, and, only when flag 4 is set, `u8 state length,
//! state`. All integers little-endian.
//!
//! Compatibility: flag 4 and the state after the origin came with item states. Records written
//! before never set it, so they read exactly as before (the magic stays `SYNCWAL1`); a version
//! without states cannot read a record whose item has one (the record counts as corrupt), so
//! drain the WAL before a downgrade.

use std::sync::Arc;

use bytes::Bytes;

use crate::item::{ContentType, Origin, SyncItem};

pub const MAGIC: &[u8; 8] = b"SYNCWAL1";
pub const FRAME_HEADER_BYTES: usize = 8;
/// No batch is this large; a longer length field is corruption.
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 30;
const NO_ORIGIN: u16 = u16::MAX;
const FLAG_TOMBSTONE: u8 = 1;
const FLAG_JSON: u8 = 2;
const FLAG_STATE: u8 = 4;

pub fn encode_batch(items: &[&SyncItem]) -> Vec<u8> {
    let size: usize = items.iter().map(|item| item.size_bytes() + 32).sum();
    let mut out = Vec::with_capacity(size + 4);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for item in items {
        let id = item.id.as_bytes();
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&item.version.to_le_bytes());
        // A state longer than a u8 length is never valid (`validate_state`); it is cut rather
        // than written with a wrong length.
        let state = item.state.as_deref().map(|state| &state.as_bytes()[..state.len().min(u8::MAX as usize)]);
        let mut flags = 0;
        if item.is_tombstone() {
            flags |= FLAG_TOMBSTONE;
        }
        if item.content_type == ContentType::Json {
            flags |= FLAG_JSON;
        }
        if state.is_some() {
            flags |= FLAG_STATE;
        }
        out.push(flags);
        let content = item.content.as_deref().unwrap_or_default();
        out.extend_from_slice(&(content.len() as u32).to_le_bytes());
        out.extend_from_slice(content);
        match &item.origin {
            Some(origin) => {
                out.extend_from_slice(&(origin.topic.len() as u16).to_le_bytes());
                out.extend_from_slice(origin.topic.as_bytes());
                out.extend_from_slice(&origin.partition.to_le_bytes());
                out.extend_from_slice(&origin.offset.to_le_bytes());
            }
            None => out.extend_from_slice(&NO_ORIGIN.to_le_bytes()),
        }
        if let Some(state) = state {
            out.push(state.len() as u8);
            out.extend_from_slice(state);
        }
    }
    out
}

/// A frame: header (length, checksum) and payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + FRAME_HEADER_BYTES);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads little-endian fields from a payload; `None` past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

/// Decodes a payload; `None` if it is malformed (the checksum passed but the content does
/// not parse, or a best-effort look into a corrupt record).
pub fn decode_batch(payload: &[u8]) -> Option<Vec<SyncItem>> {
    let mut cursor = Cursor { bytes: payload };
    let count = u32::from_le_bytes(cursor.array()?);
    let mut items = Vec::with_capacity(count.min(100_000) as usize);
    for _ in 0..count {
        let id_len = u16::from_le_bytes(cursor.array()?) as usize;
        let id = String::from_utf8(cursor.take(id_len)?.to_vec()).ok()?;
        let version = u64::from_le_bytes(cursor.array()?);
        let [flags] = cursor.array()?;
        let content_len = u32::from_le_bytes(cursor.array()?) as usize;
        let content = Bytes::copy_from_slice(cursor.take(content_len)?);
        let topic_len = u16::from_le_bytes(cursor.array()?);
        let origin = if topic_len == NO_ORIGIN {
            None
        } else {
            let topic = std::str::from_utf8(cursor.take(topic_len as usize)?).ok()?;
            Some(Origin {
                topic: Arc::from(topic),
                partition: i32::from_le_bytes(cursor.array()?),
                offset: i64::from_le_bytes(cursor.array()?),
            })
        };
        let state = if flags & FLAG_STATE != 0 {
            let [state_len] = cursor.array()?;
            Some(String::from_utf8(cursor.take(state_len as usize)?.to_vec()).ok()?)
        } else {
            None
        };
        items.push(SyncItem {
            id,
            version,
            content: (flags & FLAG_TOMBSTONE == 0).then_some(content),
            content_type: if flags & FLAG_JSON != 0 { ContentType::Json } else { ContentType::Binary },
            origin,
            state,
        });
    }
    cursor.bytes.is_empty().then_some(items)
}

/// What one step of reading frames found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A record whose checksum matches.
    Valid(&'a [u8]),
    /// A complete record whose checksum does not match: `len` bytes to skip past it.
    Corrupt { payload: &'a [u8] },
    /// Fewer bytes than the header or the payload announce: a torn write at the end.
    Torn,
    /// A length field no batch can have: nothing after it can be trusted.
    Garbage,
}

/// Classifies the frame at the start of `bytes`.
pub fn read_frame(bytes: &[u8]) -> Frame<'_> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Frame::Torn;
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len > MAX_PAYLOAD_BYTES {
        return Frame::Garbage;
    }
    let Some(payload) = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len as usize) else {
        return Frame::Torn;
    };
    if crc32fast::hash(payload) == crc {
        Frame::Valid(payload)
    } else {
        Frame::Corrupt { payload }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items() -> Vec<SyncItem> {
        let origin = Origin { topic: Arc::from("t"), partition: 3, offset: 99 };
        vec![
            SyncItem { origin: Some(origin), ..SyncItem::new("a.b", b"{\"x\":1}".to_vec()).with_version(7) },
            SyncItem::tombstone("c", u64::MAX),
            SyncItem::new("d.e", b"bytes".to_vec()).with_version(8).with_state("active"),
            SyncItem::tombstone("f", 9).with_state("archived"),
        ]
    }

    /// A payload as the version before item states wrote it: byte for byte, by hand.
    fn old_payload() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&2u32.to_le_bytes());
        // "a.b", version 7, json, {"x":1}, origin t/3/99
        out.extend_from_slice(&3u16.to_le_bytes());
        out.extend_from_slice(b"a.b");
        out.extend_from_slice(&7u64.to_le_bytes());
        out.push(2);
        out.extend_from_slice(&7u32.to_le_bytes());
        out.extend_from_slice(b"{\"x\":1}");
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(b"t");
        out.extend_from_slice(&3i32.to_le_bytes());
        out.extend_from_slice(&99i64.to_le_bytes());
        // "c", a tombstone at u64::MAX, no origin
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(b"c");
        out.extend_from_slice(&u64::MAX.to_le_bytes());
        out.push(1);
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&NO_ORIGIN.to_le_bytes());
        out
    }

    #[test]
    fn a_record_written_before_item_states_still_reads_and_is_written_the_same_today() {
        let old = old_payload();
        let framed = frame(&old);
        let Frame::Valid(payload) = read_frame(&framed) else { panic!("valid frame expected") };
        let items = decode_batch(payload).expect("an old record decodes");
        assert_eq!(items, items_without_state());
        assert!(items.iter().all(|item| item.state.is_none()));
        // Items without a state are encoded exactly as before: old and new logs mix freely.
        let refs: Vec<&SyncItem> = items.iter().collect();
        assert_eq!(encode_batch(&refs), old);
    }

    fn items_without_state() -> Vec<SyncItem> {
        items().into_iter().take(2).collect()
    }

    #[test]
    fn a_state_sets_flag_4_and_follows_the_origin() {
        let item = SyncItem::new("k", b"v".to_vec()).with_version(1).with_state("ok");
        let payload = encode_batch(&[&item]);
        // count, id len, id, version, then the flags byte.
        assert_eq!(payload[4 + 2 + 1 + 8], FLAG_STATE);
        assert!(payload.ends_with(&[2, b'o', b'k']));
        assert_eq!(decode_batch(&payload).unwrap(), vec![item]);
        // A state length past the end of the payload is malformed, not a panic.
        assert_eq!(decode_batch(&payload[..payload.len() - 1]), None);
    }

    #[test]
    fn a_batch_round_trips_through_a_frame() {
        let items = items();
        let refs: Vec<&SyncItem> = items.iter().collect();
        let framed = frame(&encode_batch(&refs));
        let Frame::Valid(payload) = read_frame(&framed) else { panic!("valid frame expected") };
        assert_eq!(decode_batch(payload).unwrap(), items);
    }

    #[test]
    fn a_flipped_byte_is_corrupt_and_a_cut_frame_is_torn() {
        let items = items();
        let refs: Vec<&SyncItem> = items.iter().collect();
        let mut framed = frame(&encode_batch(&refs));
        assert_eq!(read_frame(&framed[..framed.len() - 1]), Frame::Torn);
        assert_eq!(read_frame(&framed[..5]), Frame::Torn);
        framed[12] ^= 0x40;
        assert!(matches!(read_frame(&framed), Frame::Corrupt { .. }));
    }

    proptest! {
        #[test]
        fn reading_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read_frame(&bytes);
            let _ = decode_batch(&bytes);
        }
    }
}
