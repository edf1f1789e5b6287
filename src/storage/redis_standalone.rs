//! L2 on one standalone Redis (cluster support disabled): a batch is one pipeline of
//! `EVALSHA` calls, so one round trip however many items. What that pipeline could not do
//! (a `NOSCRIPT` after the server restarted or flushed its scripts, a dropped connection) is
//! retried one item at a time; each call loads its script when the server lacks it.
//!
//! A multiplexed connection never reconnects by itself: once its socket is gone every request
//! fails. So any failure that is not the server's own answer replaces the connection (at most
//! every `RECONNECT_EVERY`), on reads as well as writes, since a reader may never write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Client, RedisError, Value};

use crate::storage::redis::{connection_config, unavailable, Commands, L2Op, Replaceable, RECONNECT_EVERY, SCRIPTS};
use crate::storage::{ScanCursor, StoreError};

pub(super) struct StandaloneL2 {
    client: Client,
    connection: Replaceable<MultiplexedConnection>,
    /// Whether the server has both scripts, as far as we know: `EVALSHA` in a pipeline cannot
    /// load them. Cleared by any pipeline failure and by a reconnect (it may be a new server).
    scripts_loaded: AtomicBool,
}

impl StandaloneL2 {
    pub(super) fn new(client: Client, connection: MultiplexedConnection) -> StandaloneL2 {
        StandaloneL2 { client, connection: Replaceable::new(connection), scripts_loaded: AtomicBool::new(false) }
    }

    /// Applies each change in one pipeline, then one by one what it left. Returns the ids that failed.
    pub(super) async fn apply(&self, commands: &Commands, ops: &[L2Op<'_>]) -> Vec<(String, StoreError)> {
        let retry = self.pipeline(commands, ops).await;
        if retry.is_empty() {
            return Vec::new();
        }
        let failed = commands.apply_each(|| self.connection.get(), ops, retry).await;
        if !failed.is_empty() {
            self.reconnect().await;
        }
        failed
    }

    /// Sends all ops as one pipeline; returns the indexes that failed.
    async fn pipeline(&self, commands: &Commands, ops: &[L2Op<'_>]) -> Vec<usize> {
        if !self.scripts_loaded.load(Ordering::Relaxed) {
            if let Err(error) = self.load_scripts().await {
                tracing::debug!(%error, "could not load the L2 scripts, writing one by one");
                self.after_failure(&error).await;
                return (0..ops.len()).collect();
            }
        }
        let mut pipeline = redis::pipe();
        // Every reply comes back, errors as values: one failed call must not hide the others.
        pipeline.ignore_errors();
        for op in ops {
            commands.push_evalsha(&mut pipeline, *op);
        }
        let reply: redis::RedisResult<Vec<Value>> = pipeline.query_async(&mut self.connection.get()).await;
        match reply {
            Ok(values) if values.len() == ops.len() => {
                let failed: Vec<usize> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(index, value)| (!matches!(value, Value::Int(_))).then_some(index))
                    .collect();
                if let Some(sample) = failed.first().map(|&index| &values[index]) {
                    tracing::debug!(
                        failed = failed.len(),
                        ?sample,
                        "pipelined L2 writes failed, retrying them one by one"
                    );
                    self.scripts_loaded.store(false, Ordering::Relaxed);
                }
                failed
            }
            Ok(values) => {
                tracing::debug!(got = values.len(), "pipeline answered with the wrong number of replies");
                self.scripts_loaded.store(false, Ordering::Relaxed);
                (0..ops.len()).collect()
            }
            Err(error) => {
                tracing::debug!(%error, "L2 pipeline failed, retrying its writes one by one");
                self.scripts_loaded.store(false, Ordering::Relaxed);
                // A dropped connection would fail the retries too: replace it first.
                self.after_failure(&error).await;
                (0..ops.len()).collect()
            }
        }
    }

    async fn load_scripts(&self) -> redis::RedisResult<()> {
        let mut pipeline = redis::pipe();
        for script in SCRIPTS {
            pipeline.cmd("SCRIPT").arg("LOAD").arg(script);
        }
        let _: Vec<String> = pipeline.query_async(&mut self.connection.get()).await?;
        self.scripts_loaded.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes these keys with one command.
    pub(super) async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let result: redis::RedisResult<u64> = self.connection.get().del(keys).await;
        self.checked(result).await.map(drop)
    }

    /// Deletes every key matching `pattern`, a `SCAN` page at a time; returns how many.
    pub(super) async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).clone();
            let page: redis::RedisResult<(u64, Vec<String>)> = scan.query_async(&mut self.connection.get()).await;
            let (next, keys) = self.checked(page).await?;
            if !keys.is_empty() {
                let result: redis::RedisResult<u64> = self.connection.get().del(&keys).await;
                deleted += self.checked(result).await?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// One `SCAN` page of the keys matching `pattern`; `None` next when the walk is done.
    pub(super) async fn scan_page(
        &self,
        pattern: &str,
        cursor: ScanCursor,
        count: usize,
    ) -> Result<(Vec<String>, Option<ScanCursor>), StoreError> {
        let scan = redis::cmd("SCAN").arg(cursor.position).arg("MATCH").arg(pattern).arg("COUNT").arg(count).clone();
        let page: redis::RedisResult<(u64, Vec<String>)> = scan.query_async(&mut self.connection.get()).await;
        let (next, keys) = self.checked(page).await?;
        Ok((keys, (next != 0).then_some(ScanCursor { node: 0, position: next })))
    }

    /// The fields of the hash at `key` (empty when there is none).
    pub(super) async fn hash(&self, key: &str) -> Result<HashMap<String, Vec<u8>>, StoreError> {
        let result = self.connection.get().hgetall(key).await;
        self.checked(result).await
    }

    /// The fields of the hashes at `keys`, as one pipeline of `HGETALL`s: per key, its fields
    /// (empty when there is no hash), or `None` where the read failed.
    pub(super) async fn hashes(&self, keys: &[String]) -> Vec<Option<HashMap<String, Vec<u8>>>> {
        let mut pipeline = redis::pipe();
        // Every reply comes back, errors as values: one failed read must not hide the others.
        pipeline.ignore_errors();
        for key in keys {
            pipeline.cmd("HGETALL").arg(key);
        }
        let reply: redis::RedisResult<Vec<Value>> = pipeline.query_async(&mut self.connection.get()).await;
        match reply {
            Ok(values) if values.len() == keys.len() => {
                values.into_iter().map(|value| redis::from_redis_value(value).ok()).collect()
            }
            Ok(values) => {
                tracing::debug!(got = values.len(), "pipeline answered with the wrong number of replies");
                vec![None; keys.len()]
            }
            Err(error) => {
                self.after_failure(&error).await;
                vec![None; keys.len()]
            }
        }
    }

    /// Some fields of the hash at `key` (`HMGET`), `None` for each one it lacks.
    pub(super) async fn fields(&self, key: &str, names: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let result = redis::cmd("HMGET").arg(key).arg(names).query_async(&mut self.connection.get()).await;
        self.checked(result).await
    }

    /// The result, after replacing the connection if it failed for want of one.
    async fn checked<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                self.after_failure(&error).await;
                Err(unavailable(error))
            }
        }
    }

    /// Reconnects unless the server itself answered (a script error, a wrong type, `OOM`):
    /// then the connection is fine.
    async fn after_failure(&self, error: &RedisError) {
        if !matches!(error.kind(), redis::ErrorKind::Server(_)) {
            self.reconnect().await;
        }
    }

    /// Replaces the connection with a fresh one (at most every `RECONNECT_EVERY`).
    async fn reconnect(&self) {
        if !self.connection.reconnect_due() {
            return;
        }
        self.scripts_loaded.store(false, Ordering::Relaxed);
        let config = connection_config();
        let connecting = self.client.get_multiplexed_async_connection_with_config(&config);
        match tokio::time::timeout(RECONNECT_EVERY, connecting).await {
            Ok(Ok(fresh)) => {
                self.connection.replace(fresh);
                tracing::info!("reconnected to the standalone Redis");
            }
            Ok(Err(error)) => tracing::warn!(error = %unavailable(error), "standalone Redis reconnect failed"),
            Err(_) => tracing::warn!("standalone Redis reconnect timed out"),
        }
    }
}
