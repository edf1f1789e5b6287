//! A merkle tree over the rows of L3, split on dots (`PathMerkle`, `MerkleBatch`, `MerkleNode`,
//! `MerkleDiff`). Two stores with the same rows have the same root, whatever the order or
//! batching of their writes; a diff walks two trees top-down and touches only what differs.
//!
//! # What is hashed (all SHA-256; every input starts with a NUL-terminated domain tag)
//!
//! - **leaf** of an id (a row, tombstones included):
//!   `"sync-merkle:leaf\0" ‖ u32be(len id) ‖ id ‖ u64be(version) ‖ u8(deleted) ‖ content_hash[32]`.
//! - A **path** is a list of segments (the id split on `.`, empty segments included); the root
//!   is the empty list. The path `a.b` is a child of `a`; an id is a path, so a path can be
//!   both a leaf and an interior node (`a` and `a.b` both ids).
//! - The children of a node are grouped by the first two bytes `(b1, b2)` of
//!   `SHA-256(segment)` into at most 256 × 256 buckets, as two extra hashed levels:
//!   - **bucket2** `(b1, b2)`: `"sync-merkle:bkt2\0" ‖ for each child, ascending by segment
//!     bytes: u32be(len segment) ‖ segment ‖ node(child)[32]`;
//!   - **bucket1** `b1`: `"sync-merkle:bkt1\0" ‖ for each non-empty b2 ascending: u8(b2) ‖ bucket2[32]`;
//!   - **node**: `"sync-merkle:node\0" ‖ u8(has leaf) ‖ [leaf[32]] ‖ for each non-empty b1
//!     ascending: u8(b1) ‖ bucket1[32]`. A path with no leaf and no children has no node.
//! - The **root** is the root path's node, or `SHA-256("sync-merkle:empty\0")` for no rows.
//!
//! Lengths prefix every variable field and the tags are distinct and prefix-free, so no two
//! different trees encode to the same bytes (the seed's `segment:hash;` could).
//!
//! # Why buckets
//!
//! Ids like `bench.00001234` give one node a million children. A node hash over all its sorted
//! children would cost O(width) per change. With the two bucket levels a change rehashes one
//! bucket2 (width / 65,536 children on average), one bucket1 (≤ 256 entries) and the node
//! (≤ 256 entries) per ancestor: O(depth × (width / 65,536 + 512)) bytes hashed, and a
//! drain of k changed ids under one node reads at most k bucket2 ranges, min(k, 256) bucket1
//! rows and one node row. A diff reads, per differing node, its node row, then only the
//! differing bucket1 rows and bucket2 ranges: O(drift × depth) queries.
//!
//! # Storage (`slots`)
//!
//! The tree is kept as key → value slots (L3 table `<table>_merkle`, `src/storage/sql_merkle.rs`;
//! in memory in `PathMerkle`). The key of a path is `u16be(depth) ‖ (u8(len segment) ‖ segment)*`,
//! prefix-free among paths; after it comes a kind byte:
//!
//! | slot key | value |
//! | --- | --- |
//! | `path ‖ 0x00` | the node's bucket1 hashes: `(u8 b1 ‖ hash[32])*` ascending; absent without children |
//! | `path ‖ 0x01 ‖ b1` | bucket1 `b1`'s bucket2 hashes: `(u8 b2 ‖ hash[32])*` ascending |
//! | `path ‖ 0x02 ‖ b1 ‖ b2` | bucket2 `(b1, b2)`'s children: `(u8 len ‖ segment ‖ node hash[32])*` ascending by segment |
//! | `0xFF` | the root hash (absent: no rows) |
//!
//! Leaves are not stored: they are computed from the rows (`SlotRead::leaves`).
//! `apply` updates the slots for a batch of changed ids: it reads every slot it may change in
//! one batched `get` (the node, bucket1 and bucket2 slots of the affected paths), recomputes
//! one depth at a time from the deepest in memory, and writes the changed slots in one batched
//! `write`. A bucket2 is one slot, not one per child: a change reads and writes one short value.

mod diff;
mod path_merkle;

pub use diff::MerkleDiff;
pub use path_merkle::{reference_root, MerkleNode, PathMerkle};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use crate::storage::StoreError;

pub type Hash = [u8; 32];

const LEAF_TAG: &[u8] = b"sync-merkle:leaf\0";
const NODE_TAG: &[u8] = b"sync-merkle:node\0";
const BUCKET1_TAG: &[u8] = b"sync-merkle:bkt1\0";
const BUCKET2_TAG: &[u8] = b"sync-merkle:bkt2\0";
const EMPTY_TAG: &[u8] = b"sync-merkle:empty\0";

/// Slot kinds, the byte after a path's key.
const NODE_SLOT: u8 = 0;
const BUCKET_SLOT: u8 = 1;
const CHILD_SLOT: u8 = 2;
/// The slot holding the root hash (no path key starts with 0xFF: depths are at most 256).
pub const ROOT_SLOT: &[u8] = &[0xFF];

#[derive(Debug, thiserror::Error)]
pub enum MerkleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A slot whose value cannot be decoded: rebuild the tree.
    #[error("corrupt merkle slot: {0}")]
    Corrupt(String),
}

/// The leaf hash of a row.
pub fn leaf_hash(id: &str, version: u64, deleted: bool, content_hash: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(LEAF_TAG);
    hasher.update((id.len() as u32).to_be_bytes());
    hasher.update(id.as_bytes());
    hasher.update(version.to_be_bytes());
    hasher.update([deleted as u8]);
    hasher.update(content_hash);
    hasher.finalize().into()
}

/// The root of a store with no rows.
pub fn empty_root() -> Hash {
    Sha256::digest(EMPTY_TAG).into()
}

/// The bucket `(b1, b2)` of a child segment.
pub fn bucket_of(segment: &str) -> (u8, u8) {
    let digest = Sha256::digest(segment.as_bytes());
    (digest[0], digest[1])
}

/// The path's segments: the id split on dots (`""` is the root, with none).
fn segments_of(depth: usize, path: &str) -> Vec<&str> {
    if depth == 0 {
        Vec::new()
    } else {
        path.split('.').collect()
    }
}

/// The slot key prefix of a path at `depth` (its segments joined with dots).
pub fn path_key(depth: usize, path: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + path.len() + depth);
    key.extend_from_slice(&(depth as u16).to_be_bytes());
    for segment in segments_of(depth, path) {
        key.push(segment.len() as u8);
        key.extend_from_slice(segment.as_bytes());
    }
    key
}

pub fn node_slot(path_key: &[u8]) -> Vec<u8> {
    [path_key, &[NODE_SLOT]].concat()
}

pub fn bucket_slot(path_key: &[u8], b1: u8) -> Vec<u8> {
    [path_key, &[BUCKET_SLOT, b1]].concat()
}

pub fn bucket2_slot(path_key: &[u8], b1: u8, b2: u8) -> Vec<u8> {
    [path_key, &[CHILD_SLOT, b1, b2]].concat()
}

/// The children of a bucket2, `(u8 len ‖ segment ‖ hash[32])*` ascending by segment: the value
/// of a bucket2 slot.
pub fn encode_children(children: &BTreeMap<Vec<u8>, Hash>) -> Vec<u8> {
    let mut out = Vec::with_capacity(children.iter().map(|(segment, _)| 33 + segment.len()).sum());
    for (segment, hash) in children {
        out.push(segment.len() as u8);
        out.extend_from_slice(segment);
        out.extend_from_slice(hash);
    }
    out
}

pub fn decode_children(mut bytes: &[u8]) -> Result<BTreeMap<Vec<u8>, Hash>, MerkleError> {
    let mut children = BTreeMap::new();
    while let Some((&len, rest)) = bytes.split_first() {
        let len = len as usize;
        if rest.len() < len + 32 {
            return Err(MerkleError::Corrupt("truncated bucket2".into()));
        }
        children.insert(rest[..len].to_vec(), hash_of(&rest[len..len + 32])?);
        bytes = &rest[len + 32..];
    }
    Ok(children)
}

/// The number of segments of an id.
pub fn depth_of(id: &str) -> usize {
    id.split('.').count()
}

/// `path.segment` (or `segment` under the root).
pub fn child_path(depth: usize, path: &str, segment: &str) -> String {
    if depth == 0 {
        segment.to_owned()
    } else {
        format!("{path}.{segment}")
    }
}

/// `(index ‖ hash)*` ascending, the value of node and bucket1 slots.
pub fn encode_entries(entries: &BTreeMap<u8, Hash>) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 33);
    for (index, hash) in entries {
        out.push(*index);
        out.extend_from_slice(hash);
    }
    out
}

pub fn decode_entries(bytes: &[u8]) -> Result<BTreeMap<u8, Hash>, MerkleError> {
    if bytes.len() % 33 != 0 {
        return Err(MerkleError::Corrupt(format!("entry list of {} bytes", bytes.len())));
    }
    Ok(bytes.chunks_exact(33).map(|entry| (entry[0], entry[1..].try_into().unwrap_or([0; 32]))).collect())
}

fn hash_of(value: &[u8]) -> Result<Hash, MerkleError> {
    value.try_into().map_err(|_| MerkleError::Corrupt(format!("hash of {} bytes", value.len())))
}

fn hash_entries(tag: &[u8], entries: &BTreeMap<u8, Hash>) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(tag);
    hasher.update(encode_entries(entries));
    hasher.finalize().into()
}

/// A bucket2's hash over its children, given ascending by segment bytes.
pub fn bucket2_hash<'a>(children: impl IntoIterator<Item = (&'a [u8], &'a Hash)>) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(BUCKET2_TAG);
    for (segment, hash) in children {
        hasher.update((segment.len() as u32).to_be_bytes());
        hasher.update(segment);
        hasher.update(hash);
    }
    hasher.finalize().into()
}

pub fn bucket1_hash(entries: &BTreeMap<u8, Hash>) -> Hash {
    hash_entries(BUCKET1_TAG, entries)
}

/// A node's hash from its leaf and its bucket1 hashes; `None` when it has neither.
pub fn node_hash(leaf: Option<&Hash>, buckets: &BTreeMap<u8, Hash>) -> Option<Hash> {
    if leaf.is_none() && buckets.is_empty() {
        return None;
    }
    let mut hasher = Sha256::new();
    hasher.update(NODE_TAG);
    match leaf {
        Some(leaf) => {
            hasher.update([1]);
            hasher.update(leaf);
        }
        None => hasher.update([0]),
    }
    hasher.update(encode_entries(buckets));
    Some(hasher.finalize().into())
}

pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Leaf changes to apply: each id's new leaf, or `None` when its row is gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MerkleBatch {
    pub leaves: BTreeMap<String, Option<Hash>>,
}

impl MerkleBatch {
    pub fn new() -> MerkleBatch {
        MerkleBatch::default()
    }

    /// The row of `id` now holds this version, tombstone flag and content hash.
    pub fn upsert(&mut self, id: &str, version: u64, deleted: bool, content_hash: &Hash) -> &mut MerkleBatch {
        self.leaves.insert(id.to_owned(), Some(leaf_hash(id, version, deleted, content_hash)));
        self
    }

    /// The row of `id` is gone.
    pub fn remove(&mut self, id: &str) -> &mut MerkleBatch {
        self.leaves.insert(id.to_owned(), None);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    pub fn len(&self) -> usize {
        self.leaves.len()
    }
}

/// Reads of a tree's slots and of the rows' leaves; every call is one round trip (or a few,
/// for long lists) to the store behind it.
#[allow(async_fn_in_trait)]
pub trait SlotRead {
    /// The values of these slots (absent slots are missing from the map).
    async fn get(&mut self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, Vec<u8>>, MerkleError>;
    /// The leaf hashes of the rows of these ids (ids without a row are missing).
    async fn leaves(&mut self, ids: &[String]) -> Result<HashMap<String, Hash>, MerkleError>;
}

/// A tree's slots, writable.
#[allow(async_fn_in_trait)]
pub trait SlotStore: SlotRead {
    async fn write(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), MerkleError>;
}

/// The stored root hash (`empty_root` when there is none).
pub async fn stored_root<S: SlotRead>(store: &mut S) -> Result<Hash, MerkleError> {
    let root = store.get(&[ROOT_SLOT.to_vec()]).await?;
    match root.get(ROOT_SLOT) {
        Some(value) => hash_of(value),
        None => Ok(empty_root()),
    }
}

/// Brings the slots up to date for the ids in `batch` (whose leaves it carries) and returns
/// the new root. Slots of other ids must already be up to date.
pub async fn apply<S: SlotStore>(store: &mut S, batch: &MerkleBatch) -> Result<Hash, MerkleError> {
    if batch.is_empty() {
        return stored_root(store).await;
    }
    // Every affected path by depth, with the child segments that changed under it.
    let mut levels: BTreeMap<usize, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for id in batch.leaves.keys() {
        let segments: Vec<&str> = id.split('.').collect();
        levels.entry(segments.len()).or_default().entry(id.clone()).or_default();
        for depth in 0..segments.len() {
            let path = segments[..depth].join(".");
            levels.entry(depth).or_default().entry(path).or_default().insert(segments[depth].to_owned());
        }
    }
    // Every slot this may change, read at once.
    let mut wanted = BTreeSet::new();
    for (&depth, paths) in &levels {
        for (path, children) in paths {
            let key = path_key(depth, path);
            wanted.insert(node_slot(&key));
            for segment in children {
                let (b1, b2) = bucket_of(segment);
                wanted.insert(bucket_slot(&key, b1));
                wanted.insert(bucket2_slot(&key, b1, b2));
            }
        }
    }
    let wanted: Vec<Vec<u8>> = wanted.into_iter().collect();
    let current = store.get(&wanted).await?;
    // Leaves of the affected paths the batch does not carry (interior paths that are ids too).
    let others: Vec<String> = levels
        .iter()
        .filter(|(depth, _)| **depth > 0)
        .flat_map(|(_, paths)| paths.keys())
        .filter(|path| !batch.leaves.contains_key(*path))
        .cloned()
        .collect();
    let other_leaves = if others.is_empty() { HashMap::new() } else { store.leaves(&others).await? };
    let leaf_of = |path: &str| -> Option<Hash> {
        match batch.leaves.get(path) {
            Some(leaf) => *leaf,
            None => other_leaves.get(path).copied(),
        }
    };
    // The new value of each changed slot (`None`: delete it).
    let mut writes: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    // The node hash of each path of the level below, once computed.
    let mut below: HashMap<String, Option<Hash>> = HashMap::new();
    for (&depth, paths) in levels.iter().rev() {
        let mut level = HashMap::with_capacity(paths.len());
        for (path, children) in paths {
            let key = path_key(depth, path);
            // The changed children, by bucket.
            let mut touched: BTreeMap<u8, BTreeMap<u8, Vec<&String>>> = BTreeMap::new();
            for segment in children {
                let (b1, b2) = bucket_of(segment);
                touched.entry(b1).or_default().entry(b2).or_default().push(segment);
            }
            let node_key = node_slot(&key);
            let mut buckets = match current.get(&node_key) {
                Some(value) => decode_entries(value)?,
                None => BTreeMap::new(),
            };
            let before = buckets.clone();
            for (b1, b2s) in touched {
                let slot1 = bucket_slot(&key, b1);
                let mut entries = match current.get(&slot1) {
                    Some(value) => decode_entries(value)?,
                    None => BTreeMap::new(),
                };
                for (b2, segments) in b2s {
                    let slot2 = bucket2_slot(&key, b1, b2);
                    let mut kids = match current.get(&slot2) {
                        Some(value) => decode_children(value)?,
                        None => BTreeMap::new(),
                    };
                    for segment in segments {
                        match below.get(&child_path(depth, path, segment)).copied().flatten() {
                            Some(hash) => kids.insert(segment.as_bytes().to_vec(), hash),
                            None => kids.remove(segment.as_bytes()),
                        };
                    }
                    if kids.is_empty() {
                        entries.remove(&b2);
                        writes.insert(slot2, None);
                    } else {
                        entries.insert(b2, bucket2_hash(kids.iter().map(|(s, h)| (s.as_slice(), h))));
                        writes.insert(slot2, Some(encode_children(&kids)));
                    }
                }
                if entries.is_empty() {
                    buckets.remove(&b1);
                    writes.insert(slot1, None);
                } else {
                    buckets.insert(b1, bucket1_hash(&entries));
                    writes.insert(slot1, Some(encode_entries(&entries)));
                }
            }
            if buckets != before {
                writes.insert(node_key, (!buckets.is_empty()).then(|| encode_entries(&buckets)));
            }
            let leaf = if depth == 0 { None } else { leaf_of(path) };
            level.insert(path.clone(), node_hash(leaf.as_ref(), &buckets));
        }
        // Only this level's results are needed by the next one up.
        below = level;
    }
    let root = below.get("").copied().flatten();
    writes.insert(ROOT_SLOT.to_vec(), root.map(|root| root.to_vec()));
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for (key, value) in writes {
        match value {
            Some(value) => puts.push((key, value)),
            // Deleting a slot that is not there is harmless, but skipped.
            None if current.contains_key(&key) || key == ROOT_SLOT => deletes.push(key),
            None => {}
        }
    }
    store.write(puts, deletes).await?;
    Ok(root.unwrap_or_else(empty_root))
}

#[cfg(test)]
mod tests;
