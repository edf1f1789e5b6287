//! L3's merkle tree (`crate::merkle` defines it): its slots in `<table>_merkle`, and durable
//! dirty marks in `<table>_merkle_dirty`.
//!
//! **Marks.** With marks on (`SqlStore::set_merkle_marks`, the engine's `SYNC_MERKLE`),
//! `write_batch` appends one row to `<table>_merkle_dirty` inside the batch's own transaction,
//! listing every written id with the leaf of the row the transaction holds (`encode_marks`; up
//! to `MARKS_PER_ROW` ids a row): a committed row change always has its mark, even after a
//! `kill -9`. The mark log is append-only (an auto-increment `seq`, no unique id), so a write
//! never waits on a lock held by a drain.
//!
//! **Drain.** `merkle_drain_step` takes up to N mark rows in `seq` order, takes each id's leaf from
//! its newest mark (a mark made by hand has none: the row is read), recomputes the ancestors
//! (`merkle::apply`: one batched read of the slots, one batched write), deletes exactly the rows it
//! read (by `seq`: a mark committed meanwhile stays for the next step) and commits, all in one
//! transaction. On MySQL the transaction first locks the `0xFE` slot (`FOR UPDATE`), so drains
//! of several pods sharing one L3 run one at a time, each on a snapshot taken after the
//! previous one committed. A row written after the snapshot has a mark the step did not read.
//!
//! **Built.** The `0xFD` slot says every row change since the tree was (re)built has a mark.
//! An engine started with `SYNC_MERKLE=0` removes it, since it writes without marks; the next
//! start with marks on (`merkle_ensure_built`) deletes the slots and marks every row once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use sqlx::Row;

use crate::item::SyncItem;
use crate::merkle::{self, leaf_hash, Hash, MerkleBatch, MerkleDiff, MerkleError, SlotRead, SlotStore};
use crate::storage::sql::{classify, SqlStore};
use crate::storage::{ArchiveStore, StoreError};

/// The migration that creates the merkle tables (after the `state` migration, 2).
pub const MERKLE_MIGRATION: i64 = 4;
/// The slot every drain locks first (MySQL), and the "built" flag; outside every path's range.
const LOCK_SLOT: &[u8] = &[0xFE];
pub const BUILT_SLOT: &[u8] = &[0xFD];
/// Mark rows one drain step takes at most (a row holds the ids of one batch, at most
/// `MARKS_PER_ROW`).
pub const DRAIN_STEP_ROWS: usize = 5;
pub const MARKS_PER_ROW: usize = 1000;
/// List lengths statements are padded to (the last element repeated), so few shapes are prepared.
const SHAPES: [usize; 4] = [1, 10, 100, 1000];
const PUT_SHAPES: [usize; 4] = [1, 10, 100, 500];

/// The statements that create the merkle tables; `mysql` picks the dialect.
pub fn create_statements(table: &str, mysql: bool) -> [String; 3] {
    if mysql {
        [
            format!(
                "CREATE TABLE IF NOT EXISTS {table}_merkle (k VARBINARY(700) NOT NULL PRIMARY KEY, v MEDIUMBLOB NOT NULL) ENGINE=InnoDB"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {table}_merkle_dirty (seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
                 marks MEDIUMBLOB NOT NULL) ENGINE=InnoDB"
            ),
            format!("INSERT IGNORE INTO {table}_merkle (k, v) VALUES (x'FE', x'')"),
        ]
    } else {
        [
            format!("CREATE TABLE IF NOT EXISTS {table}_merkle (k BLOB NOT NULL PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"),
            format!("CREATE TABLE IF NOT EXISTS {table}_merkle_dirty (seq INTEGER PRIMARY KEY, marks BLOB NOT NULL)"),
            format!("INSERT OR IGNORE INTO {table}_merkle (k, v) VALUES (x'FE', x'')"),
        ]
    }
}

/// `INSERT` of one mark row: `encode_marks` of up to `MARKS_PER_ROW` ids.
pub fn mark_sql(table: &str) -> String {
    format!("INSERT INTO {table}_merkle_dirty (marks) VALUES (?)")
}

/// Marks as one row's value: per id `u16be(len) ‖ id ‖ u8(has leaf) ‖ [leaf[32]]`. A mark
/// without a leaf (made by hand, or by a rebuild) makes the drain read the row.
pub fn encode_marks<'a>(marks: impl IntoIterator<Item = (&'a str, Option<Hash>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, leaf) in marks {
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id.as_bytes());
        match leaf {
            Some(leaf) => {
                out.push(1);
                out.extend_from_slice(&leaf);
            }
            None => out.push(0),
        }
    }
    out
}

fn decode_marks(mut bytes: &[u8]) -> Result<Vec<(String, Option<Hash>)>, StoreError> {
    let corrupt = || StoreError::Rejected("merkle tree: corrupt mark row".into());
    let mut marks = Vec::new();
    while !bytes.is_empty() {
        let len = u16::from_be_bytes(bytes.get(..2).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?) as usize;
        let id = bytes.get(2..2 + len).ok_or_else(corrupt)?;
        let flag = *bytes.get(2 + len).ok_or_else(corrupt)?;
        let (leaf, used) = if flag == 1 {
            let leaf: Hash = bytes.get(3 + len..35 + len).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?;
            (Some(leaf), 35 + len)
        } else {
            (None, 3 + len)
        };
        marks.push((String::from_utf8_lossy(id).into_owned(), leaf));
        bytes = &bytes[used..];
    }
    Ok(marks)
}

/// The leaf of what L3 holds for `id` after a write (`None`: no row, the drain reads it).
/// A later write of the same id waits for this transaction's row lock before it marks, so of
/// one id's marks the highest `seq` carries the newest committed row.
pub fn held_leaf(id: &str, held: Option<&crate::storage::sql::HeldRow>) -> Option<Hash> {
    held.map(|row| leaf_hash(id, row.version, row.deleted, &row.content_hash))
}

/// The mark rows of a batch write, each `MARKS_PER_ROW` ids with the leaf of what the
/// transaction holds for them (`held`): the values to insert by `mark_sql`, after the upserts.
pub fn batch_mark_rows<'a>(
    items: &'a [&'a SyncItem],
    held: &'a crate::storage::sql::HeldRows,
) -> impl Iterator<Item = Vec<u8>> + 'a {
    items.chunks(MARKS_PER_ROW).map(move |chunk| {
        encode_marks(chunk.iter().map(|item| (item.id.as_str(), held_leaf(&item.id, held.get(&item.id)))))
    })
}

/// `items` cut into lists of at most the largest shape, each padded up to a shape.
fn padded<T: Clone>(items: &[T], shapes: &[usize]) -> Vec<Vec<T>> {
    let largest = shapes[shapes.len() - 1];
    items
        .chunks(largest)
        .map(|chunk| {
            let shape = shapes.iter().copied().find(|&shape| shape >= chunk.len()).unwrap_or(chunk.len());
            let mut list = chunk.to_vec();
            list.resize(shape, chunk[chunk.len() - 1].clone());
            list
        })
        .collect()
}

fn list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

enum Conn<'a> {
    My(sqlx::Transaction<'a, sqlx::MySql>),
    Lite(sqlx::Transaction<'a, sqlx::Sqlite>),
}

/// The same body for both backends (the executor is `&mut **$c`).
macro_rules! on_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::My($c) => $body,
            Conn::Lite($c) => $body,
        }
    };
}

/// A merkle tree in L3, read and written inside one transaction. Dropped without `commit`, it
/// rolls back. As a `SlotRead` it is what `sync-engine diff` compares: one consistent snapshot.
pub struct SqlSlots<'a> {
    conn: Conn<'a>,
    table: String,
}

impl SqlSlots<'_> {
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.conn {
            Conn::My(tx) => tx.commit().await.map_err(classify),
            Conn::Lite(tx) => tx.commit().await.map_err(classify),
        }
    }

    /// Waits for other drains of this tree to commit (MySQL; SQLite has one writer).
    async fn lock(&mut self) -> Result<(), StoreError> {
        if let Conn::My(tx) = &mut self.conn {
            let statement = format!("SELECT v FROM {}_merkle WHERE k = ? FOR UPDATE", self.table);
            sqlx::query(&statement).bind(LOCK_SLOT).fetch_optional(&mut **tx).await.map_err(classify)?;
        }
        Ok(())
    }

    async fn execute(&mut self, statement: &str, values: &[&[u8]]) -> Result<u64, StoreError> {
        on_conn!(&mut self.conn, c => {
            let mut query = sqlx::query(statement);
            for value in values {
                query = query.bind(*value);
            }
            Ok(query.execute(&mut **c).await.map_err(classify)?.rows_affected())
        })
    }

    /// `(k, v)` rows of a statement over the slots table.
    async fn slot_rows(&mut self, statement: &str, values: &[&[u8]]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        on_conn!(&mut self.conn, c => {
            let mut query = sqlx::query(statement);
            for value in values {
                query = query.bind(*value);
            }
            let rows = query.fetch_all(&mut **c).await.map_err(classify)?;
            rows.iter()
                .map(|row| Ok((row.try_get::<Vec<u8>, _>("k").map_err(classify)?, row.try_get::<Vec<u8>, _>("v").map_err(classify)?)))
                .collect()
        })
    }

    /// Up to `limit` mark rows, oldest first: `(seq, marks)`.
    async fn marks(&mut self, limit: usize) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        let statement = format!("SELECT seq, marks FROM {}_merkle_dirty ORDER BY seq LIMIT ?", self.table);
        match &mut self.conn {
            Conn::My(tx) => {
                let rows = sqlx::query(&statement).bind(limit as i64).fetch_all(&mut **tx).await.map_err(classify)?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            row.try_get::<u64, _>("seq").map_err(classify)? as i64,
                            row.try_get("marks").map_err(classify)?,
                        ))
                    })
                    .collect()
            }
            Conn::Lite(tx) => {
                let rows = sqlx::query(&statement).bind(limit as i64).fetch_all(&mut **tx).await.map_err(classify)?;
                rows.iter()
                    .map(|row| {
                        Ok((row.try_get::<i64, _>("seq").map_err(classify)?, row.try_get("marks").map_err(classify)?))
                    })
                    .collect()
            }
        }
    }

    /// Ids of the items table after `after`, in order, at most `limit` (keyset pages).
    async fn ids_after(&mut self, after: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let statement = format!("SELECT id FROM {} WHERE id > ? ORDER BY id LIMIT ?", self.table);
        on_conn!(&mut self.conn, c => {
            let rows = sqlx::query(&statement).bind(after).bind(limit as i64).fetch_all(&mut **c).await.map_err(classify)?;
            rows.iter().map(|row| row.try_get::<Vec<u8>, _>("id").map_err(classify)).collect()
        })
    }

    async fn delete_marks(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        for chunk in padded(seqs, &SHAPES) {
            let statement = format!("DELETE FROM {}_merkle_dirty WHERE seq IN ({})", self.table, list(chunk.len()));
            on_conn!(&mut self.conn, c => {
                let mut query = sqlx::query(&statement);
                for seq in &chunk {
                    query = query.bind(*seq);
                }
                query.execute(&mut **c).await.map_err(classify)?;
            });
        }
        Ok(())
    }

    /// `(id, version, deleted, content_hash)` of the rows of these ids, as leaves.
    async fn row_leaves(&mut self, ids: &[String]) -> Result<HashMap<String, Hash>, StoreError> {
        let mut leaves = HashMap::with_capacity(ids.len());
        for chunk in padded(ids, &SHAPES) {
            let statement = format!(
                "SELECT id, version, deleted, content_hash FROM {} WHERE id IN ({})",
                self.table,
                list(chunk.len())
            );
            let mut rows = Vec::new();
            match &mut self.conn {
                Conn::My(tx) => {
                    let mut query = sqlx::query(&statement);
                    for id in &chunk {
                        query = query.bind(id.as_bytes());
                    }
                    for row in query.fetch_all(&mut **tx).await.map_err(classify)? {
                        let version: u64 = row.try_get("version").map_err(classify)?;
                        rows.push((
                            row.try_get::<Vec<u8>, _>("id").map_err(classify)?,
                            version,
                            row.try_get::<bool, _>("deleted").map_err(classify)?,
                            row.try_get::<Vec<u8>, _>("content_hash").map_err(classify)?,
                        ));
                    }
                }
                Conn::Lite(tx) => {
                    let mut query = sqlx::query(&statement);
                    for id in &chunk {
                        query = query.bind(id.as_bytes());
                    }
                    for row in query.fetch_all(&mut **tx).await.map_err(classify)? {
                        let version: i64 = row.try_get("version").map_err(classify)?;
                        rows.push((
                            row.try_get::<Vec<u8>, _>("id").map_err(classify)?,
                            version as u64,
                            row.try_get::<bool, _>("deleted").map_err(classify)?,
                            row.try_get::<Vec<u8>, _>("content_hash").map_err(classify)?,
                        ));
                    }
                }
            }
            for (id, version, deleted, hash) in rows {
                let id = String::from_utf8_lossy(&id).into_owned();
                let hash: Hash = hash.try_into().unwrap_or([0; 32]);
                let leaf = leaf_hash(&id, version, deleted, &hash);
                leaves.insert(id, leaf);
            }
        }
        Ok(leaves)
    }
}

impl SlotRead for SqlSlots<'_> {
    async fn get(&mut self, keys: &[Vec<u8>]) -> Result<HashMap<Vec<u8>, Vec<u8>>, MerkleError> {
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in padded(keys, &SHAPES) {
            let statement = format!("SELECT k, v FROM {}_merkle WHERE k IN ({})", self.table, list(chunk.len()));
            let values: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            out.extend(self.slot_rows(&statement, &values).await?);
        }
        Ok(out)
    }

    async fn leaves(&mut self, ids: &[String]) -> Result<HashMap<String, Hash>, MerkleError> {
        Ok(self.row_leaves(ids).await?)
    }
}

impl SlotStore for SqlSlots<'_> {
    async fn write(&mut self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<(), MerkleError> {
        for chunk in padded(&deletes, &SHAPES) {
            let statement = format!("DELETE FROM {}_merkle WHERE k IN ({})", self.table, list(chunk.len()));
            let values: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            self.execute(&statement, &values).await?;
        }
        for chunk in padded(&puts, &PUT_SHAPES) {
            let rows = vec!["(?, ?)"; chunk.len()].join(", ");
            let statement = match self.conn {
                Conn::My(_) => {
                    format!(
                        "INSERT INTO {}_merkle (k, v) VALUES {rows} ON DUPLICATE KEY UPDATE v = VALUES(v)",
                        self.table
                    )
                }
                Conn::Lite(_) => {
                    format!(
                        "INSERT INTO {}_merkle (k, v) VALUES {rows} ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                        self.table
                    )
                }
            };
            let values: Vec<&[u8]> = chunk.iter().flat_map(|(k, v)| [k.as_slice(), v.as_slice()]).collect();
            self.execute(&statement, &values).await?;
        }
        Ok(())
    }
}

/// What one drain step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainStep {
    /// Mark rows taken (and deleted).
    pub rows: usize,
    /// Marks in them.
    pub marks: usize,
    /// Distinct ids recomputed.
    pub ids: usize,
    pub root: Hash,
}

fn store_error(error: MerkleError) -> StoreError {
    match error {
        MerkleError::Store(error) => error,
        MerkleError::Corrupt(why) => StoreError::Rejected(format!("merkle tree: {why} (rebuild it)")),
    }
}

impl SqlStore {
    /// Whether `write_batch` marks the ids it writes for the merkle tree (off by default;
    /// the engine turns it on with `SYNC_MERKLE`).
    pub fn set_merkle_marks(&self, on: bool) {
        match self {
            SqlStore::MySql(store) => store.merkle_marks.store(on, Ordering::Relaxed),
            SqlStore::Sqlite(store) => store.merkle_marks.store(on, Ordering::Relaxed),
        }
    }

    fn table_name(&self) -> &str {
        match self {
            SqlStore::MySql(store) => &store.table,
            SqlStore::Sqlite(store) => &store.table,
        }
    }

    /// The tree in a transaction of its own (see `SqlSlots`).
    pub async fn merkle_slots(&self) -> Result<SqlSlots<'static>, StoreError> {
        let conn = match self {
            SqlStore::MySql(store) => Conn::My(store.pool.begin().await.map_err(classify)?),
            SqlStore::Sqlite(store) => Conn::Lite(store.pool.begin().await.map_err(classify)?),
        };
        Ok(SqlSlots { conn, table: self.table_name().to_owned() })
    }

    /// The stored root (the empty root for no rows). Only as fresh as the last drain.
    pub async fn merkle_root(&self) -> Result<Hash, StoreError> {
        let mut slots = self.merkle_slots().await?;
        let root = merkle::stored_root(&mut slots).await.map_err(store_error)?;
        slots.commit().await?;
        Ok(root)
    }

    /// Marks ids by hand (rows changed outside `write_batch`, e.g. by an operator's `UPDATE`).
    pub async fn merkle_mark(&self, ids: &[&str]) -> Result<(), StoreError> {
        let mut slots = self.merkle_slots().await?;
        let statement = mark_sql(&slots.table);
        for chunk in ids.chunks(MARKS_PER_ROW) {
            let marks = encode_marks(chunk.iter().map(|id| (*id, None)));
            slots.execute(&statement, &[&marks]).await?;
        }
        slots.commit().await
    }

    /// Mark rows not drained yet (each holds the ids of one batch, or up to `MARKS_PER_ROW`).
    pub async fn merkle_pending(&self) -> Result<u64, StoreError> {
        let mut slots = self.merkle_slots().await?;
        let statement = format!("SELECT COUNT(*) AS n FROM {}_merkle_dirty", self.table_name());
        let count: i64 =
            on_conn!(&mut slots.conn, c => sqlx::query_scalar(&statement).fetch_one(&mut **c).await.map_err(classify)?);
        slots.commit().await?;
        Ok(count.max(0) as u64)
    }

    /// One drain step: up to `max_marks` marks, their ids' leaves and ancestors, in one
    /// transaction (module doc).
    pub async fn merkle_drain_step(&self, max_rows: usize) -> Result<DrainStep, StoreError> {
        let mut slots = self.merkle_slots().await?;
        slots.lock().await?;
        let rows = slots.marks(max_rows.max(1)).await?;
        if rows.is_empty() {
            let root = merkle::stored_root(&mut slots).await.map_err(store_error)?;
            slots.commit().await?;
            return Ok(DrainStep { rows: 0, marks: 0, ids: 0, root });
        }
        // Each id's newest mark (rows come in `seq` order); one without a leaf means "read the row".
        let mut newest: BTreeMap<String, Option<Hash>> = BTreeMap::new();
        let mut marks = 0;
        for (_, row) in &rows {
            for (id, leaf) in decode_marks(row)? {
                marks += 1;
                newest.insert(id, leaf);
            }
        }
        let unknown: Vec<String> = newest.iter().filter(|(_, leaf)| leaf.is_none()).map(|(id, _)| id.clone()).collect();
        let read = if unknown.is_empty() { HashMap::new() } else { slots.row_leaves(&unknown).await? };
        let mut batch = MerkleBatch::new();
        for (id, leaf) in &newest {
            batch.leaves.insert(id.clone(), leaf.or_else(|| read.get(id).copied()));
        }
        let root = merkle::apply(&mut slots, &batch).await.map_err(store_error)?;
        let seqs: Vec<i64> = rows.iter().map(|(seq, _)| *seq).collect();
        slots.delete_marks(&seqs).await?;
        slots.commit().await?;
        Ok(DrainStep { rows: rows.len(), marks, ids: newest.len(), root })
    }

    /// Drains every mark; returns the root.
    pub async fn merkle_drain(&self) -> Result<Hash, StoreError> {
        loop {
            let step = self.merkle_drain_step(DRAIN_STEP_ROWS).await?;
            if step.rows == 0 {
                return Ok(step.root);
            }
        }
    }

    /// If the tree is not known to be complete (new table, or written with marks off since),
    /// deletes its slots and marks every row, in one transaction; the drain then rebuilds it.
    /// Returns whether it did.
    pub async fn merkle_ensure_built(&self) -> Result<bool, StoreError> {
        let mut slots = self.merkle_slots().await?;
        slots.lock().await?;
        if slots.get(&[BUILT_SLOT.to_vec()]).await.map_err(store_error)?.contains_key(BUILT_SLOT) {
            slots.commit().await?;
            return Ok(false);
        }
        let table = self.table_name();
        slots.execute(&format!("DELETE FROM {table}_merkle WHERE k < ?"), &[BUILT_SLOT]).await?;
        slots.execute(&format!("DELETE FROM {table}_merkle WHERE k = ?"), &[merkle::ROOT_SLOT]).await?;
        // Every row marked, a page of ids per mark row (keyset pages, never OFFSET).
        let statement = mark_sql(table);
        let mut after = Vec::new();
        loop {
            let page = slots.ids_after(&after, MARKS_PER_ROW).await?;
            let Some(last) = page.last().cloned() else { break };
            let ids: Vec<String> = page.iter().map(|id| String::from_utf8_lossy(id).into_owned()).collect();
            let marks = encode_marks(ids.iter().map(|id| (id.as_str(), None)));
            slots.execute(&statement, &[&marks]).await?;
            after = last;
        }
        slots.write(vec![(BUILT_SLOT.to_vec(), Vec::new())], Vec::new()).await.map_err(store_error)?;
        slots.commit().await?;
        Ok(true)
    }

    /// Says the tree may miss changes (rows are written without marks from now on); the
    /// next `merkle_ensure_built` rebuilds it.
    pub async fn merkle_invalidate(&self) -> Result<(), StoreError> {
        let mut slots = self.merkle_slots().await?;
        let statement = format!("DELETE FROM {}_merkle WHERE k = ?", self.table_name());
        slots.execute(&statement, &[BUILT_SLOT]).await?;
        slots.commit().await
    }

    /// Rebuilds the tree from the rows: `merkle_invalidate`, `merkle_ensure_built`, drain.
    pub async fn merkle_rebuild(&self) -> Result<Hash, StoreError> {
        self.merkle_invalidate().await?;
        self.merkle_ensure_built().await?;
        self.merkle_drain().await
    }
}

/// What `repair` did with the divergent ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    /// Copied from the other store into this one (newer there, or only there).
    pub to_local: Vec<String>,
    /// Copied from this store into the other.
    pub to_other: Vec<String>,
    /// Left as they are: neither row supersedes the other (equal versions with different
    /// content, say, which only a newer write can settle), or the guard refused the copy.
    pub unrepairable: Vec<String>,
}

impl SqlStore {
    /// Makes both trees current (a tree not known to be complete is rebuilt, then every mark
    /// is drained) and compares them top-down: the ids whose rows differ, and the reads it took.
    pub async fn merkle_diff(&self, other: &SqlStore) -> Result<MerkleDiff, StoreError> {
        for store in [self, other] {
            store.merkle_ensure_built().await?;
            store.merkle_drain().await?;
        }
        let mut local = self.merkle_slots().await?;
        let mut remote = other.merkle_slots().await?;
        let diff = MerkleDiff::between(&mut local, &mut remote).await.map_err(store_error)?;
        local.commit().await?;
        remote.commit().await?;
        Ok(diff)
    }

    /// Makes this tree current and compares it top-down with another read through `other`
    /// (a peer's `GET /merkle/` endpoint, `http_merkle::HttpSlots`), whose owner keeps it current.
    pub async fn merkle_diff_with<S: SlotRead>(&self, other: &mut S) -> Result<MerkleDiff, StoreError> {
        self.merkle_ensure_built().await?;
        self.merkle_drain().await?;
        let mut local = self.merkle_slots().await?;
        let diff = MerkleDiff::between(&mut local, other).await.map_err(store_error)?;
        local.commit().await?;
        Ok(diff)
    }

    /// Copies the newer row of each id to the store that lacks it or holds an older one,
    /// through the version-guarded `write_batch` (in both directions), with marks on, so the
    /// trees follow. `timeout` bounds each batch write.
    pub async fn merkle_repair(
        &self,
        other: &SqlStore,
        ids: &[String],
        timeout: std::time::Duration,
    ) -> Result<Repair, StoreError> {
        let mut repair = Repair::default();
        for chunk in ids.chunks(crate::storage::sql::READ_CHUNK_IDS) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let by_id = |stored: Vec<crate::storage::Stored>| -> HashMap<String, SyncItem> {
                stored.into_iter().map(|stored| (stored.item.id.clone(), stored.item)).collect()
            };
            let local = by_id(self.get_many(&refs).await?);
            let remote = by_id(other.get_many(&refs).await?);
            let (mut to_local, mut to_other) = (Vec::new(), Vec::new());
            for id in chunk {
                match (local.get(id), remote.get(id)) {
                    (Some(mine), None) => to_other.push(mine),
                    (None, Some(theirs)) => to_local.push(theirs),
                    (Some(mine), Some(theirs)) if mine.supersedes(theirs) => to_other.push(mine),
                    (Some(mine), Some(theirs)) if theirs.supersedes(mine) => to_local.push(theirs),
                    _ => repair.unrepairable.push(id.clone()),
                }
            }
            for (target, items, done) in
                [(self, to_local, &mut repair.to_local), (other, to_other, &mut repair.to_other)]
            {
                if items.is_empty() {
                    continue;
                }
                target.set_merkle_marks(true);
                let held = target.write_batch(&items, timeout).await?;
                for item in items {
                    if held.get(&item.id).is_some_and(|row| row.is(item)) {
                        done.push(item.id.clone());
                    } else {
                        repair.unrepairable.push(item.id.clone());
                    }
                }
            }
        }
        repair.unrepairable.sort();
        Ok(repair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_padded_to_few_shapes() {
        let items: Vec<u32> = (0..1234).collect();
        let lists = padded(&items, &SHAPES);
        assert_eq!(lists.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 1000]);
        assert!(lists[1][234..].iter().all(|n| *n == 1233));
        let leaf = [7; 32];
        let marks = encode_marks([("a.b", Some(leaf)), ("", None), ("ü", None)]);
        assert_eq!(
            decode_marks(&marks).unwrap(),
            vec![("a.b".to_string(), Some(leaf)), (String::new(), None), ("ü".to_string(), None)]
        );
        assert!(decode_marks(&marks[..marks.len() - 1]).is_err());
    }
}
