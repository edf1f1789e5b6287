//! Live reconfiguration of the worker: its settings come from the process environment and,
//! when `SYNC_ENV_FILE` names one, an env file whose values win (a mounted ConfigMap, say).
//! On SIGHUP the worker reads the file again, validates the whole set like at start, and
//! either applies it or logs why not: one bad value keeps every old value.
//!
//! Only some settings can change under a running worker (`LIVE`); the others are connections,
//! identities or file locations, and a change to one is logged as needing a restart (the
//! running value stays).

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{Config, ConfigError};

/// Names the env file; itself only read from the process environment.
pub const ENV_FILE_VAR: &str = "SYNC_ENV_FILE";

/// Largest env file we read: a config, not a data file.
const MAX_ENV_FILE_BYTES: u64 = 1 << 20;

/// The settings a running worker applies without a restart.
pub const LIVE: [&str; 7] = [
    "SYNC_BATCH_MAX_ITEMS",
    "SYNC_BATCH_MAX_BYTES",
    "SYNC_BATCH_MAX_DELAY_MS",
    "SYNC_REDIS_TTL_SECS",
    "SYNC_MEMORY_BUDGET_BYTES",
    "SYNC_L1_MAX_BYTES",
    "SYNC_LOG",
];

/// Why an env file could not be used. Values are never quoted back: they may be secrets.
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    #[error("cannot read the env file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the env file {path} is over {MAX_ENV_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("the env file {path}, line {line}: {why}")]
    Syntax { path: String, line: usize, why: &'static str },
}

/// Reads `KEY=VALUE` lines: blank lines and `#` comments are skipped, an `export ` prefix is
/// allowed, and a value may be wrapped in one pair of single or double quotes (taken
/// literally, no escapes). Keys must be `[A-Z0-9_]+`; only `SYNC_*` keys and `HOSTNAME` are
/// kept, like the process environment.
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>, EnvFileError> {
    let shown = path.display().to_string();
    let size = std::fs::metadata(path).map_err(|source| EnvFileError::Read { path: shown.clone(), source })?.len();
    if size > MAX_ENV_FILE_BYTES {
        return Err(EnvFileError::TooLarge { path: shown });
    }
    let text = std::fs::read_to_string(path).map_err(|source| EnvFileError::Read { path: shown.clone(), source })?;
    parse_env_file(&text).map_err(|(line, why)| EnvFileError::Syntax { path: shown, line, why })
}

/// The parser of `read_env_file`; errors carry the 1-based line number.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, (usize, &'static str)> {
    let mut vars = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or((index + 1, "expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            return Err((index + 1, "a key must be upper-case letters, digits and underscores"));
        }
        let value = unquote(value.trim()).ok_or((index + 1, "unbalanced quotes"))?;
        if key.starts_with("SYNC_") || key == "HOSTNAME" {
            vars.insert(key.to_owned(), value.to_owned());
        }
    }
    Ok(vars)
}

fn unquote(value: &str) -> Option<&str> {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            return rest.strip_suffix(quote);
        }
    }
    (!value.ends_with('"') && !value.ends_with('\'')).then_some(value)
}

/// The variables the worker runs with: the process environment's, overridden by the env
/// file's (the file is what operators change while it runs).
pub fn layered(process: BTreeMap<String, String>, file: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut vars = process;
    vars.extend(file);
    vars
}

/// The process environment's `SYNC_*` variables and `HOSTNAME`, plus the env file's when
/// `SYNC_ENV_FILE` names one.
pub fn current_vars() -> Result<BTreeMap<String, String>, EnvFileError> {
    let process: BTreeMap<String, String> =
        std::env::vars().filter(|(name, _)| name.starts_with("SYNC_") || name == "HOSTNAME").collect();
    let file = match process.get(ENV_FILE_VAR) {
        Some(path) if !path.is_empty() => read_env_file(Path::new(path))?,
        _ => return Ok(process),
    };
    Ok(layered(process, file))
}

/// What a reload would change, by variable name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied to the running worker.
    pub live: Vec<String>,
    /// Kept at their running value until the next restart.
    pub need_restart: Vec<String>,
}

/// Compares two variable sets (names only are reported: values may be secrets).
pub fn changes(running: &BTreeMap<String, String>, next: &BTreeMap<String, String>) -> Changes {
    let mut changes = Changes::default();
    let names: std::collections::BTreeSet<&String> = running.keys().chain(next.keys()).collect();
    for name in names {
        if running.get(name) == next.get(name) || name == "HOSTNAME" {
            continue;
        }
        if LIVE.contains(&name.as_str()) {
            changes.live.push(name.clone());
        } else {
            changes.need_restart.push(name.clone());
        }
    }
    changes
}

/// The outcome of one reload, for the log.
#[derive(Debug)]
pub enum Reload {
    /// Nothing differs from what runs.
    Unchanged,
    /// The new set is valid: `config` carries the live values (restart-only ones as running).
    Apply { config: Box<Config>, vars: BTreeMap<String, String>, changes: Changes },
    /// The new set is invalid: nothing changes.
    Refused(ConfigError),
}

/// Validates `next` as a whole; on success, returns the running config with the live
/// settings taken from `next`.
pub fn plan(running: &Config, running_vars: &BTreeMap<String, String>, next: BTreeMap<String, String>) -> Reload {
    let changes = changes(running_vars, &next);
    if changes.live.is_empty() && changes.need_restart.is_empty() {
        return Reload::Unchanged;
    }
    let proposed = match Config::from_vars(next.clone()) {
        Ok(config) => config,
        Err(error) => return Reload::Refused(error),
    };
    let mut config = running.clone();
    config.engine.batch = proposed.engine.batch;
    config.engine.redis_ttl_secs = proposed.engine.redis_ttl_secs;
    config.engine.memory_budget_bytes = proposed.engine.memory_budget_bytes;
    config.engine.l1_max_bytes = proposed.engine.l1_max_bytes;
    config.kafka.memory_budget_bytes = proposed.kafka.memory_budget_bytes;
    config.log_filter = proposed.log_filter;
    // Restart-only variables keep their running values, so the next diff names them again
    // until a restart picks them up.
    let mut vars = next;
    for name in &changes.need_restart {
        match running_vars.get(name) {
            Some(value) => vars.insert(name.clone(), value.clone()),
            None => vars.remove(name),
        };
    }
    Reload::Apply { config: Box::new(config), vars, changes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn base() -> BTreeMap<String, String> {
        vars(&[("SYNC_KAFKA_TOPICS", "items"), ("SYNC_SQL_URL", "mysql://u:p@h/db")])
    }

    #[test]
    fn env_files_take_comments_quotes_and_export_and_keep_only_sync_keys() {
        let text = "# config\n\nSYNC_BATCH_MAX_ITEMS=500\nexport SYNC_LOG=\"info,sync_engine=debug\"\nSYNC_REDIS_PREFIX='a b'\nPATH=/bin\n";
        let parsed = parse_env_file(text).unwrap();
        assert_eq!(
            parsed,
            vars(&[
                ("SYNC_BATCH_MAX_ITEMS", "500"),
                ("SYNC_LOG", "info,sync_engine=debug"),
                ("SYNC_REDIS_PREFIX", "a b")
            ])
        );
        assert_eq!(parse_env_file("SYNC_A=1\nnot a pair\n").unwrap_err().0, 2);
        assert!(parse_env_file("sync_lower=1").is_err());
        assert!(parse_env_file("SYNC_A=\"open").is_err());
    }

    #[test]
    fn the_file_overrides_the_process_environment() {
        let merged = layered(vars(&[("SYNC_A", "process"), ("SYNC_B", "process")]), vars(&[("SYNC_A", "file")]));
        assert_eq!(merged, vars(&[("SYNC_A", "file"), ("SYNC_B", "process")]));
    }

    #[test]
    fn live_changes_apply_and_restart_only_ones_keep_their_running_value() {
        let running_vars = base();
        let running = Config::from_vars(running_vars.clone()).unwrap();
        let mut next = base();
        next.insert("SYNC_BATCH_MAX_ITEMS".into(), "250".into());
        next.insert("SYNC_REDIS_TTL_SECS".into(), "60".into());
        next.insert("SYNC_MEMORY_BUDGET_BYTES".into(), (64u64 << 20).to_string());
        next.insert("SYNC_KAFKA_GROUP_ID".into(), "other".into());
        let Reload::Apply { config, vars, changes } = plan(&running, &running_vars, next) else {
            panic!("a valid set applies")
        };
        assert_eq!(config.engine.batch.max_items, 250);
        assert_eq!(config.engine.redis_ttl_secs, 60);
        assert_eq!(config.engine.memory_budget_bytes, 64 << 20);
        assert_eq!(config.kafka.group_id, running.kafka.group_id, "the group needs a restart");
        assert_eq!(changes.live, ["SYNC_BATCH_MAX_ITEMS", "SYNC_MEMORY_BUDGET_BYTES", "SYNC_REDIS_TTL_SECS"]);
        assert_eq!(changes.need_restart, ["SYNC_KAFKA_GROUP_ID"]);
        assert!(!vars.contains_key("SYNC_KAFKA_GROUP_ID"), "the running value is kept in the applied set");
    }

    #[test]
    fn an_invalid_set_is_refused_whole_and_the_same_set_is_unchanged() {
        let running_vars = base();
        let running = Config::from_vars(running_vars.clone()).unwrap();
        let mut next = base();
        next.insert("SYNC_BATCH_MAX_ITEMS".into(), "250".into());
        next.insert("SYNC_BATCH_MAX_BYTES".into(), "lots".into());
        let Reload::Refused(error) = plan(&running, &running_vars, next) else { panic!("one bad value refuses all") };
        assert!(error.to_string().contains("SYNC_BATCH_MAX_BYTES"), "{error}");
        assert!(matches!(plan(&running, &running_vars, base()), Reload::Unchanged));
    }
}
