//! `sync-engine replay`: moves a consumer group's committed offsets on one topic, so the
//! workers read a range of it again (issue 9, item 3).
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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

/// Bound for every request to the broker.
const TIMEOUT: Duration = Duration::from_secs(10);

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

/// RFC 3339 (`2026-11-27T10:00:00Z`, `2026-11-27T11:00:00.250+01:00`; `t`, `z` and a space
/// for `T` are accepted) → milliseconds since the Unix epoch. Fractions finer than a
/// millisecond are truncated; leap seconds and times before 1970 are refused.
pub fn parse_datetime(text: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("expected an RFC 3339 time like 2026-11-27T10:00:00Z, got {text:?}: {why}");
    let b = text.trim().as_bytes();
    let digits = |from: usize, len: usize| -> Result<i64, String> {
        let slice = b.get(from..from + len).ok_or_else(|| bad("too short"))?;
        if !slice.iter().all(u8::is_ascii_digit) {
            return Err(bad("a digit is missing"));
        }
        Ok(slice.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let expect = |at: usize, what: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if what.contains(c) => Ok(()),
            _ => Err(bad(&format!(
                "expected {:?} at position {}",
                what.iter().map(|c| *c as char).collect::<String>(),
                at + 1
            ))),
        }
    };
    let year = digits(0, 4)?;
    expect(4, b"-")?;
    let month = digits(5, 2)?;
    expect(7, b"-")?;
    let day = digits(8, 2)?;
    expect(10, b"Tt ")?;
    let hour = digits(11, 2)?;
    expect(13, b":")?;
    let minute = digits(14, 2)?;
    expect(16, b":")?;
    let second = digits(17, 2)?;
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return Err(bad("no digits after the decimal point"));
        }
        let fraction = &b[start..at.min(start + 3)];
        millis = fraction.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')) * 10_i64.pow(3 - fraction.len() as u32);
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let hours = digits(at + 1, 2)?;
            expect(at + 3, b":")?;
            let minutes = digits(at + 4, 2)?;
            if hours > 23 || minutes > 59 {
                return Err(bad("the UTC offset is out of range"));
            }
            at += 6;
            (hours * 60 + minutes) * if *sign == b'-' { -1 } else { 1 }
        }
        _ => return Err(bad("the UTC offset (Z or ±HH:MM) is missing")),
    };
    if at != b.len() {
        return Err(bad("unexpected text after the time"));
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("the time of day is out of range"));
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    let ms = seconds * 1000 + millis;
    if ms < 0 {
        return Err(bad("before 1970-01-01T00:00:00Z"));
    }
    Ok(ms)
}

/// Milliseconds since the epoch → `2026-11-27T10:00:00.000Z`.
pub fn format_datetime(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (second, millis) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

// ---- offset computation (pure) ----

/// One partition as read from the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionState {
    pub partition: i32,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// The earliest offset still retained (low watermark).
    pub low: i64,
    /// The end offset: the next record's offset (high watermark).
    pub high: i64,
}

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

// ---- the broker ----

/// A client of `group` that never subscribes, so it never joins the group. librdkafka
/// settings from `SYNC_KAFKA_OPT_*` apply (SASL, TLS), except the ones this client fixes.
pub fn client(brokers: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (property, value) in passthrough(std::env::vars()) {
        config.set(property, value);
    }
    config.set("group.id", group).set("enable.auto.commit", "false").set("allow.auto.create.topics", "false");
    config.create().map_err(|error| match error {
        // rdkafka's message repeats the value, which may be a password: name the property only.
        rdkafka::error::KafkaError::ClientConfig(_, description, property, value) => anyhow!(
            "cannot create the Kafka client: invalid librdkafka setting {property:?} (value not shown): {}",
            if value.is_empty() { description } else { description.replace(&value, "***") }
        ),
        other => anyhow!("cannot create the Kafka client: {other}"),
    })
}

/// `SYNC_KAFKA_OPT_SECURITY_PROTOCOL=SASL_SSL` → `security.protocol`, like the worker, minus
/// the group-membership settings a client outside the group must not take over.
pub fn passthrough(vars: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    vars.into_iter()
        .filter_map(|(name, value)| {
            let property = name.strip_prefix("SYNC_KAFKA_OPT_")?.to_ascii_lowercase().replace('_', ".");
            let owned = ["group.id", "group.instance.id", "enable.auto.commit", "allow.auto.create.topics"];
            (!owned.contains(&property.as_str())).then_some((property, value))
        })
        .collect()
}

/// A member of the group, as the broker describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
}

/// The group's state and members (`Dead` with none for a group that does not exist).
pub fn group_members(consumer: &BaseConsumer, group: &str) -> anyhow::Result<(String, Vec<Member>)> {
    let list = consumer.fetch_group_list(Some(group), TIMEOUT).context("cannot describe the consumer group")?;
    let Some(info) = list.groups().iter().find(|info| info.name() == group) else {
        return Ok(("Dead".into(), Vec::new()));
    };
    let members = info
        .members()
        .iter()
        .map(|m| Member { id: m.id().into(), client_id: m.client_id().into(), host: m.client_host().into() })
        .collect();
    Ok((info.state().to_owned(), members))
}

/// Err("stop the workers first: …") while the group has members or is rebalancing.
pub fn refuse_if_active(consumer: &BaseConsumer, group: &str) -> anyhow::Result<()> {
    let (state, members) = group_members(consumer, group)?;
    if !members.is_empty() {
        let mut message = format!(
            "stop the workers first: consumer group {group:?} has {} active member(s) (state {state}):",
            members.len()
        );
        for m in &members {
            let _ = write!(message, "\n  member {} (client id {}, host {})", m.id, m.client_id, m.host);
        }
        message.push_str(
            "\n(a worker stopped with static membership, SYNC_KAFKA_INSTANCE_ID, stays listed until its \
             session.timeout.ms has passed)",
        );
        bail!("{message}");
    }
    if !matches!(state.as_str(), "Empty" | "Dead") {
        bail!("stop the workers first: consumer group {group:?} is in state {state:?} (expected Empty); try again when it is empty");
    }
    Ok(())
}

/// Partitions of `topic`, their watermarks and the group's committed offsets.
pub fn partition_states(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<PartitionState>> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).context("cannot read the topic's metadata")?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("unknown topic {topic:?}");
    };
    match found.error() {
        None => {}
        Some(code) if RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            bail!("unknown topic {topic:?}")
        }
        Some(code) => bail!("cannot read topic {topic:?}: {}", RDKafkaErrorCode::from(code)),
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        bail!("unknown topic {topic:?} (no partitions)");
    }
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, TIMEOUT).context("cannot read the group's committed offsets")?;
    partitions
        .iter()
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, *partition, TIMEOUT)
                .with_context(|| format!("cannot read the watermarks of partition {partition}"))?;
            let committed = match committed.find_partition(topic, *partition).map(|e| e.offset()) {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            };
            Ok(PartitionState { partition: *partition, committed, low, high })
        })
        .collect()
}

/// For every partition: the offset of its first record at or after `ms`, or `None`.
pub fn offsets_at(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    ms: i64,
) -> anyhow::Result<HashMap<i32, Option<i64>>> {
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        list.add_partition_offset(topic, *partition, Offset::Offset(ms))?;
    }
    let found = consumer.offsets_for_times(list, TIMEOUT).context("cannot look up offsets for the time")?;
    found
        .elements()
        .iter()
        .map(|element| {
            if let Err(error) = element.error() {
                bail!("partition {}: cannot look up the offset for the time: {error}", element.partition());
            }
            let offset = match element.offset() {
                Offset::Offset(offset) if offset >= 0 => Some(offset),
                Offset::End | Offset::Offset(_) => None,
                other => bail!("partition {}: unexpected offset {other:?} for the time", element.partition()),
            };
            Ok((element.partition(), offset))
        })
        .collect()
}

/// Commits `offsets` for the consumer's group synchronously, then reads them back.
pub fn commit_offsets(consumer: &BaseConsumer, topic: &str, offsets: &[(i32, i64)]) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer
        .commit(&list, CommitMode::Sync)
        .context("the broker refused the commit (if a worker has joined the group: stop the workers first)")?;
    let read = consumer.committed_offsets(list.clone(), TIMEOUT).context("cannot read the commit back")?;
    for (partition, offset) in offsets {
        let got = read.find_partition(topic, *partition).map(|e| e.offset());
        if got != Some(Offset::Offset(*offset)) {
            bail!("partition {partition}: committed {offset} but the group now has {got:?}");
        }
    }
    Ok(())
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
    fn datetimes_parse_as_rfc_3339() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_datetime("2026-11-27T10:00:00Z").unwrap(), 1_795_773_600_000);
        assert_eq!(parse_datetime("2026-11-27T11:00:00+01:00").unwrap(), 1_795_773_600_000);
        assert_eq!(parse_datetime("2026-11-27t09:30:00.5-00:30").unwrap(), 1_795_773_600_500);
        assert_eq!(parse_datetime("2026-11-27 10:00:00.123456789z").unwrap(), 1_795_773_600_123);
        assert_eq!(parse_datetime("2024-02-29T00:00:00Z").unwrap(), 1_709_164_800_000);
        for bad in [
            "2026-11-27",
            "2026-11-27T10:00:00",
            "2026-11-27T10:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T10:00:60Z",
            "2026-11-27T10:00:00.Z",
            "2026-11-27T10:00:00+1:00",
            "2026-11-27T10:00:00Zjunk",
            "1969-12-31T23:59:59Z",
            "1700000000",
        ] {
            assert!(parse_datetime(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse(&["--to-datetime", "yesterday"]).is_err());
        assert_eq!(parse(&["--to-datetime", "1970-01-01T00:00:01Z"]).unwrap().target(), Target::Datetime(1000));
    }

    #[test]
    fn datetimes_format_back_to_what_they_parse_from() {
        for ms in [0, 1_795_773_600_123, 1_709_164_800_000, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_datetime(&format_datetime(ms)).unwrap(), ms, "{}", format_datetime(ms));
        }
        assert_eq!(format_datetime(1_795_773_600_000), "2026-11-27T10:00:00.000Z");
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

    #[test]
    fn passthrough_follows_the_worker_convention_minus_membership_settings() {
        let vars = [
            ("SYNC_KAFKA_OPT_SECURITY_PROTOCOL", "SASL_SSL"),
            ("SYNC_KAFKA_OPT_SASL_MECHANISMS", "PLAIN"),
            ("SYNC_KAFKA_OPT_GROUP_INSTANCE_ID", "pod-1"),
            ("SYNC_KAFKA_OPT_GROUP_ID", "other"),
            ("SYNC_KAFKA_BROKERS", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let got = passthrough(vars);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["security.protocol"], "SASL_SSL");
        assert_eq!(got["sasl.mechanisms"], "PLAIN");
    }
}
