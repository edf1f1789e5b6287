//! A consumer group's committed offsets, read and moved from outside the group: the broker
//! side of `sync-engine replay` and `sync-engine offsets`. Every call is bounded by a timeout.

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

#[cfg(test)]
mod tests {
    use super::*;

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
