//! The read methods of both SQL stores, written once. Their statements and binds are the same
//! text on MySQL and SQLite; only the pool's driver and how an unsigned column is decoded
//! differ (SQLite's integers are signed, so it stores versions as `i64`). `sql_reads!` writes
//! them into each store's own `impl` with its driver and its decoder (`sql_mysql.rs`,
//! `sql_sqlite.rs`). A function generic over `sqlx::Database` would need a bound for every type
//! it binds and decodes, longer than the methods themselves.
//!
//! The store passes: its type, its `sqlx::Database`, a `fn(&Row, &str) -> Result<u64,
//! StoreError>` that decodes an unsigned column, and its SQL expression for "now in ms".

macro_rules! sql_reads {
    ($store:ty, $db:ty, $unsigned:path, $now_ms:expr) => {
        impl $store {
            pub async fn get(&self, id: &str) -> Result<Option<$crate::item::SyncItem>, $crate::storage::StoreError> {
                use $crate::storage::sql::{classify, item_from_row};
                let statement = format!(
                    "SELECT id, version, content, content_type, origin_topic, origin_partition, origin_offset, state \
                     FROM {} WHERE id = ?",
                    self.table
                );
                let row =
                    sqlx::query(&statement).bind(id.as_bytes()).fetch_optional(&self.pool).await.map_err(classify)?;
                row.map(|row| item_from_row(&row, $unsigned(&row, "version")?)).transpose()
            }

            /// The rows of these ids (one statement; ids may repeat), with their hashes.
            pub async fn stored_in(
                &self,
                ids: &[&str],
            ) -> Result<Vec<$crate::storage::Stored>, $crate::storage::StoreError> {
                use $crate::storage::sql::{classify, stored_from_row, stored_items_sql};
                let statement = stored_items_sql(&self.table, ids.len());
                let mut query = sqlx::query(&statement);
                for id in ids {
                    query = query.bind(id.as_bytes());
                }
                self.read_statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let rows = query.fetch_all(&self.pool).await.map_err(classify)?;
                rows.iter().map(|row| stored_from_row(row, $unsigned(row, "version")?)).collect()
            }

            /// `Some(true)` for a live row, `Some(false)` for a tombstone, `None` for no row.
            pub async fn live(&self, id: &str) -> Result<Option<bool>, $crate::storage::StoreError> {
                let statement = format!("SELECT deleted FROM {} WHERE id = ?", self.table);
                self.read_statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let deleted: Option<bool> = sqlx::query_scalar(&statement)
                    .bind(id.as_bytes())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err($crate::storage::sql::classify)?;
                Ok(deleted.map(|deleted| !deleted))
            }

            /// A selection's query with its values, the `after` id and the limit bound.
            fn bind_scan<'q>(
                statement: &'q str,
                selection: &$crate::storage::sql::Selection,
                after: &'q str,
                limit: i64,
            ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                let mut query = sqlx::query(statement);
                for value in selection.condition().1 {
                    query = query.bind(value);
                }
                query.bind(after.as_bytes()).bind(limit)
            }

            pub async fn scan(
                &self,
                selection: &$crate::storage::sql::Selection<'_>,
                after: &str,
                limit: i64,
            ) -> Result<Vec<$crate::item::SyncItem>, $crate::storage::StoreError> {
                use $crate::storage::sql::{classify, item_from_row, scan_sql};
                let statement = scan_sql(&self.table, selection, false);
                let rows =
                    Self::bind_scan(&statement, selection, after, limit).fetch_all(&self.pool).await.map_err(classify)?;
                rows.iter().map(|row| item_from_row(row, $unsigned(row, "version")?)).collect()
            }

            pub async fn scan_ids(
                &self,
                selection: &$crate::storage::sql::Selection<'_>,
                after: &str,
                limit: i64,
            ) -> Result<Vec<String>, $crate::storage::StoreError> {
                use $crate::storage::sql::{classify, scan_sql};
                let statement = scan_sql(&self.table, selection, true);
                let rows =
                    Self::bind_scan(&statement, selection, after, limit).fetch_all(&self.pool).await.map_err(classify)?;
                rows.iter()
                    .map(|row| {
                        let id: Vec<u8> = sqlx::Row::try_get(row, "id").map_err(classify)?;
                        Ok(String::from_utf8_lossy(&id).into_owned())
                    })
                    .collect()
            }

            /// Every id (tombstones included) above `after`, by id, at most `limit`.
            pub async fn ids_after(
                &self,
                after: &[u8],
                limit: i64,
            ) -> Result<Vec<Vec<u8>>, $crate::storage::StoreError> {
                let statement = format!("SELECT id FROM {} WHERE id > ? ORDER BY id LIMIT ?", self.table);
                sqlx::query_scalar(&statement)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::storage::sql::classify)
            }

            /// The clock `created_at_ms` is stamped with.
            pub async fn db_now_ms(&self) -> Result<i64, $crate::storage::StoreError> {
                sqlx::query_scalar(&format!("SELECT {}", $now_ms))
                    .fetch_one(&self.pool)
                    .await
                    .map_err($crate::storage::sql::classify)
            }

            /// See `SqlStore::ids_created_since`: the key to continue after is `(from, after_id)`.
            pub async fn ids_created_since(
                &self,
                since: i64,
                from: i64,
                after_id: &[u8],
                limit: i64,
            ) -> Result<Vec<(i64, Vec<u8>)>, $crate::storage::StoreError> {
                let statement = $crate::storage::sql::ids_created_since_sql(&self.table);
                sqlx::query_as(&statement)
                    .bind(since)
                    .bind(from)
                    .bind(from)
                    .bind(after_id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err($crate::storage::sql::classify)
            }

            pub async fn count(
                &self,
                selection: &$crate::storage::sql::Selection<'_>,
            ) -> Result<u64, $crate::storage::StoreError> {
                let statement = $crate::storage::sql::count_sql(&self.table, selection);
                let mut query = sqlx::query_scalar(&statement);
                for value in selection.condition().1 {
                    query = query.bind(value);
                }
                let count: i64 = query.fetch_one(&self.pool).await.map_err($crate::storage::sql::classify)?;
                Ok(count.max(0) as u64)
            }

            pub async fn summaries(&self) -> Result<Vec<$crate::storage::RowSummary>, $crate::storage::StoreError> {
                use $crate::storage::sql::{classify, summary_from_row};
                let statement =
                    format!("SELECT id, version, content_hash, deleted, updated_at_ms FROM {} ORDER BY id", self.table);
                let rows = sqlx::query(&statement).fetch_all(&self.pool).await.map_err(classify)?;
                rows.iter()
                    .map(|row| summary_from_row(row, $unsigned(row, "version")?, $unsigned(row, "updated_at_ms")?))
                    .collect()
            }

            pub async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}

pub(super) use sql_reads;
