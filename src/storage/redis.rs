//! L2: Redis, a Cluster (`redis_cluster.rs`) or one standalone server (`redis_standalone.rs`),
//! told apart at connect time by the first server that answers `INFO cluster`. Each item is a
//! hash under `prefix + id` with fields `v` (version), `c` (content), `t` (content type), `d`
//! (`1` for a tombstone), plus `ot`/`op`/`oo`, the origin topic, partition and offset that
//! break ties at equal versions (readers may ignore them), and `h`, the SHA-256 of `c` in
//! lowercase hex, which verified reads check the content against (entries written before `h`
//! existed lack it), and `s`, the item's state, present only when it has one.
//!
//! Writes are version-guarded by a Lua script that runs on the key's server, so a write never
//! replaces a newer version (invariant 2). A second script drops an entry that is behind a
//! given L3 row: how the engine removes what L3 refused (invariant 6). Both modes send a batch
//! as pipelines of `EVALSHA` (one per cluster master, one in all on a standalone server) and
//! retry what a pipeline could not do one item at a time; the connection is replaced after
//! failures. Clients get short connection and response timeouts: the defaults wait for minutes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Client, Script, ScriptInvocation};

use crate::item::{ContentType, Origin, SyncItem};
use crate::storage::redis_cluster::ClusterL2;
use crate::storage::redis_standalone::StandaloneL2;
use crate::storage::sql::HeldRow;
use crate::storage::{CacheStore, ScanCursor, StoreError, StoreFuture, Stored};

/// The least time between two reconnects.
pub(super) const RECONNECT_EVERY: Duration = Duration::from_secs(3);

/// Connection and response timeout of every client.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);

/// Script calls in flight at once when a batch is retried item by item.
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
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', ARGV[2], 't', ARGV[3], 'd', ARGV[4], 'ot', ARGV[6], 'op', ARGV[7], 'oo', ARGV[8], 'h', ARGV[9])
if ARGV[10] == '' then redis.call('HDEL', KEYS[1], 's') else redis.call('HSET', KEYS[1], 's', ARGV[10]) end
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

/// Both scripts, as `SCRIPT LOAD` needs them on every server before `EVALSHA` in a pipeline.
pub(super) const SCRIPTS: [&str; 2] = [GUARDED_WRITE, DROP_IF_BEHIND];

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

/// Which kind of Redis L2 talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Mode {
    Cluster,
    Standalone,
}

impl L2Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            L2Mode::Cluster => "cluster",
            L2Mode::Standalone => "standalone",
        }
    }
}

/// The mode an `INFO cluster` reply announces (`cluster_enabled:1` or `:0`); `None` when it
/// does not say (a proxy, or a server that hides the line).
pub fn mode_from_info(info: &str) -> Option<L2Mode> {
    info.lines().find_map(|line| match line.trim().strip_prefix("cluster_enabled:")? {
        "1" => Some(L2Mode::Cluster),
        "0" => Some(L2Mode::Standalone),
        _ => None,
    })
}

pub struct RedisStore {
    backend: Backend,
    commands: Commands,
}

enum Backend {
    Cluster(ClusterL2),
    Standalone(StandaloneL2),
}

impl RedisStore {
    /// Connects to the Redis at `urls`: a standalone server when the first one that answers
    /// says cluster support is disabled (then it must be the only URL), else a Cluster seeded
    /// with all of them. Detection needs no setting, so one config serves both.
    pub async fn connect(urls: &[String], prefix: &str) -> Result<RedisStore, StoreError> {
        let (probed, url) = probe(urls).await?;
        let backend = match probed {
            Probed::Standalone(..) if urls.len() > 1 => {
                return Err(StoreError::Unavailable(format!(
                    "{} is a standalone Redis (cluster support disabled), but {} Redis URLs are given: \
                     give only its URL, or the seed nodes of a Redis Cluster",
                    crate::config::redact_url(url),
                    urls.len()
                )));
            }
            Probed::Standalone(client, connection) => Backend::Standalone(StandaloneL2::new(*client, connection)),
            Probed::Cluster => Backend::Cluster(ClusterL2::connect(urls).await?),
        };
        let commands = Commands {
            prefix: prefix.to_owned(),
            write: Script::new(GUARDED_WRITE),
            drop: Script::new(DROP_IF_BEHIND),
        };
        let store = RedisStore { backend, commands };
        let mode = store.mode().as_str();
        tracing::info!(mode, url = %crate::config::redact_url(url), "L2 connected to a {mode} Redis");
        Ok(store)
    }

    /// Which kind of Redis this store talks to.
    pub fn mode(&self) -> L2Mode {
        match self.backend {
            Backend::Cluster(_) => L2Mode::Cluster,
            Backend::Standalone(_) => L2Mode::Standalone,
        }
    }

    pub fn key(&self, id: &str) -> String {
        self.commands.key(id)
    }
}

impl CacheStore for RedisStore {
    fn kind(&self) -> &'static str {
        match self.mode() {
            L2Mode::Cluster => "redis-cluster",
            L2Mode::Standalone => "redis-standalone",
        }
    }

    /// Pipelined: one pipeline per Cluster master, one in all on a standalone server.
    fn apply<'a>(&'a self, ops: &'a [L2Op<'a>]) -> StoreFuture<'a, Vec<(String, StoreError)>> {
        Box::pin(async move {
            if ops.is_empty() {
                return Vec::new();
            }
            match &self.backend {
                Backend::Cluster(cluster) => cluster.apply(&self.commands, ops).await,
                Backend::Standalone(standalone) => standalone.apply(&self.commands, ops).await,
            }
        })
    }

    fn invalidate<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
            if keys.is_empty() {
                return Ok(());
            }
            match &self.backend {
                Backend::Cluster(cluster) => cluster.delete(&keys).await,
                Backend::Standalone(standalone) => standalone.delete(&keys).await,
            }
        })
    }

    /// Every key under the prefix, on every master of a Cluster.
    fn invalidate_prefix(&self) -> StoreFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let pattern = self.commands.pattern();
            match &self.backend {
                Backend::Cluster(cluster) => cluster.delete_matching(&pattern).await,
                Backend::Standalone(standalone) => standalone.delete_matching(&pattern).await,
            }
        })
    }

    /// `h` is `None` for an entry written before L2 stored hashes.
    fn get_stored<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let key = self.key(id);
            let fields = match &self.backend {
                Backend::Cluster(cluster) => cluster.hash(&key).await?,
                Backend::Standalone(standalone) => standalone.hash(&key).await?,
            };
            Ok(stored_from_fields(id, &fields))
        })
    }

    /// One pipeline per Redis node (one in all on a standalone server). An id whose key L2
    /// could not read is left out: invariant 6 makes L3's answer the same.
    fn get_many<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, HashMap<String, Stored>> {
        Box::pin(async move {
            if ids.is_empty() {
                return HashMap::new();
            }
            let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
            let replies = match &self.backend {
                Backend::Cluster(cluster) => cluster.hashes(&keys).await,
                Backend::Standalone(standalone) => standalone.hashes(&keys).await,
            };
            let failed = replies.iter().filter(|reply| reply.is_none()).count();
            if failed > 0 {
                tracing::warn!(failed, "L2 could not read some ids, reading them from L3");
            }
            ids.iter()
                .zip(replies)
                .filter_map(|(id, fields)| Some(((*id).to_owned(), stored_from_fields(id, &fields?)?)))
                .collect()
        })
    }

    /// `SCAN … MATCH prefix*` on each master in turn; keys are turned back into ids.
    fn scan_page(
        &self,
        cursor: ScanCursor,
        count: usize,
    ) -> StoreFuture<'_, Result<(Vec<String>, Option<ScanCursor>), StoreError>> {
        Box::pin(async move {
            let pattern = self.commands.pattern();
            let (keys, next) = match &self.backend {
                Backend::Cluster(cluster) => cluster.scan_page(&pattern, cursor, count).await?,
                Backend::Standalone(standalone) => standalone.scan_page(&pattern, cursor, count).await?,
            };
            let prefix = &self.commands.prefix;
            Ok((
                keys.into_iter().filter_map(|key| key.strip_prefix(prefix.as_str()).map(str::to_owned)).collect(),
                next,
            ))
        })
    }

    fn live<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Result<Option<bool>, StoreError>> {
        Box::pin(async move {
            let key = self.key(id);
            let fields = match &self.backend {
                Backend::Cluster(cluster) => cluster.fields(&key, &["v", "d"]).await?,
                Backend::Standalone(standalone) => standalone.fields(&key, &["v", "d"]).await?,
            };
            // No version, no entry: the guarded write always sets `v` (and `d`).
            Ok(match fields.as_slice() {
                [Some(_), deleted] => Some(deleted.as_deref() != Some(b"1")),
                _ => None,
            })
        })
    }
}

/// What the first Redis that answered said it is. A standalone server's probe connection is
/// kept: it is the one L2 will use (boxed: a `Client` is large).
enum Probed {
    Cluster,
    Standalone(Box<Client>, MultiplexedConnection),
}

/// Asks each URL in turn for `INFO cluster` until one answers; returns its answer and URL.
async fn probe(urls: &[String]) -> Result<(Probed, &str), StoreError> {
    let mut last_error = StoreError::Unavailable("no Redis URL given".into());
    for url in urls {
        let client = Client::open(url.as_str()).map_err(unavailable)?;
        let connection = match client.get_multiplexed_async_connection_with_config(&connection_config()).await {
            Ok(connection) => connection,
            Err(error) => {
                last_error = unavailable(error);
                tracing::debug!(url = %crate::config::redact_url(url), error = %last_error, "Redis does not answer, trying the next URL");
                continue;
            }
        };
        let info: redis::RedisResult<String> =
            redis::cmd("INFO").arg("cluster").query_async(&mut connection.clone()).await;
        let mode = match info {
            Ok(info) => mode_from_info(&info),
            Err(error) if matches!(error.kind(), redis::ErrorKind::Server(_)) => None, // INFO renamed or denied
            Err(error) => {
                last_error = unavailable(error);
                continue;
            }
        };
        let probed = match mode {
            Some(L2Mode::Standalone) => Probed::Standalone(Box::new(client), connection),
            Some(L2Mode::Cluster) => Probed::Cluster,
            None => {
                // Unknown means what it meant before standalone support: a Cluster.
                tracing::warn!(
                    "Redis does not say whether cluster support is enabled (INFO cluster); assuming a Cluster"
                );
                Probed::Cluster
            }
        };
        return Ok((probed, url));
    }
    Err(last_error)
}

pub(super) fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_connection_timeout(Some(TIMEOUT)).set_response_timeout(Some(TIMEOUT))
}

/// The key prefix and the two scripts: what turns an `L2Op` into a command in either mode.
pub(super) struct Commands {
    prefix: String,
    write: Script,
    drop: Script,
}

impl Commands {
    /// The `SCAN`/`KEYS` pattern of every key under the prefix (its glob characters escaped).
    pub(super) fn pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.prefix.len() + 2);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    pub(super) fn key(&self, id: &str) -> String {
        format!("{}{}", self.prefix, id)
    }

    /// Appends the op to a pipeline as `EVALSHA` (the script must be loaded on the server).
    pub(super) fn push_evalsha(&self, pipeline: &mut redis::Pipeline, op: L2Op<'_>) {
        match op {
            L2Op::Write(item, ttl_secs) => {
                let command = pipeline.cmd("EVALSHA").arg(self.write.get_hash()).arg(1).arg(self.key(&item.id));
                guarded_write_args(command, item, ttl_secs);
            }
            L2Op::DropIfBehind(id, row) => {
                let command = pipeline.cmd("EVALSHA").arg(self.drop.get_hash()).arg(1).arg(self.key(id));
                drop_if_behind_args(command, row);
            }
        }
    }

    /// The op as one script call (`EVALSHA`, loading the script on `NOSCRIPT`).
    fn invocation(&self, op: L2Op<'_>) -> ScriptInvocation<'_> {
        match op {
            L2Op::Write(item, ttl_secs) => {
                let mut invocation = self.write.key(self.key(&item.id));
                guarded_write_args(&mut invocation, item, ttl_secs);
                invocation
            }
            L2Op::DropIfBehind(id, row) => {
                let mut invocation = self.drop.key(self.key(id));
                drop_if_behind_args(&mut invocation, row);
                invocation
            }
        }
    }

    /// Applies `ops[indexes]` one call each, at most `CONCURRENCY` at once, on connections
    /// from `connection`; returns the failures.
    pub(super) async fn apply_each<C: ConnectionLike + Send>(
        &self,
        connection: impl Fn() -> C,
        ops: &[L2Op<'_>],
        indexes: impl IntoIterator<Item = usize>,
    ) -> Vec<(String, StoreError)> {
        // Futures are built eagerly into a Vec: a lazily mapped stream trips the compiler's
        // `Send` inference for spawned tasks (a higher-ranked lifetime limitation).
        let calls: Vec<_> = indexes
            .into_iter()
            .map(|index| {
                let (op, invocation, mut connection) = (ops[index], self.invocation(ops[index]), connection());
                async move {
                    let result: redis::RedisResult<i64> = invocation.invoke_async(&mut connection).await;
                    result.err().map(|error| (op.id().to_owned(), unavailable(error)))
                }
            })
            .collect();
        let results: Vec<Option<(String, StoreError)>> =
            futures::stream::iter(calls).buffer_unordered(CONCURRENCY).collect().await;
        results.into_iter().flatten().collect()
    }
}

/// A connection that every request clones, replaced after failures at most every
/// `RECONNECT_EVERY` (a burst of failures reconnects once).
// A std Mutex: held only to clone or swap the handle, never across an await.
pub(super) struct Replaceable<C>(std::sync::Mutex<(C, Instant)>);

impl<C: Clone> Replaceable<C> {
    pub(super) fn new(connection: C) -> Self {
        Replaceable(std::sync::Mutex::new((connection, Instant::now())))
    }

    pub(super) fn get(&self) -> C {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.clone()
    }

    /// Whether a reconnect may start now; if so, the next one waits `RECONNECT_EVERY`.
    pub(super) fn reconnect_due(&self) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let due = guard.1.elapsed() >= RECONNECT_EVERY;
        if due {
            guard.1 = Instant::now();
        }
        due
    }

    pub(super) fn replace(&self, connection: C) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0 = connection;
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

impl Args for ScriptInvocation<'_> {
    fn push_arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.arg(arg)
    }
}

/// The script's arguments: version, content, type, tombstone flag, ttl, origin, content hash,
/// state (empty for none: a valid state is never empty).
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
        .push_arg(origin.map_or(String::new(), |o| o.offset.to_string()))
        .push_arg(hash_to_hex(&item.content_hash()))
        .push_arg(item.state.as_deref().unwrap_or_default());
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
        state: text(fields, "s").filter(|state| !state.is_empty()),
    })
}

fn stored_from_fields(id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<Stored> {
    let item = item_from_fields(id, fields)?;
    // A hash field of the wrong length matches no content: reported as a mismatch.
    let stored_hash = fields.get("h").map(|hash| hash_from_hex(hash).unwrap_or([0; 32]));
    Some(Stored { item, stored_hash })
}

/// A SHA-256 as 64 lowercase hex digits: how `h` stores it, readable with `redis-cli`.
fn hash_to_hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The 32 bytes of a 64-digit hex SHA-256.
fn hash_from_hex(hex: &[u8]) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(hash)
}

pub(super) fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(crate::config::redact_url(&error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_goes_to_hex_and_back() {
        let hash = crate::item::content_hash(b"abc");
        let hex = hash_to_hex(&hash);
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hash_from_hex(hex.as_bytes()), Some(hash));
        assert_eq!(hash_from_hex(hex.to_uppercase().as_bytes()), Some(hash));
        assert_eq!(hash_from_hex(&hex.as_bytes()[..62]), None);
        assert_eq!(hash_from_hex(&[b'g'; 64]), None);
    }

    #[test]
    fn info_cluster_tells_the_mode() {
        assert_eq!(mode_from_info("# Cluster\r\ncluster_enabled:0\r\n"), Some(L2Mode::Standalone));
        assert_eq!(mode_from_info("# Cluster\r\ncluster_enabled:1\r\n"), Some(L2Mode::Cluster));
        // A server or proxy that leaves the line out, or says something else, does not tell.
        assert_eq!(mode_from_info("# Cluster\r\n"), None);
        assert_eq!(mode_from_info(""), None);
        assert_eq!(mode_from_info("cluster_enabled:yes\r\n"), None);
        // Only a whole field name counts.
        assert_eq!(mode_from_info("xcluster_enabled:0\r\n"), None);
    }
}
