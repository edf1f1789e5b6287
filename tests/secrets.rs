//! Invariant 7: passwords in URLs and librdkafka settings never reach logs, errors or
//! `/metrics`, whether the process fails to start or runs.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SQL_PASSWORD: &str = "sql-Pa55word-never-printed";
const REDIS_PASSWORD: &str = "redis-Pa55word-never-printed";
const SASL_PASSWORD: &str = "sasl-Pa55word-never-printed";

fn assert_clean(what: &str, text: &str) {
    for secret in [SQL_PASSWORD, REDIS_PASSWORD, SASL_PASSWORD] {
        assert!(!text.contains(secret), "{what} leaks a password:\n{text}");
    }
}

fn run_to_exit(envs: &[(&str, String)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
    command.arg("run").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("SYNC_LOG", "debug");
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code(), text)
}

#[test]
fn a_bad_configuration_names_the_variables_but_never_their_secret_values() {
    let (code, text) = run_to_exit(&[
        ("SYNC_KAFKA_TOPICS", "t".into()),
        ("SYNC_SQL_URL", format!("postgres://user:{SQL_PASSWORD}@127.0.0.1/db")),
        ("SYNC_REDIS_URLS", format!("http://:{REDIS_PASSWORD}@127.0.0.1:7000")),
        ("SYNC_KAFKA_OPT_SASL_PASSWORD", SASL_PASSWORD.into()),
        ("SYNC_BATCH_MAX_ITEMS", "zero".into()),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        text.contains("SYNC_SQL_URL") && text.contains("SYNC_REDIS_URLS") && text.contains("SYNC_BATCH_MAX_ITEMS"),
        "{text}"
    );
    assert_clean("the configuration error", &text);
}

#[test]
fn a_refused_database_login_reports_the_error_without_the_password() {
    let names = Names::new("secrets");
    let url = mysql_url().replacen("mysql://root@", &format!("mysql://nosuchuser:{SQL_PASSWORD}@"), 1);
    let (code, text) = run_to_exit(&[
        ("SYNC_KAFKA_TOPICS", names.topic.clone()),
        ("SYNC_SQL_URL", url),
        ("SYNC_SQL_TABLE", names.table.clone()),
        ("SYNC_METRICS_ADDR", format!("127.0.0.1:{}", free_port())),
        ("SYNC_WAL_DIR", names.wal_dir().display().to_string()),
        ("SYNC_KAFKA_OPT_SASL_PASSWORD", SASL_PASSWORD.into()),
    ]);
    assert_ne!(code, Some(0));
    assert!(text.to_lowercase().contains("denied") || text.contains("error"), "the failure is reported:\n{text}");
    assert_clean("a refused login", &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_keeps_secrets_out_of_logs_and_metrics() {
    let names = Names::new("secrets_run");
    create_topic(&names.topic, 1).await;
    // The SASL password is set but unused (PLAINTEXT): it still must never be printed.
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sync-engine"));
    child
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SYNC_LOG", "debug")
        .env("SYNC_KAFKA_BROKERS", brokers())
        .env("SYNC_KAFKA_TOPICS", &names.topic)
        .env("SYNC_KAFKA_GROUP_ID", &names.group)
        .env("SYNC_SQL_URL", mysql_url())
        .env("SYNC_SQL_TABLE", &names.table)
        .env("SYNC_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("SYNC_WAL_DIR", names.wal_dir())
        .env("SYNC_KAFKA_OPT_SASL_USERNAME", "sync")
        .env("SYNC_KAFKA_OPT_SASL_PASSWORD", SASL_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let process = child.spawn().unwrap();
    let ready = wait_ready(port, Duration::from_secs(30)).await;
    let metrics = http_get(port, "/metrics").unwrap_or_default();
    signal(&process, "TERM");
    let output = process.wait_with_output().unwrap();
    let logs = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(ready, "the worker became ready:\n{logs}");
    assert!(output.status.success());
    assert!(logs.len() > 100, "debug logs were written");
    assert_clean("the logs", &logs);
    assert_clean("/metrics", &metrics);
}
