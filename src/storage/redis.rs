//! L2: Redis Cluster. Each item is a hash under `prefix + id` with fields `v` (version), `c`
//! (content), `t` (content type), `d` (`1` for a tombstone), plus `ot`/`op`/`oo`, the origin
//! topic, partition and offset that break ties at equal versions (readers may ignore them).
//!
//! Writes are version-guarded by a Lua script that runs on the key's node, so a write never
//! replaces a newer version (invariant 2). A batch is sent as concurrent script calls on the
//! one multiplexed cluster connection: the client pipelines them per node, and no request
//! ever spans slots (async cluster pipelines must stay in one slot). The client gets short
//! connection and response timeouts: its defaults would retry for minutes.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Script};

use crate::item::{ContentType, Origin, SyncItem};
use crate::storage::StoreError;

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

pub struct RedisStore {
    connection: ClusterConnection,
    script: Script,
    prefix: String,
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
        Ok(RedisStore { connection, script: Script::new(GUARDED_WRITE), prefix: prefix.to_owned() })
    }

    pub fn key(&self, id: &str) -> String {
        format!("{}{}", self.prefix, id)
    }

    /// Writes each `(item, ttl_secs)`; 0 = no expiry. Returns the ids that failed.
    pub async fn write_batch(&self, items: &[(&SyncItem, u64)]) -> Vec<(String, StoreError)> {
        // Futures are built eagerly into a Vec: a lazily mapped stream trips the compiler's
        // `Send` inference for spawned tasks (a higher-ranked lifetime limitation).
        let writes: Vec<_> = items.iter().map(|(item, ttl_secs)| self.write_one(item, *ttl_secs)).collect();
        let results: Vec<Option<(String, StoreError)>> =
            futures::stream::iter(writes).buffer_unordered(CONCURRENCY).collect().await;
        results.into_iter().flatten().collect()
    }

    async fn write_one(&self, item: &SyncItem, ttl_secs: u64) -> Option<(String, StoreError)> {
        let mut connection = self.connection.clone();
        let origin = item.origin.as_ref();
        let result: redis::RedisResult<i64> = self
            .script
            .key(self.key(&item.id))
            .arg(item.version.to_string())
            .arg(item.content.as_deref().unwrap_or_default())
            .arg(item.content_type.as_str())
            .arg(if item.is_tombstone() { "1" } else { "0" })
            .arg(ttl_secs.to_string())
            .arg(origin.map_or("", |o| o.topic.as_ref()))
            .arg(origin.map_or(String::new(), |o| o.partition.to_string()))
            .arg(origin.map_or(String::new(), |o| o.offset.to_string()))
            .invoke_async(&mut connection)
            .await;
        result.err().map(|error| (item.id.clone(), unavailable(error)))
    }

    /// The stored item; a tombstone comes back with `content: None`.
    pub async fn get(&self, id: &str) -> Result<Option<SyncItem>, StoreError> {
        let mut connection = self.connection.clone();
        let fields: HashMap<String, Vec<u8>> = connection.hgetall(self.key(id)).await.map_err(unavailable)?;
        Ok(item_from_fields(id, &fields))
    }
}

fn text(fields: &HashMap<String, Vec<u8>>, name: &str) -> Option<String> {
    fields.get(name).and_then(|value| String::from_utf8(value.clone()).ok())
}

fn item_from_fields(id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<SyncItem> {
    let version = text(fields, "v")?.parse().ok()?;
    let deleted = text(fields, "d").as_deref() == Some("1");
    let origin = match (text(fields, "ot"), text(fields, "op"), text(fields, "oo")) {
        (Some(topic), Some(partition), Some(offset)) if !topic.is_empty() => Some(Origin {
            topic: topic.into(),
            partition: partition.parse().ok()?,
            offset: offset.parse().ok()?,
        }),
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
