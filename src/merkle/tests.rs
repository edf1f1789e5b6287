use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::path_merkle::reference_root;
use super::*;

fn content(byte: u8) -> Hash {
    crate::item::content_hash(&[byte])
}

fn leaves_of(rows: &BTreeMap<String, (u64, bool, u8)>) -> BTreeMap<String, Hash> {
    rows.iter()
        .map(|(id, (version, deleted, byte))| (id.clone(), leaf_hash(id, *version, *deleted, &content(*byte))))
        .collect()
}

/// A tree built by writing the rows in the given order, `split` per batch.
fn built(order: &[(String, Option<Hash>)], split: usize) -> PathMerkle {
    let mut tree = PathMerkle::new();
    for chunk in order.chunks(split.max(1)) {
        let mut batch = MerkleBatch::new();
        for (id, leaf) in chunk {
            batch.leaves.insert(id.clone(), *leaf);
        }
        tree.apply(&batch);
    }
    tree
}

#[test]
fn no_rows_is_the_empty_root_and_removing_every_row_leaves_no_slot() {
    assert_eq!(PathMerkle::new().root(), empty_root());
    assert_eq!(reference_root(&BTreeMap::new()), empty_root());
    let ids = ["a", "a.b", "a.b.c", "x.y", ".lead", "trail.", "a..b"];
    let order: Vec<(String, Option<Hash>)> =
        ids.iter().map(|id| (id.to_string(), Some(leaf_hash(id, 1, false, &content(1))))).collect();
    let mut tree = built(&order, 3);
    assert_ne!(tree.root(), empty_root());
    assert!(tree.slot_count() > 0);
    let mut batch = MerkleBatch::new();
    for id in ids {
        batch.remove(id);
    }
    assert_eq!(tree.apply(&batch), empty_root());
    assert_eq!(tree.slot_count(), 0);
}

#[test]
fn a_path_can_be_a_leaf_and_an_interior_node_and_the_encoding_keeps_them_apart() {
    let leaf = leaf_hash("a", 1, false, &content(0));
    // "a" with a child "b", versus "a.b" alone, versus "a" alone: three different roots.
    let both = reference_root(&[("a".to_string(), leaf), ("a.b".to_string(), leaf)].into());
    let child_only = reference_root(&[("a.b".to_string(), leaf)].into());
    let leaf_only = reference_root(&[("a".to_string(), leaf)].into());
    assert_ne!(both, child_only);
    assert_ne!(both, leaf_only);
    assert_ne!(child_only, leaf_only);
    // Segments that concatenate alike stay apart: "ab.c" vs "a.bc", "a.b" vs "a..b".
    let one = reference_root(&[("ab.c".to_string(), leaf)].into());
    let two = reference_root(&[("a.bc".to_string(), leaf)].into());
    let three = reference_root(&[("a..b".to_string(), leaf)].into());
    assert_ne!(one, two);
    assert_ne!(child_only, three);
    // The leaf covers version, tombstone flag and content hash, each.
    let base = leaf_hash("a", 1, false, &content(0));
    assert_ne!(base, leaf_hash("a", 2, false, &content(0)));
    assert_ne!(base, leaf_hash("a", 1, true, &content(0)));
    assert_ne!(base, leaf_hash("a", 1, false, &content(1)));
    assert_ne!(base, leaf_hash("b", 1, false, &content(0)));
}

#[test]
fn a_wide_node_updates_by_bucket_and_diffs_in_few_reads() {
    let ids: Vec<String> = (0..5000).map(|n| format!("bench.{n:08}")).collect();
    let order: Vec<(String, Option<Hash>)> =
        ids.iter().map(|id| (id.clone(), Some(leaf_hash(id, 1, false, &content(1))))).collect();
    let mut local = built(&order, 1000);
    let mut other = local.clone();
    let leaves: BTreeMap<String, Hash> = order.iter().map(|(id, leaf)| (id.clone(), leaf.unwrap())).collect();
    assert_eq!(local.root(), reference_root(&leaves));
    let changed: Vec<String> = (0..10).map(|n| ids[n * 499].clone()).collect();
    let mut batch = MerkleBatch::new();
    for id in &changed {
        batch.upsert(id, 2, false, &content(2));
    }
    other.apply(&batch);
    let diff = futures::executor::block_on(MerkleDiff::between(&mut local, &mut other)).unwrap();
    assert_eq!(diff.ids, changed);
    // Per differing node at most 2 leaf + 2 node + 2 bucket1 + 2 bucket2 reads per id under it.
    let bound = 2 + 8 * changed.len() as u64 * 3;
    assert!(diff.queries <= bound, "{} queries, bound {bound}", diff.queries);
    let mut copy = local.clone();
    let same = futures::executor::block_on(MerkleDiff::between(&mut local, &mut copy)).unwrap();
    assert!(same.ids.is_empty());
    assert_eq!(same.queries, 2);
}

#[test]
fn a_node_on_one_side_only_lists_every_id_under_it() {
    let mut local = PathMerkle::new();
    let mut other = PathMerkle::new();
    let mut batch = MerkleBatch::new();
    batch.upsert("a.x", 1, false, &content(1));
    local.apply(&batch);
    other.apply(&batch);
    let mut more = MerkleBatch::new();
    more.upsert("b", 1, false, &content(1)).upsert("b.c.d", 1, true, &content(1)).upsert("b.e", 3, false, &content(2));
    other.apply(&more);
    let diff = futures::executor::block_on(MerkleDiff::between(&mut local, &mut other)).unwrap();
    assert_eq!(diff.ids, vec!["b", "b.c.d", "b.e"]);
    let node = other.node(1, "b");
    assert_eq!(node.children.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(), vec!["c", "e"]);
    assert!(node.leaf.is_some());
}

fn id_strategy() -> impl Strategy<Value = String> {
    "[ab.]{1,6}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The root is a pure function of the rows: any write order, any batch split, any earlier
    /// versions written and replaced or removed on the way give the root of the definition.
    #[test]
    fn the_root_is_a_function_of_the_rows(
        rows in prop::collection::btree_map(id_strategy(), (0u64..4, any::<bool>(), 0u8..3), 0..40),
        noise in prop::collection::vec((id_strategy(), 0u64..4), 0..20),
        seed in any::<u64>(),
        split in 1usize..9,
    ) {
        let leaves = leaves_of(&rows);
        let expected = reference_root(&leaves);
        let in_order: Vec<(String, Option<Hash>)> = leaves.iter().map(|(id, leaf)| (id.clone(), Some(*leaf))).collect();
        prop_assert_eq!(built(&in_order, usize::MAX).root(), expected);
        // Noise first: other leaves for random ids, later replaced or removed.
        let mut order: Vec<(String, Option<Hash>)> =
            noise.iter().map(|(id, v)| (id.clone(), Some(leaf_hash(id, *v + 10, false, &content(9))))).collect();
        for (id, _) in &noise {
            if !leaves.contains_key(id) {
                order.push((id.clone(), None));
            }
        }
        let mut shuffled = in_order.clone();
        shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        order.extend(shuffled);
        let tree = built(&order, split);
        prop_assert_eq!(tree.root(), expected);
    }

    /// Changing any one row (its version, tombstone flag or content; adding or removing it)
    /// changes the root, and the diff finds exactly that id.
    #[test]
    fn any_change_to_one_row_changes_the_root_and_the_diff_names_it(
        rows in prop::collection::btree_map(id_strategy(), (0u64..4, any::<bool>(), 0u8..3), 1..40),
        pick in any::<prop::sample::Index>(),
        kind in 0u8..5,
        new_id in id_strategy(),
    ) {
        let leaves = leaves_of(&rows);
        let order: Vec<(String, Option<Hash>)> = leaves.iter().map(|(id, leaf)| (id.clone(), Some(*leaf))).collect();
        let mut local = built(&order, 7);
        let mut other = local.clone();
        let (id, (version, deleted, byte)) = rows.iter().nth(pick.index(rows.len())).unwrap();
        let mut batch = MerkleBatch::new();
        let changed = match kind {
            0 => { batch.upsert(id, version + 1, *deleted, &content(*byte)); id.clone() }
            1 => { batch.upsert(id, *version, !deleted, &content(*byte)); id.clone() }
            2 => { batch.upsert(id, *version, *deleted, &content(byte + 1)); id.clone() }
            3 => { batch.remove(id); id.clone() }
            _ => {
                prop_assume!(!rows.contains_key(&new_id));
                batch.upsert(&new_id, 1, false, &content(0));
                new_id.clone()
            }
        };
        other.apply(&batch);
        prop_assert_ne!(local.root(), other.root());
        let diff = futures::executor::block_on(MerkleDiff::between(&mut local, &mut other)).unwrap();
        prop_assert_eq!(diff.ids, vec![changed]);
    }
}
