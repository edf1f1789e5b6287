//! `MerkleDiff`: the ids whose rows differ between two trees, found top-down. Only nodes whose
//! hashes differ are opened, and in them only the differing bucket1 and bucket2 entries; a
//! node one side lacks is not asked of that side. Every read is counted.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    bucket2_slot, bucket_slot, child_path, decode_children, decode_entries, empty_root, node_slot, path_key,
    stored_root, Hash, MerkleError, SlotRead,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleDiff {
    /// Ids whose rows differ: on one side only, or with another leaf (version, tombstone flag
    /// or content hash). Ascending.
    pub ids: Vec<String>,
    /// Reads issued to the two trees together (each one statement for an L3 tree).
    pub queries: u64,
    pub local_root: Hash,
    pub other_root: Hash,
}

/// A node to open: its depth and path, and whether each side has it.
struct Open {
    depth: usize,
    path: String,
    in_local: bool,
    in_other: bool,
}

/// Counts the reads made through it.
struct Counted<'a, S> {
    store: &'a mut S,
    queries: u64,
}

impl<S: SlotRead> Counted<'_, S> {
    async fn entries(&mut self, present: bool, key: Vec<u8>) -> Result<BTreeMap<u8, Hash>, MerkleError> {
        if !present {
            return Ok(BTreeMap::new());
        }
        self.queries += 1;
        match self.store.get(std::slice::from_ref(&key)).await?.get(&key) {
            Some(value) => decode_entries(value),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn children(&mut self, present: bool, key: Vec<u8>) -> Result<BTreeMap<Vec<u8>, Hash>, MerkleError> {
        if !present {
            return Ok(BTreeMap::new());
        }
        self.queries += 1;
        match self.store.get(std::slice::from_ref(&key)).await?.get(&key) {
            Some(value) => decode_children(value),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn leaf(&mut self, present: bool, id: &str) -> Result<Option<Hash>, MerkleError> {
        if !present {
            return Ok(None);
        }
        self.queries += 1;
        Ok(self.store.leaves(&[id.to_owned()]).await?.get(id).copied())
    }
}

/// The keys whose values differ between two maps (present on one side only included).
fn differing<K: Ord + Clone, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> Vec<K> {
    let keys: BTreeSet<&K> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|key| a.get(*key) != b.get(*key)).cloned().collect()
}

impl MerkleDiff {
    /// Compares two up-to-date trees.
    pub async fn between<A: SlotRead, B: SlotRead>(local: &mut A, other: &mut B) -> Result<MerkleDiff, MerkleError> {
        let local_root = stored_root(local).await?;
        let other_root = stored_root(other).await?;
        let mut local = Counted { store: local, queries: 1 };
        let mut other = Counted { store: other, queries: 1 };
        let mut ids = Vec::new();
        let mut stack = Vec::new();
        if local_root != other_root {
            let empty = empty_root();
            stack.push(Open {
                depth: 0,
                path: String::new(),
                in_local: local_root != empty,
                in_other: other_root != empty,
            });
        }
        while let Some(open) = stack.pop() {
            if open.depth > 0 {
                let a = local.leaf(open.in_local, &open.path).await?;
                let b = other.leaf(open.in_other, &open.path).await?;
                if a != b {
                    ids.push(open.path.clone());
                }
            }
            let key = path_key(open.depth, &open.path);
            let a = local.entries(open.in_local, node_slot(&key)).await?;
            let b = other.entries(open.in_other, node_slot(&key)).await?;
            for b1 in differing(&a, &b) {
                let a2 = local.entries(a.contains_key(&b1), bucket_slot(&key, b1)).await?;
                let b2s = other.entries(b.contains_key(&b1), bucket_slot(&key, b1)).await?;
                for b2 in differing(&a2, &b2s) {
                    let slot = bucket2_slot(&key, b1, b2);
                    let ca = local.children(a2.contains_key(&b2), slot.clone()).await?;
                    let cb = other.children(b2s.contains_key(&b2), slot).await?;
                    for segment in differing(&ca, &cb) {
                        let segment_text = String::from_utf8_lossy(&segment).into_owned();
                        stack.push(Open {
                            depth: open.depth + 1,
                            path: child_path(open.depth, &open.path, &segment_text),
                            in_local: ca.contains_key(&segment),
                            in_other: cb.contains_key(&segment),
                        });
                    }
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(MerkleDiff { ids, queries: local.queries + other.queries, local_root, other_root })
    }
}
