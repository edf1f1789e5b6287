//! L2 on a standalone Redis (issue 7 item 2), against the real services: the standalone Redis
//! of `scripts/services.sh` (`SYNC_TEST_REDIS_STANDALONE_URL`), MariaDB and Apache Kafka, plus
//! a private `redis-server` for the restart test. The same guarantees as on the Cluster:
//! version guard, `DROP_IF_BEHIND`, TTLs, pipelined batches, invalidation, reconnects, and a
//! worker process that ends with L2 and L3 exact.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::config::Secret;
use sync_engine::storage::redis::{L2Mode, L2Op, RedisStore};
use sync_engine::storage::sql::HeldRow;
use sync_engine::workload::compare;
use sync_engine::workload::Workload;
use sync_engine::CacheStore;
use sync_engine::{CacheTtl, Origin, SubmitOptions, SyncEngine, SyncEngineConfig, SyncItem, Tier, Tiers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const PARTITIONS: i32 = 4;

fn standalone_url() -> String {
    std::env::var("SYNC_TEST_REDIS_STANDALONE_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

/// `engine_config` with the standalone Redis as L2.
fn standalone_config(names: &Names) -> SyncEngineConfig {
    SyncEngineConfig { redis_url: Some(Secret::new(standalone_url())), ..engine_config(names) }
}

async fn engine(config: SyncEngineConfig) -> SyncEngine {
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

async fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(&[url.to_owned()], prefix).await.expect("standalone L2 connects")
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.expect("redis answers")
}

/// Per id: `(version, sha256 of the content or None for a tombstone, ttl)`, or None if absent.
type L2State = BTreeMap<String, Option<(u64, Option<[u8; 32]>, i64)>>;

/// Like `common::l2_state`, read from the standalone Redis.
async fn standalone_l2_state(prefix: &str, ids: impl Iterator<Item = String>) -> L2State {
    let mut connection = raw_connection(&standalone_url()).await;
    l2_state_on(&mut connection, prefix, ids).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_detects_a_standalone_redis_and_a_cluster() {
    let standalone = store(&standalone_url(), "detect:").await;
    assert_eq!(standalone.mode(), L2Mode::Standalone);
    let cluster = RedisStore::connect(&redis_urls(), "detect:").await.expect("cluster L2 connects");
    assert_eq!(cluster.mode(), L2Mode::Cluster);
    // A standalone server among several URLs is a configuration mistake, said so at connect.
    let mixed = [standalone_url(), redis_urls()[0].clone()];
    let error = RedisStore::connect(&mixed, "detect:").await.err().expect("a standalone Redis must be the only URL");
    assert!(error.to_string().contains("standalone"), "{error}");
    // A URL that does not answer is skipped; the next one decides.
    let dead_first = [format!("redis://127.0.0.1:{}", free_port()), redis_urls()[0].clone()];
    assert_eq!(RedisStore::connect(&dead_first, "detect:").await.expect("connects").mode(), L2Mode::Cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_on_standalone_l2_writes_with_and_without_ttl_and_reads_l1_l2_l3() {
    let names = Names::new("standalone_tiers");
    let writer = engine(standalone_config(&names)).await;
    let within = |secs| SubmitOptions { redis_ttl: CacheTtl::After(Duration::from_secs(secs)), ..Default::default() };
    let forever = SubmitOptions { redis_ttl: CacheTtl::Forever, ..Default::default() };
    let l2_only = SubmitOptions { tiers: Tiers { l1: false, l2: true, l3: false }, ..within(60) };
    let json = SyncItem::from_json("ttl.default".into(), serde_json::json!({"name": "Ada"})).with_version(10);
    assert_eq!(writer.submit(json.clone()).await.unwrap(), Tier::L3);
    writer.submit_with(SyncItem::new("ttl.minute", b"m".to_vec()).with_version(3), within(60)).await.unwrap();
    writer.submit_with(SyncItem::new("ttl.forever", b"f".to_vec()).with_version(4), forever).await.unwrap();
    assert_eq!(writer.submit_with(SyncItem::new("only.l2", b"x".to_vec()), l2_only).await.unwrap(), Tier::L2);
    writer.shutdown().await;

    let ids = ["ttl.default", "ttl.minute", "ttl.forever", "only.l2"].map(String::from);
    let l2 = standalone_l2_state(&names.prefix, ids.into_iter()).await;
    let (version, hash, ttl) = l2["ttl.default"].expect("in L2");
    assert_eq!((version, hash), (10, Some(json.content_hash())));
    assert!((3500..=3600).contains(&ttl), "the default TTL (3600 s) reaches L2: {ttl}");
    assert!(l2["ttl.minute"].is_some_and(|(_, _, ttl)| (1..=60).contains(&ttl)), "{:?}", l2["ttl.minute"]);
    assert_eq!(l2["ttl.forever"].map(|(version, _, ttl)| (version, ttl)), Some((4, -1)), "ttl 0 means PERSIST");
    let rows: Vec<String> = l3_rows(&names).await.into_iter().map(|row| row.id).collect();
    assert_eq!(rows, ["ttl.default", "ttl.forever", "ttl.minute"], "the L2-only item is not in L3");

    // A fresh engine has an empty L1: the L2-only item can only come from L2.
    let reader = engine(standalone_config(&names)).await;
    assert_eq!(reader.get("only.l2").await.unwrap().expect("read from L2").content.as_deref(), Some(&b"x"[..]));
    // Gone from L2, it is still in the reader's L1.
    let redis = store(&standalone_url(), &names.prefix).await;
    redis.invalidate(&["only.l2"]).await.unwrap();
    assert!(redis.get("only.l2").await.unwrap().is_none());
    assert!(reader.get("only.l2").await.unwrap().is_some(), "read from L1");

    // Without its L2 entry, an item comes from L3 and L2 is filled again.
    redis.invalidate(&["ttl.default"]).await.unwrap();
    let third = engine(standalone_config(&names)).await;
    let got = third.get("ttl.default").await.unwrap().expect("read from L3");
    assert_eq!(got.content_as_json().unwrap()["name"], "Ada");
    assert_eq!(redis.get("ttl.default").await.unwrap().expect("L2 filled from L3").version, 10);
    assert!(third.get("missing").await.unwrap().is_none());
    third.shutdown().await;
    reader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_never_overwrites_a_newer_one_in_standalone_l2() {
    let names = Names::new("standalone_order");
    let engine = engine(standalone_config(&names)).await;
    engine.submit(SyncItem::new("a.b", b"new".to_vec()).with_version(5)).await.unwrap();
    engine.submit(SyncItem::new("a.b", b"old".to_vec()).with_version(4)).await.unwrap();
    let redis = store(&standalone_url(), &names.prefix).await;
    assert_eq!(redis.get("a.b").await.unwrap().unwrap().content.as_deref(), Some(&b"new"[..]));
    engine.delete("a.b").await.unwrap();
    // A replayed older upsert cannot resurrect it.
    engine.submit(SyncItem::new("a.b", b"old".to_vec()).with_version(5)).await.unwrap();
    engine.shutdown().await;
    assert!(redis.get("a.b").await.unwrap().unwrap().is_tombstone());

    // Straight to L2: an older version is refused, whatever its TTL.
    let newer = SyncItem::new("direct", b"v9".to_vec()).with_version(9);
    let older = SyncItem::new("direct", b"v8".to_vec()).with_version(8);
    assert!(redis.write_batch(&[(&newer, 0), (&older, 60)]).await.is_empty());
    assert_eq!(redis.get("direct").await.unwrap().unwrap().content.as_deref(), Some(&b"v9"[..]));

    // Equal versions: the later record of the same partition wins, an earlier one does not.
    let at = |offset: i64, content: &str| SyncItem {
        origin: Some(Origin { topic: "t".into(), partition: 0, offset }),
        ..SyncItem::new("tie", content.as_bytes().to_vec()).with_version(7)
    };
    let (first, earlier, later) = (at(10, "first"), at(9, "earlier"), at(11, "later"));
    assert!(redis.write_batch(&[(&first, 0)]).await.is_empty());
    assert!(redis.write_batch(&[(&earlier, 0)]).await.is_empty());
    assert_eq!(redis.get("tie").await.unwrap().unwrap().content.as_deref(), Some(&b"first"[..]));
    assert!(redis.write_batch(&[(&later, 0)]).await.is_empty());
    assert_eq!(redis.get("tie").await.unwrap().unwrap().content.as_deref(), Some(&b"later"[..]));

    // DROP_IF_BEHIND: L3's own row and an older row leave the entry; a newer row drops it.
    let row = |item: &SyncItem, version: u64| HeldRow {
        version,
        origin: item.origin.clone(),
        content_hash: item.content_hash(),
        deleted: false,
        state: item.state.clone(),
    };
    let (same, behind, ahead) = (row(&later, 7), row(&later, 6), row(&later, 8));
    assert!(redis.apply(&[L2Op::DropIfBehind("tie", &same), L2Op::DropIfBehind("tie", &behind)]).await.is_empty());
    assert_eq!(redis.get("tie").await.unwrap().expect("kept").version, 7);
    assert!(redis.apply(&[L2Op::DropIfBehind("tie", &ahead)]).await.is_empty());
    assert!(redis.get("tie").await.unwrap().is_none(), "an entry behind L3 is dropped");
}

/// Issue 6 item 6 on standalone L2: once an entry expired, an older version replayed later is
/// refused by L3 and must not reach L2 either (the engine drops what L3 refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_expiry_an_older_replay_l3_refuses_stays_out_of_standalone_l2() {
    let names = Names::new("standalone_stale");
    let config = SyncEngineConfig { redis_ttl_secs: 1, ..standalone_config(&names) };
    let writer = engine(config.clone()).await;
    writer.submit(SyncItem::new("p.upserted", b"new".to_vec()).with_version(5)).await.unwrap();
    writer.submit(SyncItem::tombstone("p.deleted", 5)).await.unwrap();
    writer.shutdown().await;
    let redis = store(&standalone_url(), &names.prefix).await;
    let expired = eventually_async(Duration::from_secs(10), || async {
        redis.get("p.upserted").await.unwrap().is_none() && redis.get("p.deleted").await.unwrap().is_none()
    })
    .await;
    assert!(expired, "L2 entries expire after 1 s");

    let replayer = engine(config).await;
    replayer.submit(SyncItem::new("p.upserted", b"old".to_vec()).with_version(3)).await.unwrap();
    replayer.submit(SyncItem::new("p.deleted", b"zombie".to_vec()).with_version(4)).await.unwrap();
    for id in ["p.upserted", "p.deleted"] {
        if let Some(in_l2) = redis.get(id).await.unwrap() {
            assert_eq!(in_l2.version, 5, "L2 holds a version L3 refused for {id}");
        }
    }
    let read = replayer.get("p.upserted").await.unwrap().expect("the newest upsert is readable");
    assert_eq!((read.version, read.content.as_deref()), (5, Some(&b"new"[..])));
    assert!(replayer.get("p.deleted").await.unwrap().is_none(), "a delete was resurrected by an older upsert");
    replayer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_invalidate_prefix_on_standalone_l2() {
    let names = Names::new("standalone_invalidate");
    let redis = store(&standalone_url(), &names.prefix).await;
    let neighbour = store(&standalone_url(), &format!("other_{}", names.prefix)).await;
    // More keys than one SCAN page (COUNT 1000), so the cursor is followed.
    let items: Vec<SyncItem> = (0..2_500).map(|i| SyncItem::new(format!("x.{i}"), b"v".to_vec())).collect();
    let batch: Vec<(&SyncItem, u64)> = items.iter().map(|item| (item, 600)).collect();
    assert!(redis.write_batch(&batch).await.is_empty());
    assert!(neighbour.write_batch(&batch[..10]).await.is_empty());

    redis.invalidate(&["x.0", "x.1", "x.missing"]).await.unwrap();
    assert!(redis.get("x.0").await.unwrap().is_none() && redis.get("x.1").await.unwrap().is_none());
    assert!(redis.get("x.2").await.unwrap().is_some());

    assert_eq!(redis.invalidate_prefix().await.unwrap(), 2_498);
    assert!(redis.get("x.2499").await.unwrap().is_none());
    assert_eq!(neighbour.invalidate_prefix().await.unwrap(), 10, "another prefix is left alone");
}

/// A private `redis-server` (no persistence) on a free port, killed with the handle.
struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    async fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/services.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        let up = eventually_async(Duration::from_secs(10), || async {
            client.get_multiplexed_async_connection().await.is_ok()
        })
        .await;
        assert!(up, "private redis-server on {port} answers");
        PrivateRedis { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: the data and loaded scripts are gone with it.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay to a Redis that holds every reply for `REPLY_DELAY`, so that a client which
/// waits for replies before sending more shows it: `turns` counts the client's sends that
/// follow a delivered reply, i.e. its round trips.
struct SlowRelay {
    port: u16,
    turns: Arc<AtomicU64>,
}

const REPLY_DELAY: Duration = Duration::from_millis(50);

impl SlowRelay {
    async fn start(upstream_port: u16) -> SlowRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await.unwrap();
                let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                    (client.into_split(), server.into_split());
                let replied = Arc::new(AtomicBool::new(true));
                let (replied_up, turns) = (replied.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 << 10];
                    while let Ok(n @ 1..) = client_rx.read(&mut buffer).await {
                        if replied_up.swap(false, Ordering::SeqCst) {
                            turns.fetch_add(1, Ordering::SeqCst);
                        }
                        if server_tx.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 << 10];
                    while let Ok(n @ 1..) = server_rx.read(&mut buffer).await {
                        tokio::time::sleep(REPLY_DELAY).await;
                        if client_tx.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        replied.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        SlowRelay { port, turns }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn take_turns(&self) -> u64 {
        self.turns.swap(0, Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_round_trip_on_standalone_l2() {
    let server = PrivateRedis::start(free_port()).await;
    let relay = SlowRelay::start(server.port).await;
    let redis = store(&relay.url(), "p:").await;
    relay.take_turns();

    // One by one (even 256 at a time) 1,000 writes would take at least 4 round trips.
    let items: Vec<SyncItem> =
        (0..1_000).map(|i| SyncItem::new(format!("i.{i}"), vec![b'x'; 200]).with_version(1)).collect();
    let batch: Vec<(&SyncItem, u64)> = items.iter().map(|item| (item, 0)).collect();
    assert!(redis.write_batch(&batch).await.is_empty());
    assert_eq!(relay.take_turns(), 2, "loading the scripts, then the batch");
    let newer: Vec<SyncItem> = items.iter().map(|item| item.clone().with_version(2)).collect();
    let batch: Vec<(&SyncItem, u64)> = newer.iter().map(|item| (item, 600)).collect();
    assert!(redis.write_batch(&batch).await.is_empty());
    assert_eq!(relay.take_turns(), 1, "the scripts are loaded: the batch alone");
    let mut probe = raw_connection(&server.url()).await;
    let keys: usize = redis::cmd("DBSIZE").query_async(&mut probe).await.unwrap();
    assert_eq!(keys, 1_000);
    assert_eq!(redis.get("i.999").await.unwrap().unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_l2_recovers_from_a_script_flush_and_a_restart() {
    let server = PrivateRedis::start(free_port()).await;
    let redis = store(&server.url(), "p:").await;
    let mut probe = raw_connection(&server.url()).await;
    let items: Vec<SyncItem> =
        (0..1_000).map(|i| SyncItem::new(format!("i.{i}"), vec![b'x'; 200]).with_version(1)).collect();
    let batch: Vec<(&SyncItem, u64)> = items.iter().map(|item| (item, 0)).collect();
    assert!(redis.write_batch(&batch).await.is_empty());

    // The server forgets its scripts: the pipeline's NOSCRIPT replies are retried, loading them.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut probe).await.unwrap();
    let newer: Vec<SyncItem> = items.iter().take(10).map(|item| item.clone().with_version(2)).collect();
    let batch: Vec<(&SyncItem, u64)> = newer.iter().map(|item| (item, 0)).collect();
    assert_eq!(redis.write_batch(&batch).await, vec![]);
    assert_eq!(redis.get("i.9").await.unwrap().unwrap().version, 2);
    // ...and the next batch is pipelined again.
    assert_eq!(redis.write_batch(&batch).await, vec![]);

    // kill -9 and a restart on the same port: writes succeed again without a new RedisStore.
    let mut server = server;
    server.kill();
    let mut server = PrivateRedis::start(server.port).await;
    let written =
        eventually_async(Duration::from_secs(15), || async { redis.write_batch(&batch).await.is_empty() }).await;
    assert!(written, "writes resume after the server restarts");
    assert_eq!(redis.get("i.0").await.unwrap().unwrap().version, 2);

    // A store that only reads reconnects too.
    let reader = store(&server.url(), "p:").await;
    assert!(reader.get("i.0").await.unwrap().is_some());
    server.kill();
    let server = PrivateRedis::start(server.port).await;
    let read = eventually_async(Duration::from_secs(15), || async { reader.get("i.0").await.is_ok() }).await;
    assert!(read, "reads resume after the server restarts");
    assert!(reader.get("i.0").await.unwrap().is_none(), "the restarted server is empty");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_on_standalone_l2_ends_with_l2_and_l3_exact() {
    let names = Names::new("standalone_worker");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(spec(&names, 8_000, 2_000));
    let ends = produce(&names, &mut workload).await;
    let port = free_port();
    let mut worker = spawn_worker(&names, port, &[("SYNC_REDIS_URLS", standalone_url())]);
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    signal(&worker, "TERM");
    let status = wait_exit(&mut worker, Duration::from_secs(30)).await.expect("SIGTERM stops the worker");
    assert!(status.success(), "the worker exits 0 after SIGTERM, got {status}");
    assert_eq!(committed, ends.0, "every offset is committed");

    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());
    let expected = workload.expected();
    let state = standalone_l2_state(&names.prefix, expected.keys().cloned()).await;
    let mut mismatches = Vec::new();
    for (id, got) in &state {
        let want = &expected[id];
        match got {
            None => mismatches.push(format!("{id}: missing from L2")),
            Some((version, hash, ttl)) => {
                if (*version, *hash) != (want.version, want.content_hash) {
                    mismatches.push(format!("{id}: L2 has version {version}, expected {}", want.version));
                }
                if !(1..=3600).contains(ttl) {
                    mismatches.push(format!("{id}: L2 ttl {ttl}, expected 1..=3600"));
                }
            }
        }
    }
    eprintln!("standalone worker: {} ids compared in L2 and L3", state.len());
    assert_eq!(mismatches, Vec::<String>::new());
}

/// Polls an async `check` until it holds or `timeout` passes; returns whether it held.
async fn eventually_async<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check().await
}
