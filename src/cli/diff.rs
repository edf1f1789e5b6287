//! `sync-engine diff --against <sql-url> [--repair]`: compares the merkle tree of this worker's
//! L3 (`SYNC_SQL_URL`, `SYNC_SQL_TABLE`) with another L3's (another deployment, a restore),
//! top-down, and prints the divergent ids and the reads it took. `--repair` copies the newer
//! row of each divergent id through the version guard, both ways, then compares again.
//! Both trees are brought up to date first (marks drained; a tree not known to be complete is
//! rebuilt from its rows). URLs are printed redacted, never with a password.
//!
//! `--against-peer http://host:port` compares with a peer's tree through its `GET /merkle/`
//! endpoint instead (token from `SYNC_MERKLE_TOKEN`, never a flag: flags show in `ps`), with
//! no SQL credentials for it; the peer keeps its own tree current, and `--repair` needs SQL.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sync_engine::config::{redact_url, Secret};
use sync_engine::http_merkle::HttpSlots;
use sync_engine::merkle::hex;
use sync_engine::storage::sql::SqlStore;
use sync_engine::ArchiveStore;

#[derive(Clone, Debug, clap::Args)]
pub struct DiffArgs {
    /// This worker's L3 (mysql://… or sqlite:…).
    #[arg(long, env = "SYNC_SQL_URL", hide_env_values = true)]
    pub sql_url: String,
    #[arg(long, env = "SYNC_SQL_TABLE", default_value = "sync_items")]
    pub table: String,
    /// The other L3 (mysql://… or sqlite:…).
    #[arg(long, required_unless_present = "against_peer", conflicts_with = "against_peer")]
    pub against: Option<String>,
    /// A peer's merkle endpoint (http://host:port, its SYNC_MERKLE_ADDR), with the token in
    /// SYNC_MERKLE_TOKEN: compares without SQL access to the peer.
    #[arg(long, conflicts_with_all = ["repair", "against_table"])]
    pub against_peer: Option<String>,
    /// The other L3's table (default: the same name as ours).
    #[arg(long)]
    pub against_table: Option<String>,
    /// Copy the newer row of each divergent id to the other side, through the version guard.
    #[arg(long)]
    pub repair: bool,
    /// Rebuild both trees from their rows first: finds rows changed behind the engine's back
    /// (an operator's UPDATE), at the cost of reading every row.
    #[arg(long)]
    pub rebuild: bool,
    /// Deadline of each repair batch write, in milliseconds.
    #[arg(long, env = "SYNC_SQL_WRITE_TIMEOUT_MS", default_value_t = 5000)]
    pub write_timeout_ms: u64,
}

async fn connect(url: &str, table: &str, what: &str) -> anyhow::Result<SqlStore> {
    SqlStore::connect(url, table)
        .await
        .with_context(|| format!("cannot open {what} L3 {} table {table}", redact_url(url)))
}

/// How an id's row reads, for the report.
async fn describe(store: &SqlStore, id: &str) -> String {
    match store.get(id).await {
        Ok(Some(item)) if item.is_tombstone() => format!("deleted v{}", item.version),
        Ok(Some(item)) => format!("v{}", item.version),
        Ok(None) => "absent".into(),
        Err(error) => format!("unreadable ({error})"),
    }
}

pub async fn run(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let against = match (&args.against, &args.against_peer) {
        (Some(against), _) => against.clone(),
        (None, Some(peer)) => return run_against_peer(&args, peer).await,
        (None, None) => anyhow::bail!("--against or --against-peer is required"),
    };
    let against_table = args.against_table.clone().unwrap_or_else(|| args.table.clone());
    let local = connect(&args.sql_url, &args.table, "the local").await?;
    let other = connect(&against, &against_table, "the other").await?;
    if args.rebuild {
        local.merkle_rebuild().await.context("rebuilding the local tree")?;
        other.merkle_rebuild().await.context("rebuilding the other tree")?;
    }
    let diff = local.merkle_diff(&other).await.context("comparing the trees")?;
    println!("local   {} table {} root {}", redact_url(&args.sql_url), args.table, hex(&diff.local_root));
    println!("against {} table {} root {}", redact_url(&against), against_table, hex(&diff.other_root));
    for id in &diff.ids {
        println!("diverges {id} local={} against={}", describe(&local, id).await, describe(&other, id).await);
    }
    println!("divergent={} queries={}", diff.ids.len(), diff.queries);
    if diff.ids.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if !args.repair {
        return Ok(ExitCode::from(1));
    }
    let timeout = Duration::from_millis(args.write_timeout_ms);
    let repair = local.merkle_repair(&other, &diff.ids, timeout).await.context("repairing")?;
    for id in &repair.unrepairable {
        println!("not repaired {id}: neither row supersedes the other (or the guard refused the copy)");
    }
    let after = local.merkle_diff(&other).await.context("comparing the trees after the repair")?;
    println!(
        "repaired to_local={} to_against={} not_repaired={} divergent_after={} roots_equal={}",
        repair.to_local.len(),
        repair.to_other.len(),
        repair.unrepairable.len(),
        after.ids.len(),
        after.local_root == after.other_root
    );
    Ok(if after.ids.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `--against-peer`: the local tree against a peer's, read over its merkle endpoint.
async fn run_against_peer(args: &DiffArgs, peer: &str) -> anyhow::Result<ExitCode> {
    let token = std::env::var("SYNC_MERKLE_TOKEN").unwrap_or_default();
    anyhow::ensure!(!token.is_empty(), "--against-peer needs the peer's token in SYNC_MERKLE_TOKEN");
    let mut remote = HttpSlots::new(peer, Secret::new(token)).map_err(anyhow::Error::msg)?;
    let local = connect(&args.sql_url, &args.table, "the local").await?;
    if args.rebuild {
        local.merkle_rebuild().await.context("rebuilding the local tree")?;
    }
    let diff = local.merkle_diff_with(&mut remote).await.context("comparing with the peer's tree")?;
    println!("local   {} table {} root {}", redact_url(&args.sql_url), args.table, hex(&diff.local_root));
    println!("against-peer {peer} root {}", hex(&diff.other_root));
    for id in &diff.ids {
        println!("diverges {id} local={}", describe(&local, id).await);
    }
    println!("divergent={} queries={} http_requests={}", diff.ids.len(), diff.queries, remote.requests);
    Ok(if diff.ids.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
