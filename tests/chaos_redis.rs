//! A Redis Cluster master killed mid-stream: the cluster fails over, L3 stays exact (L2
//! failures never hold back a commit), and L2 converges to L3 through repair, no restart.
//! The master killed is one of a private cluster this test starts on its own ports
//! (`scripts/private-redis-cluster.sh`) and removes at the end: the shared cluster of
//! `scripts/services.sh` is never touched.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::config::{Secret, SyncEngineConfig};
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;
/// Port bases tried in turn (7100-7105, 7110-7115, ...): below the ephemeral range, clear of
/// the shared cluster, and a second run at the same time takes the next free one.
const PORT_BASES: [u16; 10] = [7100, 7110, 7120, 7130, 7140, 7150, 7160, 7170, 7180, 7190];
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/private-redis-cluster.sh");
/// The script's exit code when one of the six ports is in use: nothing was started.
const PORTS_TAKEN: i32 = 3;

/// A six-node cluster of this test's own, removed on drop (a failed assertion included).
struct PrivateRedisCluster {
    base: u16,
}

impl PrivateRedisCluster {
    fn start() -> PrivateRedisCluster {
        for base in PORT_BASES {
            let status = Command::new(SCRIPT).arg("start").arg(base.to_string()).status().expect("script runs");
            match status.code() {
                Some(0) => return PrivateRedisCluster { base },
                Some(PORTS_TAKEN) => continue,
                _ => panic!("private Redis Cluster on {base} did not start: {status}"),
            }
        }
        panic!("no free port base for a private Redis Cluster among {PORT_BASES:?}");
    }

    fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.base..=self.base + 5
    }

    /// The seed nodes the worker and the checks connect to.
    fn urls(&self) -> Vec<String> {
        self.ports().take(3).map(|port| format!("redis://127.0.0.1:{port}")).collect()
    }

    /// Every node but `except` answers `cluster_state:ok`.
    fn ok_without(&self, except: Option<u16>) -> bool {
        self.ports()
            .filter(|port| Some(*port) != except)
            .all(|port| redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok"))
    }

    /// A master with a replica, so the cluster can fail over when it dies.
    fn master_with_replica(&self) -> u16 {
        self.ports()
            .find(|port| {
                redis_cli(*port, &["role"]).starts_with("master")
                    && redis_cli(*port, &["info", "replication"]).contains("connected_slaves:1")
            })
            .expect("a master with a replica")
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        let removed = Command::new(SCRIPT).arg("remove").arg(self.base.to_string()).status();
        if !removed.as_ref().is_ok_and(|status| status.success()) {
            eprintln!("could not remove the private Redis Cluster on {}: {removed:?}", self.base);
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn process_id(port: u16) -> u32 {
    redis_cli(port, &["info", "server"])
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("redis pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_master_fails_over_l3_stays_exact_and_l2_converges() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn,sync_engine=info").try_init();
    let names = Names::new("redis_kill");
    create_topic(&names.topic, PARTITIONS).await;
    let cluster = PrivateRedisCluster::start();
    assert!(cluster.ok_without(None), "the cluster must be whole before the test");
    let master = cluster.master_with_replica();
    let pid = process_id(master);
    let config = SyncEngineConfig { redis_url: Some(Secret::new(cluster.urls().join(","))), ..engine_config(&names) };

    let worker = InProcessWorker::start_with(config, kafka_config(&names)).await;
    let mut workload = Workload::new(spec(&names, 15_000, 4_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let before: Vec<_> = workload.by_ref().take(5_000).collect();
    let mut ends = publish_all(&producer, before, 0, || {}).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || worker.stats.stored.load(Ordering::Relaxed) >= 5_000).await);

    assert!(Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap().success());
    let killed_at = Instant::now();
    let during: Vec<_> = workload.by_ref().collect();
    publish_more(&producer, during, &mut ends).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    assert_eq!(committed, ends.0, "L2 trouble never holds back a commit");
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new(), "L3 exact");

    let failed_over = eventually(Duration::from_secs(60), || cluster.ok_without(Some(master))).await;
    assert!(failed_over, "the cluster must fail over");
    let failover = killed_at.elapsed();
    // L2 converges through repair, without a restart.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut l2 = compare_l2_at(&cluster.urls(), &names, &workload).await;
    while !l2.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        l2 = compare_l2_at(&cluster.urls(), &names, &workload).await;
    }
    let converged = killed_at.elapsed();
    worker.stop().await;
    eprintln!(
        "chaos redis_kill: records 15000, ids {}, L3 exact, L2 mismatches {}, cluster ok after {:.1}s, L2 converged after {:.1}s",
        workload.expected().len(),
        l2.len(),
        failover.as_secs_f64(),
        converged.as_secs_f64()
    );
    assert_eq!(l2.len(), 0, "L2 must converge to L3: {:?}", &l2[..l2.len().min(5)]);
}
