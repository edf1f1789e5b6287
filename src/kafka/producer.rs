//! Publishing item records per the wire contract, for the load generator, the demo and the
//! tests. Keys are item ids, so Kafka's default partitioner keeps every id in one partition.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::workload::OutgoingRecord;

/// Why a record was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker did not take the record (librdkafka's error: timed out, too large, the
    /// topic does not exist, authorization...).
    #[error("delivery to topic {topic:?} failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

pub struct ItemProducer {
    producer: FutureProducer,
    topic: String,
}

impl ItemProducer {
    pub fn new(brokers: &str, topic: &str) -> rdkafka::error::KafkaResult<ItemProducer> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "10")
            .set("batch.num.messages", "10000")
            .set("message.max.bytes", (64 << 20).to_string())
            .set("queue.buffering.max.kbytes", "262144")
            .create()?;
        Ok(ItemProducer { producer, topic: topic.to_owned() })
    }

    /// Sends one record; resolves with its partition and offset once the broker has it.
    pub async fn send(&self, record: &OutgoingRecord) -> Result<(i32, i64), PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header { key: name, value: Some(value) });
        }
        let mut message: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        if let Some(value) = &record.value {
            message = message.payload(value);
        }
        self.producer
            .send(message, Duration::from_secs(30))
            .await
            .map(|delivery| (delivery.partition, delivery.offset))
            .map_err(|(source, _)| PublishError::Delivery { topic: self.topic.clone(), source })
    }

    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(30));
    }
}

/// The end offset (last delivered offset + 1) of each partition, from delivery reports.
#[derive(Debug, Default, Clone)]
pub struct EndOffsets(pub HashMap<i32, i64>);

impl EndOffsets {
    pub fn record(&mut self, partition: i32, offset: i64) {
        let end = self.0.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
}

/// Records in flight at once while publishing.
const MAX_IN_FLIGHT: usize = 20_000;

/// Publishes every record, at most `rate_per_sec` a second (0 = unlimited), calling
/// `on_sent` per delivered record. Returns the end offsets, or the first delivery error.
pub async fn publish_all(
    producer: &ItemProducer,
    records: impl IntoIterator<Item = OutgoingRecord>,
    rate_per_sec: u64,
    mut on_sent: impl FnMut(),
) -> Result<EndOffsets, PublishError> {
    use futures::stream::FuturesUnordered;
    use futures::{FutureExt, StreamExt};

    let started = tokio::time::Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut ends = EndOffsets::default();
    for (index, record) in records.into_iter().enumerate() {
        if rate_per_sec > 0 {
            let due = started + Duration::from_secs_f64(index as f64 / rate_per_sec as f64);
            tokio::time::sleep_until(due).await;
        }
        while in_flight.len() >= MAX_IN_FLIGHT {
            if let Some(result) = in_flight.next().await {
                let (partition, offset) = result?;
                ends.record(partition, offset);
                on_sent();
            }
        }
        in_flight.push(async move { producer.send(&record).await });
        // A send does nothing until polled: poll the new one now (it hands the record to
        // librdkafka) and collect the finished ones, or paced records would sit unsent until
        // MAX_IN_FLIGHT of them piled up.
        while let Some(Some(result)) = in_flight.next().now_or_never() {
            let (partition, offset) = result?;
            ends.record(partition, offset);
            on_sent();
        }
    }
    while let Some(result) = in_flight.next().await {
        let (partition, offset) = result?;
        ends.record(partition, offset);
        on_sent();
    }
    Ok(ends)
}
