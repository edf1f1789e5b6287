//! L2: Redis Cluster. Each item is a hash under `prefix + id` with fields `v` (version), `c`
//! (content), `t` (content type), `d` (`1` for a tombstone), plus `ot`/`op`/`oo`, the origin
//! topic, partition and offset that break ties at equal versions (readers may ignore them).
//!
//! Writes are version-guarded by a Lua script that runs on the key's node, so a write never
//! replaces a newer version (invariant 2). A second script drops an entry that is behind a
//! given L3 row: how the engine removes what L3 refused (invariant 6). A batch is grouped by master (`redis_slots.rs`)
//! and sent as one pipeline of `EVALSHA` calls per master, routed by address: one round trip
//! per node instead of one per item. Items whose pipeline fails (a stale slot map after a
//! failover, a missing script) are retried one by one through the cluster client, which
//! follows redirects, and the slot map is refreshed. The client gets short connection and
//! response timeouts: its defaults would retry for minutes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncCommands, Script, Value};

use crate::item::{ContentType, Origin, SyncItem};
use crate::storage::redis_slots::{key_slot, Node, SlotMap};
use crate::storage::sql::HeldRow;
use crate::storage::StoreError;

/// The least time between two reconnects.
const RECONNECT_EVERY: Duration = Duration::from_secs(3);

/// Script calls in flight at once for one batch.
const CONCURRENCY: usize = 256;

const GUARDED_WRITE: &str = r#"
local current = redis.call('HMGET', KEYS[1], 'v', 'ot', 'op', 'oo')
local function greater(a, b) -- unsigned decimals without leading zeros
  if #a ~= #b then return #a > #b end
  return a > b
end
if current[1] then
  if ARGV[1] ~= current[1] then
    if not greater(ARGV[1], current[1]) then return 0 end
  else
    if ARGV[6] == '' or current[2] ~= ARGV[6] or current[3] ~= ARGV[7] or not current[4] then return 0 end
    if not greater(ARGV[8], current[4]) then return 0 end
  end
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', ARGV[2], 't', ARGV[3], 'd', ARGV[4], 'ot', ARGV[6], 'op', ARGV[7], 'oo', ARGV[8])
if ARGV[5] == '0' then redis.call('PERSIST', KEYS[1]) else redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"#;

/// Deletes the entry unless it is L3's row (same version and origin) or newer than it by the
/// write guard's rule (ARGV: L3's version, origin topic, partition, offset). So an older
/// entry, or one at the same version from another origin, goes: reads then fall to L3.
const DROP_IF_BEHIND: &str = r#"
local current = redis.call('HMGET', KEYS[1], 'v', 'ot', 'op', 'oo')
if not current[1] then return 0 end
local function greater(a, b) -- unsigned decimals without leading zeros
  if #a ~= #b then return #a > #b end
  return a > b
end
local v, t, p, o = current[1], current[2] or '', current[3] or '', current[4] or ''
if v == ARGV[1] and t == ARGV[2] and p == ARGV[3] and o == ARGV[4] then return 0 end
local newer
if v ~= ARGV[1] then
  newer = greater(v, ARGV[1])
else
  newer = t ~= '' and t == ARGV[2] and p == ARGV[3] and o ~= '' and ARGV[4] ~= '' and greater(o, ARGV[4])
end
if newer then return 0 end
redis.call('DEL', KEYS[1])
return 1
"#;

/// One change to L2.
#[derive(Clone, Copy, Debug)]
pub enum L2Op<'a> {
    /// Write the item through the version guard, with this TTL in seconds (0 = none).
    Write(&'a SyncItem, u64),
    /// Drop the id's entry unless it is this L3 row or newer.
    DropIfBehind(&'a str, &'a HeldRow),
}

impl L2Op<'_> {
    pub fn id(&self) -> &str {
        match self {
            L2Op::Write(item, _) => &item.id,
            L2Op::DropIfBehind(id, _) => id,
        }
    }
}

pub struct RedisStore {
    client: ClusterClient,
    /// The multiplexed connection, replaced after failures (see `reconnect`).
    // A std Mutex: held only to clone or swap the handle, never across an await.
    connection: std::sync::Mutex<(ClusterConnection, Instant)>,
    script: Script,
    drop_script: Script,
    prefix: String,
    /// The last `CLUSTER SLOTS` snapshot; `None` until loaded or after a pipeline failed.
    // A std Mutex: held only to clone or replace an Arc, never across an await.
    slots: std::sync::Mutex<Option<Arc<SlotMap>>>,
}

impl RedisStore {
    pub async fn connect(urls: &[String], prefix: &str) -> Result<RedisStore, StoreError> {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .retries(3)
            .build()
            .map_err(unavailable)?;
        let connection = client.get_async_connection().await.map_err(unavailable)?;
        Ok(RedisStore {
            client,
            connection: std::sync::Mutex::new((connection, Instant::now())),
            script: Script::new(GUARDED_WRITE),
            drop_script: Script::new(DROP_IF_BEHIND),
            prefix: prefix.to_owned(),
            slots: std::sync::Mutex::new(None),
        })
    }

    pub fn key(&self, id: &str) -> String {
        format!("{}{}", self.prefix, id)
    }

    /// Writes each `(item, ttl_secs)`; 0 = no expiry. Returns the ids that failed.
    pub async fn write_batch(&self, items: &[(&SyncItem, u64)]) -> Vec<(String, StoreError)> {
        let ops: Vec<L2Op> = items.iter().map(|(item, ttl)| L2Op::Write(item, *ttl)).collect();
        self.apply(&ops).await
    }

    /// Applies each change, pipelined per master. Returns the ids that failed.
    pub async fn apply(&self, items: &[L2Op<'_>]) -> Vec<(String, StoreError)> {
        if items.is_empty() {
            return Vec::new();
        }
        let retry: Vec<usize> = match self.slot_map().await {
            Some(map) => {
                let mut by_node: HashMap<&Node, Vec<usize>> = HashMap::new();
                let mut unmapped = Vec::new();
                for (index, op) in items.iter().enumerate() {
                    match map.node(key_slot(self.key(op.id()).as_bytes())) {
                        Some(node) => by_node.entry(node).or_default().push(index),
                        None => unmapped.push(index),
                    }
                }
                let pipelines = by_node.into_iter().map(|(node, indexes)| self.write_pipeline(node, items, indexes));
                let failed: Vec<usize> = futures::future::join_all(pipelines).await.into_iter().flatten().collect();
                if !failed.is_empty() || !unmapped.is_empty() {
                    self.forget_slot_map();
                }
                failed.into_iter().chain(unmapped).collect()
            }
            None => (0..items.len()).collect(),
        };
        // Futures are built eagerly into a Vec: a lazily mapped stream trips the compiler's
        // `Send` inference for spawned tasks (a higher-ranked lifetime limitation).
        let writes: Vec<_> = retry.into_iter().map(|index| self.apply_one(items[index])).collect();
        let results: Vec<Option<(String, StoreError)>> =
            futures::stream::iter(writes).buffer_unordered(CONCURRENCY).collect().await;
        let failed: Vec<(String, StoreError)> = results.into_iter().flatten().collect();
        if !failed.is_empty() {
            self.reconnect().await;
        }
        failed
    }

    /// One pipeline of guarded writes to one master; returns the indexes that failed.
    async fn write_pipeline(&self, node: &Node, items: &[L2Op<'_>], indexes: Vec<usize>) -> Vec<usize> {
        let mut pipeline = redis::pipe();
        for &index in &indexes {
            match items[index] {
                L2Op::Write(item, ttl_secs) => {
                    let command = pipeline.cmd("EVALSHA").arg(self.script.get_hash()).arg(1).arg(self.key(&item.id));
                    guarded_write_args(command, item, ttl_secs);
                }
                L2Op::DropIfBehind(id, row) => {
                    let command = pipeline.cmd("EVALSHA").arg(self.drop_script.get_hash()).arg(1).arg(self.key(id));
                    drop_if_behind_args(command, row);
                }
            }
        }
        let route = SingleNodeRoutingInfo::ByAddress { host: node.0.clone(), port: node.1 };
        let mut connection = self.connection();
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

    /// The slot map, loading it (and the script, on every master) when missing.
    async fn slot_map(&self) -> Option<Arc<SlotMap>> {
        if let Some(map) = self.slots.lock().ok()?.clone() {
            return Some(map);
        }
        let mut connection = self.connection();
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut connection).await.ok()?;
        let map = Arc::new(SlotMap::from_cluster_slots(&reply)?);
        for (host, port) in map.masters() {
            for script in [GUARDED_WRITE, DROP_IF_BEHIND] {
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

    async fn apply_one(&self, op: L2Op<'_>) -> Option<(String, StoreError)> {
        let mut connection = self.connection();
        let invocation = match op {
            L2Op::Write(item, ttl_secs) => {
                let mut invocation = self.script.key(self.key(&item.id));
                guarded_write_args(&mut invocation, item, ttl_secs);
                invocation
            }
            L2Op::DropIfBehind(id, row) => {
                let mut invocation = self.drop_script.key(self.key(id));
                drop_if_behind_args(&mut invocation, row);
                invocation
            }
        };
        let result: redis::RedisResult<i64> = invocation.invoke_async(&mut connection).await;
        result.err().map(|error| (op.id().to_owned(), unavailable(error)))
    }

    /// Deletes these ids' keys (reads then fall through to L3).
    pub async fn invalidate(&self, ids: &[&str]) -> Result<(), StoreError> {
        for id in ids {
            let mut connection = self.connection();
            let _: i64 = connection.del(self.key(id)).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Deletes every key under the prefix on every master; returns how many.
    pub async fn invalidate_prefix(&self) -> Result<u64, StoreError> {
        self.forget_slot_map();
        let map = self.slot_map().await.ok_or_else(|| StoreError::Unavailable("no cluster slot map".into()))?;
        let pattern = format!("{}*", self.prefix.replace('*', "\\*").replace('?', "\\?"));
        let mut deleted = 0;
        for (host, port) in map.masters() {
            let mut cursor: u64 = 0;
            loop {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
                let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).clone();
                let reply = self.connection().route_command(scan, route).await.map_err(unavailable)?;
                let (next, keys): (u64, Vec<String>) =
                    redis::from_redis_value(reply).map_err(|error| StoreError::Unavailable(error.to_string()))?;
                for key in keys {
                    let mut connection = self.connection();
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

    fn connection(&self) -> ClusterConnection {
        match self.connection.lock() {
            Ok(guard) => guard.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Replaces the connection with a fresh one (at most every `RECONNECT_EVERY`). After a
    /// master dies, the client's own slot map can keep pointing at it: its background
    /// repair runs before the failover completes and never looks again. A new connection
    /// discovers the topology from scratch.
    async fn reconnect(&self) {
        let due = self.connection.lock().map(|guard| guard.1.elapsed() >= RECONNECT_EVERY).unwrap_or(false);
        if !due {
            return;
        }
        if let Ok(mut guard) = self.connection.lock() {
            guard.1 = Instant::now();
        }
        self.forget_slot_map();
        match tokio::time::timeout(RECONNECT_EVERY, self.client.get_async_connection()).await {
            Ok(Ok(fresh)) => {
                if let Ok(mut guard) = self.connection.lock() {
                    guard.0 = fresh;
                }
                tracing::info!("reconnected to the Redis Cluster");
            }
            Ok(Err(error)) => tracing::warn!(error = %unavailable(error), "Redis Cluster reconnect failed"),
            Err(_) => tracing::warn!("Redis Cluster reconnect timed out"),
        }
    }

    /// The stored item; a tombstone comes back with `content: None`.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StoreError> {
        let mut connection = self.connection();
        let fields: HashMap<String, Vec<u8>> = connection.hgetall(self.key(id)).await.map_err(unavailable)?;
        Ok(item_from_fields(id, &fields))
    }
}

/// Anything that takes arguments: a pipeline's last command or a script invocation.
trait Args {
    fn push_arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self;
}

/// A pipeline's `arg` adds to its last command.
impl Args for redis::Pipeline {
    fn push_arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.arg(arg)
    }
}

impl Args for redis::ScriptInvocation<'_> {
    fn push_arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.arg(arg)
    }
}

/// The script's arguments: version, content, type, tombstone flag, ttl, origin.
fn guarded_write_args<A: Args>(target: &mut A, item: &SyncItem, ttl_secs: u64) {
    let origin = item.origin.as_ref();
    target
        .push_arg(item.version.to_string())
        .push_arg(item.content.as_deref().unwrap_or_default())
        .push_arg(item.content_type.as_str())
        .push_arg(if item.is_tombstone() { "1" } else { "0" })
        .push_arg(ttl_secs.to_string())
        .push_arg(origin.map_or("", |o| o.topic.as_ref()))
        .push_arg(origin.map_or(String::new(), |o| o.partition.to_string()))
        .push_arg(origin.map_or(String::new(), |o| o.offset.to_string()));
}

/// The drop script's arguments: L3's row version and origin.
fn drop_if_behind_args<A: Args>(target: &mut A, row: &HeldRow) {
    let origin = row.origin.as_ref();
    target
        .push_arg(row.version.to_string())
        .push_arg(origin.map_or("", |o| o.topic.as_ref()))
        .push_arg(origin.map_or(String::new(), |o| o.partition.to_string()))
        .push_arg(origin.map_or(String::new(), |o| o.offset.to_string()));
}

fn text(fields: &HashMap<String, Vec<u8>>, name: &str) -> Option<String> {
    fields.get(name).and_then(|value| String::from_utf8(value.clone()).ok())
}

fn item_from_fields(id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<SyncItem> {
    let version = text(fields, "v")?.parse().ok()?;
    let deleted = text(fields, "d").as_deref() == Some("1");
    let origin = match (text(fields, "ot"), text(fields, "op"), text(fields, "oo")) {
        (Some(topic), Some(partition), Some(offset)) if !topic.is_empty() => {
            Some(Origin { topic: topic.into(), partition: partition.parse().ok()?, offset: offset.parse().ok()? })
        }
        _ => None,
    };
    Some(SyncItem {
        id: id.to_owned(),
        version,
        content: (!deleted).then(|| Bytes::from(fields.get("c").cloned().unwrap_or_default())),
        content_type: text(fields, "t").and_then(|t| ContentType::parse(&t)).unwrap_or(ContentType::Binary),
        origin,
    })
}

fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(crate::config::redact_url(&error.to_string()))
}
