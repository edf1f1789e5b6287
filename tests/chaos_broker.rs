//! The broker made unreachable mid-stream (frozen with SIGSTOP for 12 s, then resumed): the
//! worker reconnects and continues, and the final state is exact. In its own test binary:
//! every client of the shared broker stalls while it runs. (Tansu here keeps its data in
//! memory, so a restart would lose the topic itself; a freeze is the outage it survives.)

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::demo::compare;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

fn broker_pid() -> u32 {
    let port = brokers().rsplit(':').next().unwrap_or("9092").to_owned();
    let output = Command::new("pgrep").arg("-f").arg(format!("tansu broker .*{port}")).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .and_then(|pid| pid.trim().parse().ok())
        .expect("the tansu broker runs")
}

fn signal_pid(pid: u32, signal: &str) {
    assert!(Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success());
}

/// Freezes the broker; resumes it when dropped, even if the test panics.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        signal_pid(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.0.to_string()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_stalls_the_worker_which_then_continues_and_loses_nothing() {
    let names = Names::new("broker_freeze");
    create_topic(&names.topic, PARTITIONS).await;
    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let mut workload = Workload::new(spec(&names, 10_000, 3_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let before: Vec<_> = workload.by_ref().take(5_000).collect();
    let mut ends = publish_all(&producer, before, 0, || {}).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || worker.stats.stored.load(Ordering::Relaxed) >= 5_000).await);

    let pid = broker_pid();
    let frozen = Frozen::new(pid);
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    drop(frozen);
    let resumed_at = Instant::now();

    let after: Vec<_> = workload.by_ref().collect();
    publish_more(&producer, after, &mut ends).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    let recovered = resumed_at.elapsed();
    worker.stop().await;
    assert_eq!(committed, ends.0, "the worker continues after the broker returns");
    let l3 = compare(&workload, &l3_rows(&names).await);
    let l2 = compare_l2(&names, &workload).await;
    eprintln!(
        "chaos broker_freeze: records 10000, ids {}, L3 mismatches {}, L2 mismatches {}, frozen {:.1}s, caught up {:.1}s after resume",
        workload.expected().len(),
        l3.len(),
        l2.len(),
        resumed_at.duration_since(frozen_at).as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert_eq!(l3, Vec::<String>::new());
    assert_eq!(l2, Vec::<String>::new());
}
