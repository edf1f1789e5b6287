//! `sync-engine run`: the worker, configured by `SYNC_*` env vars. Serves the HTTP endpoint
//! (and the merkle endpoint when `SYNC_MERKLE_ADDR` is set), starts the engine, runs the
//! Kafka worker until SIGTERM, then drains within the grace.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use sync_engine::config::{Config, LogFormat, SyncEngineConfig, DEFAULT_LOG_FILTER};
use sync_engine::engine::BackendState;
use sync_engine::kafka::worker::{self, WorkerStats};
use sync_engine::{http, http_merkle, metrics, reload, SyncEngine};

/// Changes the log filter of a running process.
pub type LogFilterReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Logs to stderr with `filter` (`SYNC_LOG`); returns the handle that changes it live.
pub fn init_logs(format: LogFormat, filter: &str) -> LogFilterReload {
    use tracing_subscriber::EnvFilter;
    let initial = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(initial).with_writer(std::io::stderr);
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |filter: &str| {
                let filter = EnvFilter::try_new(filter).map_err(|error| error.to_string())?;
                handle.reload(filter).map_err(|error| error.to_string())
            })
        }};
    }
    match format {
        LogFormat::Json => install!(builder.json()),
        LogFormat::Text => install!(builder),
    }
}

pub async fn run_worker() -> anyhow::Result<ExitCode> {
    // The process environment, overridden by SYNC_ENV_FILE's values when it names a file.
    let vars = match reload::current_vars() {
        Ok(vars) => vars,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(2));
        }
    };
    let config = match Config::from_vars(vars.clone()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return Ok(ExitCode::from(2));
        }
    };
    let log_filter = init_logs(config.log_format, &config.log_filter);
    let stop = CancellationToken::new();
    let handle = metrics::install();
    let readiness = http::Readiness::default();
    // The endpoint answers /health/live while the engine connects; the probe sees it later.
    let started_engine = Arc::new(OnceLock::new());
    let probe = ready_probe(started_engine.clone());
    let stats = Arc::new(WorkerStats::default());
    let lag_source = stats.clone();
    let lag: http::ExtraMetrics = Arc::new(move || lag_source.lag.render(sync_engine::item::now_ms() as i64));
    let bound = http::serve(config.metrics_addr, handle, readiness.clone(), probe, lag, stop.child_token()).await?;
    tracing::info!(%bound, "metrics and health endpoint listening");
    // Bound before the engine connects, so a taken port stops the start at once; it answers
    // 503 until the engine (and its L3) is there. Off unless SYNC_MERKLE_ADDR is set.
    if let Some(merkle) = &config.merkle_http {
        let source: Arc<dyn http_merkle::MerkleSource> = started_engine.clone();
        let bound = http_merkle::serve(merkle.addr, &merkle.token, source, stop.child_token()).await?;
        tracing::info!(%bound, "merkle endpoint listening (bearer token required)");
    }
    // The sender stays with the SIGHUP task: it is how live settings reach the engine.
    let (engine_config_tx, engine_config_rx) = watch::channel(config.engine.clone());
    let mut engine = SyncEngine::new(config.engine.clone(), engine_config_rx);
    engine.start().await?;
    let engine = Arc::new(engine);
    let _ = started_engine.set(engine.clone());
    tokio::spawn(stop_on_signal(stop.clone()));
    tokio::spawn(reload_on_sighup(config.clone(), vars, engine_config_tx, log_filter, stop.clone()));
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
fn ready_probe(engine: Arc<OnceLock<Arc<SyncEngine>>>) -> http::ReadyProbe {
    Arc::new(move || engine.get().map(|engine| ready_state(&engine.backend_state())).unwrap_or_default())
}

fn ready_state(backends: &BackendState) -> http::ReadyState {
    http::ReadyState {
        breakers: backends.breakers.iter().map(|(backend, state)| (backend.to_string(), (*state).into())).collect(),
        wal_bytes: backends.wal_bytes,
        l2_stale_ids: backends.l2_stale_ids,
        backpressure: backends.backpressure,
        filter: backends.filter.as_ref().map(ToString::to_string),
    }
}

/// On SIGHUP: reads the environment and `SYNC_ENV_FILE` again, validates the whole set and
/// applies the live settings, or logs why not (the running values stay).
async fn reload_on_sighup(
    mut running: Config,
    mut running_vars: BTreeMap<String, String>,
    engine_config: watch::Sender<SyncEngineConfig>,
    log_filter: LogFilterReload,
    stop: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP: live reconfiguration is off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            received = hangup.recv() => if received.is_none() { return },
        }
        let next = match reload::current_vars() {
            Ok(next) => next,
            Err(error) => {
                ::metrics::counter!(metrics::CONFIG_RELOADS, "outcome" => "refused").increment(1);
                tracing::error!(%error, "SIGHUP: configuration not reloaded, the running one stays");
                continue;
            }
        };
        match reload::plan(&running, &running_vars, next) {
            reload::Reload::Unchanged => tracing::info!("SIGHUP: the configuration is unchanged"),
            reload::Reload::Refused(error) => {
                ::metrics::counter!(metrics::CONFIG_RELOADS, "outcome" => "refused").increment(1);
                tracing::error!("SIGHUP: configuration not reloaded, the running one stays: {error}");
            }
            reload::Reload::Apply { config, vars, changes } => {
                if config.log_filter != running.log_filter {
                    if let Err(error) = log_filter(&config.log_filter) {
                        tracing::error!(%error, "SIGHUP: the log filter could not be changed");
                    }
                }
                engine_config.send_replace(config.engine.clone());
                if !changes.need_restart.is_empty() {
                    tracing::warn!(settings = ?changes.need_restart, "SIGHUP: these settings take effect at the next restart");
                }
                ::metrics::counter!(metrics::CONFIG_RELOADS, "outcome" => "applied").increment(1);
                tracing::info!(settings = ?changes.live, "SIGHUP: configuration reloaded");
                running = *config;
                running_vars = vars;
            }
        }
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
