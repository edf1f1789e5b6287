//! What L3 can take, for the benchmark: the same rows the worker writes (the same workload,
//! generated from the same seed: ids, versions, contents, deletes), written four ways, each
//! into a fresh table of our schema, timed from the first row to the last commit:
//!
//! - `naive`: one plain client, multi-row upserts of 1,000 rows, a transaction each (no
//!   version guard);
//! - `parallel`: the same from two clients at once, the rows split by id so they never
//!   contend for a row lock;
//! - `load-data`: `LOAD DATA LOCAL INFILE` of a tab-separated file through the `mariadb`
//!   client (the fastest bulk path a MariaDB has; the password goes by `MYSQL_PWD`, never
//!   the command line);
//! - `library`: our own engine, L3 only: `enqueue` every item and await the receipts (the
//!   version guard, batching and the held-row read-back included).
//!
//! The benchmark reports the worker's rate against the best raw method and against the
//! library path, all measured in the same run on the same machine.

use std::io::Write;
use std::time::{Duration, Instant};

use sqlx::mysql::MySqlPoolOptions;
use sqlx::{Connection, MySqlConnection};
use tokio::sync::watch;

use sync_engine::config::Secret;
use sync_engine::item::{content_hash, now_ms};
use sync_engine::storage::sql::{placeholders, COLUMNS, COLUMN_COUNT};
use sync_engine::workload::Workload;
use sync_engine::{SyncEngine, SyncEngineConfig, SyncItem};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Naive,
    Parallel,
    LoadData,
    Library,
}

#[derive(Clone, Debug, clap::Args)]
pub struct CeilingArgs {
    #[arg(long, env = "SYNC_SQL_URL")]
    pub sql_url: String,
    #[command(flatten)]
    pub workload: super::produce::WorkloadArgs,
    #[arg(long, value_enum, default_value = "naive")]
    pub method: Method,
    #[arg(long, default_value_t = 1000)]
    pub rows_per_statement: usize,
    #[arg(long, default_value = "ceiling_items")]
    pub table: String,
}

/// One row to write: what the worker would store for one valid record.
struct Row {
    id: Vec<u8>,
    version: u64,
    content: Option<Vec<u8>>,
}

fn rows(args: &CeilingArgs) -> Vec<Row> {
    Workload::new(args.workload.spec())
        .filter(|record| record.poison_reason.is_none())
        .map(|record| Row {
            version: record
                .headers
                .iter()
                .find(|(name, _)| name == "sync-version")
                .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse().ok())
                .unwrap_or(0),
            id: record.key.unwrap_or_default(),
            content: record.value,
        })
        .collect()
}

pub async fn run(args: CeilingArgs) -> anyhow::Result<f64> {
    anyhow::ensure!(sync_engine::config::is_sql_identifier(&args.table), "invalid table name");
    anyhow::ensure!(args.rows_per_statement > 0, "--rows-per-statement must be at least 1");
    let rows = rows(&args);
    let mut connection = MySqlConnection::connect(&args.sql_url).await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", args.table)).execute(&mut connection).await?;
    if args.method != Method::Library {
        create_table(&mut connection, &args.table).await?;
    }
    let started = Instant::now();
    match args.method {
        Method::Naive => upsert_all(&args.sql_url, &args.table, &rows, args.rows_per_statement).await?,
        Method::Parallel => {
            let (left, right): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|row| content_hash(&row.id)[0] % 2 == 0);
            let (a, b) = tokio::join!(
                upsert_all(&args.sql_url, &args.table, &left, args.rows_per_statement),
                upsert_all(&args.sql_url, &args.table, &right, args.rows_per_statement)
            );
            a?;
            b?;
        }
        Method::LoadData => load_data(&args.sql_url, &args.table, &rows)?,
        Method::Library => library(&args.sql_url, &args.table, &rows).await?,
    }
    let elapsed = started.elapsed();
    let rows_per_sec = rows.len() as f64 / elapsed.as_secs_f64();
    // A method that skipped rows would look fast: every id must have its row.
    let ids: std::collections::HashSet<&[u8]> = rows.iter().map(|row| row.id.as_slice()).collect();
    let stored: i64 =
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", args.table)).fetch_one(&mut connection).await?;
    anyhow::ensure!(stored as usize == ids.len(), "{stored} rows stored for {} ids", ids.len());
    let leftovers = ["", "_migrations", "_merkle", "_merkle_dirty"].map(|suffix| format!("{}{suffix}", args.table));
    for table in leftovers {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}")).execute(&mut connection).await?;
    }
    let method =
        clap::ValueEnum::to_possible_value(&args.method).map(|value| value.get_name().to_owned()).unwrap_or_default();
    println!("ceiling method={method} rows={} rows_per_sec={rows_per_sec:.0}", rows.len());
    Ok(rows_per_sec)
}

async fn create_table(connection: &mut MySqlConnection, table: &str) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE {table} (id VARBINARY(255) NOT NULL PRIMARY KEY, version BIGINT UNSIGNED NOT NULL, \
         content LONGBLOB NULL, content_type VARCHAR(16) NOT NULL, content_hash BINARY(32) NOT NULL, \
         deleted TINYINT(1) NOT NULL, updated_at_ms BIGINT UNSIGNED NOT NULL, origin_topic VARCHAR(255) NULL, \
         origin_partition INT NULL, origin_offset BIGINT NULL, state VARBINARY(64) NULL, \
         KEY state_id (state, id)) ENGINE=InnoDB"
    ))
    .execute(connection)
    .await?;
    Ok(())
}

/// One client: plain multi-row upserts, one transaction per statement.
async fn upsert_all<R: std::borrow::Borrow<Row>>(
    url: &str,
    table: &str,
    rows: &[R],
    per_statement: usize,
) -> anyhow::Result<()> {
    let pool = MySqlPoolOptions::new().max_connections(1).connect(url).await?;
    let mut connection = pool.acquire().await?;
    let upsert = |rows: usize| {
        format!(
            "INSERT INTO {table} ({COLUMNS}) VALUES {} ON DUPLICATE KEY UPDATE content = VALUES(content), \
             version = VALUES(version), content_hash = VALUES(content_hash), deleted = VALUES(deleted)",
            placeholders(rows, COLUMN_COUNT)
        )
    };
    let full = upsert(per_statement);
    for (chunk_index, chunk) in rows.chunks(per_statement).enumerate() {
        let statement = if chunk.len() == per_statement { full.clone() } else { upsert(chunk.len()) };
        let mut transaction = connection.begin().await?;
        let mut query = sqlx::query(&statement);
        for (index, row) in chunk.iter().enumerate() {
            let row = row.borrow();
            query = query
                .bind(row.id.clone())
                .bind(row.version)
                .bind(row.content.as_deref())
                .bind("binary")
                .bind(content_hash(row.content.as_deref().unwrap_or_default()).to_vec())
                .bind(row.content.is_none())
                .bind(now_ms())
                .bind("ceiling")
                .bind(0i32)
                .bind((chunk_index * per_statement + index) as i64)
                .bind(None::<&[u8]>);
        }
        query.execute(&mut *transaction).await?;
        transaction.commit().await?;
    }
    Ok(())
}

/// `bytes` escaped for LOAD DATA's default format (fields by tab, lines by newline, `\` escapes).
fn escaped(bytes: &[u8], out: &mut Vec<u8>) {
    for &byte in bytes {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0 => out.extend_from_slice(b"\\0"),
            byte => out.push(byte),
        }
    }
}

/// The parts of `mysql://user[:password]@host[:port]/database` the `mariadb` client needs.
struct MysqlTarget {
    user: String,
    password: Option<String>,
    host: String,
    port: String,
    database: String,
}

fn mysql_target(url: &str) -> anyhow::Result<MysqlTarget> {
    let rest = url.strip_prefix("mysql://").ok_or_else(|| anyhow::anyhow!("load-data needs a mysql:// URL"))?;
    let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("root", rest));
    let (user, password) = match credentials.split_once(':') {
        Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
        None => (credentials.to_owned(), None),
    };
    let (address, database) = rest.split_once('/').unwrap_or((rest, ""));
    let database = database.split('?').next().unwrap_or_default().to_owned();
    let (host, port) = address.split_once(':').unwrap_or((address, "3306"));
    Ok(MysqlTarget { user, password, host: host.to_owned(), port: port.to_owned(), database })
}

/// Writes the rows to a tab-separated file, then has the `mariadb` client load it (REPLACE:
/// a later row of the same id wins, as the upserts' order makes it).
fn load_data(url: &str, table: &str, rows: &[Row]) -> anyhow::Result<()> {
    let target = mysql_target(url)?;
    let mut file = tempfile::NamedTempFile::new()?;
    let mut line = Vec::with_capacity(4096);
    for (index, row) in rows.iter().enumerate() {
        line.clear();
        escaped(&row.id, &mut line);
        write!(line, "\t{}\t", row.version)?;
        match &row.content {
            Some(content) => escaped(content, &mut line),
            None => line.extend_from_slice(b"\\N"),
        }
        line.extend_from_slice(b"\tbinary\t");
        escaped(&content_hash(row.content.as_deref().unwrap_or_default()), &mut line);
        writeln!(line, "\t{}\t{}\tceiling\t0\t{index}\t\\N", u8::from(row.content.is_none()), now_ms())?;
        file.write_all(&line)?;
    }
    file.flush()?;
    let statement = format!(
        "LOAD DATA LOCAL INFILE '{}' REPLACE INTO TABLE {table} ({})",
        file.path().display(),
        COLUMNS.replace(['\n', ' '], "")
    );
    let mut command = std::process::Command::new("mariadb");
    command.arg("--local-infile=1").args([
        "-h",
        &target.host,
        "-P",
        &target.port,
        "-u",
        &target.user,
        &target.database,
        "-e",
        &statement,
    ]);
    if let Some(password) = &target.password {
        command.env("MYSQL_PWD", password);
    }
    let output = command.output().map_err(|error| anyhow::anyhow!("cannot run the mariadb client: {error}"))?;
    anyhow::ensure!(output.status.success(), "LOAD DATA failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// Our engine, L3 only: every item enqueued, every receipt awaited.
async fn library(url: &str, table: &str, rows: &[Row]) -> anyhow::Result<()> {
    let config = SyncEngineConfig {
        sql_url: Some(Secret::new(url.to_owned())),
        sql_table: table.to_owned(),
        memory_budget_bytes: 4 << 30,
        audit_keys_per_sec: 0,
        ..SyncEngineConfig::in_memory()
    };
    let mut engine = SyncEngine::new(config.clone(), watch::channel(config).1);
    engine.start().await?;
    let mut receipts = Vec::with_capacity(rows.len());
    for row in rows {
        let id = String::from_utf8(row.id.clone())?;
        let item = match &row.content {
            Some(content) => SyncItem::new(id, content.clone()).with_version(row.version),
            None => SyncItem::tombstone(id, row.version),
        };
        receipts.push(engine.enqueue(item, Default::default()).await?);
    }
    for receipt in receipts {
        receipt.await?;
    }
    engine.shutdown_within(Duration::from_secs(30)).await;
    Ok(())
}
