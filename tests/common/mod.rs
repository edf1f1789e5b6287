//! Helpers shared by the integration tests: every test gets its own topic, consumer group,
//! L3 table and L2 key prefix, against the real services that `scripts/services.sh` starts
//! (MariaDB, a Redis Cluster, Apache Kafka). Addresses come from `SYNC_TEST_*` variables.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use sync_engine::config::{KafkaConfig, Secret, SyncEngineConfig};
use sync_engine::kafka::producer::{publish_all, EndOffsets, ItemProducer};
use sync_engine::kafka::worker::{self, WorkerStats};
use sync_engine::storage::sql::SqlStore;
use sync_engine::storage::RowSummary;
use sync_engine::workload::{Workload, WorkloadSpec};
use sync_engine::ArchiveStore;
use sync_engine::SyncEngine;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn mysql_url() -> String {
    std::env::var("SYNC_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// Drops these tests' own tables (items, migrations ledger, merkle slots and marks).
pub async fn drop_tables(url: &str, tables: &[&str]) {
    let pool = sqlx::MySqlPool::connect(url).await.expect("mysql");
    for table in tables {
        for suffix in ["", "_migrations", "_merkle", "_merkle_dirty"] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}{suffix}")).execute(&pool).await.expect("drop");
        }
    }
    pool.close().await;
}

pub fn redis_urls() -> Vec<String> {
    let urls = std::env::var("SYNC_TEST_REDIS_URLS")
        .unwrap_or_else(|_| "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into());
    urls.split(',').map(|url| url.trim().to_owned()).filter(|url| !url.is_empty()).collect()
}

pub fn brokers() -> String {
    std::env::var("SYNC_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Names unique to one test run: topic, group, table and key prefix.
#[derive(Clone, Debug)]
pub struct Names {
    pub topic: String,
    pub dlq_topic: String,
    pub group: String,
    pub table: String,
    pub prefix: String,
}

impl Names {
    /// The WAL directory of this test's worker processes (kept across their restarts), under
    /// `SYNC_TEST_WAL_ROOT` when set: `scripts/test.sh` points it at one directory per run and
    /// removes that when the run passes (a failed run's WALs stay, to be looked at).
    pub fn wal_dir(&self) -> std::path::PathBuf {
        let root = std::env::var_os("SYNC_TEST_WAL_ROOT").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
        root.join(format!("sync-engine-wal-{}", self.group))
    }

    pub fn new(test: &str) -> Names {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let unique = format!("{test}_{}_{}", std::process::id(), nanos % 1_000_000_000);
        Names {
            topic: format!("t_{unique}"),
            dlq_topic: format!("dlq_{unique}"),
            group: format!("g_{unique}"),
            table: format!("items_{unique}"),
            prefix: format!("{unique}:"),
        }
    }
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await;
}

/// A topic with topic-level settings, e.g. `max.message.bytes` (Apache Kafka enforces it).
pub async fn create_topic_with(name: &str, partitions: i32, settings: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in settings {
        topic = topic.set(key, value);
    }
    let results = admin.create_topics([&topic], &AdminOptions::new()).await.expect("create topics request");
    for result in results {
        result.expect("topic created");
    }
}

pub fn spec(names: &Names, count: u64, key_space: u64) -> WorkloadSpec {
    WorkloadSpec {
        count,
        item_bytes: 256,
        key_space,
        id_prefix: format!("uk.nhs.{}", names.group),
        delete_share: 0.08,
        out_of_order_share: 0.15,
        duplicate_share: 0.05,
        poison_share: 0.0,
        max_item_bytes: 64 << 10,
        seed: 42,
    }
}

/// Publishes the whole workload; returns the end offsets from the delivery reports.
pub async fn produce(names: &Names, workload: &mut Workload) -> EndOffsets {
    let producer = ItemProducer::new(&brokers(), &names.topic).expect("producer");
    let ends = publish_all(&producer, workload.by_ref(), 0, || {}).await.expect("all records delivered");
    producer.flush();
    ends
}

/// Publishes more records and extends the end offsets with their delivery reports.
pub async fn publish_more(
    producer: &ItemProducer,
    records: Vec<sync_engine::workload::OutgoingRecord>,
    ends: &mut EndOffsets,
) {
    let more = publish_all(producer, records, 0, || {}).await.expect("all records delivered");
    producer.flush();
    for (partition, end) in more.0 {
        ends.record(partition, end - 1);
    }
}

pub fn engine_config(names: &Names) -> SyncEngineConfig {
    SyncEngineConfig {
        redis_url: Some(Secret::new(redis_urls().join(","))),
        redis_prefix: names.prefix.clone(),
        redis_ttl_secs: 3600,
        sql_url: Some(Secret::new(mysql_url())),
        sql_table: names.table.clone(),
        // The background L2 auditor has its own tests (l2_audit.rs); elsewhere its reads
        // would land in the L3 statement counts some tests take.
        audit_keys_per_sec: 0,
        ..SyncEngineConfig::in_memory()
    }
}

pub fn kafka_config(names: &Names) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        topics: vec![names.topic.clone()],
        group_id: names.group.clone(),
        dlq_topic: names.dlq_topic.clone(),
        passthrough: [
            ("session.timeout.ms".to_owned(), Secret::new("6000")),
            ("heartbeat.interval.ms".to_owned(), Secret::new("500")),
        ]
        .into_iter()
        .collect(),
        commit_interval: Duration::from_millis(200),
        revoke_deadline: Duration::from_secs(4),
        memory_budget_bytes: 64 << 20,
        max_item_bytes: 64 << 10,
        instance_id: None,
    }
}

/// A worker running in this process.
pub struct InProcessWorker {
    pub stats: Arc<WorkerStats>,
    pub engine: Arc<SyncEngine>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    pub async fn start(names: &Names, kafka: KafkaConfig) -> InProcessWorker {
        InProcessWorker::start_with(engine_config(names), kafka).await
    }

    pub async fn start_with(config: SyncEngineConfig, kafka: KafkaConfig) -> InProcessWorker {
        log_to_test_output();
        let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
        engine.start().await.expect("engine starts");
        let engine = Arc::new(engine);
        let stats = Arc::new(WorkerStats::default());
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(worker::run(kafka, engine.clone(), stop.clone(), Duration::from_secs(20), stats.clone()));
        InProcessWorker { stats, engine, stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("worker task").expect("worker drained cleanly");
        self.engine.shutdown_within(Duration::from_secs(10)).await;
    }
}

/// The in-process workers' logs (this crate's, `info` and up, or `SYNC_TEST_LOG` as an
/// env filter) go to the test's captured output, which the harness prints when a test fails:
/// a failure in CI then shows what the workers did. librdkafka's own threads are not the
/// test's, so its target stays out.
fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNC_TEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sync_engine=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A client of the test's group that never subscribes, so it never joins the group.
fn group_client(names: &Names) -> BaseConsumer {
    ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", &names.group).create().expect("consumer")
}

/// The group's committed offsets, read without joining the group.
pub fn committed(names: &Names, partitions: i32) -> HashMap<i32, i64> {
    let consumer = group_client(names);
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(&names.topic, partition);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect()
}

/// Commits offset 0 for every partition: a replay from the start (group must be empty).
pub fn reset_to_earliest(names: &Names, partitions: i32) {
    reset_to(names, &(0..partitions).map(|partition| (partition, 0)).collect());
}

/// Commits these offsets for the (empty) group: where the next worker starts.
pub fn reset_to(names: &Names, offsets: &HashMap<i32, i64>) {
    let consumer = group_client(names);
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        list.add_partition_offset(&names.topic, *partition, Offset::Offset(*offset)).unwrap();
    }
    consumer.commit(&list, CommitMode::Sync).expect("offsets reset");
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check()
}

/// Waits until the committed offsets reach the end offsets of every produced partition.
pub async fn wait_for_commits(
    names: &Names,
    partitions: i32,
    ends: &EndOffsets,
    timeout: Duration,
) -> HashMap<i32, i64> {
    let names = names.clone();
    let want = ends.0.clone();
    let deadline = Instant::now() + timeout;
    loop {
        let names_now = names.clone();
        let got = tokio::task::spawn_blocking(move || committed(&names_now, partitions)).await.unwrap();
        let done = want.iter().all(|(partition, end)| got.get(partition) == Some(end));
        if done || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn l3_rows(names: &Names) -> Vec<RowSummary> {
    l3_rows_at(&mysql_url(), names).await
}

pub async fn l3_rows_at(url: &str, names: &Names) -> Vec<RowSummary> {
    let store = SqlStore::connect(url, &names.table).await.expect("L3 reachable");
    let rows = store.summaries().await.expect("rows");
    store.close().await;
    rows
}

/// L2 state per expected id: `(version, sha256 of content or None for a tombstone, ttl)`.
pub async fn l2_state(
    names: &Names,
    ids: impl Iterator<Item = String>,
) -> BTreeMap<String, Option<(u64, Option<[u8; 32]>, i64)>> {
    l2_state_at(&redis_urls(), names, ids).await
}

/// Every expected id must be in L2 with its version and content hash (or as a tombstone),
/// with a TTL set. Returns the mismatches.
pub async fn compare_l2(names: &Names, workload: &Workload) -> Vec<String> {
    compare_l2_at(&redis_urls(), names, workload).await
}

// ---- the worker as a child process ----

/// A free port outside the kernel's ephemeral range (32768-60999 here), so it cannot be
/// taken as the source port of some outgoing connection between a server's stop and its
/// restart on the same port. Unique within this test process.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    loop {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + offset) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn spawn_worker(names: &Names, metrics_port: u16, extra: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
    command
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SYNC_KAFKA_BROKERS", brokers())
        .env("SYNC_KAFKA_TOPICS", &names.topic)
        .env("SYNC_KAFKA_GROUP_ID", &names.group)
        .env("SYNC_DLQ_TOPIC", &names.dlq_topic)
        .env("SYNC_REDIS_URLS", redis_urls().join(","))
        .env("SYNC_REDIS_PREFIX", &names.prefix)
        .env("SYNC_REDIS_TTL_SECS", "3600")
        .env("SYNC_SQL_URL", mysql_url())
        .env("SYNC_SQL_TABLE", &names.table)
        .env("SYNC_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS", "6000")
        .env("SYNC_KAFKA_OPT_HEARTBEAT_INTERVAL_MS", "500")
        .env("SYNC_REVOKE_DEADLINE_MS", "4000")
        .env("SYNC_COMMIT_INTERVAL_MS", "200")
        .env("SYNC_LOG", "warn")
        .env("SYNC_WAL_DIR", names.wal_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in extra {
        command.env(name, value);
    }
    command.spawn().expect("worker process starts")
}

/// Waits until the worker on `port` answers `/health/ready` with 200.
pub async fn wait_ready(port: u16, timeout: Duration) -> bool {
    eventually(timeout, || http_get(port, "/health/ready").is_some_and(|r| r.starts_with("HTTP/1.0 200"))).await
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} failed");
}

pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

// ---- L2 of a Redis Cluster other than the shared one (a test's private cluster) ----

/// Like `l2_state`, against the cluster at `urls`.
pub async fn l2_state_at(
    urls: &[String],
    names: &Names,
    ids: impl Iterator<Item = String>,
) -> BTreeMap<String, Option<(u64, Option<[u8; 32]>, i64)>> {
    let client = redis::cluster::ClusterClient::new(urls.to_vec()).expect("cluster client");
    let mut connection = client.get_async_connection().await.expect("cluster connection");
    l2_state_on(&mut connection, &names.prefix, ids).await
}

/// Per id: `(version, sha256 of the content or None for a tombstone, ttl)`, or None if the
/// key is absent, read over any Redis connection (a Cluster's or a standalone server's).
pub async fn l2_state_on<C: redis::AsyncCommands>(
    connection: &mut C,
    prefix: &str,
    ids: impl Iterator<Item = String>,
) -> BTreeMap<String, Option<(u64, Option<[u8; 32]>, i64)>> {
    let mut state = BTreeMap::new();
    for id in ids {
        let key = format!("{prefix}{id}");
        let fields: HashMap<String, Vec<u8>> = connection.hgetall(&key).await.expect("hgetall");
        let entry = if fields.is_empty() {
            None
        } else {
            let version = String::from_utf8(fields["v"].clone()).unwrap().parse().unwrap();
            let deleted = fields.get("d").map(|d| d.as_slice()) == Some(b"1");
            let hash = (!deleted).then(|| sync_engine::item::content_hash(&fields["c"]));
            let ttl: i64 = connection.ttl(&key).await.expect("ttl");
            Some((version, hash, ttl))
        };
        state.insert(id, entry);
    }
    state
}

/// Like `compare_l2`, against the cluster at `urls`.
pub async fn compare_l2_at(urls: &[String], names: &Names, workload: &Workload) -> Vec<String> {
    let expected = workload.expected();
    let state = l2_state_at(urls, names, expected.keys().cloned()).await;
    let mut mismatches = Vec::new();
    for (id, got) in state {
        let want = expected[&id];
        match got {
            None => mismatches.push(format!("{id}: missing from L2")),
            Some((version, hash, ttl)) => {
                if version != want.version || hash != want.content_hash {
                    mismatches.push(format!("{id}: L2 has version {version}, expected {}", want.version));
                }
                if !(0..=3600).contains(&ttl) || ttl == 0 {
                    mismatches.push(format!("{id}: L2 ttl {ttl}, expected 1..=3600"));
                }
            }
        }
    }
    mismatches
}

/// Runs `scripts/private-mariadb.sh ACTION PORT` (start, kill, remove) for a fault test's own server.
pub fn private_mariadb(action: &str, port: u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/private-mariadb.sh");
    let status =
        std::process::Command::new(script).arg(action).arg(port.to_string()).status().expect("private-mariadb.sh runs");
    assert!(status.success(), "private-mariadb.sh {action} {port} failed");
}
