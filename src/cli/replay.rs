//! `sync-engine replay`: moves a consumer group's committed offsets on one topic, so the
//! workers read a range of it again (the broker side is `sync_engine::kafka::group`).
//!
//! ```text
//! sync-engine replay --group G --topic T
//!     (--to-earliest | --to-latest | --to-offset P:O,... | --to-datetime RFC3339 | --shift-by ±N)
//!     [--dry-run]
//! ```
//!
//! # Why a replay is safe
//!
//! Every tier is version-guarded (docs/DESIGN.md §4, invariants 2 and 6): L1, L2 and L3 each
//! refuse a write whose version is older than the one they hold, and L1/L2 only take what L3
//! holds. Re-reading old records therefore never lets an older version win: a replay converges
//! to the same final state as the first pass. **Duplicates are expected**: every replayed
//! record is decoded, batched and offered to the tiers again (and counted in the metrics
//! again); the guards turn it into a no-op. Poison records in the range are dead-lettered a
//! second time.
//!
//! # What it does
//!
//! 1. Refuses while the group has active members, naming each (member id, client id, host):
//!    the workers must be stopped first, or they would overwrite the new offsets with their
//!    own at their next commit. A dry run goes through the same checks.
//! 2. Reads the topic's partitions, their watermarks (earliest and end offsets) and the
//!    group's committed offsets, without joining the group.
//! 3. Computes the new offset of each partition ([`plan`], pure):
//!    - `--to-earliest` / `--to-latest`: the low / high watermark;
//!    - `--to-datetime`: the first record at or after the time (`offsets_for_times`); a
//!      partition with none goes to its end;
//!    - `--to-offset P:O,...`: the listed partitions only, the others are unchanged; an offset
//!      outside the partition's `earliest..=end` is **refused** (not clamped), as is an
//!      unknown partition;
//!    - `--shift-by ±N`: from the committed offset, clamped to `earliest..=end`; a partition
//!      with no committed offset is left unchanged.
//! 4. Prints, per partition, the offset before (`-` if none is committed), after, and how many
//!    records will be re-read (or skipped, when moving forward).
//! 5. Unless `--dry-run`: checks the members once more, commits the new offsets synchronously
//!    from a client that never subscribes (so it never joins the group; the broker accepts
//!    such a commit only while the group is empty, and creates the group if it never
//!    existed), and reads them back.
//!
//! The member check lists classic-protocol groups (what librdkafka's consumer uses unless
//! `group.protocol=consumer`). librdkafka settings come from `SYNC_KAFKA_OPT_*`, with the
//! worker's convention (`SYNC_KAFKA_OPT_SECURITY_PROTOCOL` → `security.protocol`).

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::anyhow;

use sync_engine::kafka::group::{
    client, commit_offsets, offsets_at, partition_states, refuse_if_active, PartitionState,
};
use sync_engine::rfc3339::{format_datetime, parse_datetime};

#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct ReplayArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "SYNC_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The consumer group whose offsets move (the workers' SYNC_KAFKA_GROUP_ID).
    #[arg(long)]
    pub group: String,
    /// The topic whose partitions move.
    #[arg(long)]
    pub topic: String,
    /// Every partition to its earliest offset (everything still retained is re-read).
    #[arg(long, group = "target")]
    pub to_earliest: bool,
    /// Every partition to its end offset (nothing is re-read; the backlog is skipped).
    #[arg(long, group = "target")]
    pub to_latest: bool,
    /// The listed partitions to these offsets, e.g. 0:1200,3:0; the others are unchanged.
    /// An offset outside the partition's earliest..=end is refused.
    #[arg(long, group = "target", value_name = "P:O,...", value_parser = parse_partition_offsets)]
    pub to_offset: Option<PartitionOffsets>,
    /// Every partition to its first record at or after this RFC 3339 time, e.g.
    /// 2026-11-27T10:00:00Z; a partition with none goes to its end.
    #[arg(long, group = "target", value_name = "RFC3339", value_parser = parse_datetime_arg)]
    pub to_datetime: Option<Timestamp>,
    /// Every partition N records back (-N) or forward (+N) from its committed offset, clamped
    /// to earliest..=end; partitions with no committed offset are unchanged.
    #[arg(long, group = "target", value_name = "±N", allow_hyphen_values = true, value_parser = parse_shift)]
    pub shift_by: Option<i64>,
    /// Print what would change and commit nothing (the member check still applies).
    #[arg(long)]
    pub dry_run: bool,
}

/// `--to-offset`: partition and offset pairs, partitions distinct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionOffsets(pub Vec<(i32, i64)>);

/// `--to-datetime`: milliseconds since the Unix epoch (what Kafka record timestamps are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp(pub i64);

/// Where the group goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Earliest,
    Latest,
    Offsets(Vec<(i32, i64)>),
    /// Milliseconds since the epoch.
    Datetime(i64),
    ShiftBy(i64),
}

impl ReplayArgs {
    pub fn target(&self) -> Target {
        if self.to_earliest {
            Target::Earliest
        } else if self.to_latest {
            Target::Latest
        } else if let Some(offsets) = &self.to_offset {
            Target::Offsets(offsets.0.clone())
        } else if let Some(at) = self.to_datetime {
            Target::Datetime(at.0)
        } else {
            // clap requires exactly one target.
            Target::ShiftBy(self.shift_by.unwrap_or(0))
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Earliest => f.write_str("the earliest offsets"),
            Target::Latest => f.write_str("the end offsets"),
            Target::Offsets(list) => {
                let list: Vec<String> = list.iter().map(|(p, o)| format!("{p}:{o}")).collect();
                write!(f, "offsets {}", list.join(","))
            }
            Target::Datetime(ms) => write!(f, "the first records at or after {} ({ms} ms)", format_datetime(*ms)),
            Target::ShiftBy(n) => write!(f, "the committed offsets shifted by {n:+}"),
        }
    }
}

// ---- argument parsing (pure) ----

/// `P:O,P:O,...`: partitions ≥ 0, each once; offsets ≥ 0.
pub fn parse_partition_offsets(text: &str) -> Result<PartitionOffsets, String> {
    let mut pairs: Vec<(i32, i64)> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!("expected P:O,... (partition:offset pairs), got an empty entry in {text:?}"));
        }
        let (partition, offset) =
            part.split_once(':').ok_or_else(|| format!("expected partition:offset, got {part:?}"))?;
        let partition: i32 = partition
            .trim()
            .parse()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| format!("partition must be a number ≥ 0, got {:?} in {part:?}", partition.trim()))?;
        let offset: i64 = offset
            .trim()
            .parse()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| format!("offset must be a number ≥ 0, got {:?} in {part:?}", offset.trim()))?;
        if pairs.iter().any(|(p, _)| *p == partition) {
            return Err(format!("partition {partition} is given twice"));
        }
        pairs.push((partition, offset));
    }
    Ok(PartitionOffsets(pairs))
}

/// `-N` or `+N` (or `N`), N ≠ 0.
pub fn parse_shift(text: &str) -> Result<i64, String> {
    match text.trim().parse::<i64>() {
        Ok(0) => Err("a shift of 0 moves nothing".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected -N or +N (a record count), got {text:?}")),
    }
}

fn parse_datetime_arg(text: &str) -> Result<Timestamp, String> {
    parse_datetime(text).map(Timestamp)
}

// ---- offset computation (pure) ----

/// One partition's move. `after == before` means unchanged (nothing is committed for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub partition: i32,
    pub before: Option<i64>,
    pub after: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl Move {
    /// The offset to commit, if this partition changes.
    pub fn commit(&self) -> Option<i64> {
        self.after.filter(|after| Some(*after) != self.before)
    }

    /// Where the group's next worker starts reading today: the committed offset, or the
    /// earliest when none is (the worker's `auto.offset.reset=earliest`), within the log.
    fn effective_before(&self) -> i64 {
        self.before.unwrap_or(self.low).clamp(self.low, self.high)
    }

    /// Records read already that the group will read again.
    pub fn reread(&self) -> i64 {
        match (self.before, self.after) {
            (Some(_), Some(after)) => (self.effective_before() - after.clamp(self.low, self.high)).max(0),
            _ => 0,
        }
    }

    /// Records the group will now never read (a move forward).
    pub fn skipped(&self) -> i64 {
        self.after.map_or(0, |after| (after.clamp(self.low, self.high) - self.effective_before()).max(0))
    }
}

/// The new offset of every partition. `at_time` holds what `offsets_for_times` found for a
/// `Datetime` target (`None`: no record at or after the time), and is ignored otherwise.
pub fn plan(
    target: &Target,
    states: &[PartitionState],
    at_time: &HashMap<i32, Option<i64>>,
) -> Result<Vec<Move>, String> {
    if let Target::Offsets(list) = target {
        let known: Vec<i32> = states.iter().map(|s| s.partition).collect();
        for (partition, offset) in list {
            let Some(state) = states.iter().find(|s| s.partition == *partition) else {
                return Err(format!(
                    "partition {partition} does not exist (the topic has partitions {})",
                    describe_partitions(&known)
                ));
            };
            if *offset < state.low || *offset > state.high {
                return Err(format!(
                    "partition {partition}: offset {offset} is outside its offsets {}..={} (earliest..=end); nothing was changed",
                    state.low, state.high
                ));
            }
        }
    }
    states
        .iter()
        .map(|state| {
            let after = match target {
                Target::Earliest => Some(state.low),
                Target::Latest => Some(state.high),
                Target::Offsets(list) => {
                    list.iter().find(|(p, _)| *p == state.partition).map(|(_, o)| *o).or(state.committed)
                }
                Target::Datetime(_) => match at_time.get(&state.partition) {
                    Some(found) => Some(found.unwrap_or(state.high).clamp(state.low, state.high)),
                    None => return Err(format!("partition {}: no offset found for the time", state.partition)),
                },
                Target::ShiftBy(n) => state.committed.map(|c| c.saturating_add(*n).clamp(state.low, state.high)),
            };
            Ok(Move { partition: state.partition, before: state.committed, after, low: state.low, high: state.high })
        })
        .collect()
}

fn describe_partitions(known: &[i32]) -> String {
    match (known.first(), known.last()) {
        (Some(first), Some(last)) if known.len() == (last - first + 1) as usize => format!("{first}..={last}"),
        _ => format!("{known:?}"),
    }
}

/// The table the command prints (also for `--dry-run`).
pub fn render(moves: &[Move]) -> String {
    let dash = |o: Option<i64>| o.map_or_else(|| "-".to_owned(), |o| o.to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>9}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  note",
        "partition", "before", "after", "re-read", "skipped", "earliest"
    );
    for m in moves {
        let note = match (m.commit(), m.after) {
            (Some(_), _) => "",
            (None, None) => "unchanged (nothing committed)",
            (None, Some(_)) => "unchanged",
        };
        let _ = writeln!(
            out,
            "{:>9}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  {note}",
            m.partition,
            dash(m.before),
            dash(m.after),
            m.reread(),
            m.skipped(),
            m.low
        );
    }
    let changed = moves.iter().filter(|m| m.commit().is_some()).count();
    let reread: i64 = moves.iter().map(Move::reread).sum();
    let skipped: i64 = moves.iter().map(Move::skipped).sum();
    let _ = writeln!(out, "{changed} of {} partitions move; {reread} records re-read, {skipped} skipped", moves.len());
    out
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let target = args.target();
    let consumer = client(&args.brokers, &args.group)?;
    refuse_if_active(&consumer, &args.group)?;
    let states = partition_states(&consumer, &args.topic)?;
    let at_time = match target {
        Target::Datetime(ms) => {
            let partitions: Vec<i32> = states.iter().map(|s| s.partition).collect();
            offsets_at(&consumer, &args.topic, &partitions, ms)?
        }
        _ => HashMap::new(),
    };
    let moves = plan(&target, &states, &at_time).map_err(|why| anyhow!("{why}"))?;
    let mode = if args.dry_run { " (dry run: nothing is committed)" } else { "" };
    println!("replay consumer group {:?} on topic {:?} to {target}{mode}", args.group, args.topic);
    print!("{}", render(&moves));
    let commits: Vec<(i32, i64)> = moves.iter().filter_map(|m| Some((m.partition, m.commit()?))).collect();
    if args.dry_run {
        println!("dry run: nothing committed");
        return Ok(());
    }
    if commits.is_empty() {
        println!("nothing to commit");
        return Ok(());
    }
    // A worker may have started while we looked; the broker would refuse the commit then
    // too, but this names it.
    refuse_if_active(&consumer, &args.group)?;
    commit_offsets(&consumer, &args.topic, &commits)?;
    println!("committed {} partition(s); start the workers to replay", commits.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn parse(extra: &[&str]) -> Result<ReplayArgs, clap::Error> {
        let mut argv = vec!["replay", "--brokers", "b:9092", "--group", "g", "--topic", "t"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|cli| cli.args)
    }

    #[test]
    fn exactly_one_target_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--to-earliest", "--to-latest"]).is_err());
        assert_eq!(parse(&["--to-earliest"]).unwrap().target(), Target::Earliest);
        assert_eq!(parse(&["--to-latest", "--dry-run"]).unwrap().target(), Target::Latest);
        assert!(parse(&["--to-latest", "--dry-run"]).unwrap().dry_run);
    }

    #[test]
    fn shift_by_takes_signed_counts() {
        assert_eq!(parse(&["--shift-by", "-500"]).unwrap().target(), Target::ShiftBy(-500));
        assert_eq!(parse(&["--shift-by", "+7"]).unwrap().target(), Target::ShiftBy(7));
        assert_eq!(parse(&["--shift-by=-3"]).unwrap().target(), Target::ShiftBy(-3));
        assert!(parse(&["--shift-by", "0"]).is_err());
        assert!(parse(&["--shift-by", "-x"]).is_err());
    }

    #[test]
    fn to_offset_parses_pairs_and_rejects_malformed_ones() {
        assert_eq!(parse_partition_offsets("0:10, 3:0").unwrap(), PartitionOffsets(vec![(0, 10), (3, 0)]));
        for bad in ["", "0", "0:", ":5", "a:1", "0:-1", "-1:0", "0:1,0:2", "0:1,,1:2", "0:1:2"] {
            assert!(parse_partition_offsets(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(parse(&["--to-offset", "2:40"]).unwrap().target(), Target::Offsets(vec![(2, 40)]));
        assert!(parse(&["--to-offset", "2"]).is_err());
    }

    #[test]
    fn to_datetime_takes_rfc_3339_only() {
        assert!(parse(&["--to-datetime", "yesterday"]).is_err());
        assert_eq!(parse(&["--to-datetime", "1970-01-01T00:00:01Z"]).unwrap().target(), Target::Datetime(1000));
    }

    fn states() -> Vec<PartitionState> {
        vec![
            PartitionState { partition: 0, committed: Some(100), low: 0, high: 100 },
            PartitionState { partition: 1, committed: None, low: 0, high: 50 },
            PartitionState { partition: 2, committed: Some(30), low: 20, high: 80 },
        ]
    }

    fn afters(target: Target, at_time: &HashMap<i32, Option<i64>>) -> Vec<Option<i64>> {
        plan(&target, &states(), at_time).unwrap().iter().map(|m| m.after).collect()
    }

    #[test]
    fn earliest_and_latest_come_from_the_watermarks() {
        let none = HashMap::new();
        assert_eq!(afters(Target::Earliest, &none), vec![Some(0), Some(0), Some(20)]);
        assert_eq!(afters(Target::Latest, &none), vec![Some(100), Some(50), Some(80)]);
        let moves = plan(&Target::Earliest, &states(), &none).unwrap();
        assert_eq!(moves.iter().map(Move::reread).collect::<Vec<_>>(), vec![100, 0, 10]);
        assert_eq!(moves.iter().map(Move::commit).collect::<Vec<_>>(), vec![Some(0), Some(0), Some(20)]);
        let moves = plan(&Target::Latest, &states(), &none).unwrap();
        assert_eq!(moves.iter().map(Move::skipped).collect::<Vec<_>>(), vec![0, 50, 50]);
        assert_eq!(moves[0].commit(), None, "already at the end: nothing to commit");
    }

    #[test]
    fn a_datetime_with_no_record_after_it_goes_to_the_end() {
        let at_time = HashMap::from([(0, Some(60)), (1, None), (2, Some(10))]);
        assert_eq!(afters(Target::Datetime(5), &at_time), vec![Some(60), Some(50), Some(20)]);
        assert!(plan(&Target::Datetime(5), &states(), &HashMap::from([(0, None)])).is_err());
    }

    #[test]
    fn to_offset_moves_only_the_listed_partitions_and_refuses_out_of_range() {
        let none = HashMap::new();
        let moves = plan(&Target::Offsets(vec![(2, 20), (1, 50)]), &states(), &none).unwrap();
        assert_eq!(moves.iter().map(|m| m.after).collect::<Vec<_>>(), vec![Some(100), Some(50), Some(20)]);
        assert_eq!(moves.iter().map(Move::commit).collect::<Vec<_>>(), vec![None, Some(50), Some(20)]);
        let error = plan(&Target::Offsets(vec![(2, 19)]), &states(), &none).unwrap_err();
        assert!(error.contains("outside") && error.contains("20..=80"), "{error}");
        assert!(plan(&Target::Offsets(vec![(0, 101)]), &states(), &none).is_err());
        let error = plan(&Target::Offsets(vec![(3, 0)]), &states(), &none).unwrap_err();
        assert!(error.contains("partition 3 does not exist") && error.contains("0..=2"), "{error}");
    }

    #[test]
    fn shift_by_moves_from_the_committed_offset_within_the_watermarks() {
        let none = HashMap::new();
        assert_eq!(afters(Target::ShiftBy(-40), &none), vec![Some(60), None, Some(20)]);
        assert_eq!(afters(Target::ShiftBy(25), &none), vec![Some(100), None, Some(55)]);
        assert_eq!(afters(Target::ShiftBy(i64::MIN), &none), vec![Some(0), None, Some(20)]);
        let moves = plan(&Target::ShiftBy(-40), &states(), &none).unwrap();
        assert_eq!(moves.iter().map(Move::reread).collect::<Vec<_>>(), vec![40, 0, 10]);
        assert_eq!(moves[1].commit(), None, "no committed offset: unchanged");
    }

    #[test]
    fn the_table_shows_before_after_and_counts() {
        let moves = plan(&Target::ShiftBy(-40), &states(), &HashMap::new()).unwrap();
        let table = render(&moves);
        let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[1][..5], ["0", "100", "60", "40", "0"]);
        assert_eq!(lines[2][..3], ["1", "-", "-"]);
        assert!(table.contains("unchanged (nothing committed)"));
        assert!(table.ends_with("2 of 3 partitions move; 50 records re-read, 0 skipped\n"), "{table}");
    }
}
