//! The broker made unreachable mid-stream (frozen with SIGSTOP for 12 s, then resumed): the
//! worker reconnects and continues, and the final state is exact. The frozen broker is a
//! private Tansu of this test's own (the pinned binary `scripts/services.sh` installed, on a
//! free port), never the shared one. (Tansu here keeps its data in memory, so a restart would
//! lose the topic itself; a freeze is the outage it survives.)

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 4;

/// A Tansu broker of this test's own on a free loopback port; killed when dropped.
struct PrivateBroker {
    child: std::process::Child,
    address: String,
}

impl PrivateBroker {
    fn start() -> PrivateBroker {
        let services = std::env::var("SYNC_SERVICES_DIR").unwrap_or_else(|_| "/tmp/sync-engine-services".into());
        let binary = format!("{services}/tansu/tansu");
        let address = format!("127.0.0.1:{}", free_port());
        let url = format!("tcp://{address}");
        let child = Command::new(&binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("{binary} (installed by scripts/services.sh) runs: {error}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "private broker did not listen on {address}");
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateBroker { child, address }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let broker = PrivateBroker::start();
    // The only test in this binary: every helper below talks to the private broker.
    std::env::set_var("SYNC_TEST_KAFKA_BROKERS", &broker.address);
    let names = Names::new("broker_freeze");
    create_topic(&names.topic, PARTITIONS).await;
    // Tansu's group coordinator assigns with `range` only.
    let mut kafka = kafka_config(&names);
    kafka.passthrough.insert("partition.assignment.strategy".into(), sync_engine::config::Secret::new("range"));
    let worker = InProcessWorker::start(&names, kafka).await;
    let mut workload = Workload::new(spec(&names, 10_000, 3_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let before: Vec<_> = workload.by_ref().take(5_000).collect();
    let mut ends = publish_all(&producer, before, 0, || {}).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || worker.stats.stored.load(Ordering::Relaxed) >= 5_000).await);

    let frozen = Frozen::new(broker.child.id());
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
