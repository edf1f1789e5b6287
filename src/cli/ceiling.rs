//! The raw MariaDB ceiling for the benchmark: the same rows the worker writes (the same
//! workload, generated from the same seed: ids, versions, contents, deletes), as plain
//! multi-row upserts (no version guard, no Kafka, no Redis) from one plain client, 1,000 rows
//! per statement in one transaction each. The worker's throughput is reported as a ratio
//! of this number, measured in the same run on the same machine.

use std::time::Instant;

use sqlx::mysql::MySqlPoolOptions;
use sqlx::Connection;

use sync_engine::item::{content_hash, now_ms};
use sync_engine::storage::sql::{placeholders, COLUMNS, COLUMN_COUNT};
use sync_engine::workload::{OutgoingRecord, Workload};

#[derive(Clone, Debug, clap::Args)]
pub struct CeilingArgs {
    #[arg(long, env = "SYNC_SQL_URL")]
    pub sql_url: String,
    #[command(flatten)]
    pub workload: super::produce::WorkloadArgs,
    #[arg(long, default_value_t = 1000)]
    pub rows_per_statement: usize,
    #[arg(long, default_value = "ceiling_items")]
    pub table: String,
}

pub async fn run(args: CeilingArgs) -> anyhow::Result<f64> {
    anyhow::ensure!(sync_engine::config::is_sql_identifier(&args.table), "invalid table name");
    let pool = MySqlPoolOptions::new().max_connections(1).connect(&args.sql_url).await?;
    let mut connection = pool.acquire().await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", args.table)).execute(&mut *connection).await?;
    sqlx::query(&format!(
        "CREATE TABLE {} (id VARBINARY(255) NOT NULL PRIMARY KEY, version BIGINT UNSIGNED NOT NULL, \
         content LONGBLOB NULL, content_type VARCHAR(16) NOT NULL, content_hash BINARY(32) NOT NULL, \
         deleted TINYINT(1) NOT NULL, updated_at_ms BIGINT UNSIGNED NOT NULL, origin_topic VARCHAR(255) NULL, \
         origin_partition INT NULL, origin_offset BIGINT NULL, state VARBINARY(64) NULL, \
         KEY state_id (state, id)) ENGINE=InnoDB",
        args.table
    ))
    .execute(&mut *connection)
    .await?;
    let upsert = |rows: usize| {
        format!(
            "INSERT INTO {} ({COLUMNS}) VALUES {} ON DUPLICATE KEY UPDATE content = VALUES(content), version = VALUES(version), \
             content_hash = VALUES(content_hash), deleted = VALUES(deleted)",
            args.table,
            placeholders(rows, COLUMN_COUNT)
        )
    };
    let statement = upsert(args.rows_per_statement);
    let rows: Vec<OutgoingRecord> = Workload::new(args.workload.spec()).filter(|r| r.poison_reason.is_none()).collect();
    let started = Instant::now();
    let mut written = 0u64;
    for chunk in rows.chunks(args.rows_per_statement) {
        let statement = if chunk.len() == args.rows_per_statement { statement.clone() } else { upsert(chunk.len()) };
        let mut transaction = connection.begin().await?;
        let mut query = sqlx::query(&statement);
        for (index, record) in chunk.iter().enumerate() {
            let version: u64 = record
                .headers
                .iter()
                .find(|(name, _)| name == "sync-version")
                .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
                .unwrap_or(0);
            let content = record.value.as_deref();
            query = query
                .bind(record.key.clone().unwrap_or_default())
                .bind(version)
                .bind(content)
                .bind("binary")
                .bind(content_hash(content.unwrap_or_default()).to_vec())
                .bind(content.is_none())
                .bind(now_ms())
                .bind("ceiling")
                .bind(0i32)
                .bind(written as i64 + index as i64)
                .bind(None::<&[u8]>);
        }
        query.execute(&mut *transaction).await?;
        transaction.commit().await?;
        written += chunk.len() as u64;
    }
    let rows_per_sec = written as f64 / started.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", args.table)).execute(&mut *connection).await?;
    println!("ceiling rows={written} rows_per_sec={rows_per_sec:.0}");
    Ok(rows_per_sec)
}
