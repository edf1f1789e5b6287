//! The whole configuration, from `SYNC_*` environment variables (docs/DESIGN.md §5).
//!
//! Parsed once at start and validated as a whole: every bad variable is reported together,
//! by name, and a secret's value never appears in a message. URLs that can carry passwords
//! (`SYNC_SQL_URL`, `SYNC_REDIS_URLS`) and every librdkafka passthrough are `Secret`s.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::batch::BatchConfig;
use crate::pressure::BackpressureThresholds;

/// A value that redacts itself in `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `Some("mysql://…".into())` in a config literal.
impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces `user:password@` with `user:***@` in a URL; text without it is returned as is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|index| index + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end], user, &rest[at..])
        }
        None => url.to_owned(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dlq_topic: String,
    /// librdkafka properties from `SYNC_KAFKA_OPT_*`, e.g. `security.protocol`.
    pub passthrough: BTreeMap<String, Secret>,
    pub commit_interval: Duration,
    pub revoke_deadline: Duration,
    pub memory_budget_bytes: u64,
    pub max_item_bytes: usize,
    /// Static group membership (`group.instance.id`): a member that comes back within the
    /// session timeout gets its partitions back without a rebalance. `None` = dynamic.
    pub instance_id: Option<String>,
}

/// Everything the library engine needs: which tiers, where, and how it batches. `Default`
/// is an engine with L1 only; set `redis_url` and/or `sql_url` for L2 and L3.
#[derive(Clone, Debug)]
pub struct SyncEngineConfig {
    /// L2: a Redis URL (`redis://host:port`, standalone or any Cluster node), or a comma list
    /// of Cluster seed nodes; `None` means no L2.
    pub redis_url: Option<Secret>,
    pub redis_prefix: String,
    pub redis_ttl_secs: u64,
    /// `mysql://…` or `sqlite://…`; `None` means no L3.
    pub sql_url: Option<Secret>,
    pub sql_table: String,
    pub batch: BatchConfig,
    pub l1_max_bytes: u64,
    /// Where batches for an unavailable L3 are logged; `None` = no WAL (L3 writes wait).
    pub wal_dir: Option<PathBuf>,
    pub wal_max_bytes: u64,
    /// Consecutive L3 failures that open its circuit breaker, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_cool_down: Duration,
    /// Deadline for one L3 batch write (transaction included): past it L3 counts as
    /// unavailable and the batch goes to the write-ahead log.
    pub sql_write_timeout: Duration,
    /// The largest item the caller accepts (`SYNC_MAX_ITEM_BYTES`), checked at start against
    /// what L3 can store in one row; `None` = not checked.
    pub max_item_bytes: Option<u64>,
    /// How long `shutdown()` waits for accepted items to settle before abandoning them.
    pub shutdown_grace: Duration,
    /// The bytes the engine may hold (unsettled items + L1 + a worker's Kafka records in
    /// flight) before it pushes back; the worker's `SYNC_MEMORY_BUDGET_BYTES`. Default 256 MiB.
    pub memory_budget_bytes: u64,
    /// Where each `BackpressureLevel` starts, in percent of `memory_budget_bytes`
    /// (default: warn 50, throttle 70, critical 85, emergency 95, shutdown 100, left 10
    /// points below).
    pub backpressure: BackpressureThresholds,
    /// The membership filter over L3's ids (`crate::filter`): on by default when there is
    /// an L3; sizes, tail interval and the lag beyond which it is not trusted.
    pub filter: crate::filter::FilterConfig,
    /// The L2 auditor's pace (`SYNC_AUDIT_KEYS_PER_SEC`): entries compared with L3 per
    /// second, pass after pass; 0 turns it off. Default 1,000.
    pub audit_keys_per_sec: u64,
    /// Keep the merkle tree over L3 (`SYNC_MERKLE`, default on): every L3 write marks its ids
    /// in its transaction and a background task folds the marks into the tree
    /// (`engine/merkle_task.rs`). Off: writes carry no marks and the tree is flagged stale, to
    /// be rebuilt at the next start with it on.
    pub merkle: bool,
}

/// `GET /merkle/<path>` (`crate::http_merkle`): its own address and the bearer token it
/// demands. The token is a `Secret`, so `Debug` never shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleHttpConfig {
    pub addr: SocketAddr,
    pub token: Secret,
}

/// The shortest `SYNC_MERKLE_TOKEN` accepted, in bytes.
pub const MIN_MERKLE_TOKEN_BYTES: usize = 16;

#[derive(Clone, Debug)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub engine: SyncEngineConfig,
    pub metrics_addr: SocketAddr,
    /// `SYNC_MERKLE_ADDR` and `SYNC_MERKLE_TOKEN`; `None` (the default): no merkle endpoint.
    pub merkle_http: Option<MerkleHttpConfig>,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// `SYNC_LOG`: a tracing filter (`info`, `info,sync_engine=debug`); changes live.
    pub log_filter: String,
}

/// What `SYNC_LOG` defaults to: our own logs at info, the clients' only when they warn.
pub const DEFAULT_LOG_FILTER: &str = "info,librdkafka=warn,rdkafka=warn,sqlx=warn";

/// Every bad variable, by name.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|(name, why)| format!("  {name}: {why}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<(String, String)>,
}

/// Reads variables and collects problems instead of stopping at the first.
struct Reader<'a> {
    vars: &'a BTreeMap<String, String>,
    problems: Vec<(String, String)>,
}

impl Reader<'_> {
    fn text(&mut self, name: &str, default: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_else(|| default.to_owned())
    }

    fn required(&mut self, name: &str) -> String {
        match self.vars.get(name).filter(|value| !value.trim().is_empty()) {
            Some(value) => value.clone(),
            None => {
                self.problems.push((name.into(), "required".into()));
                String::new()
            }
        }
    }

    fn number<T: FromStr + Copy + PartialOrd + fmt::Display>(&mut self, name: &str, default: T, min: T, max: T) -> T {
        let Some(raw) = self.vars.get(name) else { return default };
        match raw.trim().parse::<T>() {
            Ok(value) if value >= min && value <= max => value,
            _ => {
                self.problems.push((name.into(), format!("expected a number in {min}..={max}, got {raw:?}")));
                default
            }
        }
    }

    fn problem(&mut self, name: &str, why: impl Into<String>) {
        self.problems.push((name.into(), why.into()));
    }
}

/// The merkle endpoint: off unless `SYNC_MERKLE_ADDR` is set (non-empty); then it needs a
/// `SYNC_MERKLE_TOKEN` of at least `MIN_MERKLE_TOKEN_BYTES` visible ASCII characters and an
/// address other than the metrics listener's. The token is never quoted back.
fn merkle_http(r: &mut Reader<'_>, metrics_addr: SocketAddr) -> Option<MerkleHttpConfig> {
    let raw_addr = r.text("SYNC_MERKLE_ADDR", "");
    if raw_addr.trim().is_empty() {
        return None;
    }
    let addr: Option<SocketAddr> = raw_addr.trim().parse().ok();
    if addr.is_none() {
        r.problem("SYNC_MERKLE_ADDR", format!("expected host:port, got {raw_addr:?}"));
    }
    let shares_metrics = addr.is_some_and(|addr| {
        addr.port() == metrics_addr.port()
            && (addr.ip() == metrics_addr.ip() || addr.ip().is_unspecified() || metrics_addr.ip().is_unspecified())
    });
    if shares_metrics {
        r.problem("SYNC_MERKLE_ADDR", "must differ from SYNC_METRICS_ADDR: the merkle endpoint has its own listener");
    }
    let token = r.vars.get("SYNC_MERKLE_TOKEN").map(|token| token.trim().to_owned()).unwrap_or_default();
    if token.is_empty() {
        r.problem("SYNC_MERKLE_TOKEN", "required when SYNC_MERKLE_ADDR is set");
    } else if token.len() < MIN_MERKLE_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        r.problem(
            "SYNC_MERKLE_TOKEN",
            format!("expected at least {MIN_MERKLE_TOKEN_BYTES} visible ASCII characters, no spaces (value not shown)"),
        );
    }
    let valid = r.problems.iter().all(|(name, _)| !name.starts_with("SYNC_MERKLE_"));
    addr.filter(|_| valid).map(|addr| MerkleHttpConfig { addr, token: Secret(token) })
}

/// `SYNC_KAFKA_INSTANCE_ID`, else `HOSTNAME`; set but empty turns static membership off.
fn instance_id(r: &mut Reader<'_>) -> Option<String> {
    let id = match r.vars.get("SYNC_KAFKA_INSTANCE_ID") {
        Some(id) => id.trim().to_owned(),
        None => r.vars.get("HOSTNAME").map(|host| host.trim().to_owned()).unwrap_or_default(),
    };
    if id.is_empty() {
        return None;
    }
    // Kafka's own rule for instance ids (the same as for topic names).
    let valid = id.len() <= 249 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        r.problem(
            "SYNC_KAFKA_INSTANCE_ID",
            "expected 1..=249 letters, digits, '.', '_' or '-' (or empty: no static membership)",
        );
        return None;
    }
    Some(id)
}

/// A boolean variable: `1`/`true`/`on` or `0`/`false`/`off`.
fn flag(r: &mut Reader<'_>, name: &str, default: bool) -> bool {
    let Some(raw) = r.vars.get(name) else { return default };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => true,
        "0" | "false" | "off" | "no" => false,
        _ => {
            r.problem(name, format!("expected 1/true/on or 0/false/off, got {raw:?}"));
            default
        }
    }
}

pub fn comma_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|part| !part.is_empty()).map(String::from).collect()
}

/// An identifier we interpolate into SQL: letters, digits, underscore, 1..=64.
pub fn is_sql_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

const GIB: u64 = 1 << 30;

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        // HOSTNAME is the pod's name in a StatefulSet: the default static member id.
        Config::from_vars(
            std::env::vars().filter(|(name, _)| name.starts_with("SYNC_") || name == "HOSTNAME").collect(),
        )
    }

    pub fn from_vars(vars: BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut r = Reader { vars: &vars, problems: Vec::new() };
        let topics = comma_list(&r.required("SYNC_KAFKA_TOPICS"));
        let sql_url = r.required("SYNC_SQL_URL");
        if !sql_url.is_empty() && !sql_url.starts_with("mysql://") && !sql_url.starts_with("sqlite:") {
            r.problem("SYNC_SQL_URL", "expected mysql://… or sqlite:… (value not shown)");
        }
        let redis_urls = comma_list(&r.text("SYNC_REDIS_URLS", ""));
        if redis_urls.iter().any(|url| !(url.starts_with("redis://") || url.starts_with("rediss://"))) {
            r.problem("SYNC_REDIS_URLS", "every entry must start with redis:// or rediss:// (values not shown)");
        }
        let sql_table = r.text("SYNC_SQL_TABLE", "sync_items");
        if !is_sql_identifier(&sql_table) {
            r.problem("SYNC_SQL_TABLE", "expected 1..=64 letters, digits or underscores");
        }
        let redis_prefix = r.text("SYNC_REDIS_PREFIX", "sync:");
        if redis_prefix.len() > 64 || redis_prefix.chars().any(char::is_control) {
            r.problem("SYNC_REDIS_PREFIX", "expected at most 64 bytes and no control characters");
        }
        let log_format = match r.text("SYNC_LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                r.problem("SYNC_LOG_FORMAT", format!("expected text or json, got {other:?}"));
                LogFormat::Text
            }
        };
        let log_filter = r.text("SYNC_LOG", DEFAULT_LOG_FILTER);
        if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
            r.problem("SYNC_LOG", "expected a tracing filter such as info or info,sync_engine=debug");
        }
        let metrics_addr = r.text("SYNC_METRICS_ADDR", "0.0.0.0:9090");
        let metrics_addr = metrics_addr.parse().unwrap_or_else(|_| {
            r.problem("SYNC_METRICS_ADDR", format!("expected host:port, got {metrics_addr:?}"));
            SocketAddr::from(([0, 0, 0, 0], 9090))
        });
        let merkle_http = merkle_http(&mut r, metrics_addr);
        let passthrough = vars
            .iter()
            .filter_map(|(name, value)| {
                let property = name.strip_prefix("SYNC_KAFKA_OPT_")?;
                Some((property.to_ascii_lowercase().replace('_', "."), Secret(value.clone())))
            })
            .collect();
        let batch = BatchConfig {
            max_items: r.number("SYNC_BATCH_MAX_ITEMS", 1000, 1, 100_000),
            max_bytes: r.number("SYNC_BATCH_MAX_BYTES", 8 << 20, 1024, 1 << 30),
            max_delay: Duration::from_millis(r.number("SYNC_BATCH_MAX_DELAY_MS", 50, 0, 60_000)),
        };
        let session_timeout_ms: u64 = r.number("SYNC_KAFKA_OPT_SESSION_TIMEOUT_MS", 45_000, 1, 3_600_000);
        let revoke_deadline_ms = r.number("SYNC_REVOKE_DEADLINE_MS", 5_000, 1, 3_600_000);
        if revoke_deadline_ms >= session_timeout_ms {
            r.problem("SYNC_REVOKE_DEADLINE_MS", "must be below session.timeout.ms");
        }
        let kafka = KafkaConfig {
            brokers: r.text("SYNC_KAFKA_BROKERS", "127.0.0.1:9092"),
            topics,
            group_id: r.text("SYNC_KAFKA_GROUP_ID", "sync-engine"),
            dlq_topic: r.text("SYNC_DLQ_TOPIC", "sync-dlq"),
            passthrough,
            commit_interval: Duration::from_millis(r.number("SYNC_COMMIT_INTERVAL_MS", 1_000, 10, 600_000)),
            revoke_deadline: Duration::from_millis(revoke_deadline_ms),
            memory_budget_bytes: r.number("SYNC_MEMORY_BUDGET_BYTES", 256 << 20, 4 << 20, 64 * GIB),
            max_item_bytes: r.number("SYNC_MAX_ITEM_BYTES", 1 << 20, 1, 64 << 20),
            instance_id: instance_id(&mut r),
        };
        if kafka.max_item_bytes as u64 * 4 > kafka.memory_budget_bytes {
            r.problem("SYNC_MEMORY_BUDGET_BYTES", "must hold at least four items of SYNC_MAX_ITEM_BYTES");
        }
        let shutdown_grace = Duration::from_millis(r.number("SYNC_SHUTDOWN_GRACE_MS", 30_000, 100, 3_600_000));
        let defaults = BackpressureThresholds::default();
        let backpressure = BackpressureThresholds {
            warn_percent: r.number("SYNC_BACKPRESSURE_WARN_PERCENT", defaults.warn_percent, 1, 100),
            throttle_percent: r.number("SYNC_BACKPRESSURE_THROTTLE_PERCENT", defaults.throttle_percent, 1, 100),
            critical_percent: r.number("SYNC_BACKPRESSURE_CRITICAL_PERCENT", defaults.critical_percent, 1, 100),
            emergency_percent: r.number("SYNC_BACKPRESSURE_EMERGENCY_PERCENT", defaults.emergency_percent, 1, 100),
            shutdown_percent: r.number("SYNC_BACKPRESSURE_SHUTDOWN_PERCENT", defaults.shutdown_percent, 1, 100),
            hysteresis_percent: r.number("SYNC_BACKPRESSURE_HYSTERESIS_PERCENT", defaults.hysteresis_percent, 1, 99),
        };
        if let Err(why) = backpressure.validate() {
            r.problem("SYNC_BACKPRESSURE_*_PERCENT", why);
        }
        let filter_defaults = crate::filter::FilterConfig::default();
        let lag_bound_ms =
            r.number("SYNC_FILTER_LAG_BOUND_MS", filter_defaults.lag_bound.as_millis() as u64, 0, 3_600_000);
        let poll_interval_ms =
            r.number("SYNC_FILTER_POLL_INTERVAL_MS", filter_defaults.poll_interval.as_millis() as u64, 10, 3_600_000);
        if lag_bound_ms > 0 && poll_interval_ms >= lag_bound_ms {
            r.problem(
                "SYNC_FILTER_POLL_INTERVAL_MS",
                format!("must be below SYNC_FILTER_LAG_BOUND_MS ({lag_bound_ms}), or the filter is never trusted"),
            );
        }
        let filter = crate::filter::FilterConfig {
            enabled: lag_bound_ms > 0,
            lag_bound: Duration::from_millis(lag_bound_ms),
            poll_interval: Duration::from_millis(poll_interval_ms),
            ..filter_defaults
        };
        let engine = SyncEngineConfig {
            redis_url: (!redis_urls.is_empty()).then(|| Secret(redis_urls.join(","))),
            redis_prefix,
            redis_ttl_secs: r.number("SYNC_REDIS_TTL_SECS", 0, 0, crate::decode::MAX_TTL_SECS),
            sql_url: Some(Secret(sql_url)),
            sql_table,
            batch,
            l1_max_bytes: r.number("SYNC_L1_MAX_BYTES", 64 << 20, 0, 64 * GIB),
            wal_dir: Some(PathBuf::from(r.text("SYNC_WAL_DIR", "/var/lib/sync-engine/wal"))),
            wal_max_bytes: r.number("SYNC_WAL_MAX_BYTES", GIB, 1 << 20, 1 << 50),
            breaker_failures: r.number("SYNC_BREAKER_FAILURES", 3, 1, 1_000),
            breaker_cool_down: Duration::from_millis(r.number("SYNC_BREAKER_COOLDOWN_MS", 2_000, 10, 600_000)),
            sql_write_timeout: Duration::from_millis(r.number("SYNC_SQL_WRITE_TIMEOUT_MS", 5_000, 100, 600_000)),
            max_item_bytes: Some(kafka.max_item_bytes as u64),
            shutdown_grace,
            // One budget: the worker's records, the engine's queue and L1 share it.
            memory_budget_bytes: kafka.memory_budget_bytes,
            backpressure,
            filter,
            audit_keys_per_sec: r.number("SYNC_AUDIT_KEYS_PER_SEC", 1_000, 0, 1_000_000),
            merkle: flag(&mut r, "SYNC_MERKLE", true),
        };
        let config = Config { kafka, engine, metrics_addr, merkle_http, shutdown_grace, log_format, log_filter };
        if r.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems: r.problems })
        }
    }
}

impl Default for SyncEngineConfig {
    fn default() -> SyncEngineConfig {
        SyncEngineConfig {
            redis_url: None,
            redis_prefix: "sync:".into(),
            redis_ttl_secs: 0,
            sql_url: None,
            sql_table: "sync_items".into(),
            batch: BatchConfig { max_items: 1000, max_bytes: 8 << 20, max_delay: Duration::from_millis(50) },
            l1_max_bytes: 64 << 20,
            wal_dir: None,
            wal_max_bytes: GIB,
            breaker_failures: 3,
            breaker_cool_down: Duration::from_secs(2),
            sql_write_timeout: Duration::from_secs(5),
            max_item_bytes: None,
            shutdown_grace: Duration::from_secs(30),
            memory_budget_bytes: 256 << 20,
            backpressure: BackpressureThresholds::default(),
            filter: crate::filter::FilterConfig::default(),
            audit_keys_per_sec: 1_000,
            merkle: true,
        }
    }
}

impl SyncEngineConfig {
    /// The L3 and L2 breakers' settings (`breaker_failures`, `breaker_cool_down`).
    pub fn circuit_config(&self) -> crate::resilience::circuit_breaker::CircuitConfig {
        crate::resilience::circuit_breaker::CircuitConfig {
            failure_threshold: self.breaker_failures,
            cool_down: self.breaker_cool_down,
        }
    }

    /// An engine with no L2 and no L3 configured (tests and embedding fill in what they need).
    pub fn in_memory() -> SyncEngineConfig {
        SyncEngineConfig::default()
    }

    /// The L2 URLs: one, or the Cluster seed nodes.
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_url.as_ref().map(|urls| comma_list(urls.expose())).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_minimal_environment_parses_with_defaults() {
        let config = Config::from_vars(vars(&[
            ("SYNC_KAFKA_TOPICS", "a, b"),
            ("SYNC_SQL_URL", "mysql://u:pw@h/db"),
            ("SYNC_KAFKA_OPT_SECURITY_PROTOCOL", "SASL_SSL"),
        ]))
        .unwrap();
        assert_eq!(config.kafka.topics, vec!["a", "b"]);
        assert_eq!(config.engine.batch.max_items, 1000);
        assert_eq!(config.kafka.passthrough["security.protocol"].expose(), "SASL_SSL");
        assert!(config.engine.merkle);
    }

    #[test]
    fn the_merkle_switch_takes_on_and_off_and_names_a_bad_value() {
        let base = [("SYNC_KAFKA_TOPICS", "a"), ("SYNC_SQL_URL", "sqlite::memory:")];
        let with = |extra: &[(&str, &str)]| Config::from_vars(vars(&[&base[..], extra].concat()));
        assert!(!with(&[("SYNC_MERKLE", "0")]).unwrap().engine.merkle);
        assert!(!with(&[("SYNC_MERKLE", "off")]).unwrap().engine.merkle);
        assert!(with(&[("SYNC_MERKLE", "true")]).unwrap().engine.merkle);
        let bad = with(&[("SYNC_MERKLE", "maybe")]).unwrap_err().to_string();
        assert!(bad.contains("SYNC_MERKLE"), "{bad}");
    }

    #[test]
    fn the_static_member_id_defaults_to_the_host_name_and_can_be_turned_off() {
        let base = [("SYNC_KAFKA_TOPICS", "a"), ("SYNC_SQL_URL", "sqlite::memory:")];
        let with = |extra: &[(&str, &str)]| Config::from_vars(vars(&[&base[..], extra].concat()));
        assert_eq!(with(&[("HOSTNAME", "sync-engine-2")]).unwrap().kafka.instance_id.as_deref(), Some("sync-engine-2"));
        let explicit = with(&[("HOSTNAME", "h"), ("SYNC_KAFKA_INSTANCE_ID", "pod-a")]).unwrap();
        assert_eq!(explicit.kafka.instance_id.as_deref(), Some("pod-a"));
        assert_eq!(with(&[("HOSTNAME", "h"), ("SYNC_KAFKA_INSTANCE_ID", "")]).unwrap().kafka.instance_id, None);
        assert_eq!(with(&[]).unwrap().kafka.instance_id, None);
        let bad = with(&[("SYNC_KAFKA_INSTANCE_ID", "pod a/../x")]).unwrap_err().to_string();
        assert!(bad.contains("SYNC_KAFKA_INSTANCE_ID"), "{bad}");
    }

    #[test]
    fn every_bad_variable_is_named_and_no_secret_is_printed() {
        let error = Config::from_vars(vars(&[
            ("SYNC_SQL_URL", "postgres://u:hunter2@h/db"),
            ("SYNC_REDIS_URLS", "http://:hunter3@h"),
            ("SYNC_BATCH_MAX_ITEMS", "lots"),
            ("SYNC_SQL_TABLE", "x; drop"),
        ]))
        .unwrap_err();
        let message = error.to_string();
        for name in ["SYNC_KAFKA_TOPICS", "SYNC_SQL_URL", "SYNC_REDIS_URLS", "SYNC_BATCH_MAX_ITEMS", "SYNC_SQL_TABLE"] {
            assert!(message.contains(name), "{name} missing from {message}");
        }
        assert!(!message.contains("hunter"), "{message}");
    }

    #[test]
    fn the_engine_shares_the_worker_budget_and_thresholds_are_validated() {
        let base = [("SYNC_KAFKA_TOPICS", "a"), ("SYNC_SQL_URL", "sqlite::memory:")];
        let with = |extra: &[(&str, &str)]| Config::from_vars(vars(&[&base[..], extra].concat()));
        let config =
            with(&[("SYNC_MEMORY_BUDGET_BYTES", "33554432"), ("SYNC_BACKPRESSURE_WARN_PERCENT", "40")]).unwrap();
        assert_eq!(config.engine.memory_budget_bytes, 32 << 20);
        assert_eq!(config.engine.backpressure.warn_percent, 40);
        assert_eq!(SyncEngineConfig::default().memory_budget_bytes, 256 << 20);
        let bad = with(&[("SYNC_BACKPRESSURE_THROTTLE_PERCENT", "90")]).unwrap_err().to_string();
        assert!(bad.contains("SYNC_BACKPRESSURE"), "{bad}");
        assert!(with(&[("SYNC_BACKPRESSURE_SHUTDOWN_PERCENT", "101")]).is_err());
    }

    #[test]
    fn the_filter_is_on_by_default_off_at_a_zero_lag_bound_and_must_poll_within_it() {
        let base = [("SYNC_KAFKA_TOPICS", "a"), ("SYNC_SQL_URL", "sqlite::memory:")];
        let with = |extra: &[(&str, &str)]| Config::from_vars(vars(&[&base[..], extra].concat()));
        let filter = with(&[]).unwrap().engine.filter;
        assert!(filter.enabled);
        assert_eq!((filter.lag_bound, filter.poll_interval), (Duration::from_secs(5), Duration::from_secs(2)));
        assert!(!with(&[("SYNC_FILTER_LAG_BOUND_MS", "0")]).unwrap().engine.filter.enabled);
        let bad = with(&[("SYNC_FILTER_LAG_BOUND_MS", "1000"), ("SYNC_FILTER_POLL_INTERVAL_MS", "1000")]);
        assert!(bad.unwrap_err().to_string().contains("SYNC_FILTER_POLL_INTERVAL_MS"));
    }

    #[test]
    fn the_merkle_endpoint_is_off_by_default_and_needs_its_own_address_and_a_long_token() {
        const TOKEN: &str = "s3cret-token-0123456789";
        let base = [("SYNC_KAFKA_TOPICS", "a"), ("SYNC_SQL_URL", "sqlite::memory:")];
        let with = |extra: &[(&str, &str)]| Config::from_vars(vars(&[&base[..], extra].concat()));
        assert_eq!(with(&[]).unwrap().merkle_http, None);
        assert_eq!(with(&[("SYNC_MERKLE_ADDR", ""), ("SYNC_MERKLE_TOKEN", TOKEN)]).unwrap().merkle_http, None);
        let on = with(&[("SYNC_MERKLE_ADDR", "127.0.0.1:9091"), ("SYNC_MERKLE_TOKEN", TOKEN)]).unwrap();
        let merkle = on.merkle_http.clone().unwrap();
        assert_eq!((merkle.addr, merkle.token.expose()), ("127.0.0.1:9091".parse().unwrap(), TOKEN));
        assert!(!format!("{on:?}").contains(TOKEN), "Debug of Config shows the token");
        for (extra, name) in [
            (vec![("SYNC_MERKLE_ADDR", "127.0.0.1:9091")], "SYNC_MERKLE_TOKEN"),
            (vec![("SYNC_MERKLE_ADDR", "127.0.0.1:9091"), ("SYNC_MERKLE_TOKEN", "s3cret-short")], "SYNC_MERKLE_TOKEN"),
            (
                vec![("SYNC_MERKLE_ADDR", "127.0.0.1:9091"), ("SYNC_MERKLE_TOKEN", "s3cret token 0123456789")],
                "SYNC_MERKLE_TOKEN",
            ),
            (vec![("SYNC_MERKLE_ADDR", "9091"), ("SYNC_MERKLE_TOKEN", TOKEN)], "SYNC_MERKLE_ADDR"),
            (vec![("SYNC_MERKLE_ADDR", "127.0.0.1:9090"), ("SYNC_MERKLE_TOKEN", TOKEN)], "SYNC_MERKLE_ADDR"),
            (
                vec![
                    ("SYNC_METRICS_ADDR", "127.0.0.1:9500"),
                    ("SYNC_MERKLE_ADDR", "127.0.0.1:9500"),
                    ("SYNC_MERKLE_TOKEN", TOKEN),
                ],
                "SYNC_MERKLE_ADDR",
            ),
        ] {
            let message = with(&extra).unwrap_err().to_string();
            assert!(message.contains(name), "{extra:?}: {message}");
            assert!(!message.contains("s3cret"), "the token is printed: {message}");
        }
        let elsewhere = [("SYNC_MERKLE_ADDR", "127.0.0.1:9090"), ("SYNC_METRICS_ADDR", "127.0.0.1:9500")];
        assert!(with(&[&elsewhere[..], &[("SYNC_MERKLE_TOKEN", TOKEN)]].concat()).unwrap().merkle_http.is_some());
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(redact_url("mysql://root:pw@127.0.0.1:3306/test"), "mysql://root:***@127.0.0.1:3306/test");
        assert_eq!(redact_url("redis://127.0.0.1:7000"), "redis://127.0.0.1:7000");
        assert_eq!(format!("{:?}", Secret::new("pw")), "Secret(***)");
    }
}
