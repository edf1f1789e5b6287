//! The `sync-engine` command: CLI wiring only.
//!
//! `run` (the worker, configured by `SYNC_*` env vars), `demo` (the embedded main job),
//! `produce` (the load generator), `offsets` (a group's committed offsets), `replay` (move a stopped
//! group's committed offsets so the workers re-read a range), `ceiling` (the raw MariaDB ceiling for the benchmark).

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use sync_engine::config::{Config, LogFormat};
use sync_engine::engine::BackendState;
use sync_engine::kafka::worker::{self, WorkerStats};
use sync_engine::{demo, metrics, produce, SyncEngine};

#[derive(Parser)]
#[command(name = "sync-engine", version, about = "Kafka → L1 → Redis Cluster → MySQL ingestion worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (configured by SYNC_* environment variables).
    Run,
    /// Run the main job on an embedded Kafka and SQLite, then verify every item.
    Demo(demo::DemoArgs),
    /// Publish a generated workload to a real broker.
    Produce(produce::ProduceArgs),
    /// Print a consumer group's committed offsets without joining it.
    Offsets(sync_engine::inspect::OffsetsArgs),
    /// Move a stopped consumer group's committed offsets so the workers re-read a range (safe: every tier is version-guarded).
    Replay(sync_engine::replay::ReplayArgs),
    /// Measure the raw MariaDB ceiling: plain multi-row upserts, no version guard.
    Ceiling(sync_engine::storage::ceiling::CeilingArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run_worker().await,
            Command::Demo(args) => run_demo(args).await,
            Command::Produce(args) => produce::run(args).await.map(|_| ExitCode::SUCCESS),
            Command::Offsets(args) => sync_engine::inspect::run(args).map(|()| ExitCode::SUCCESS),
            Command::Replay(args) => sync_engine::replay::run(args).map(|()| ExitCode::SUCCESS),
            Command::Ceiling(args) => sync_engine::storage::ceiling::run(args).await.map(|_| ExitCode::SUCCESS),
        }
    });
    // Do not wait for blocking tasks still running (a consumer thread join that timed out,
    // an fsync): the grace period is over once the command returns.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run_worker() -> anyhow::Result<ExitCode> {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(2));
        }
    };
    init_logs(config.log_format);
    let stop = CancellationToken::new();
    let handle = metrics::install();
    let readiness = metrics::Readiness::default();
    // The endpoint answers /health/live while the engine connects; the probe sees it later.
    let started_engine = Arc::new(OnceLock::new());
    let probe = ready_probe(started_engine.clone());
    let stats = Arc::new(WorkerStats::default());
    let lag_source = stats.clone();
    let lag: metrics::ExtraMetrics = Arc::new(move || lag_source.lag.render(sync_engine::item::now_ms() as i64));
    let bound = metrics::serve(config.metrics_addr, handle, readiness.clone(), probe, lag, stop.child_token()).await?;
    tracing::info!(%bound, "metrics and health endpoint listening");
    let mut engine = SyncEngine::new(config.engine.clone(), watch::channel(config.engine.clone()).1);
    engine.start().await?;
    let engine = Arc::new(engine);
    let _ = started_engine.set(engine.clone());
    tokio::spawn(stop_on_signal(stop.clone()));
    readiness.set(true);
    // The grace counts from the stop signal: whatever is left of it after the worker has
    // drained is all the engine gets, so the process exits at the grace, never later.
    let stopped_at = Arc::new(OnceLock::new());
    let stop_watch = (stop.clone(), stopped_at.clone());
    tokio::spawn(async move {
        stop_watch.0.cancelled().await;
        let _ = stop_watch.1.set(tokio::time::Instant::now());
    });
    let grace = config.shutdown_grace;
    let result = worker::run(config.kafka.clone(), engine.clone(), stop.clone(), grace, stats).await;
    readiness.set(false);
    let left = stopped_at.get().map_or(grace, |at| grace.saturating_sub(at.elapsed()));
    // The engine's own grace ends a little earlier, so its abort step still fits in `left`.
    let engine_grace = left.saturating_sub(left / 5);
    if tokio::time::timeout(left, engine.shutdown_within(engine_grace)).await.is_err() {
        tracing::error!("the engine did not stop within the grace period; exiting anyway");
        stop.cancel();
        return Err(anyhow::anyhow!("grace period ended before the engine stopped"));
    }
    stop.cancel();
    result.map(|()| ExitCode::SUCCESS)
}

/// The backend state for `/health/ready`, read directly from the engine once it runs (until
/// then there is nothing to report, and the worker is not ready either). The dead-letter
/// breaker lives inside the worker loop: it shows in `/metrics` only.
fn ready_probe(engine: Arc<OnceLock<Arc<SyncEngine>>>) -> metrics::ReadyProbe {
    Arc::new(move || engine.get().map(|engine| ready_state(&engine.backend_state())).unwrap_or_default())
}

fn ready_state(backends: &BackendState) -> metrics::ReadyState {
    metrics::ReadyState {
        breakers: backends.breakers.iter().map(|(backend, state)| (backend.to_string(), (*state).into())).collect(),
        wal_bytes: backends.wal_bytes,
        l2_stale_ids: backends.l2_stale_ids,
        backpressure: backends.backpressure,
    }
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    stop.cancel();
}

async fn run_demo(args: demo::DemoArgs) -> anyhow::Result<ExitCode> {
    init_logs(LogFormat::Text);
    println!(
        "sync-engine demo: {} items of {} bytes, embedded Kafka (MockCluster) and SQLite",
        args.items, args.item_bytes
    );
    let summary = demo::run(args).await?;
    println!("produced        {}", summary.produced);
    println!("stored          {}", summary.stored);
    println!("dead-lettered   {} (poison produced: {})", summary.dead_lettered, summary.poison_produced);
    println!("ids checked     {}", summary.ids_checked);
    println!("mismatches      {}", summary.mismatches.len());
    println!("throughput      {:.0} items/s", summary.items_per_sec);
    for mismatch in summary.mismatches.iter().take(20) {
        println!("  {mismatch}");
    }
    let ok = summary.mismatches.is_empty() && summary.dead_lettered == summary.poison_produced;
    println!("{}", if ok { "PASS: every id holds its newest version" } else { "FAIL" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
