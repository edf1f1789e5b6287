//! `sync-engine verify --l2 [--repair]`: one L2 audit pass on demand, with the worker's own
//! `SYNC_*` settings (Redis URL and prefix, SQL URL and table). It prints what it found and,
//! with `--repair`, what it rewrote; it exits non-zero when drift is left unrepaired, so a
//! cron job or a runbook step can act on it.

use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use sync_engine::config::{redact_url, Config};
use sync_engine::engine::{audit_pass, AuditOptions};
use sync_engine::storage::redis::RedisStore;
use sync_engine::storage::sql::SqlStore;
use sync_engine::ArchiveStore;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Compare every L2 entry with L3 (the only check so far; required).
    #[arg(long)]
    pub l2: bool,
    /// Rewrite or delete the entries that differ.
    #[arg(long)]
    pub repair: bool,
    /// Entries read per second at most (0: as fast as the stores answer).
    #[arg(long, default_value_t = 0)]
    pub keys_per_sec: u64,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.l2, "say what to verify: --l2");
    let config = Config::from_env()?.engine;
    let urls = config.redis_urls();
    anyhow::ensure!(!urls.is_empty(), "SYNC_REDIS_URLS is not set: there is no L2 to verify");
    let sql_url = config.sql_url.as_ref().ok_or_else(|| anyhow::anyhow!("SYNC_SQL_URL is not set"))?;
    let l2 = RedisStore::connect(&urls, &config.redis_prefix).await?;
    let l3 = SqlStore::connect(sql_url.expose(), &config.sql_table).await?;
    println!(
        "verify: L2 {} (prefix {:?}) against L3 {} (table {}){}",
        redact_url(&urls[0]),
        config.redis_prefix,
        redact_url(sql_url.expose()),
        config.sql_table,
        if args.repair { ", repairing" } else { "" }
    );
    let options =
        AuditOptions { keys_per_sec: args.keys_per_sec, repair: args.repair, ttl_secs: config.redis_ttl_secs };
    let report = audit_pass(&l2, &l3, options, &CancellationToken::new()).await?;
    l3.close().await;
    println!("scanned         {}", report.scanned);
    println!("agreeing        {}", report.agreeing);
    println!("stale           {}", report.stale);
    println!("corrupt         {}", report.corrupt);
    println!("unreadable      {}", report.unreadable);
    println!("ahead of L3     {} (L3 behind: a write-ahead log draining)", report.ahead_of_l3);
    println!("only in L2      {} (routed without L3; left alone)", report.only_in_l2);
    println!("repaired        {}", report.repaired);
    println!("took            {:.1} s", report.duration.as_secs_f64());
    for id in report.divergent_ids.iter().take(50) {
        println!("  divergent: {id}");
    }
    let unrepaired = report.drift().saturating_sub(report.repaired);
    Ok(if unrepaired == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
