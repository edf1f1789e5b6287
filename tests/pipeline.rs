//! End to end against real services: Tansu → worker → Redis Cluster + MariaDB.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};
use sync_engine::workload::compare;
use sync_engine::workload::Workload;
use sync_engine::{ArchiveStore, CacheStore};

const PARTITIONS: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_version_of_every_id_lands_in_l2_and_l3_and_a_replay_changes_nothing() {
    let names = Names::new("e2e");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(spec(&names, 6_000, 1_500));
    let ends = produce(&names, &mut workload).await;

    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(90)).await;
    worker.stop().await;
    assert_eq!(committed, ends.0, "committed offsets must equal the end offsets");

    let rows = l3_rows(&names).await;
    assert_eq!(compare(&workload, &rows), Vec::<String>::new());
    assert!(rows.iter().any(|row| row.deleted), "the workload deletes some ids");
    assert_eq!(compare_l2(&names, &workload).await, Vec::<String>::new());

    // Replay: rewind the group and consume everything again.
    reset_to_earliest(&names, PARTITIONS);
    assert!(committed_is_zero(&names), "the reset must take effect");
    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(90)).await;
    let replayed = worker.stats.stored.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0);
    assert!(replayed >= 6_000, "the replay consumed only {replayed} records");
    assert_eq!(l3_rows(&names).await, rows, "a replay must not change a single L3 row (not even updated_at_ms)");
    assert_eq!(compare_l2(&names, &workload).await, Vec::<String>::new());
}

fn committed_is_zero(names: &Names) -> bool {
    committed(names, PARTITIONS).values().all(|offset| *offset == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_with_reasons_and_good_ones_land() {
    let names = Names::new("poison");
    create_topic(&names.topic, PARTITIONS).await;
    create_topic(&names.dlq_topic, 1).await;
    let mut workload =
        Workload::new(sync_engine::workload::WorkloadSpec { poison_share: 0.01, ..spec(&names, 10_000, 2_500) });
    let records: Vec<_> = workload.by_ref().collect();
    let mut poison_by_reason: HashMap<String, usize> = HashMap::new();
    for record in records.iter().filter_map(|record| record.poison_reason) {
        *poison_by_reason.entry(record.to_owned()).or_default() += 1;
    }
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    let ends = sync_engine::kafka::producer::publish_all(&producer, records, 0, || {}).await.unwrap();
    producer.flush();
    assert!(poison_by_reason.len() >= 4, "every kind of poison is produced: {poison_by_reason:?}");

    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(90)).await;
    let dead_lettered = worker.stats.dead_lettered.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0, "dead-lettered offsets settle, so the watermark reaches the end");
    assert_eq!(dead_lettered as usize, poison_by_reason.values().sum::<usize>());
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());

    let found = tokio::task::spawn_blocking({
        let names = names.clone();
        let total = dead_lettered as usize;
        move || read_dead_letters(&names, total)
    })
    .await
    .unwrap();
    assert_eq!(found, poison_by_reason, "each poison record is in the dead-letter topic with its reason");
}

/// A consumer of the test's dead-letter topic, from its start.
fn dead_letter_reader(names: &Names) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{}-reader", names.group))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[&names.dlq_topic]).unwrap();
    consumer
}

/// Reads `total` dead letters; checks their provenance headers; counts them by reason code.
fn read_dead_letters(names: &Names, total: usize) -> HashMap<String, usize> {
    let consumer = dead_letter_reader(names);
    let mut by_reason = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < total && std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let headers = message.headers().expect("dead letters carry headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        };
        assert_eq!(header("sync-dlq-topic").as_deref(), Some(names.topic.as_str()));
        assert!(header("sync-dlq-partition").is_some() && header("sync-dlq-offset").is_some());
        let reason = header("sync-dlq-reason").expect("reason header");
        let code = reason.split(':').next().unwrap().to_owned();
        *by_reason.entry(code).or_default() += 1;
        seen += 1;
    }
    by_reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memory_budget_pauses_and_resumes_partitions_and_loses_nothing() {
    let names = Names::new("pressure");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload =
        Workload::new(sync_engine::workload::WorkloadSpec { item_bytes: 2048, ..spec(&names, 12_000, 4_000) });
    let ends = produce(&names, &mut workload).await;
    let budget = 4u64 << 20; // the backlog is ~24 MiB: six times the budget
    let kafka = sync_engine::config::KafkaConfig { memory_budget_bytes: budget, ..kafka_config(&names) };
    let worker = InProcessWorker::start(&names, kafka).await;
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    let pauses = worker.stats.pauses.load(Ordering::Relaxed);
    let peak = worker.stats.peak_bytes_in_flight.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0);
    assert!(pauses > 0, "the worker must have paused under pressure");
    assert!(peak <= budget, "bytes in flight peaked at {peak}, over the {budget} budget");
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_joining_mid_stream_takes_partitions_through_a_revoke_and_nothing_is_lost() {
    let names = Names::new("group");
    create_topic(&names.topic, PARTITIONS).await;
    let mut workload = Workload::new(spec(&names, 16_000, 4_000));
    let first_part: Vec<_> = workload.by_ref().take(10_000).collect();
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    let mut ends = sync_engine::kafka::producer::publish_all(&producer, first_part, 0, || {}).await.unwrap();

    // Small batches keep the first worker busy, so the rebalance lands while it holds items.
    let slow = sync_engine::config::SyncEngineConfig {
        batch: sync_engine::batch::BatchConfig { max_items: 50, ..sync_engine::SyncEngineConfig::in_memory().batch },
        ..engine_config(&names)
    };
    let first = InProcessWorker::start_with(slow, kafka_config(&names)).await;
    let started = eventually(Duration::from_secs(30), || first.stats.stored.load(Ordering::Relaxed) > 0).await;
    assert!(started, "the first worker must be consuming before the second joins");
    let second = InProcessWorker::start(&names, kafka_config(&names)).await;
    let split = eventually(Duration::from_secs(40), || {
        let (a, b) = (
            first.stats.assigned_partitions.load(Ordering::Relaxed),
            second.stats.assigned_partitions.load(Ordering::Relaxed),
        );
        a > 0 && b > 0 && a + b == PARTITIONS as u64
    })
    .await;
    assert!(split, "the partitions must be split between the two workers");
    assert!(first.stats.revokes.load(Ordering::Relaxed) > 0, "the first worker went through a revoke");

    // More data after the split: both workers must take part.
    let rest: Vec<_> = workload.by_ref().collect();
    let more = sync_engine::kafka::producer::publish_all(&producer, rest, 0, || {}).await.unwrap();
    producer.flush();
    for (partition, end) in more.0 {
        ends.record(partition, end - 1);
    }
    let before = (first.stats.stored.load(Ordering::Relaxed), second.stats.stored.load(Ordering::Relaxed));
    let committed = wait_for_commits(&names, PARTITIONS, &ends, Duration::from_secs(120)).await;
    let after = (first.stats.stored.load(Ordering::Relaxed), second.stats.stored.load(Ordering::Relaxed));
    first.stop().await;
    second.stop().await;
    assert_eq!(committed, ends.0);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "both workers must store items after the split: {before:?} -> {after:?}"
    );
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());
    assert_eq!(compare_l2(&names, &workload).await, Vec::<String>::new());
}

// One record of 16x the item limit is over the dead-letter producer's `message.max.bytes`
// (the larger of 1 MiB and the limit + 64 KiB), so librdkafka refuses it for good
// (`MessageSizeTooLarge`). It must be dead-lettered without its value, and its partition
// must go on. (Tansu itself would take the 1 MiB record: the permanent error is the
// client's own size check, as with a broker's `message.max.bytes`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_dead_letter_topic_cannot_take_goes_there_without_its_value_and_the_partition_goes_on() {
    use sync_engine::workload::OutgoingRecord;
    let names = Names::new("huge");
    // The source topic takes records up to 8 MiB, the dead-letter topic keeps the broker's
    // default (about 1 MiB), as in a deployment where the DLQ was never tuned.
    create_topic_with(&names.topic, 1, &[("max.message.bytes", "8388608")]).await;
    create_topic(&names.dlq_topic, 1).await;
    let max_item_bytes = 64 << 10;
    let mut workload =
        Workload::new(sync_engine::workload::WorkloadSpec { max_item_bytes, ..spec(&names, 2_000, 500) });
    let mut records: Vec<_> = workload.by_ref().collect();
    let huge_value = OutgoingRecord {
        key: Some(b"huge-value".to_vec()),
        value: Some(vec![b'x'; 16 * max_item_bytes]),
        headers: vec![("trace-id".into(), b"abc".to_vec())],
        poison_reason: Some("oversize"),
    };
    records.insert(700, huge_value);
    // A 2 MiB key (an invalid id) is too large for the dead-letter topic even without a value:
    // logged, counted and settled all the same.
    let huge_key = OutgoingRecord {
        key: Some(vec![b'k'; 2 << 20]),
        value: Some(b"{}".to_vec()),
        headers: Vec::new(),
        poison_reason: Some("invalid_key"),
    };
    records.insert(1_400, huge_key);
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    let ends = sync_engine::kafka::producer::publish_all(&producer, records, 0, || {}).await.unwrap();
    producer.flush();

    let kafka = sync_engine::config::KafkaConfig { max_item_bytes, ..kafka_config(&names) };
    let worker = InProcessWorker::start(&names, kafka).await;
    let committed = wait_for_commits(&names, 1, &ends, Duration::from_secs(60)).await;
    let dead_lettered = worker.stats.dead_lettered.load(Ordering::Relaxed);
    let dropped = worker.stats.dead_letters_dropped.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0, "the partition goes on past both records");
    assert_eq!((dead_lettered, dropped), (1, 1), "one dead-lettered without its value, one dropped");
    assert_eq!(compare(&workload, &l3_rows(&names).await), Vec::<String>::new());

    let names_now = names.clone();
    let letters = tokio::task::spawn_blocking(move || read_raw_dead_letters(&names_now, 1)).await.unwrap();
    assert_eq!(letters.len(), 1);
    let (key, value, headers) = &letters[0];
    assert_eq!(key.as_deref(), Some(&b"huge-value"[..]));
    assert!(value.as_ref().is_none_or(|value| value.is_empty()), "the value is left out");
    let header = |name: &str| headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    assert_eq!(header("sync-dlq-value-bytes"), Some((16 * max_item_bytes).to_string().as_str()));
    assert_eq!(header("trace-id"), Some("abc"), "the record's own headers are kept");
    assert!(header("sync-dlq-reason").is_some_and(|reason| reason.starts_with("oversize:")));
    assert_eq!(header("sync-dlq-offset"), Some("700"));
}

/// Reads `total` dead letters as (key, value, headers).
#[allow(clippy::type_complexity)]
fn read_raw_dead_letters(
    names: &Names,
    total: usize,
) -> Vec<(Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>)> {
    let consumer = dead_letter_reader(names);
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < total && std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (header.key.to_owned(), String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        letters.push((message.key().map(<[u8]>::to_vec), message.payload().map(<[u8]>::to_vec), headers));
    }
    letters
}

// The load generator paces records (`produce --rate`, the scale test, the benchmark): each
// record must reach the broker when it is due, not when 20,000 sends have piled up. (Before
// the fix nothing was sent until the last record was pushed, 5 s in.)
#[tokio::test]
async fn a_paced_publish_delivers_records_as_it_goes() {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    let names = Names::new("paced_publish");
    create_topic(&names.topic, 2).await;
    let mut records = Workload::new(spec(&names, 5_001, 1_000));
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    // One record first, so the producer knows the new topic's leaders before the clock runs.
    let first: Vec<_> = records.by_ref().take(1).collect();
    sync_engine::kafka::producer::publish_all(&producer, first, 0, || {}).await.expect("first record delivered");
    let paced: Vec<_> = records.collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let counted = delivered.clone();
    let publishing = async {
        sync_engine::kafka::producer::publish_all(&producer, paced, 1_000, || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .await
    };
    let halfway = async {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        delivered.load(Ordering::Relaxed)
    };
    let (published, at_halfway) = tokio::join!(publishing, halfway);
    published.expect("every record delivered");
    assert_eq!(delivered.load(Ordering::Relaxed), 5_000);
    // About 2,500 are due at 2.5 s; any delivery at all shows records leave as they are due.
    assert!(at_halfway > 0, "none of 5,000 records paced over 5 s was delivered halfway through");
    eprintln!("paced publish: {at_halfway} of 5,000 delivered at 2.5 s (about 2,500 due)");
}

/// The `sync-state` header end to end: a valid one lands in L2 and L3 with its item and a
/// newer record without it clears it; an invalid one is a dead letter naming the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_header_lands_in_every_tier_and_an_invalid_one_is_dead_lettered() {
    use sync_engine::workload::OutgoingRecord;
    let names = Names::new("state_header");
    create_topic(&names.topic, 1).await;
    create_topic(&names.dlq_topic, 1).await;
    let record = |id: &str, version: u64, state: Option<&[u8]>| {
        let mut headers = vec![("sync-version".to_owned(), version.to_string().into_bytes())];
        if let Some(state) = state {
            headers.push(("sync-state".to_owned(), state.to_vec()));
        }
        OutgoingRecord { key: Some(id.into()), value: Some(b"x".to_vec()), headers, poison_reason: None }
    };
    let records = vec![
        record("s.active", 5, Some(b"active")),
        record("s.bad", 5, Some(b"not valid")),
        record("s.cleared", 5, Some(b"pending")),
        record("s.cleared", 6, None),
        record("s.none", 5, None),
    ];
    let producer = sync_engine::kafka::producer::ItemProducer::new(&brokers(), &names.topic).unwrap();
    let ends = sync_engine::kafka::producer::publish_all(&producer, records, 0, || {}).await.unwrap();
    producer.flush();

    let worker = InProcessWorker::start(&names, kafka_config(&names)).await;
    let committed = wait_for_commits(&names, 1, &ends, Duration::from_secs(60)).await;
    let dead_lettered = worker.stats.dead_lettered.load(Ordering::Relaxed);
    worker.stop().await;
    assert_eq!(committed, ends.0);
    assert_eq!(dead_lettered, 1);

    let l3 = sync_engine::storage::sql::SqlStore::connect(&mysql_url(), &names.table).await.unwrap();
    let l2 = sync_engine::storage::redis::RedisStore::connect(&redis_urls(), &names.prefix).await.unwrap();
    let expected = [("s.active", Some("active")), ("s.cleared", None), ("s.none", None)];
    for (id, state) in expected {
        assert_eq!(l3.get(id).await.unwrap().expect("in L3").state.as_deref(), state, "{id} in L3");
        assert_eq!(l2.get(id).await.unwrap().expect("in L2").state.as_deref(), state, "{id} in L2");
    }
    assert_eq!(l3.get("s.bad").await.unwrap(), None, "an invalid state writes nothing");
    l3.close().await;

    let reason = tokio::task::spawn_blocking({
        let names = names.clone();
        move || {
            let consumer = dead_letter_reader(&names);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
                let headers = message.headers().expect("dead letters carry headers");
                return headers
                    .iter()
                    .find(|header| header.key == "sync-dlq-reason")
                    .and_then(|header| header.value)
                    .map(|value| String::from_utf8_lossy(value).into_owned());
            }
            None
        }
    })
    .await
    .unwrap()
    .expect("the dead letter arrives with a reason");
    assert!(reason.starts_with("bad_header: bad header sync-state: "), "{reason}");
    assert!(reason.contains("' '"), "the reason says what is wrong: {reason}");
}
