//! `sync-engine replay` (issue 9, item 3), the real binary against the real services: a dry
//! run changes nothing; a running worker makes it refuse and name the member; a replay to the
//! earliest offsets, and one to a time between two produce phases, move the committed
//! offsets where they should, and the re-read leaves L3 and L2 exactly as they were.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::kafka::group;
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::workload::Workload;

const PARTITIONS: i32 = 3;

/// Runs `sync-engine replay --group … --topic … ARGS` with only the broker address set.
async fn run_replay(names: &Names, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
    command
        .arg("replay")
        .args(["--group", &names.group, "--topic", &names.topic])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SYNC_KAFKA_BROKERS", brokers());
    let output = tokio::task::spawn_blocking(move || command.output().expect("replay runs")).await.unwrap();
    eprintln!(
        "replay {args:?} -> {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The printed table: partition → (before, after, re-read).
fn table(output: &Output) -> BTreeMap<i32, (String, String, i64)> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let partition = cells.first()?.parse().ok()?;
            Some((partition, (cells[1].to_owned(), cells[2].to_owned(), cells[3].parse().ok()?)))
        })
        .collect()
}

async fn committed_now(names: &Names) -> HashMap<i32, i64> {
    let names = names.clone();
    tokio::task::spawn_blocking(move || committed(&names, PARTITIONS)).await.unwrap()
}

/// The group's members as the broker lists them.
async fn members(names: &Names) -> Vec<group::Member> {
    let group = names.group.clone();
    tokio::task::spawn_blocking(move || {
        let client = group::client(&brokers(), &group).unwrap();
        group::group_members(&client, &group).unwrap().1
    })
    .await
    .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

type L3 = Vec<sync_engine::storage::RowSummary>;
type L2 = BTreeMap<String, Option<(u64, Option<[u8; 32]>)>>;

/// L2 without the TTLs (they count down): version and content hash per id.
async fn l2_versions(names: &Names, workload: &Workload) -> L2 {
    let state = l2_state(names, workload.expected().keys().cloned()).await;
    state.into_iter().map(|(id, entry)| (id, entry.map(|(version, hash, _ttl)| (version, hash)))).collect()
}

/// Runs a worker from the committed offsets until it has committed `ends` again; returns the
/// records it consumed.
async fn run_worker_to_the_end(names: &Names, ends: &sync_engine::kafka::producer::EndOffsets) -> u64 {
    let worker = InProcessWorker::start(names, kafka_config(names)).await;
    let committed = wait_for_commits(names, PARTITIONS, ends, Duration::from_secs(90)).await;
    let consumed = worker.stats.consumed.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0, "the worker commits up to the end");
    consumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_while_workers_run_and_a_replay_to_earliest_or_to_a_time_changes_no_tier() {
    let started = Instant::now();
    let names = Names::new("replay_cmd");
    create_topic(&names.topic, PARTITIONS).await;

    // Two produce phases with a gap: a time inside it selects exactly the second phase.
    let mut workload = Workload::new(spec(&names, 4_000, 1_000));
    let producer = ItemProducer::new(&brokers(), &names.topic).unwrap();
    let first: Vec<_> = workload.by_ref().take(2_000).collect();
    let mut ends = publish_all(&producer, first, 0, || {}).await.expect("phase one delivered");
    producer.flush();
    let phase_two_starts: HashMap<i32, i64> =
        (0..PARTITIONS).map(|p| (p, ends.0.get(&p).copied().unwrap_or(0))).collect();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let between = now_ms();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let second: Vec<_> = workload.by_ref().collect();
    publish_more(&producer, second, &mut ends).await;
    let total: i64 = ends.0.values().sum();
    assert_eq!(total, 4_000);
    assert!(phase_two_starts.iter().all(|(p, start)| *start < ends.0[p]), "every partition has phase-two records");

    // The first pass settles everything; the snapshot is what every replay must leave.
    let consumed = run_worker_to_the_end(&names, &ends).await;
    assert!(consumed >= 4_000);
    let rows: L3 = l3_rows(&names).await;
    assert_eq!(sync_engine::workload::compare(&workload, &rows), Vec::<String>::new(), "the first pass is exact");
    let l2 = l2_versions(&names, &workload).await;
    assert_eq!(compare_l2(&names, &workload).await, Vec::<String>::new(), "L2 holds every id after the first pass");

    // (a) A dry run prints the move and commits nothing.
    let dry = run_replay(&names, &["--to-earliest", "--dry-run"]).await;
    assert!(dry.status.success(), "the dry run succeeds");
    let printed = table(&dry);
    for partition in 0..PARTITIONS {
        let end = ends.0[&partition];
        assert_eq!(printed[&partition], (end.to_string(), "0".to_owned(), end), "dry-run row of partition {partition}");
    }
    assert!(String::from_utf8_lossy(&dry.stdout).contains("dry run: nothing committed"));
    assert_eq!(committed_now(&names).await, ends.0, "a dry run commits nothing");

    // (b) With a worker in the group, the replay refuses and names the member; the broker
    // itself also refuses a commit from outside a non-empty group.
    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_group = Vec::new();
    while in_group.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        in_group = members(&names).await;
    }
    assert_eq!(in_group.len(), 1, "the worker joined the group");
    let refused = run_replay(&names, &["--to-earliest"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the replay refuses while a worker runs");
    assert!(stderr.contains("stop the workers first"), "{stderr}");
    assert!(stderr.contains(&in_group[0].id), "the message names member {}: {stderr}", in_group[0].id);
    assert!(stderr.contains(&in_group[0].host), "the message names the member's host: {stderr}");
    let dry_refused = run_replay(&names, &["--to-earliest", "--dry-run"]).await;
    assert!(!dry_refused.status.success(), "a dry run goes through the same member check");
    let group = names.group.clone();
    let topic = names.topic.clone();
    let outside_commit = tokio::task::spawn_blocking(move || {
        let client = group::client(&brokers(), &group).unwrap();
        group::commit_offsets(&client, &topic, &[(0, 0)])
    })
    .await
    .unwrap();
    assert!(outside_commit.is_err(), "the broker refuses a commit from outside a group with members");
    eprintln!("a commit from outside the running group: {:#}", outside_commit.as_ref().unwrap_err());
    worker.stop().await;
    assert_eq!(committed_now(&names).await, ends.0, "nothing moved while the worker ran");

    // (c) Stopped: replay everything. The offsets go to the earliest, a worker re-reads it all,
    // and L3 and L2 are unchanged.
    assert!(members(&names).await.is_empty(), "a stopped in-process worker leaves the group");
    let replayed = run_replay(&names, &["--to-earliest"]).await;
    assert!(replayed.status.success(), "the replay to the earliest offsets succeeds");
    assert_eq!(table(&replayed), table(&dry), "the real run prints what the dry run did");
    assert_eq!(committed_now(&names).await, (0..PARTITIONS).map(|p| (p, 0)).collect(), "offsets at the earliest");
    let consumed = run_worker_to_the_end(&names, &ends).await;
    assert!(consumed >= 4_000, "the worker re-read everything, consumed {consumed}");
    assert_eq!(l3_rows(&names).await, rows, "a replay changes no L3 row (not even updated_at_ms)");
    assert_eq!(l2_versions(&names, &workload).await, l2, "a replay changes no L2 version");

    // (d) Replay from a time between the phases: the offsets move to where phase two begins.
    let at = sync_engine::rfc3339::format_datetime(between);
    let replayed = run_replay(&names, &["--to-datetime", &at]).await;
    assert!(replayed.status.success(), "the replay to {at} succeeds");
    assert_eq!(committed_now(&names).await, phase_two_starts, "offsets at the first record of phase two");
    let rereads: i64 = table(&replayed).values().map(|(_, _, reread)| reread).sum();
    assert_eq!(rereads, 2_000, "the table counts phase two as re-read");
    let consumed = run_worker_to_the_end(&names, &ends).await;
    assert!(consumed >= 2_000, "the worker re-read phase two, consumed {consumed}");
    assert_eq!(l3_rows(&names).await, rows, "a replay from the middle changes no L3 row");
    assert_eq!(l2_versions(&names, &workload).await, l2, "a replay from the middle changes no L2 version");
    eprintln!("replay command test took {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_commits_for_a_new_group_and_refuses_bad_targets() {
    let names = Names::new("replay_args");
    create_topic(&names.topic, 2).await;
    let mut workload = Workload::new(spec(&names, 50, 20));
    let ends = produce(&names, &mut workload).await;
    let end0 = ends.0[&0];

    // A group that never existed: committing creates it; partition 1 stays without an offset.
    let moved = run_replay(&names, &["--to-offset", "0:1"]).await;
    assert!(moved.status.success());
    let rows = table(&moved);
    assert_eq!(rows[&0], ("-".to_owned(), "1".to_owned(), 0));
    assert_eq!(rows[&1], ("-".to_owned(), "-".to_owned(), 0));
    assert_eq!(committed(&names, 2), HashMap::from([(0, 1)]));

    // Shift forward, clamped at the end; the uncommitted partition is left alone.
    let shifted = run_replay(&names, &["--shift-by", &format!("+{}", end0 + 5)]).await;
    assert!(shifted.status.success());
    assert_eq!(committed(&names, 2), HashMap::from([(0, end0)]));
    let back = run_replay(&names, &["--shift-by", "-1"]).await;
    assert!(back.status.success());
    assert_eq!(table(&back)[&0], (end0.to_string(), (end0 - 1).to_string(), 1));
    assert_eq!(committed(&names, 2), HashMap::from([(0, end0 - 1)]));

    // Refused, with nothing changed: an unknown partition, an offset past the end, an unknown
    // topic, a malformed value.
    let error_of = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();
    let unknown_partition = run_replay(&names, &["--to-offset", "0:0,7:0"]).await;
    assert!(!unknown_partition.status.success());
    assert!(error_of(&unknown_partition).contains("partition 7 does not exist"), "{}", error_of(&unknown_partition));
    let past_end = run_replay(&names, &["--to-offset", &format!("0:{}", end0 + 1)]).await;
    assert!(!past_end.status.success());
    assert!(error_of(&past_end).contains("outside"), "{}", error_of(&past_end));
    let malformed = run_replay(&names, &["--to-datetime", "2026-11-27 10:00"]).await;
    assert!(!malformed.status.success());
    assert!(error_of(&malformed).contains("RFC 3339"), "{}", error_of(&malformed));
    assert_eq!(committed(&names, 2), HashMap::from([(0, end0 - 1)]), "refused replays change nothing");
    let mut other = names.clone();
    other.topic = format!("{}_missing", names.topic);
    let unknown_topic = run_replay(&other, &["--to-earliest"]).await;
    assert!(!unknown_topic.status.success());
    assert!(error_of(&unknown_topic).contains("unknown topic"), "{}", error_of(&unknown_topic));
}
