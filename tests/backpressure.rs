//! Backpressure levels and pressure-aware L1 eviction, observed on real engines (MariaDB and
//! the Redis Cluster): a throttled submit is slower, Critical refuses writes with a typed
//! error until the pressure drops, Warn makes L1 give way largest × coldest first, Emergency
//! empties L1 of durable entries but keeps pending ones, Shutdown refuses reads, and the
//! level shows in `sync_backpressure_level` and `/health/ready`. The hit-rate comparison runs
//! on `L1Cache` alone.
//!
//! Pressure is made the way it happens: items wait in the batcher (a batch closes only on
//! `flush`), so they stay unsettled and count against a 1 MiB budget until the test flushes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sync_engine::batch::BatchConfig;
use sync_engine::cache::L1Cache;
use sync_engine::{
    BackpressureLevel, BackpressureThresholds, EngineError, ItemStatus, SettleReceipt, SyncEngine, SyncEngineConfig,
    SyncItem,
};
use tokio::sync::watch;

const BUDGET: u64 = 1 << 20;

/// The engine tests share the process-wide `sync_backpressure_level` gauge: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An engine whose batches close only on `flush`: what it accepts stays pending until then.
async fn held_engine(names: &Names, thresholds: BackpressureThresholds) -> SyncEngine {
    let config = SyncEngineConfig {
        batch: BatchConfig { max_items: 100_000, max_bytes: 1 << 30, max_delay: Duration::from_secs(600) },
        memory_budget_bytes: BUDGET,
        backpressure: thresholds,
        ..engine_config(names)
    };
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await.expect("engine starts");
    engine
}

fn item(id: &str, bytes: usize) -> SyncItem {
    SyncItem::new(id, vec![b'x'; bytes]).with_version(1)
}

/// Enqueues 16 KiB items until the engine reaches `level`; returns their receipts and ids.
async fn fill_until(engine: &SyncEngine, prefix: &str, level: BackpressureLevel) -> Vec<(String, SettleReceipt)> {
    let mut pending = Vec::new();
    for n in 0.. {
        if engine.backpressure_level() >= level {
            break;
        }
        assert!(n < 1000, "the level never reached {level}: {} bytes", engine.memory_bytes());
        let id = format!("{prefix}-{n}");
        pending.push((id.clone(), engine.enqueue(item(&id, 16 << 10), Default::default()).await.unwrap()));
    }
    pending
}

async fn settle(engine: &SyncEngine, pending: Vec<(String, SettleReceipt)>) {
    engine.flush().await.unwrap();
    for (id, receipt) in pending {
        receipt.await.unwrap_or_else(|error| panic!("{id} did not settle: {error}"));
    }
}

/// Submits and waits: batches of a held engine close only on a flush.
async fn submit_now(engine: &SyncEngine, item: SyncItem) -> Result<(), EngineError> {
    let receipt = engine.enqueue(item, Default::default()).await?;
    engine.flush().await?;
    receipt.await?;
    Ok(())
}

/// Mean time of `count` small library enqueues.
async fn mean_enqueue(engine: &SyncEngine, prefix: &str, count: usize) -> (Duration, Vec<(String, SettleReceipt)>) {
    let mut receipts = Vec::new();
    let started = Instant::now();
    for n in 0..count {
        let id = format!("{prefix}-{n}");
        receipts.push((id.clone(), engine.enqueue(item(&id, 10), Default::default()).await.unwrap()));
    }
    (started.elapsed() / count as u32, receipts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_submit_takes_measurably_longer() {
    let _serial = SERIAL.lock().await;
    let names = Names::new("bp_throttle");
    let engine = held_engine(&names, BackpressureThresholds::default()).await;
    let (normal, mut pending) = mean_enqueue(&engine, "normal", 20).await;
    pending.extend(fill_until(&engine, "fill", BackpressureLevel::Throttle).await);
    assert_eq!(engine.backpressure_level(), BackpressureLevel::Throttle);
    let (throttled, more) = mean_enqueue(&engine, "throttled", 20).await;
    pending.extend(more);
    println!("mean enqueue: {normal:?} at Normal, {throttled:?} at Throttle");
    assert!(throttled >= sync_engine::pressure::THROTTLE_MIN_DELAY, "throttled enqueue took {throttled:?}");
    assert!(throttled > normal * 4, "throttled {throttled:?} vs normal {normal:?}");
    settle(&engine, pending).await;
    assert!(engine.backpressure_level() <= BackpressureLevel::Warn, "settled items no longer count twice");
    engine.shutdown_within(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_refuses_library_writes_with_a_typed_error_until_the_pressure_drops() {
    let _serial = SERIAL.lock().await;
    let names = Names::new("bp_critical");
    let engine = held_engine(&names, BackpressureThresholds::default()).await;
    let mut levels = engine.backpressure_receiver();
    let pending = fill_until(&engine, "fill", BackpressureLevel::Critical).await;
    let refused = engine.submit(item("refused", 10)).await;
    assert!(
        matches!(refused, Err(EngineError::Backpressure(BackpressureLevel::Critical))),
        "expected a backpressure refusal, got {refused:?}"
    );
    assert_eq!(engine.status("refused").await.unwrap(), ItemStatus::Missing, "a refused write leaves no trace");
    assert_eq!(*levels.borrow_and_update(), BackpressureLevel::Critical);
    // Reads are still served at Critical.
    assert!(engine.get(&pending[0].0).await.unwrap().is_some());

    settle(&engine, pending).await;
    let after = engine.backpressure_level();
    assert!(after < BackpressureLevel::Critical, "still {after} at {} bytes", engine.memory_bytes());
    assert!(levels.has_changed().unwrap(), "the receiver hears the level come down");
    let accepted = submit_now(&engine, item("accepted", 10)).await;
    assert!(accepted.is_ok(), "{accepted:?}");
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// Whether L1 holds the id: `status` answers InL1 for a settled id found in L1.
async fn in_l1(engine: &SyncEngine, id: &str) -> bool {
    matches!(engine.status(id).await.unwrap(), ItemStatus::InL1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_evicts_large_cold_entries_first_and_emergency_sheds_every_durable_one_but_no_pending_one() {
    let _serial = SERIAL.lock().await;
    let names = Names::new("bp_emergency");
    // Warn is left only below 55%: its relief frees part of L1, not all of it.
    let thresholds = BackpressureThresholds {
        warn_percent: 60,
        throttle_percent: 90,
        critical_percent: 92,
        emergency_percent: 95,
        shutdown_percent: 100,
        hysteresis_percent: 5,
    };
    let engine = held_engine(&names, thresholds).await;
    let hot: Vec<String> = (0..10).map(|n| format!("hot-{n}")).collect();
    let cold: Vec<String> = (0..30).map(|n| format!("cold-{n}")).collect();
    let durable = hot.iter().map(|id| item(id, 200)).chain(cold.iter().map(|id| item(id, 10 << 10)));
    let submitting = engine.submit_many(durable.collect());
    submitting.await.unwrap();
    for _ in 0..20 {
        for id in &hot {
            assert!(engine.get(id).await.unwrap().is_some());
        }
    }
    assert_eq!(engine.backpressure_level(), BackpressureLevel::Normal);

    // Unsettled items push the engine to Warn; L1 gives way, cold and large first.
    let pending = fill_until(&engine, "pending", BackpressureLevel::Warn).await;
    let relieved = eventually(Duration::from_secs(5), || engine.memory_bytes() < BUDGET * 55 / 100).await;
    assert!(relieved, "L1 relief did not bring {} bytes below Warn's exit", engine.memory_bytes());
    let mut cold_left = 0;
    for id in &cold {
        cold_left += in_l1(&engine, id).await as usize;
    }
    for id in &hot {
        assert!(in_l1(&engine, id).await, "hot small {id} must stay in L1");
    }
    assert!(cold_left < cold.len(), "some large cold entries must have gone");
    assert!(cold_left > 0, "Warn frees only what it must: {cold_left} cold entries left");
    println!("after Warn relief: {cold_left} of {} large cold entries left, every hot small one kept", cold.len());

    // One large unsettled item jumps the bytes past Emergency: every durable entry goes.
    let mut seen = engine.backpressure_receiver();
    let watcher = tokio::spawn(async move {
        let mut highest = *seen.borrow_and_update();
        while seen.changed().await.is_ok() {
            highest = highest.max(*seen.borrow_and_update());
            if highest >= BackpressureLevel::Emergency {
                break;
            }
        }
        highest
    });
    let big_bytes = ((BUDGET * 97 / 100).saturating_sub(engine.memory_bytes()) / 2) as usize;
    let big = engine.enqueue(item("big", big_bytes), Default::default()).await.unwrap();
    let reached = engine.backpressure_level();
    let highest = tokio::time::timeout(Duration::from_secs(5), watcher).await.map(|joined| joined.unwrap());
    assert!(
        reached >= BackpressureLevel::Emergency || highest.is_ok_and(|level| level >= BackpressureLevel::Emergency),
        "the level never reached Emergency (now {reached})"
    );
    let shed = eventually(Duration::from_secs(5), || {
        futures::executor::block_on(async {
            for id in hot.iter().chain(&cold) {
                if in_l1(&engine, id).await {
                    return false;
                }
            }
            true
        })
    })
    .await;
    assert!(shed, "Emergency must drop every durable L1 entry");
    for id in pending.iter().map(|(id, _)| id.as_str()).chain(["big"]) {
        assert_eq!(engine.status(id).await.unwrap(), ItemStatus::Pending);
        assert!(engine.get(id).await.unwrap().is_some(), "pending {id} must still be read from L1");
    }
    assert_eq!(engine.len().await, pending.len() as u64 + 1, "L1 holds exactly the pending items");
    // The shed entries are durable: reads still find them, in L2.
    assert_eq!(engine.status(&cold[0]).await.unwrap(), ItemStatus::InL2);

    let mut all = pending;
    all.push(("big".into(), big));
    settle(&engine, all).await;
    engine.shutdown_within(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_reads_and_writes_until_the_pressure_drops() {
    let _serial = SERIAL.lock().await;
    let names = Names::new("bp_shutdown");
    let engine = held_engine(&names, BackpressureThresholds::default()).await;
    submit_now(&engine, item("durable", 100)).await.unwrap();
    // Queued and in L1, 55% of the budget counts twice: past 100%.
    let huge = engine.enqueue(item("huge", (BUDGET * 55 / 100) as usize), Default::default()).await.unwrap();
    assert_eq!(engine.backpressure_level(), BackpressureLevel::Shutdown);
    let read = engine.get("durable").await;
    assert!(matches!(read, Err(EngineError::Backpressure(BackpressureLevel::Shutdown))), "{read:?}");
    let many = engine.get_many(&["durable"]).await;
    assert!(matches!(many, Err(EngineError::Backpressure(BackpressureLevel::Shutdown))), "{many:?}");
    let write = engine.submit(item("later", 10)).await;
    assert!(matches!(write, Err(EngineError::Backpressure(BackpressureLevel::Shutdown))), "{write:?}");
    assert_eq!(engine.status("huge").await.unwrap(), ItemStatus::Pending, "status still answers");

    settle(&engine, vec![("huge".into(), huge)]).await;
    assert!(engine.backpressure_level() < BackpressureLevel::Shutdown);
    assert!(engine.get("durable").await.unwrap().is_some());
    engine.shutdown_within(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_is_the_gauge_and_shows_in_health_ready() {
    let _serial = SERIAL.lock().await;
    let handle = sync_engine::metrics::install();
    let names = Names::new("bp_health");
    let engine = Arc::new(held_engine(&names, BackpressureThresholds::default()).await);
    let probe_engine = engine.clone();
    let probe: sync_engine::http::ReadyProbe = Arc::new(move || {
        let backends = probe_engine.backend_state();
        sync_engine::http::ReadyState { backpressure: backends.backpressure, ..Default::default() }
    });
    let readiness = sync_engine::http::Readiness::default();
    readiness.set(true);
    let stop = tokio_util::sync::CancellationToken::new();
    let extra: sync_engine::http::ExtraMetrics = Arc::new(String::new);
    let bound =
        sync_engine::http::serve("127.0.0.1:0".parse().unwrap(), handle.clone(), readiness, probe, extra, stop.clone())
            .await
            .unwrap();
    let get = |path: &'static str| {
        let port = bound.port();
        async move { tokio::task::spawn_blocking(move || http_get(port, path).unwrap_or_default()).await.unwrap() }
    };
    assert!(get("/health/ready").await.contains("backpressure normal"));
    assert!(handle.render().contains("sync_backpressure_level 0"));

    let pending = fill_until(&engine, "fill", BackpressureLevel::Critical).await;
    let ready = get("/health/ready").await;
    assert!(ready.contains("backpressure critical"), "{ready}");
    let rendered = handle.render();
    assert!(rendered.contains("sync_backpressure_level 3"), "{rendered}");

    settle(&engine, pending).await;
    // Settled, the items count once; L1 relief then brings the bytes below Warn's exit.
    let eased = eventually(Duration::from_secs(5), || engine.backpressure_level() == BackpressureLevel::Normal).await;
    assert!(eased, "still {} at {} bytes", engine.backpressure_level(), engine.memory_bytes());
    assert!(get("/health/ready").await.contains("backpressure normal"));
    assert!(handle.render().contains("sync_backpressure_level 0"));
    stop.cancel();
    engine.shutdown_within(Duration::from_secs(5)).await;
}

/// A skewed read workload (a Zipf-like draw over a few hot small ids and many cold large
/// ones), read through `cache`; a miss fills L1 as the engine's reads do, and `relieve` runs
/// after every fill. Returns the hit rate.
async fn hit_rate(cache: &L1Cache, catalogue: &[Arc<SyncItem>], reads: usize, relieve: impl AsyncFn(&L1Cache)) -> f64 {
    let weights: Vec<f64> = (1..=catalogue.len()).map(|rank| 1.0 / rank as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut hits = 0;
    for _ in 0..reads {
        // xorshift64*: the same sequence for both caches.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let mut draw = (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64 * total;
        let index = weights.iter().position(|weight| {
            draw -= weight;
            draw <= 0.0
        });
        let item = &catalogue[index.unwrap_or(catalogue.len() - 1)];
        if cache.get(&item.id).await.is_some() {
            hits += 1;
        } else {
            cache.put_if_newer(item.clone()).await;
            cache.run_pending_tasks().await;
            relieve(cache).await;
        }
    }
    hits as f64 / reads as f64
}

/// Hit rates of moka's own policy and of the pressure-aware pass, both held to `L1_BYTES`,
/// over 40,000 reads of 2,040 ids drawn with probability ∝ 1/rank; `size` gives each rank its
/// bytes. Asserts the pressure-aware cache kept every hot id (ranks 1..=40).
async fn compare(shape: &str, size: impl Fn(usize) -> usize) -> (f64, f64) {
    const L1_BYTES: u64 = 1 << 20;
    let catalogue: Vec<Arc<SyncItem>> =
        (1..=2040).map(|rank| Arc::new(item(&format!("id-{rank}"), size(rank)))).collect();
    let reads = 40_000;
    let moka = L1Cache::new(L1_BYTES);
    let moka_rate = hit_rate(&moka, &catalogue, reads, async |_: &L1Cache| {}).await;
    // Unbounded by moka; the pass holds it to the same bytes, as the engine's relief does.
    let aware = L1Cache::new(u64::MAX >> 1);
    let aware_rate = hit_rate(&aware, &catalogue, reads, async |cache: &L1Cache| {
        let excess = cache.bytes().saturating_sub(L1_BYTES);
        cache.evict_large_and_cold(excess, |_| false).await;
        cache.run_pending_tasks().await;
    })
    .await;
    let hot = &catalogue[..40];
    let moka_hot = hot.iter().filter(|item| moka.contains(&item.id)).count();
    let aware_hot = hot.iter().filter(|item| aware.contains(&item.id)).count();
    println!(
        "{shape}: hit rate over {reads} reads: moka {moka_rate:.4}, pressure-aware {aware_rate:.4}; \
         hot ids kept at the end: moka {moka_hot}/40, pressure-aware {aware_hot}/40"
    );
    assert!(aware.bytes() <= L1_BYTES, "the pressure-aware cache kept to the same bytes");
    assert_eq!(aware_hot, hot.len(), "{shape}: every hot id must stay");
    (moka_rate, aware_rate)
}

#[tokio::test]
async fn pressure_aware_eviction_keeps_the_hot_ids_and_beats_mokas_own_hit_rate() {
    // The colder, the larger: 256 bytes for the 40 hot ids, growing with rank up to 64 KiB.
    let (moka, aware) = compare("size grows with rank", |rank| (64 * rank).clamp(256, 64 << 10)).await;
    assert!(aware > moka, "pressure-aware {aware} vs moka {moka}");
    // A few hot small ids, then a tail of equal large ones.
    let (moka, aware) = compare("hot small, cold 16 KiB", |rank| if rank <= 40 { 256 } else { 16 << 10 }).await;
    assert!(aware > moka, "pressure-aware {aware} vs moka {moka}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_capacity_changes_live_through_the_config_receiver() {
    let config = SyncEngineConfig { l1_max_bytes: 1 << 20, ..SyncEngineConfig::in_memory() };
    let (config_tx, config_rx) = watch::channel(config.clone());
    let mut engine = SyncEngine::new(config.clone(), config_rx);
    engine.start().await.unwrap();
    for n in 0..200 {
        engine.submit(item(&format!("l1-{n:03}"), 1000)).await.unwrap();
    }
    for _ in 0..3 {
        for n in 0..20 {
            assert!(engine.get(&format!("l1-{n:03}")).await.unwrap().is_some());
        }
    }
    assert!(engine.len().await >= 190, "1 MiB holds them all: {}", engine.len().await);

    config_tx.send(SyncEngineConfig { l1_max_bytes: 50_000, ..config.clone() }).unwrap();
    let shrunk =
        eventually(Duration::from_secs(10), || engine.l1_max_bytes() == 50_000 && engine.memory_bytes() <= 50_000)
            .await;
    assert!(shrunk, "the new capacity applies and L1 shrinks to fit: {} bytes", engine.memory_bytes());
    for n in 0..20 {
        assert!(engine.get(&format!("l1-{n:03}")).await.unwrap().is_some(), "hot l1-{n:03} was kept");
    }
    engine.shutdown().await;
}
