//! The dead-letter producer (docs/DESIGN.md §2): a rejected record is republished to
//! `SYNC_DLQ_TOPIC` with its original key, value and headers, plus `sync-dlq-reason`
//! (`code: message`), `sync-dlq-topic`, `sync-dlq-partition` and `sync-dlq-offset`, so an
//! operator can fix and replay it with any Kafka tool. Its offset settles only once the
//! dead-letter topic acknowledges it.
//!
//! Some records the dead-letter topic can never take (too large for the producer's or the
//! broker's `message.max.bytes`, an invalid topic, no authorization): retrying them would
//! hold their partition for ever. The worker then sends the record without its value, with
//! `sync-dlq-value-bytes` giving the original value's size; if even that is refused for good,
//! the worker logs the record's origin, counts it in `sync_dead_letter_dropped_total` and
//! settles it. Only transient produce errors are retried.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::decode::{DeadLetterReason, RawRecord};

pub const HEADER_REASON: &str = "sync-dlq-reason";
pub const HEADER_TOPIC: &str = "sync-dlq-topic";
pub const HEADER_PARTITION: &str = "sync-dlq-partition";
pub const HEADER_OFFSET: &str = "sync-dlq-offset";
/// On a dead letter sent without its value: the size in bytes of the value left out.
pub const HEADER_VALUE_BYTES: &str = "sync-dlq-value-bytes";

/// A failed dead-letter produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterError {
    pub message: String,
    /// Retrying the same record cannot succeed (size, topic, authorization).
    pub permanent: bool,
}

impl std::fmt::Display for DeadLetterError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl From<KafkaError> for DeadLetterError {
    fn from(error: KafkaError) -> DeadLetterError {
        DeadLetterError { permanent: is_permanent(&error), message: error.to_string() }
    }
}

/// Errors the broker (or librdkafka's own checks) will give again for the same record.
pub fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | InvalidRecord
                | InvalidTopic
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
        )
    )
}

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

    /// Publishes the record with its reason, with or without its value; resolves when the
    /// broker acknowledged it.
    pub async fn send(
        &self,
        record: &RawRecord,
        reason: &DeadLetterReason,
        with_value: bool,
    ) -> Result<(), DeadLetterError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 5);
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
        let value_bytes = record.value.as_ref().map_or(0, |value| value.len()).to_string();
        if !with_value {
            headers = headers.insert(Header { key: HEADER_VALUE_BYTES, value: Some(value_bytes.as_str()) });
        }
        let mut message: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_ref());
        }
        if let Some(value) = record.value.as_ref().filter(|_| with_value) {
            message = message.payload(value.as_ref());
        }
        self.producer.send(message, Duration::from_secs(0)).await.map(|_| ()).map_err(|(error, _)| error.into())
    }

    /// Waits for outstanding dead-letter deliveries (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}
