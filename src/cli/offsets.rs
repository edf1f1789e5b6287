//! `sync-engine offsets`: a consumer group's committed offsets, read without joining the
//! group (for operators, and for the benchmark to see when the last offset is committed).

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use sync_engine::kafka::group;

#[derive(Clone, Debug, clap::Args)]
pub struct OffsetsArgs {
    #[arg(long, env = "SYNC_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, env = "SYNC_KAFKA_GROUP_ID")]
    pub group: String,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub partitions: i32,
}

/// Prints `partition offset` lines (`-` when nothing is committed) and the sum.
pub fn run(args: OffsetsArgs) -> anyhow::Result<()> {
    // The same client as `replay`: it never joins the group, and takes SYNC_KAFKA_OPT_* (TLS, SASL).
    let consumer = group::client(&args.brokers, &args.group)?;
    let mut list = TopicPartitionList::new();
    for partition in 0..args.partitions {
        list.add_partition(&args.topic, partition);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
    let mut sum = 0;
    for element in committed.elements() {
        match element.offset() {
            Offset::Offset(offset) => {
                sum += offset;
                println!("{} {offset}", element.partition());
            }
            _ => println!("{} -", element.partition()),
        }
    }
    println!("sum {sum}");
    Ok(())
}
