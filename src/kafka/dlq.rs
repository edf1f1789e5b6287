//! The dead-letter producer (docs/DESIGN.md §2): a rejected record is republished to
//! `SYNC_DLQ_TOPIC` with its original key, value and headers, plus `sync-dlq-reason`
//! (`code: message`), `sync-dlq-topic`, `sync-dlq-partition` and `sync-dlq-offset`, so an
//! operator can fix and replay it with any Kafka tool. Its offset settles only once the
//! dead-letter topic acknowledges it.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::decode::{DeadLetterReason, RawRecord};

pub const HEADER_REASON: &str = "sync-dlq-reason";
pub const HEADER_TOPIC: &str = "sync-dlq-topic";
pub const HEADER_PARTITION: &str = "sync-dlq-partition";
pub const HEADER_OFFSET: &str = "sync-dlq-offset";

#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterProducer {
    pub fn new(kafka: &KafkaConfig) -> rdkafka::error::KafkaResult<DeadLetterProducer> {
        Ok(DeadLetterProducer {
            producer: super::client::producer_config(kafka).create()?,
            topic: kafka.dlq_topic.clone(),
        })
    }

    /// Publishes the record with its reason; resolves when the broker acknowledged it.
    pub async fn send(&self, record: &RawRecord, reason: &DeadLetterReason) -> Result<(), String> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 4);
        for (name, value) in &record.headers {
            headers = headers.insert(Header { key: name, value: value.as_deref() });
        }
        let reason_text = reason.header_value();
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        headers = headers
            .insert(Header { key: HEADER_REASON, value: Some(reason_text.as_str()) })
            .insert(Header { key: HEADER_TOPIC, value: Some(record.topic.as_ref()) })
            .insert(Header { key: HEADER_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: HEADER_OFFSET, value: Some(offset.as_str()) });
        let mut message: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_ref());
        }
        if let Some(value) = &record.value {
            message = message.payload(value.as_ref());
        }
        self.producer.send(message, Duration::from_secs(0)).await.map(|_| ()).map_err(|(error, _)| error.to_string())
    }

    /// Waits for outstanding dead-letter deliveries (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
