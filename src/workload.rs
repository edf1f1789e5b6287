//! A reproducible workload of item operations, and the final state it must converge to.
//!
//! Used by `sync-engine produce` (the load generator), the embedded demo and the tests. Pure:
//! it only describes records. Every upsert or delete of an id carries a version no other
//! operation of that id uses, so the expected final state is simply the highest version per
//! id, whatever order the records are consumed in. Duplicates resend an earlier record
//! as is; out-of-order operations carry a version lower than the id's current one; poison
//! records are bad input that must be dead-lettered and must not change any state.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::item::content_hash;

#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub count: u64,
    pub item_bytes: usize,
    pub key_space: u64,
    pub id_prefix: String,
    /// Shares in 0.0..=1.0 of operations that are deletes, out-of-order versions, exact
    /// duplicates of an earlier record, and poison records.
    pub delete_share: f64,
    pub out_of_order_share: f64,
    pub duplicate_share: f64,
    pub poison_share: f64,
    /// The limit the worker enforces, so oversize poison is one byte over it.
    pub max_item_bytes: usize,
    pub seed: u64,
}

/// Kafka headers as name and value.
pub type Headers = Vec<(String, Vec<u8>)>;

/// One Kafka record to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Headers,
    /// Poison records say which reason code they must be dead-lettered with.
    pub poison_reason: Option<&'static str>,
}

/// The final state an id must have: its version, and the content hash or a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub version: u64,
    pub content_hash: Option<[u8; 32]>,
}

pub struct Workload {
    spec: WorkloadSpec,
    rng: StdRng,
    produced: u64,
    used_versions: HashSet<u64>,
    expected: HashMap<String, Expected>,
    history: Vec<OutgoingRecord>,
}

const FIRST_VERSION: u64 = 1_000_000;

impl Workload {
    pub fn new(spec: WorkloadSpec) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(spec.seed),
            spec,
            produced: 0,
            used_versions: HashSet::new(),
            expected: HashMap::new(),
            history: Vec::new(),
        }
    }

    /// The state L3 must hold once every record produced so far is consumed.
    pub fn expected(&self) -> &HashMap<String, Expected> {
        &self.expected
    }

    pub fn id(&self, index: u64) -> String {
        format!("{}.{:08}", self.spec.id_prefix, index)
    }

    pub fn content(&self, id: &str, version: u64) -> Vec<u8> {
        // Starts with a letter so content detection calls it binary; repeats a digest.
        let seed = content_hash(format!("{id}/{version}").as_bytes());
        let mut content = Vec::with_capacity(self.spec.item_bytes);
        content.push(b'b');
        while content.len() < self.spec.item_bytes {
            content.extend_from_slice(&seed);
        }
        content.truncate(self.spec.item_bytes.max(1));
        content
    }

    fn poison(&mut self) -> OutgoingRecord {
        let index = self.rng.gen_range(0..self.spec.key_space);
        let id = self.id(index);
        let value = self.content(&id, 1);
        let (key, value, headers, reason): (Option<Vec<u8>>, Option<Vec<u8>>, Headers, &'static str) =
            match self.rng.gen_range(0..5) {
                0 => (None, Some(value), vec![], "missing_key"),
                1 => (Some(id.into_bytes()), Some(value), vec![("sync-version".into(), b"-12".to_vec())], "bad_header"),
                2 => (
                    Some(id.into_bytes()),
                    Some(b"{not json".to_vec()),
                    vec![
                        ("sync-version".into(), u64::MAX.to_string().into_bytes()),
                        ("sync-content-type".into(), b"json".to_vec()),
                    ],
                    "invalid_json",
                ),
                3 => (
                    Some(id.into_bytes()),
                    Some(vec![b'x'; self.spec.max_item_bytes + 1]),
                    vec![("sync-version".into(), u64::MAX.to_string().into_bytes())],
                    "oversize",
                ),
                _ => (Some(b"bad\nkey".to_vec()), Some(value), vec![], "invalid_key"),
            };
        OutgoingRecord { key, value, headers, poison_reason: Some(reason) }
    }

    fn operation(&mut self) -> OutgoingRecord {
        let index = self.rng.gen_range(0..self.spec.key_space);
        let id = self.id(index);
        let step = self.produced;
        let mut version = FIRST_VERSION + 2 * step;
        if self.rng.gen_bool(self.spec.out_of_order_share.clamp(0.0, 1.0)) {
            let lower = version.saturating_sub(2 * self.rng.gen_range(1..=200) - 1).max(1);
            if !self.used_versions.contains(&lower) {
                version = lower;
            }
        }
        self.used_versions.insert(version);
        let delete = self.rng.gen_bool(self.spec.delete_share.clamp(0.0, 1.0));
        let mut headers = vec![("sync-version".to_owned(), version.to_string().into_bytes())];
        let value = if delete {
            headers.push(("sync-op".into(), b"delete".to_vec()));
            None
        } else {
            Some(self.content(&id, version))
        };
        let hash = value.as_deref().map(content_hash);
        let newest = self.expected.get(&id).is_none_or(|current| version > current.version);
        if newest {
            self.expected.insert(id.clone(), Expected { version, content_hash: hash });
        }
        OutgoingRecord { key: Some(id.into_bytes()), value, headers, poison_reason: None }
    }
}

impl Iterator for Workload {
    type Item = OutgoingRecord;

    fn next(&mut self) -> Option<OutgoingRecord> {
        if self.produced >= self.spec.count {
            return None;
        }
        let duplicate = !self.history.is_empty() && self.rng.gen_bool(self.spec.duplicate_share.clamp(0.0, 1.0));
        let record = if duplicate {
            let earlier = self.rng.gen_range(0..self.history.len());
            self.history[earlier].clone()
        } else if self.rng.gen_bool(self.spec.poison_share.clamp(0.0, 1.0)) {
            self.poison()
        } else {
            self.operation()
        };
        // Keep a bounded window of recent records to duplicate from.
        if self.history.len() >= 1024 {
            self.history.swap_remove(self.rng.gen_range(0..1024));
        }
        if record.poison_reason.is_none() {
            self.history.push(record.clone());
        }
        self.produced += 1;
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            count: 5_000,
            item_bytes: 64,
            key_space: 300,
            id_prefix: "t".into(),
            delete_share: 0.1,
            out_of_order_share: 0.2,
            duplicate_share: 0.05,
            poison_share: 0.01,
            max_item_bytes: 128,
            seed: 7,
        }
    }

    #[test]
    fn the_expected_state_is_the_highest_version_per_id_in_any_order() {
        let mut workload = Workload::new(spec());
        let records: Vec<OutgoingRecord> = workload.by_ref().collect();
        assert_eq!(records.len(), 5_000);
        // Replay in reverse: the highest version per id is the same.
        let mut replay: HashMap<String, u64> = HashMap::new();
        for record in records.iter().rev().filter(|r| r.poison_reason.is_none()) {
            let id = String::from_utf8(record.key.clone().unwrap()).unwrap();
            let version: u64 = std::str::from_utf8(&record.headers[0].1).unwrap().parse().unwrap();
            let entry = replay.entry(id).or_insert(0);
            *entry = (*entry).max(version);
        }
        assert_eq!(replay.len(), workload.expected().len());
        for (id, version) in replay {
            assert_eq!(workload.expected()[&id].version, version);
        }
        assert!(records.iter().any(|r| r.poison_reason.is_some()));
        assert!(workload.expected().values().any(|e| e.content_hash.is_none()));
    }
}

/// Every expected id must be in L3 with its version and hash (or as a tombstone), and L3
/// must hold nothing else.
pub fn compare(workload: &Workload, rows: &[crate::storage::RowSummary]) -> Vec<String> {
    let mut mismatches = Vec::new();
    let expected = workload.expected();
    for row in rows {
        match expected.get(&row.id) {
            None => mismatches.push(format!("{}: in L3 but never produced", row.id)),
            Some(want) => {
                let hash_ok = match want.content_hash {
                    Some(hash) => !row.deleted && row.content_hash == hash,
                    None => row.deleted,
                };
                if row.version != want.version || !hash_ok {
                    mismatches.push(format!(
                        "{}: L3 has version {} deleted={}, expected version {} deleted={}",
                        row.id,
                        row.version,
                        row.deleted,
                        want.version,
                        want.content_hash.is_none()
                    ));
                }
            }
        }
    }
    let stored: std::collections::HashSet<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    for id in expected.keys().filter(|id| !stored.contains(id.as_str())) {
        mismatches.push(format!("{id}: missing from L3"));
    }
    mismatches
}
