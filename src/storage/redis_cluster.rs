//! L2 on a Redis Cluster. A batch is grouped by master (`redis_slots.rs`) and sent as one
//! pipeline of `EVALSHA` calls per master, routed by address: one round trip per node instead
//! of one per item. Items whose pipeline fails (a stale slot map after a failover, a missing
//! script) are retried one by one through the cluster client, which follows redirects, and
//! the slot map is refreshed.

use std::collections::HashMap;
use std::sync::Arc;

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, Value};

use crate::storage::redis::{unavailable, Commands, L2Op, Replaceable, RECONNECT_EVERY, SCRIPTS, TIMEOUT};
use crate::storage::redis_slots::{key_slot, Node, SlotMap};
use crate::storage::{ScanCursor, StoreError};

pub(super) struct ClusterL2 {
    client: ClusterClient,
    connection: Replaceable<ClusterConnection>,
    /// The last `CLUSTER SLOTS` snapshot; `None` until loaded or after a pipeline failed.
    // A std Mutex: held only to clone or replace an Arc, never across an await.
    slots: std::sync::Mutex<Option<Arc<SlotMap>>>,
}

impl ClusterL2 {
    pub(super) async fn connect(urls: &[String]) -> Result<ClusterL2, StoreError> {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(3)
            .build()
            .map_err(unavailable)?;
        let connection = client.get_async_connection().await.map_err(unavailable)?;
        Ok(ClusterL2 { client, connection: Replaceable::new(connection), slots: std::sync::Mutex::new(None) })
    }

    /// Applies each change, pipelined per master. Returns the ids that failed.
    pub(super) async fn apply(&self, commands: &Commands, items: &[L2Op<'_>]) -> Vec<(String, StoreError)> {
        let retry: Vec<usize> = match self.slot_map().await {
            Some(map) => {
                let mut by_node: HashMap<&Node, Vec<usize>> = HashMap::new();
                let mut unmapped = Vec::new();
                for (index, op) in items.iter().enumerate() {
                    match map.node(key_slot(commands.key(op.id()).as_bytes())) {
                        Some(node) => by_node.entry(node).or_default().push(index),
                        None => unmapped.push(index),
                    }
                }
                let pipelines =
                    by_node.into_iter().map(|(node, indexes)| self.write_pipeline(commands, node, items, indexes));
                let failed: Vec<usize> = futures::future::join_all(pipelines).await.into_iter().flatten().collect();
                if !failed.is_empty() || !unmapped.is_empty() {
                    self.forget_slot_map();
                }
                failed.into_iter().chain(unmapped).collect()
            }
            None => (0..items.len()).collect(),
        };
        let failed = commands.apply_each(|| self.connection.get(), items, retry).await;
        if !failed.is_empty() {
            self.reconnect().await;
        }
        failed
    }

    /// One pipeline of guarded writes to one master; returns the indexes that failed.
    async fn write_pipeline(
        &self,
        commands: &Commands,
        node: &Node,
        items: &[L2Op<'_>],
        indexes: Vec<usize>,
    ) -> Vec<usize> {
        let mut pipeline = redis::pipe();
        for &index in &indexes {
            commands.push_evalsha(&mut pipeline, items[index]);
        }
        let route = SingleNodeRoutingInfo::ByAddress { host: node.0.clone(), port: node.1 };
        let mut connection = self.connection.get();
        match connection.route_pipeline(pipeline, 0, indexes.len(), route).await {
            Ok(values) if values.len() == indexes.len() => {
                let failed: Vec<usize> = indexes
                    .into_iter()
                    .zip(&values)
                    .filter_map(|(index, value)| (!matches!(value, Value::Int(_))).then_some(index))
                    .collect();
                if !failed.is_empty() {
                    let sample = values.iter().find(|value| !matches!(value, Value::Int(_)));
                    tracing::debug!(node = %node.1, failed = failed.len(), ?sample, "pipelined L2 writes failed, retrying them one by one");
                }
                failed
            }
            Ok(values) => {
                tracing::debug!(node = %node.1, got = values.len(), "pipeline answered with the wrong number of replies");
                indexes
            }
            Err(error) => {
                tracing::debug!(node = %node.1, %error, "pipeline to an L2 node failed, retrying its writes one by one");
                indexes
            }
        }
    }

    /// The slot map, loading it (and the scripts, on every master) when missing.
    async fn slot_map(&self) -> Option<Arc<SlotMap>> {
        if let Some(map) = self.slots.lock().ok()?.clone() {
            return Some(map);
        }
        let mut connection = self.connection.get();
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut connection).await.ok()?;
        let map = Arc::new(SlotMap::from_cluster_slots(&reply)?);
        for (host, port) in map.masters() {
            for script in SCRIPTS {
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(script).clone();
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
                connection.route_command(load, route).await.ok()?;
            }
        }
        *self.slots.lock().ok()? = Some(map.clone());
        Some(map)
    }

    fn forget_slot_map(&self) {
        if let Ok(mut slots) = self.slots.lock() {
            *slots = None;
        }
    }

    /// Deletes these keys, one command each: keys of different slots cannot share one.
    pub(super) async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            let mut connection = self.connection.get();
            let _: i64 = connection.del(key).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Deletes every key matching `pattern` on every master; returns how many.
    pub(super) async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.forget_slot_map();
        let map = self.slot_map().await.ok_or_else(|| StoreError::Unavailable("no cluster slot map".into()))?;
        let mut deleted = 0;
        for (host, port) in map.masters() {
            let mut cursor: u64 = 0;
            loop {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
                let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).clone();
                let reply = self.connection.get().route_command(scan, route).await.map_err(unavailable)?;
                let (next, keys): (u64, Vec<String>) =
                    redis::from_redis_value(reply).map_err(|error| StoreError::Unavailable(error.to_string()))?;
                for key in keys {
                    let mut connection = self.connection.get();
                    deleted += connection.del::<_, u64>(key).await.map_err(unavailable)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }

    /// One `SCAN` page of the keys matching `pattern`, walking the masters in address order:
    /// `cursor` is (master index, SCAN cursor); `None` next when the last master is done. A
    /// topology change during a walk may skip or repeat keys: the next walk sees them.
    pub(super) async fn scan_page(
        &self,
        pattern: &str,
        cursor: ScanCursor,
        count: usize,
    ) -> Result<(Vec<String>, Option<ScanCursor>), StoreError> {
        let map = self.slot_map().await.ok_or_else(|| StoreError::Unavailable("no cluster slot map".into()))?;
        let masters = map.masters();
        let Some((host, port)) = masters.get(cursor.node).cloned() else { return Ok((Vec::new(), None)) };
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let scan = redis::cmd("SCAN").arg(cursor.position).arg("MATCH").arg(pattern).arg("COUNT").arg(count).clone();
        let reply = self.connection.get().route_command(scan, route).await.map_err(unavailable)?;
        let (next, keys): (u64, Vec<String>) =
            redis::from_redis_value(reply).map_err(|error| StoreError::Unavailable(error.to_string()))?;
        let next = match next {
            0 if cursor.node + 1 < masters.len() => Some(ScanCursor { node: cursor.node + 1, position: 0 }),
            0 => None,
            position => Some(ScanCursor { node: cursor.node, position }),
        };
        Ok((keys, next))
    }

    /// The fields of the hash at `key` (empty when there is none).
    pub(super) async fn hash(&self, key: &str) -> Result<HashMap<String, Vec<u8>>, StoreError> {
        self.connection.get().hgetall(key).await.map_err(unavailable)
    }

    /// The fields of the hashes at `keys`, as one pipeline of `HGETALL`s per master: per key,
    /// its fields (empty when there is no hash), or `None` where the read failed. Keys a
    /// pipeline could not read are read one by one through the cluster client, which follows
    /// redirects (a stale slot map), as writes are.
    pub(super) async fn hashes(&self, keys: &[String]) -> Vec<Option<HashMap<String, Vec<u8>>>> {
        let mut replies = vec![None; keys.len()];
        let retry: Vec<usize> = match self.slot_map().await {
            Some(map) => {
                let mut by_node: HashMap<&Node, Vec<usize>> = HashMap::new();
                let mut unmapped = Vec::new();
                for (index, key) in keys.iter().enumerate() {
                    match map.node(key_slot(key.as_bytes())) {
                        Some(node) => by_node.entry(node).or_default().push(index),
                        None => unmapped.push(index),
                    }
                }
                let pipelines = by_node.into_iter().map(|(node, indexes)| self.read_pipeline(node, keys, indexes));
                let mut failed = unmapped;
                for (indexes, values) in futures::future::join_all(pipelines).await {
                    for (index, value) in indexes.into_iter().zip(values) {
                        match value.and_then(|value| redis::from_redis_value(value).ok()) {
                            Some(fields) => replies[index] = Some(fields),
                            None => failed.push(index),
                        }
                    }
                }
                if !failed.is_empty() {
                    self.forget_slot_map();
                }
                failed
            }
            None => (0..keys.len()).collect(),
        };
        let reads = retry.iter().map(|&index| {
            let mut connection = self.connection.get();
            async move { (index, connection.hgetall(&keys[index]).await) }
        });
        let mut failures = 0;
        for (index, result) in futures::future::join_all(reads).await {
            match result {
                Ok(fields) => replies[index] = Some(fields),
                Err(_) => failures += 1,
            }
        }
        if failures > 0 {
            self.reconnect().await;
        }
        replies
    }

    /// One pipeline of `HGETALL`s to one master: its indexes and, per index, the reply
    /// (`None` for all of them when the pipeline failed).
    async fn read_pipeline(
        &self,
        node: &Node,
        keys: &[String],
        indexes: Vec<usize>,
    ) -> (Vec<usize>, Vec<Option<Value>>) {
        let mut pipeline = redis::pipe();
        for &index in &indexes {
            pipeline.cmd("HGETALL").arg(&keys[index]);
        }
        let route = SingleNodeRoutingInfo::ByAddress { host: node.0.clone(), port: node.1 };
        match self.connection.get().route_pipeline(pipeline, 0, indexes.len(), route).await {
            Ok(values) if values.len() == indexes.len() => (indexes, values.into_iter().map(Some).collect()),
            Ok(values) => {
                tracing::debug!(node = %node.1, got = values.len(), "pipeline answered with the wrong number of replies");
                let none = vec![None; indexes.len()];
                (indexes, none)
            }
            Err(error) => {
                tracing::debug!(node = %node.1, %error, "pipeline to an L2 node failed, reading its keys one by one");
                let none = vec![None; indexes.len()];
                (indexes, none)
            }
        }
    }

    /// Some fields of the hash at `key` (`HMGET`), `None` for each one it lacks.
    pub(super) async fn fields(&self, key: &str, names: &[&str]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        redis::cmd("HMGET").arg(key).arg(names).query_async(&mut self.connection.get()).await.map_err(unavailable)
    }

    /// Replaces the connection with a fresh one (at most every `RECONNECT_EVERY`). After a
    /// master dies, the client's own slot map can keep pointing at it: its background
    /// repair runs before the failover completes and never looks again. A new connection
    /// discovers the topology from scratch.
    async fn reconnect(&self) {
        if !self.connection.reconnect_due() {
            return;
        }
        self.forget_slot_map();
        match tokio::time::timeout(RECONNECT_EVERY, self.client.get_async_connection()).await {
            Ok(Ok(fresh)) => {
                self.connection.replace(fresh);
                tracing::info!("reconnected to the Redis Cluster");
            }
            Ok(Err(error)) => tracing::warn!(error = %unavailable(error), "Redis Cluster reconnect failed"),
            Err(_) => tracing::warn!("Redis Cluster reconnect timed out"),
        }
    }
}
