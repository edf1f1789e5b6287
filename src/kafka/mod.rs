//! Everything Kafka: rdkafka types stop in this module.
//!
//! `consumer` (the polling thread and rebalance handling), `offsets` (the settled
//! watermark), `worker` (the loop that turns records into settled items), `lag` (the owned
//! partitions' lag in records and seconds, the autoscaling signal), `dlq` (the dead-letter
//! producer), `client` (librdkafka settings), `producer` (publishing items per the wire
//! contract, for the load generator, the demo and tests), `group` (a group's committed
//! offsets read and moved from outside the group, for `offsets` and `replay`).

pub mod client;
pub mod consumer;
pub mod dlq;
pub mod group;
pub mod lag;
pub mod offsets;
pub mod producer;
pub mod worker;
