//! Scaling under load against Apache Kafka: three worker processes in one group, scaled to one
//! (SIGTERM, as Kubernetes does) and back to four, then one `kill -9`ed and restarted under
//! its old name (a pod the kubelet restarts), while a producer keeps publishing. Nothing is
//! lost, no old version wins, duplicates are counted, and the stall (the longest gap between
//! two advances of a partition's committed offset while records keep coming) is measured.
//!
//! Defaults are the shipped ones: cooperative-sticky assignment, static membership (each
//! worker's `SYNC_KAFKA_INSTANCE_ID` is its "pod name"). `SYNC_TEST_SCALE_STRATEGY=range` and
//! `SYNC_TEST_SCALE_STATIC=0` run the same scenario with eager rebalancing and dynamic
//! membership, for the comparison in the README.

mod common;

use std::collections::HashMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 8;
const RECORDS: usize = 45_000;
const RATE_PER_SEC: u64 = 1_500;

struct Pod {
    name: String,
    port: u16,
    child: Child,
}

struct Scenario {
    names: Names,
    strategy: String,
    static_membership: bool,
    pods: Vec<Pod>,
    /// Last `sync_records_consumed_total` seen per pod name and incarnation.
    consumed: Arc<Mutex<HashMap<(String, u32), u64>>>,
    events: Vec<(Duration, String)>,
    started: Instant,
}

impl Scenario {
    fn start_pod(&mut self, name: &str) {
        let port = free_port();
        let wal_dir = self.names.wal_dir().join(name);
        let instance_id = if self.static_membership { format!("{}-{name}", self.names.group) } else { String::new() };
        let child = spawn_worker(
            &self.names,
            port,
            &[
                ("SYNC_WAL_DIR", wal_dir.display().to_string()),
                ("SYNC_KAFKA_INSTANCE_ID", instance_id),
                ("SYNC_KAFKA_OPT_PARTITION_ASSIGNMENT_STRATEGY", self.strategy.clone()),
                ("SYNC_LOG", std::env::var("SYNC_TEST_SCALE_LOG").unwrap_or_else(|_| "warn".into())),
            ],
        );
        self.pods.push(Pod { name: name.to_owned(), port, child });
        self.event(format!("start {name}"));
    }

    fn take_pod(&mut self, name: &str) -> Pod {
        let index = self.pods.iter().position(|pod| pod.name == name).expect("pod runs");
        self.pods.remove(index)
    }

    /// SIGTERM and wait for the exit, as a scale-down does.
    async fn stop_pod(&mut self, name: &str) {
        let mut pod = self.take_pod(name);
        self.scrape(&pod);
        signal(&pod.child, "TERM");
        let status = wait_exit(&mut pod.child, Duration::from_secs(40)).await;
        assert!(status.is_some_and(|status| status.success()), "{name} exits cleanly on SIGTERM: {status:?}");
        self.event(format!("stopped {name}"));
    }

    async fn kill_pod(&mut self, name: &str) {
        let mut pod = self.take_pod(name);
        self.scrape(&pod);
        signal(&pod.child, "KILL");
        let _ = wait_exit(&mut pod.child, Duration::from_secs(10)).await;
        self.event(format!("kill -9 {name}"));
    }

    fn scrape(&self, pod: &Pod) {
        scrape_consumed(&self.consumed, pod.port, &pod.name, pod.child.id());
    }

    fn event(&mut self, what: String) {
        eprintln!("scale: {:>6.1}s {what}", self.started.elapsed().as_secs_f64());
        self.events.push((self.started.elapsed(), what));
    }

    async fn all_ready(&self) {
        for pod in &self.pods {
            assert!(wait_ready(pod.port, Duration::from_secs(60)).await, "{} becomes ready", pod.name);
        }
    }
}

fn scrape_consumed(consumed: &Mutex<HashMap<(String, u32), u64>>, port: u16, name: &str, pid: u32) {
    let Some(body) = http_get(port, "/metrics") else { return };
    let total: u64 = body
        .lines()
        .filter(|line| line.starts_with("sync_records_consumed_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .sum();
    consumed.lock().unwrap().insert((name.to_owned(), pid), total);
}

/// The partitions whose `sync_consumer_lag_seconds` a pod exports.
fn lag_partitions(port: u16) -> Vec<i32> {
    let body = http_get(port, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|line| line.starts_with("sync_consumer_lag_seconds{"))
        .filter_map(|line| line.split("partition=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect()
}

/// The group's committed offsets, polled by one client that never joins the group; each
/// partition's advances are timestamped.
fn watch_commits(
    names: &Names,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<(Instant, i64)>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &names.group)
        .create()
        .expect("consumer");
    let topic = names.topic.clone();
    std::thread::spawn(move || {
        let mut advances: Vec<Vec<(Instant, i64)>> = vec![Vec::new(); PARTITIONS as usize];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut list = TopicPartitionList::new();
            for partition in 0..PARTITIONS {
                list.add_partition(&topic, partition);
            }
            let read = consumer.committed_offsets(list, Duration::from_secs(5));
            if let Err(error) = &read {
                eprintln!("scale: reading committed offsets failed: {error}");
            }
            if let Ok(committed) = read {
                let now = Instant::now();
                for element in committed.elements() {
                    if let Offset::Offset(offset) = element.offset() {
                        let partition = &mut advances[element.partition() as usize];
                        if partition.last().is_none_or(|(_, last)| offset > *last) {
                            partition.push((now, offset));
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        advances
    })
}

/// Every gap between two commit advances of a partition within `[from, to]` (records were
/// being produced to every partition all along), as (start, end).
fn gaps(advances: &[Vec<(Instant, i64)>], from: Instant, to: Instant) -> impl Iterator<Item = (Instant, Instant)> + '_ {
    advances.iter().flat_map(move |partition| {
        let mut times: Vec<Instant> =
            partition.iter().map(|(at, _)| *at).filter(|at| *at >= from && *at <= to).collect();
        times.insert(0, from);
        times.push(to);
        times.windows(2).map(|pair| (pair[0], pair[1])).collect::<Vec<_>>()
    })
}

/// The longest gap between two commit advances of each partition within `[from, to]`.
fn stalls(advances: &[Vec<(Instant, i64)>], from: Instant, to: Instant) -> Vec<(Duration, Instant)> {
    advances
        .iter()
        .map(|partition| {
            gaps(std::slice::from_ref(partition), from, to)
                .map(|(start, end)| (end - start, start))
                .max_by_key(|(gap, _)| *gap)
                .expect("at least the window's two ends")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_scaled_down_up_and_killed_under_load_lose_nothing_and_stall_briefly() {
    let strategy = std::env::var("SYNC_TEST_SCALE_STRATEGY").unwrap_or_else(|_| "cooperative-sticky".into());
    let static_membership = std::env::var("SYNC_TEST_SCALE_STATIC").map_or(true, |value| value != "0");
    let names = Names::new("scale");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(spec(&names, RECORDS as u64, 10_000));
    let records: Vec<_> = workload.by_ref().collect();
    let started = Instant::now();
    let mut scenario = Scenario {
        names: names.clone(),
        strategy: strategy.clone(),
        static_membership,
        pods: Vec::new(),
        consumed: Arc::default(),
        events: Vec::new(),
        started,
    };
    for name in ["w0", "w1", "w2"] {
        scenario.start_pod(name);
    }
    scenario.all_ready().await;
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_commits(&names, watching.clone());
    let brokers = brokers();
    let topic = names.topic.clone();
    let publishing = tokio::spawn(async move {
        let producer = ItemProducer::new(&brokers, &topic).unwrap();
        let ends = publish_all(&producer, records, RATE_PER_SEC, || {}).await;
        producer.flush();
        ends
    });
    let producing_from = Instant::now();
    scenario.event("producing".into());

    // Scrape every pod's consumed count now and then (a killed pod's last count is kept).
    let scraping = {
        let consumed = scenario.consumed.clone();
        let ports: Arc<Mutex<Vec<(u16, String, u32)>>> = Arc::default();
        let ports_in = ports.clone();
        let handle = tokio::spawn(async move {
            loop {
                let pods = ports_in.lock().unwrap().clone();
                for (port, name, pid) in pods {
                    let consumed = consumed.clone();
                    let _ = tokio::task::spawn_blocking(move || scrape_consumed(&consumed, port, &name, pid)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        (handle, ports)
    };
    let refresh_ports = |scenario: &Scenario| {
        *scraping.1.lock().unwrap() =
            scenario.pods.iter().map(|pod| (pod.port, pod.name.clone(), pod.child.id())).collect();
    };
    refresh_ports(&scenario);

    tokio::time::sleep(Duration::from_secs(6)).await;
    // Scale to one.
    scenario.stop_pod("w1").await;
    scenario.stop_pod("w2").await;
    refresh_ports(&scenario);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Scale to four: the two come back under their names, one is new.
    for name in ["w1", "w2", "w3"] {
        scenario.start_pod(name);
    }
    scenario.all_ready().await;
    refresh_ports(&scenario);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A crash, then the kubelet restarts the pod under its name.
    scenario.kill_pod("w3").await;
    refresh_ports(&scenario);
    tokio::time::sleep(Duration::from_secs(2)).await;
    scenario.start_pod("w3");
    scenario.all_ready().await;
    refresh_ports(&scenario);

    let ends = publishing.await.unwrap().expect("every record delivered");
    let producing_until = Instant::now();
    scenario.event("produced".into());
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    scenario.event("all committed".into());
    watching.store(true, std::sync::atomic::Ordering::Relaxed);
    let advances = watcher.join().unwrap();
    // After all the moves, each partition's lag is exported by exactly the pod that owns it
    // now: no pod keeps a series of a partition it lost (the autoscaler would read it).
    let owners_agree = eventually(Duration::from_secs(15), || {
        let mut exported: Vec<i32> = scenario.pods.iter().flat_map(|pod| lag_partitions(pod.port)).collect();
        exported.sort_unstable();
        exported == (0..PARTITIONS).collect::<Vec<_>>()
    })
    .await;
    let exported: Vec<(String, Vec<i32>)> =
        scenario.pods.iter().map(|pod| (pod.name.clone(), lag_partitions(pod.port))).collect();
    assert!(owners_agree, "each partition's lag in seconds comes from one pod: {exported:?}");
    for name in ["w0", "w1", "w2", "w3"] {
        scenario.stop_pod(name).await;
    }
    scraping.0.abort();

    assert_eq!(committed, ends.0, "every record committed");
    let l3 = compare(&workload, &l3_rows(&names).await);
    let l2 = compare_l2(&names, &workload).await;
    let consumed: u64 = scenario.consumed.lock().unwrap().values().sum();
    let stalls = stalls(&advances, producing_from, producing_until);
    let mut report = String::new();
    for (partition, (gap, at)) in stalls.iter().enumerate() {
        report.push_str(&format!(" p{partition}:{:.1}s@{:.1}s", gap.as_secs_f64(), (*at - started).as_secs_f64()));
    }
    // For each scaling event, the longest commit gap of any partition that spans it.
    for (at, what) in &scenario.events {
        let at = started + *at;
        let spanning: Vec<Duration> = gaps(&advances, producing_from, producing_until)
            .filter(|(start, end)| *start <= at && at < *end)
            .map(|(start, end)| end - start)
            .collect();
        let longest = spanning.iter().max().copied().unwrap_or_default();
        let stalled = spanning.iter().filter(|gap| **gap > Duration::from_secs(1)).count();
        report.push_str(&format!(
            "\n  {what}: longest gap spanning it {:.1}s, partitions stalled over 1 s: {stalled}",
            longest.as_secs_f64()
        ));
    }
    let worst = stalls.iter().map(|(gap, _)| *gap).max().unwrap_or_default();
    eprintln!(
        "scale: strategy {strategy}, static membership {static_membership}: records {RECORDS}, ids {}, consumed at least {consumed} \
         (duplicates at least {}), L3 mismatches {}, L2 mismatches {}, longest commit stall {:.1}s; per partition:{report}",
        workload.expected().len(),
        consumed.saturating_sub(RECORDS as u64),
        l3.len(),
        l2.len(),
        worst.as_secs_f64()
    );
    assert_eq!(l3, Vec::<String>::new(), "L3 holds the newest version of every id");
    assert_eq!(l2, Vec::<String>::new(), "L2 holds the newest version of every id");
}
