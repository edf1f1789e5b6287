//! Issue 6 regressions at the store edges, against real MariaDB, SQLite and Redis:
//! a hung L3 write has a deadline, lock races are transient, an item L3 can never take
//! (too large for `max_allowed_packet`, a version SQLite cannot store) never blocks L3 or
//! the WAL drain, and an L2 outage never stalls L3-bound items.
//! Faults happen on private servers (a private MariaDB, a one-node Redis Cluster), never
//! on the shared ones.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use sqlx::{Connection, Executor};
use sync_engine::config::{Secret, SyncEngineConfig};
use sync_engine::resilience::wal::{Failpoints, WalConfig, WriteAheadLog};
use sync_engine::storage::sql::classify;
use sync_engine::storage::StoreError;
use sync_engine::ArchiveStore;
use sync_engine::{CacheTtl, SettleError, SubmitOptions, SyncEngine, SyncItem, Tier, Tiers};
use tokio::sync::watch;

async fn engine(config: SyncEngineConfig) -> SyncEngine {
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

/// Item 3: a table locked by another client used to hang `write_batch` (only the pool's
/// acquire timeout existed). With a write deadline the batch counts as unavailable and
/// settles in the WAL; it drains once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_times_the_write_out_into_the_wal_and_it_drains_after() {
    let names = Names::new("edge_locked");
    let config = SyncEngineConfig {
        sql_write_timeout: Duration::from_millis(1_000),
        wal_dir: Some(names.wal_dir()),
        breaker_failures: 1,
        breaker_cool_down: Duration::from_millis(300),
        ..engine_config(&names)
    };
    let engine = engine(config).await;
    engine.submit(SyncItem::new("locked.warmup", b"w".to_vec())).await.unwrap();
    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", names.table).as_str()).await.unwrap();

    let started = Instant::now();
    let submitted = tokio::time::timeout(
        Duration::from_secs(15),
        engine.submit(SyncItem::new("locked.item", b"x".to_vec()).with_version(7)),
    )
    .await;
    let waited = started.elapsed();
    assert!(submitted.is_ok(), "the write hung behind the table lock for {waited:?}");
    assert_eq!(submitted.unwrap().unwrap(), Tier::Wal, "a timed-out L3 write settles in the WAL");
    eprintln!("edge locked: settled in the WAL after {:.1}s", waited.as_secs_f64());

    locker.execute("UNLOCK TABLES").await.unwrap();
    let drained = eventually_async(Duration::from_secs(20), || async {
        l3_rows(&names).await.iter().any(|row| row.id == "locked.item" && row.version == 7)
    })
    .await;
    assert!(drained, "the WAL drains into L3 once the lock is released");
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// Item 3: InnoDB lock-wait timeouts (1205) and deadlocks (1213) say nothing about the
/// server's health: they are transient (retried, the breaker stays closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_wait_timeouts_and_deadlocks_are_transient() {
    let names = Names::new("edge_lockrace");
    let mut setup = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    let table = &names.table;
    setup.execute(format!("CREATE TABLE {table} (id INT PRIMARY KEY, v INT) ENGINE=InnoDB").as_str()).await.unwrap();
    setup.execute(format!("INSERT INTO {table} VALUES (1, 0), (2, 0)").as_str()).await.unwrap();

    let mut a = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    let mut b = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    b.execute("SET SESSION innodb_lock_wait_timeout = 1").await.unwrap();
    a.execute("BEGIN").await.unwrap();
    a.execute(format!("UPDATE {table} SET v = 1 WHERE id = 1").as_str()).await.unwrap();
    b.execute("BEGIN").await.unwrap();
    let waited = b.execute(format!("UPDATE {table} SET v = 2 WHERE id = 1").as_str()).await.unwrap_err();
    assert!(matches!(classify(waited), StoreError::Transient(_)), "lock-wait timeout must be transient");
    b.execute("ROLLBACK").await.unwrap();

    // A deadlock: a holds row 1 and wants row 2, b holds row 2 and wants row 1.
    b.execute("SET SESSION innodb_lock_wait_timeout = 20").await.unwrap();
    b.execute("BEGIN").await.unwrap();
    b.execute(format!("UPDATE {table} SET v = 2 WHERE id = 2").as_str()).await.unwrap();
    let update_a = format!("UPDATE {table} SET v = 1 WHERE id = 2");
    let a_waits = tokio::spawn(async move {
        let result = a.execute(update_a.as_str()).await.map(|_| ());
        (a, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_result = b.execute(format!("UPDATE {table} SET v = 2 WHERE id = 1").as_str()).await.map(|_| ());
    let (_a, a_result) = a_waits.await.unwrap();
    let deadlock = a_result.err().or(b_result.err()).expect("one of the two is the deadlock victim");
    assert!(matches!(classify(deadlock), StoreError::Transient(_)), "a deadlock must be transient");
}

/// Item 4: one item larger than MariaDB's `max_allowed_packet` (error 1153) was classed as
/// "unavailable": the whole batch went to the WAL and the drain retried it for ever, while
/// its offsets were committed. It must be rejected alone, and everything else stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_over_max_allowed_packet_is_rejected_alone_and_the_rest_lands() {
    let names = Names::new("edge_packet");
    let port = free_port();
    private_mariadb("start", port);
    let url = format!("mysql://root@127.0.0.1:{port}/test");
    let mut admin = sqlx::MySqlConnection::connect(&url).await.unwrap();
    admin.execute("SET GLOBAL max_allowed_packet = 524288").await.unwrap();
    drop(admin);
    let config = SyncEngineConfig {
        sql_url: Some(Secret::new(url.clone())),
        wal_dir: Some(names.wal_dir()),
        breaker_failures: 1,
        breaker_cool_down: Duration::from_millis(300),
        ..engine_config(&names)
    };
    let engine = engine(config).await;
    let mut receipts = Vec::new();
    for index in 0..3_000 {
        let content = if index == 1_500 { vec![b'b'; 700_000] } else { vec![b's'; 300] };
        let item = SyncItem::new(format!("packet.{index:04}"), content).with_version(1);
        receipts.push(engine.enqueue(item, SubmitOptions::default()).await.unwrap());
    }
    let mut tiers = std::collections::BTreeMap::new();
    let mut rejected = Vec::new();
    for (index, receipt) in receipts.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), receipt).await.expect("every item settles") {
            Ok(tier) => *tiers.entry(tier.as_str()).or_insert(0) += 1,
            Err(SettleError::Rejected(why)) => rejected.push((index, why)),
            Err(other) => panic!("item {index}: {other}"),
        }
    }
    engine.shutdown_within(Duration::from_secs(5)).await;
    let rows = l3_rows_at(&url, &names).await;
    private_mariadb("remove", port);
    eprintln!("edge packet: settled {tiers:?}, rejected {rejected:?}");
    assert_eq!(rejected.len(), 1, "exactly the oversize item is rejected: {rejected:?}");
    assert_eq!(rejected[0].0, 1_500);
    assert!(rejected[0].1.contains("max_allowed_packet"), "{}", rejected[0].1);
    assert_eq!(tiers.get("l3"), Some(&2_999), "everything else lands in L3, not the WAL: {tiers:?}");
    assert_eq!(rows.len(), 2_999);
}

/// Item 4: a batch in the WAL that L3 rejects (here a version above SQLite's 2^63-1) used to
/// stop the drain for ever. It is written item by item; the offender is handed over for
/// dead-lettering and the rest lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_item_inside_the_wal_does_not_block_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let wal_dir = dir.path().join("wal");
    let too_big = SyncItem::new("wal.bad", b"b".to_vec()).with_version(u64::MAX);
    let good: Vec<SyncItem> =
        (0..10).map(|index| SyncItem::new(format!("wal.good.{index}"), b"g".to_vec()).with_version(3)).collect();
    {
        let config = WalConfig { dir: wal_dir.clone(), max_bytes: 1 << 30, segment_bytes: 64 << 20 };
        let (mut log, _) = WriteAheadLog::open(config, Failpoints::default()).unwrap();
        let mut frame: Vec<&SyncItem> = good.iter().take(5).collect();
        frame.push(&too_big);
        log.append(&frame).unwrap();
        log.append(&good.iter().skip(5).collect::<Vec<_>>()).unwrap();
    }
    let sqlite = format!("sqlite://{}", dir.path().join("l3.db").display());
    let config = SyncEngineConfig {
        sql_url: Some(Secret::new(sqlite.clone())),
        wal_dir: Some(wal_dir.clone()),
        ..SyncEngineConfig::in_memory()
    };
    let engine = engine(config).await;
    let mut late = engine.take_late_rejections().expect("late rejections are offered once");
    let rejection = tokio::time::timeout(Duration::from_secs(20), late.recv()).await.expect("reported").unwrap();
    assert_eq!((rejection.item.id.as_str(), rejection.item.version), ("wal.bad", u64::MAX));
    let store = sync_engine::storage::sql::SqlStore::connect(&sqlite, "sync_items").await.unwrap();
    let landed =
        eventually_async(Duration::from_secs(20), || async { store.summaries().await.unwrap().len() == good.len() })
            .await;
    assert!(landed, "every good item of the WAL lands in L3");
    assert!(engine.get("wal.bad").await.unwrap().is_none());
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// Review finding: a batch holding an older valid version and a newer one L3 rejects went to
/// the WAL deduplicated (only the newest), so when the drain rejected the newest the older
/// one was lost although its offset was committed. The WAL keeps every item; the older lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_valid_version_beside_a_rejected_newer_one_survives_the_wal() {
    let names = Names::new("edge_wal_dedup");
    let config = SyncEngineConfig {
        sql_write_timeout: Duration::from_millis(500),
        wal_dir: Some(names.wal_dir()),
        breaker_failures: 1,
        breaker_cool_down: Duration::from_millis(300),
        ..engine_config(&names)
    };
    let engine = engine(config).await;
    let limit = engine.l3().and_then(|l3| l3.max_item_bytes()).expect("MySQL reports max_allowed_packet");
    let mut locker = sqlx::MySqlConnection::connect(&mysql_url()).await.unwrap();
    locker.execute(format!("LOCK TABLES {} WRITE", names.table).as_str()).await.unwrap();
    let mut late = engine.take_late_rejections().unwrap();
    let older = engine.enqueue(SyncItem::new("dedup.x", b"valid".to_vec()).with_version(1), SubmitOptions::default());
    let older = older.await.unwrap();
    let too_big = SyncItem::new("dedup.x", vec![b'z'; limit as usize + 1]).with_version(2);
    let newer = engine.enqueue(too_big, SubmitOptions::default()).await.unwrap();
    let older = tokio::time::timeout(Duration::from_secs(20), older).await.expect("the older version settles");
    assert_eq!(older, Ok(Tier::Wal), "L3 is locked: the older version settles in the WAL");
    // The newer one is rejected, at once or when the WAL drains: either way it is reported.
    let newer = tokio::time::timeout(Duration::from_secs(20), newer).await.expect("the newer version settles");
    locker.execute("UNLOCK TABLES").await.unwrap();
    match newer {
        Err(SettleError::Rejected(why)) => assert!(why.contains("max_allowed_packet"), "{why}"),
        other => {
            assert_eq!(other, Ok(Tier::Wal));
            let late = tokio::time::timeout(Duration::from_secs(20), late.recv()).await.expect("reported").unwrap();
            assert_eq!(late.item.version, 2);
        }
    }
    let landed = eventually_async(Duration::from_secs(20), || async {
        l3_rows(&names).await.iter().any(|row| row.id == "dedup.x" && row.version == 1)
    })
    .await;
    assert!(landed, "the older valid version must land once the newer one is rejected");
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// A one-node Redis Cluster of this test's own, so it can be frozen.
struct PrivateRedis {
    server: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let server = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs");
        let cli = |args: &[&str]| {
            Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().map(|out| out.stdout)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while cli(&["ping"]).map(|out| out != b"PONG\n").unwrap_or(true) {
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        cli(&["cluster", "addslotsrange", "0", "16383"]).unwrap();
        while !String::from_utf8_lossy(&cli(&["cluster", "info"]).unwrap()).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "private cluster not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateRedis { server, dir, port }
    }

    fn signal(&self, signal: &str) {
        Command::new("kill").arg(format!("-{signal}")).arg(self.server.id().to_string()).status().unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = &self.dir;
    }
}

/// Item 7: an item routed to L1/L2 only was retried inside the batch while Redis was down,
/// and the `join!` held every L3-bound item of that batch with it. An L2 outage degrades L2,
/// nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_only_items_do_not_stall_l3_items_while_redis_is_down() {
    let names = Names::new("edge_l2_down");
    let redis = PrivateRedis::start();
    let config = SyncEngineConfig {
        redis_url: Some(Secret::new(format!("redis://127.0.0.1:{}", redis.port))),
        ..engine_config(&names)
    };
    let engine = engine(config).await;
    engine.submit(SyncItem::new("down.warmup", b"w".to_vec())).await.unwrap();
    redis.signal("STOP");

    let l2_only = SubmitOptions { tiers: Tiers { l1: true, l2: true, l3: false }, redis_ttl: CacheTtl::Default };
    let cache_only = engine.enqueue(SyncItem::new("down.cache", b"c".to_vec()), l2_only).await.unwrap();
    let durable = engine.enqueue(SyncItem::new("down.durable", b"d".to_vec()), SubmitOptions::default()).await.unwrap();
    let started = Instant::now();
    let settled = tokio::time::timeout(Duration::from_secs(20), durable).await;
    assert!(settled.is_ok(), "the L3-bound item waited {:?} on a Redis outage", started.elapsed());
    assert_eq!(settled.unwrap(), Ok(Tier::L3));
    eprintln!("edge l2 down: L3 item settled in {:.1}s with Redis frozen", started.elapsed().as_secs_f64());
    assert!(l3_rows(&names).await.iter().any(|row| row.id == "down.durable"));

    // A flush that gives up (as a revoke past its deadline does) while the L2-only item still
    // waits for Redis must not stop later L3-bound items either.
    assert!(tokio::time::timeout(Duration::from_millis(500), engine.flush()).await.is_err(), "L2 is still frozen");
    let started = Instant::now();
    let later = engine.enqueue(SyncItem::new("down.later", b"l".to_vec()), SubmitOptions::default()).await.unwrap();
    let settled = tokio::time::timeout(Duration::from_secs(20), later).await;
    assert!(settled.is_ok(), "an abandoned flush stopped L3 writes for {:?}", started.elapsed());
    assert_eq!(settled.unwrap(), Ok(Tier::L3));

    redis.signal("CONT");
    let cached = tokio::time::timeout(Duration::from_secs(30), cache_only).await;
    assert_eq!(cached.expect("the L2-only item settles once Redis is back"), Ok(Tier::L2));
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// Polls an async check every 200 ms until it holds or the timeout passes.
async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}
