//! `sync-engine demo`: the main job on an embedded default, no services needed.
//!
//! An in-process Kafka (librdkafka's `MockCluster`), L2 in memory (`MemoryCacheStore`, no
//! Redis), L3 on a SQLite file in a temp dir. It produces a workload (updates, out-of-order
//! versions, deletes, duplicates and a few poison records) while the real worker consumes
//! it, then checks every id's final version and content hash in L3 against what was
//! produced, and that every L2 entry holds what L3 holds (invariant 6).
//!
//! The mock broker keeps at most 5 MiB per partition (hard-coded in librdkafka) and silently
//! drops older records, so the producer stays at most `LEAD_BYTES` ahead of the worker, and a
//! run that stops making progress fails (`Stall`) instead of waiting forever.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use sync_engine::config::{KafkaConfig, Secret, SyncEngineConfig};
use sync_engine::kafka::producer::{publish_all, ItemProducer};
use sync_engine::kafka::worker::{self, WorkerStats};
use sync_engine::storage::RowSummary;
use sync_engine::workload::{compare, Workload, WorkloadSpec};
use sync_engine::{ArchiveStore, CacheStore, MemoryCacheStore, SyncEngine, SyncItem};

use super::progress_bar;

const TOPIC: &str = "demo-items";
const DLQ_TOPIC: &str = "demo-dlq";
const PARTITIONS: i32 = 8;
/// Bytes produced ahead of the records settled: ~1.5 MiB per partition, well inside the 5 MiB
/// the mock broker keeps, so no record is dropped before it settles. Counted in bytes: with
/// 16 KiB items, 12,000 records ahead (the bound this replaced) was 24 MiB per partition, the
/// broker dropped records and the demo waited for them forever.
const LEAD_BYTES: u64 = PARTITIONS as u64 * (3 << 19);
/// What a record costs the broker beside its content: key, headers, framing (an upper bound).
const RECORD_OVERHEAD_BYTES: u64 = 256;
/// Records produced at once, at most.
const MAX_CHUNK: u64 = 2_000;
/// How long the settled count may stand still before the demo gives up.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// How many records the producer may run ahead, and how many it sends at once, for items of
/// `item_bytes`.
fn lead_and_chunk(item_bytes: usize) -> (u64, u64) {
    let lead = (LEAD_BYTES / (item_bytes as u64 + RECORD_OVERHEAD_BYTES)).max(PARTITIONS as u64);
    (lead, (lead / 6).clamp(1, MAX_CHUNK))
}

/// Fails a wait whose counter stopped moving: records the broker dropped, or a dead worker,
/// would otherwise keep the demo waiting forever.
struct Stall {
    last: u64,
    since: Instant,
    limit: Duration,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall { last: 0, since: Instant::now(), limit }
    }

    fn check(&mut self, count: u64, now: Instant, what: &str) -> anyhow::Result<()> {
        if count != self.last {
            (self.last, self.since) = (count, now);
        }
        anyhow::ensure!(
            now.duration_since(self.since) < self.limit,
            "no progress for {:?}: {count} {what}; the embedded broker keeps 5 MiB per partition and drops older records",
            self.limit
        );
        Ok(())
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 100_000)]
    pub items: u64,
    /// Content bytes per item, at most 32 KiB (the demo's worker refuses records over 64 KiB).
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=32768))]
    pub item_bytes: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub quiet: bool,
}

pub struct DemoSummary {
    pub produced: u64,
    pub stored: u64,
    pub dead_lettered: u64,
    pub poison_produced: u64,
    pub ids_checked: usize,
    /// L2 entries compared with their L3 row.
    pub l2_checked: usize,
    pub mismatches: Vec<String>,
    pub items_per_sec: f64,
}

/// The embedded Kafka: librdkafka's mock cluster, hosted by a client that does nothing else.
/// Its group coordinator waits `group.initial.rebalance.delay.ms` before the first assignment
/// of a new group (3 s, as Apache Kafka's default); with one worker there is nobody to wait
/// for, so the demo sets it to 0, as Kafka's docs advise for development and tests.
fn embedded_broker() -> anyhow::Result<BaseProducer> {
    let host: BaseProducer = ClientConfig::new().set("test.mock.num.brokers", "1").create()?;
    // SAFETY: the mock cluster belongs to `host`, alive for the whole call; the setter takes
    // the cluster pointer (checked non-null) and an integer.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(host.client().native_ptr());
        anyhow::ensure!(!cluster.is_null(), "librdkafka created no mock cluster");
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
    }
    Ok(host)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<DemoSummary> {
    let host = embedded_broker()?;
    let cluster = host.client().mock_cluster().ok_or_else(|| anyhow::anyhow!("no embedded Kafka broker"))?;
    cluster.create_topic(TOPIC, PARTITIONS, 1)?;
    cluster.create_topic(DLQ_TOPIC, 1, 1)?;
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let engine_config = SyncEngineConfig {
        sql_url: Some(Secret::new(format!("sqlite://{}", dir.path().join("demo.db").display()))),
        wal_dir: Some(dir.path().join("wal")),
        ..SyncEngineConfig::in_memory()
    };
    let l2 = Arc::new(MemoryCacheStore::new());
    let mut engine =
        SyncEngine::new(engine_config.clone(), watch::channel(engine_config).1).with_cache_store(l2.clone());
    engine.start().await?;
    let engine = Arc::new(engine);
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        topics: vec![TOPIC.into()],
        group_id: "sync-engine-demo".into(),
        dlq_topic: DLQ_TOPIC.into(),
        // The mock broker answers a fetch with one message set per partition and then waits
        // out fetch.wait.max.ms; a short wait keeps the embedded pipeline busy.
        passthrough: [("fetch.wait.max.ms".to_owned(), Secret::new("5"))].into_iter().collect(),
        commit_interval: Duration::from_millis(200),
        revoke_deadline: Duration::from_secs(5),
        memory_budget_bytes: 64 << 20,
        max_item_bytes: 64 << 10,
        instance_id: None,
    };
    let stats = Arc::new(WorkerStats::default());
    let stop = CancellationToken::new();
    let worker_task =
        tokio::spawn(worker::run(kafka, engine.clone(), stop.clone(), Duration::from_secs(30), stats.clone()));

    let spec = WorkloadSpec {
        count: args.items,
        item_bytes: args.item_bytes,
        key_space: (args.items / 3).max(1),
        id_prefix: "demo.patient".into(),
        delete_share: 0.05,
        out_of_order_share: 0.10,
        duplicate_share: 0.02,
        poison_share: 0.001,
        max_item_bytes: 64 << 10,
        seed: args.seed,
    };
    let mut workload = Workload::new(spec);
    let producer = ItemProducer::new(&brokers, TOPIC)?;
    let bar = progress_bar(args.items, "settled", args.quiet);
    let settled =
        |stats: &WorkerStats| stats.stored.load(Ordering::Relaxed) + stats.dead_lettered.load(Ordering::Relaxed);
    let (max_lead, chunk_records) = lead_and_chunk(args.item_bytes);
    let mut stall = Stall::new(STALL_LIMIT);
    let started = Instant::now();
    let mut produced = 0;
    let mut poison_produced = 0;
    let waited = async {
        while produced < args.items {
            // Settled, not consumed: a pause under memory pressure throws away records the
            // consumer had fetched, and it fetches them again later.
            while produced.saturating_sub(settled(&stats)) > max_lead {
                bar.set_position(settled(&stats));
                stall.check(settled(&stats), Instant::now(), "records settled")?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let chunk: Vec<_> = workload.by_ref().take(chunk_records as usize).collect();
            poison_produced += chunk.iter().filter(|record| record.poison_reason.is_some()).count() as u64;
            produced += chunk.len() as u64;
            publish_all(&producer, chunk, 0, || {}).await?;
            bar.set_position(settled(&stats));
        }
        while settled(&stats) < produced && !worker_task.is_finished() {
            bar.set_position(settled(&stats));
            stall.check(settled(&stats), Instant::now(), "records settled")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = waited {
        stop.cancel();
        return Err(error.context(format!("the demo stopped after producing {produced} of {} items", args.items)));
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish();
    stop.cancel();
    worker_task.await??;
    let rows = engine.l3().map(|l3| l3.summaries());
    let rows = match rows {
        Some(future) => future.await?,
        None => Vec::new(),
    };
    let mut mismatches = compare(&workload, &rows);
    let l2_checked = match engine.l3() {
        Some(l3) => l2_agrees_with_l3(&l2, l3, &rows, &mut mismatches).await?,
        None => 0,
    };
    engine.shutdown_within(Duration::from_secs(10)).await;
    // Producers first: a client outliving the mock broker logs "all brokers down".
    drop(producer);
    drop(cluster);
    drop(host);
    Ok(DemoSummary {
        produced,
        stored: stats.stored.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered.load(Ordering::Relaxed),
        poison_produced,
        ids_checked: workload.expected().len(),
        l2_checked,
        mismatches,
        items_per_sec: produced as f64 / elapsed,
    })
}

/// Invariant 6: an id L2 holds has exactly L3's row (version, origin, content, tombstone).
/// Returns how many L2 entries were compared; a disagreement is added to `mismatches`.
async fn l2_agrees_with_l3(
    l2: &MemoryCacheStore,
    l3: &dyn ArchiveStore,
    rows: &[RowSummary],
    mismatches: &mut Vec<String>,
) -> anyhow::Result<usize> {
    let mut checked = 0;
    for page in rows.chunks(sync_engine::storage::sql::READ_CHUNK_IDS) {
        let ids: Vec<&str> = page.iter().map(|row| row.id.as_str()).collect();
        let held: HashMap<String, SyncItem> =
            l3.get_many(&ids).await?.into_iter().map(|stored| (stored.item.id.clone(), stored.item)).collect();
        for id in ids {
            let (Ok(Some(cached)), Some(row)) = (l2.get_stored(id).await, held.get(id)) else { continue };
            checked += 1;
            let cached = &cached.item;
            let same = cached.version == row.version
                && cached.origin == row.origin
                && cached.content_hash() == row.content_hash()
                && cached.is_tombstone() == row.is_tombstone();
            if !same {
                mismatches.push(format!(
                    "{id}: L2 holds version {} from {:?} where L3 holds version {} from {:?}",
                    cached.version, cached.origin, row.version, row.origin
                ));
            }
        }
    }
    Ok(checked)
}

/// Runs the demo and prints its summary; fails unless every id holds its newest version.
pub async fn run_and_report(args: DemoArgs) -> anyhow::Result<ExitCode> {
    // SYNC_LOG applies to the demo too (an invalid filter falls back to the default).
    let filter = std::env::var("SYNC_LOG").unwrap_or_else(|_| sync_engine::config::DEFAULT_LOG_FILTER.to_owned());
    let _ = super::run::init_logs(sync_engine::config::LogFormat::Text, &filter);
    println!(
        "sync-engine demo: {} items of {} bytes, embedded Kafka (MockCluster), in-memory L2 and SQLite",
        args.items, args.item_bytes
    );
    let summary = run(args).await?;
    println!("produced        {}", summary.produced);
    println!("stored          {}", summary.stored);
    println!("dead-lettered   {} (poison produced: {})", summary.dead_lettered, summary.poison_produced);
    println!("ids checked     {} (L3), {} (L2 entries against L3)", summary.ids_checked, summary.l2_checked);
    println!("mismatches      {}", summary.mismatches.len());
    println!("throughput      {:.0} items/s", summary.items_per_sec);
    for mismatch in summary.mismatches.iter().take(20) {
        println!("  {mismatch}");
    }
    let ok = summary.mismatches.is_empty() && summary.dead_lettered == summary.poison_produced;
    println!("{}", if ok { "PASS: every id holds its newest version" } else { "FAIL" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lead_stays_inside_what_the_broker_keeps_whatever_the_item_size() {
        for item_bytes in [1, 1024, 16 << 10, 32 << 10] {
            let (lead, chunk) = lead_and_chunk(item_bytes);
            let per_partition = lead * (item_bytes as u64 + RECORD_OVERHEAD_BYTES) / PARTITIONS as u64;
            assert!(per_partition <= 2 << 20, "{item_bytes} B items: {per_partition} B ahead per partition");
            assert!(
                (1..=MAX_CHUNK).contains(&chunk) && chunk < lead,
                "{item_bytes} B items: chunk {chunk}, lead {lead}"
            );
        }
        assert_eq!(lead_and_chunk(1024).0, 9_830, "1 KiB items keep about the lead they had");
    }

    #[test]
    fn a_count_that_stands_still_past_the_limit_fails_and_one_that_moves_does_not() {
        let start = Instant::now();
        let mut stall = Stall { last: 0, since: start, limit: Duration::from_secs(60) };
        assert!(stall.check(0, start + Duration::from_secs(59), "settled").is_ok());
        assert!(stall.check(5, start + Duration::from_secs(100), "settled").is_ok(), "progress resets the clock");
        assert!(stall.check(5, start + Duration::from_secs(159), "settled").is_ok());
        let error = stall.check(5, start + Duration::from_secs(160), "settled").unwrap_err().to_string();
        assert!(error.contains("no progress for 60s: 5 settled"), "{error}");
    }
}
