//! `PathMerkle`: the tree kept in memory, with the same slots and the same `apply` as the L3
//! tree; and `reference_root`, the root computed straight from the definition (no slots, no
//! increments), which the tests hold both against.

use std::collections::{BTreeMap, HashMap};

use super::{
    apply, bucket1_hash, bucket2_hash, bucket_of, decode_entries, node_slot, path_key, stored_root, Hash, MerkleBatch,
    MerkleError, SlotRead, SlotStore,
};

/// One node of a tree, as a drill-down shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleNode {
    /// The path (its segments joined with dots; `""` with depth 0 is the root).
    pub path: String,
    pub depth: usize,
    /// The node's hash; `None` when nothing is stored at or under the path.
    pub hash: Option<Hash>,
    /// The leaf of the row whose id is the path, if there is one.
    pub leaf: Option<Hash>,
    /// The children's segments and node hashes, ascending by segment.
    pub children: Vec<(String, Hash)>,
}

/// A tree in memory: the rows' leaves and the slots.
#[derive(Clone, Debug, Default)]
pub struct PathMerkle {
    leaves: BTreeMap<String, Hash>,
    slots: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl PathMerkle {
    pub fn new() -> PathMerkle {
        PathMerkle::default()
    }

    /// Applies leaf changes and returns the new root.
    pub fn apply(&mut self, batch: &MerkleBatch) -> Hash {
        for (id, leaf) in &batch.leaves {
            match leaf {
                Some(leaf) => self.leaves.insert(id.clone(), *leaf),
                None => self.leaves.remove(id),
            };
        }
        // The memory store never fails.
        futures::executor::block_on(apply(self, batch)).expect("in-memory slots")
    }

    pub fn root(&self) -> Hash {
        let mut slots = self.clone();
        futures::executor::block_on(stored_root(&mut slots)).expect("in-memory slots")
    }

    /// How many slots the tree holds (for tests of its size).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The node at a path, with its children.
    pub fn node(&self, depth: usize, path: &str) -> MerkleNode {
        let key = path_key(depth, path);
        let mut children = Vec::new();
        let prefix = [key.as_slice(), &[super::CHILD_SLOT]].concat();
        for (slot, value) in self.slots.range(prefix.clone()..) {
            if !slot.starts_with(&prefix) {
                break;
            }
            for (segment, hash) in super::decode_children(value).unwrap_or_default() {
                children.push((String::from_utf8_lossy(&segment).into_owned(), hash));
            }
        }
        children.sort();
        let leaf = if depth == 0 { None } else { self.leaves.get(path).copied() };
        let buckets = self.slots.get(&node_slot(&key)).map(|value| decode_entries(value).unwrap_or_default());
        let hash = super::node_hash(leaf.as_ref(), &buckets.unwrap_or_default());
        MerkleNode { path: path.to_owned(), depth, hash, leaf, children }
    }
}

impl SlotRead for PathMerkle {
    async fn get(&mut self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, Vec<u8>>, MerkleError> {
        Ok(keys.iter().filter_map(|key| Some((key.clone(), self.slots.get(key)?.clone()))).collect())
    }

    async fn leaves(&mut self, ids: &[String]) -> Result<HashMap<String, Hash>, MerkleError> {
        Ok(ids.iter().filter_map(|id| Some((id.clone(), *self.leaves.get(id)?))).collect())
    }
}

impl SlotStore for PathMerkle {
    async fn write(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), MerkleError> {
        for key in deletes {
            self.slots.remove(&key);
        }
        self.slots.extend(puts);
        Ok(())
    }
}

/// The root of a set of leaves straight from the definition (module doc), recursively.
pub fn reference_root(leaves: &BTreeMap<String, Hash>) -> Hash {
    fn node(depth: usize, path: &str, leaves: &BTreeMap<String, Hash>, ids: &[&str]) -> Option<Hash> {
        // The ids at or under this path, grouped by their next segment.
        let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut leaf = None;
        for id in ids {
            let segments: Vec<&str> = id.split('.').collect();
            if segments.len() == depth {
                leaf = leaves.get(*id).copied();
            } else {
                children.entry(segments[depth]).or_default().push(id);
            }
        }
        let mut buckets: BTreeMap<u8, BTreeMap<u8, Vec<(Vec<u8>, Hash)>>> = BTreeMap::new();
        for (segment, under) in children {
            let child = super::child_path(depth, path, segment);
            if let Some(hash) = node(depth + 1, &child, leaves, &under) {
                let (b1, b2) = bucket_of(segment);
                buckets.entry(b1).or_default().entry(b2).or_default().push((segment.as_bytes().to_vec(), hash));
            }
        }
        let mut level1 = BTreeMap::new();
        for (b1, b2s) in buckets {
            let mut level2 = BTreeMap::new();
            for (b2, mut children) in b2s {
                children.sort();
                level2.insert(b2, bucket2_hash(children.iter().map(|(s, h)| (s.as_slice(), h))));
            }
            level1.insert(b1, bucket1_hash(&level2));
        }
        super::node_hash(leaf.as_ref(), &level1)
    }
    let ids: Vec<&str> = leaves.keys().map(String::as_str).collect();
    node(0, "", leaves, &ids).unwrap_or_else(super::empty_root)
}
