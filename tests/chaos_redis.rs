//! A Redis Cluster master killed mid-stream: the cluster fails over, L3 stays exact (L2
//! failures never hold back a commit), and L2 converges to L3 through repair, no restart.
//! In its own test binary: the shared cluster is degraded while it runs. It assumes the local
//! cluster of `scripts/services.sh` on ports 7000-7005.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::demo::compare;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().expect("redis-cli runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn cluster_ok(except: u16) -> bool {
    (7000..=7005)
        .filter(|port| *port != except)
        .all(|port| redis_cli(port, &["cluster", "info"]).contains("cluster_state:ok"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_master_fails_over_l3_stays_exact_and_l2_converges() {
    let _ = tracing_subscriber::fmt().with_env_filter("warn,sync_engine=info").try_init();
    let names = Names::new("redis_kill");
    create_topic(&names.topic, PARTITIONS).await;
    assert!(cluster_ok(0), "the cluster must be whole before the test");
    // A master with a replica, so the cluster can fail over.
    let master = (7000..=7005)
        .find(|port| {
            redis_cli(*port, &["role"]).starts_with("master")
                && redis_cli(*port, &["info", "replication"]).contains("connected_slaves:1")
        })
        .expect("a master with a replica");
    let pid: u32 = redis_cli(master, &["info", "server"])
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("master pid");

    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
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

    let failed_over = eventually(Duration::from_secs(60), || cluster_ok(master)).await;
    assert!(failed_over, "the cluster must fail over");
    let failover = killed_at.elapsed();
    // L2 converges through repair, without a restart.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut l2 = compare_l2(&names, &workload).await;
    while !l2.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        l2 = compare_l2(&names, &workload).await;
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
    // Bring the killed node back (it rejoins as a replica) for whoever runs next: the
    // services script restarts dead nodes of the local cluster (this test assumes 7000-7005).
    let services = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let restored =
        Command::new(services).env_remove("SYNC_TEST_REDIS_URLS").stdout(std::process::Stdio::null()).status().unwrap();
    assert!(restored.success() && cluster_ok(0), "services.sh restores the cluster");
    assert_eq!(l2.len(), 0, "L2 must converge to L3: {:?}", &l2[..l2.len().min(5)]);
}
