//! Which Redis Cluster node owns which key: the key's hash slot (CRC16/XMODEM of the key, or
//! of its `{hash tag}`, mod 16384) and a snapshot of `CLUSTER SLOTS`. L2 uses it to send one
//! pipeline per master instead of one request per item. The snapshot can go stale (failover,
//! resharding): a pipeline error then sends those items through the per-item path, which
//! follows redirects, and the snapshot is refreshed.

use redis::Value;

pub const SLOT_COUNT: u16 = 16384;

/// The hash slot of a key, honouring a non-empty `{hash tag}`.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % SLOT_COUNT
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A master's address.
pub type Node = (String, u16);

/// Slot ranges and their masters, sorted by range start.
#[derive(Debug, Default)]
pub struct SlotMap {
    ranges: Vec<(u16, u16, Node)>,
}

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, …], replicas…], …]`.
    pub fn from_cluster_slots(reply: &Value) -> Option<SlotMap> {
        let Value::Array(entries) = reply else { return None };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let Some(Value::Int(port)) = master.get(1) else { return None };
            ranges.push((u16::try_from(*start).ok()?, u16::try_from(*end).ok()?, (host, u16::try_from(*port).ok()?)));
        }
        ranges.sort_by_key(|(start, _, _)| *start);
        Some(SlotMap { ranges })
    }

    pub fn node(&self, slot: u16) -> Option<&Node> {
        let index = self.ranges.partition_point(|(start, _, _)| *start <= slot).checked_sub(1)?;
        let (_, end, node) = &self.ranges[index];
        (slot <= *end).then_some(node)
    }

    pub fn masters(&self) -> Vec<Node> {
        let mut nodes: Vec<Node> = self.ranges.iter().map(|(_, _, node)| node.clone()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_specification() {
        // Values from the Redis Cluster spec and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn a_slot_map_finds_the_owner_of_every_slot() {
        let node = |port: i64| Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), Value::Int(port)]);
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7002)]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply).unwrap();
        assert_eq!(map.node(0).unwrap().1, 7000);
        assert_eq!(map.node(5461).unwrap().1, 7001);
        assert_eq!(map.node(16383).unwrap().1, 7002);
        assert_eq!(map.masters().len(), 3);
    }
}
