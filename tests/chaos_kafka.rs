//! The broker restarted mid-stream, twice: a clean stop (SIGTERM, controlled shutdown) and a
//! crash (`kill -9`), each followed by a start on the same data. The worker reconnects,
//! continues, and the final state is exact: nothing lost, no old version won. The broker is
//! a private Apache Kafka of this test's own (`scripts/kafka.sh start PORT NAME` on a free
//! port, its own data dir, removed at the end), never the shared one.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

/// An Apache Kafka broker of this test's own; removed (stopped, data deleted) when dropped.
struct PrivateKafka {
    name: String,
    port: u16,
}

impl PrivateKafka {
    fn start() -> PrivateKafka {
        let kafka = PrivateKafka { name: format!("restart-{}", std::process::id()), port: free_port() };
        kafka.run("start");
        kafka
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&self, action: &str) {
        let mut command = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh"));
        command.arg(action);
        if action == "start" {
            command.arg(self.port.to_string());
        }
        let status = command.arg(&self.name).stdout(std::process::Stdio::null()).status().expect("kafka.sh runs");
        assert!(status.success(), "scripts/kafka.sh {action} {} failed", self.name);
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.run("remove");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_nothing_after_a_clean_stop_and_after_a_crash() {
    let broker = PrivateKafka::start();
    // The only test in this binary: every helper below talks to the private broker.
    std::env::set_var("SYNC_TEST_KAFKA_BROKERS", broker.address());
    let names = Names::new("broker_restart");
    create_topic(&names.topic, PARTITIONS).await;
    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let mut workload = Workload::new(spec(&names, 15_000, 4_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();

    let first: Vec<_> = workload.by_ref().take(5_000).collect();
    let mut ends = publish_all(&producer, first, 0, || {}).await.unwrap();
    assert!(eventually(Duration::from_secs(60), || worker.stats.stored.load(Ordering::Relaxed) >= 2_000).await);
    let mut outages = Vec::new();
    for (action, count) in [("stop", 5_000), ("kill", 5_000)] {
        let down_at = Instant::now();
        broker.run(action);
        // Down for a while: the worker's fetches, commits and the producer's sends all fail.
        tokio::time::sleep(Duration::from_secs(5)).await;
        broker.run("start");
        let up_at = Instant::now();
        let more: Vec<_> = workload.by_ref().take(count).collect();
        publish_more(&producer, more, &mut ends).await;
        outages.push((action, up_at.duration_since(down_at)));
    }
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(180)).await;
    let stats = (worker.stats.consumed.load(Ordering::Relaxed), worker.stats.stored.load(Ordering::Relaxed));
    worker.stop().await;
    assert_eq!(committed, ends.0, "the worker commits every record after the restarts");
    let l3 = compare(&workload, &l3_rows(&names).await);
    let l2 = compare_l2(&names, &workload).await;
    eprintln!(
        "chaos broker_restart: records 15000, ids {}, consumed {} (redelivered {}), L3 mismatches {}, L2 mismatches {}, outages {:?}",
        workload.expected().len(),
        stats.0,
        stats.0.saturating_sub(15_000),
        l3.len(),
        l2.len(),
        outages
    );
    assert_eq!(l3, Vec::<String>::new());
    assert_eq!(l2, Vec::<String>::new());
}
