//! The `sync-engine` command: parses the subcommand and runs it (each lives in `src/cli/`).
//!
//! `run` (the worker, configured by `SYNC_*` env vars), `demo` (the embedded main job),
//! `produce` (the load generator), `offsets` (a group's committed offsets), `replay` (move a stopped
//! group's committed offsets so the workers re-read a range), `ceiling` (the raw MariaDB ceiling for the benchmark), `verify` (one L2 audit pass), `diff` (compare two L3s by their merkle trees, `--repair`).

mod cli;

/// mimalloc instead of glibc malloc: the worker allocates per record (decode, batches, rows) on
/// several threads, and glibc's arenas spent a quarter of the library path's CPU in
/// malloc/free/consolidate (perf, `scripts/bench.sh`). The library leaves the choice to its user.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h v3; the Rust
/// binding names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS at once rather than after mimalloc's default 10 ms: the
/// worker's peak RSS must stay within its budget + L1 + 64 MiB, and with the delay it ran
/// 10-20 MiB higher (the L2 + L3 run of `scripts/bench.sh`: 218 vs 206 MiB) for no measured
/// speed.
///
/// An operator's own `MIMALLOC_PURGE_DELAY` (mimalloc reads its options from the environment)
/// is left to win.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer option; mimalloc reads it at every purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::{ceiling, demo, diff, offsets, produce, replay, verify};

#[derive(Parser)]
#[command(name = "sync-engine", version, about = "Kafka → L1 → Redis → MySQL ingestion worker")]
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
    Offsets(offsets::OffsetsArgs),
    /// Move a stopped consumer group's committed offsets so the workers re-read a range (safe: every tier is version-guarded).
    Replay(replay::ReplayArgs),
    /// Measure the raw MariaDB ceiling: plain multi-row upserts, no version guard.
    Ceiling(ceiling::CeilingArgs),
    /// Compare every L2 entry with L3 once (`--l2`), and repair what differs (`--repair`).
    Verify(verify::VerifyArgs),
    /// Compare this worker's L3 with another by their merkle trees; print the divergent ids (--repair copies the newer rows).
    Diff(diff::DiffArgs),
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
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
            Command::Run => cli::run::run_worker().await,
            Command::Demo(args) => demo::run_and_report(args).await,
            Command::Produce(args) => produce::run(args).await.map(|_| ExitCode::SUCCESS),
            Command::Offsets(args) => offsets::run(args).map(|()| ExitCode::SUCCESS),
            Command::Replay(args) => replay::run(args).map(|()| ExitCode::SUCCESS),
            Command::Ceiling(args) => ceiling::run(args).await.map(|_| ExitCode::SUCCESS),
            Command::Verify(args) => verify::run(args).await,
            Command::Diff(args) => diff::run(args).await,
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
