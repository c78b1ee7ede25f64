//! The broker seen from outside the services: a reader and a producer of the
//! test's own on the topics, a topic read to its end, the offsets a consumer
//! group committed, and the results published for a correlation id.

use std::time::Duration;

use onceflow_runtime::config::KafkaConfig;

use crate::OUTCOME_TIMEOUT;

/// A plain Kafka consumer outside the services, reading a topic from the
/// beginning without a consumer group (no group join to wait for).
pub struct TopicReader {
    consumer: rdkafka::consumer::StreamConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicReader")
    }
}

/// One record as an outside consumer sees it.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub headers: std::collections::HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl Record {
    /// `message` as text where it is text (header values and the key read as
    /// UTF-8, lossily).
    fn of(message: &impl rdkafka::Message) -> Self {
        use rdkafka::message::Headers as _;
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: message.payload().unwrap_or_default().to_vec(),
        }
    }
}

impl TopicReader {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Self {
        use rdkafka::{Offset, TopicPartitionList, consumer::Consumer as _};
        let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("outside-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut partitions = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            partitions.add_partition_offset(topic, partition, Offset::Beginning).expect("partition");
        }
        consumer.assign(&partitions).expect("assign");
        Self { consumer }
    }

    /// The next record, waiting up to `timeout`.
    pub async fn next(&self, timeout: Duration) -> Record {
        let message = tokio::time::timeout(timeout, self.consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("no record within {timeout:?}"))
            .expect("kafka record");
        Record::of(&message)
    }

    /// Records until `wanted` matches one, which is returned.
    pub async fn find(&self, timeout: Duration, mut wanted: impl FnMut(&Record) -> bool) -> Record {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let record = self.next(left).await;
            if wanted(&record) {
                return record;
            }
        }
    }

    /// Every record until none arrives for `quiet`.
    pub async fn records_until_quiet(&self, quiet: Duration) -> Vec<Record> {
        let mut records = Vec::new();
        loop {
            let next = tokio::time::timeout(quiet, self.next(quiet * 2)).await;
            match next {
                Ok(record) => records.push(record),
                Err(_) => return records,
            }
        }
    }
}

/// A plain idempotent Kafka producer, independent of the services' code, for
/// tests that put records on a topic themselves (as ingest's relay, a
/// redelivering broker or a misbehaving client would).
pub fn kafka_producer(kafka: &KafkaConfig) -> rdkafka::producer::FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

/// A record read back with its place on the topic.
#[derive(Debug, Clone)]
pub struct PositionedRecord {
    pub partition: i32,
    pub offset: i64,
    pub record: Record,
}

/// How long a topic must stay quiet before [`read_topic_to_end`] takes its end
/// as reached.
const TOPIC_QUIET: Duration = Duration::from_millis(1500);

/// The `message-id` (event id) of every result of `correlation_id` on the
/// results topic of `kafka`, read to its end.
pub async fn published_event_ids(kafka: &KafkaConfig, correlation_id: &str) -> std::collections::HashSet<String> {
    read_topic_to_end(kafka, &kafka.topics().results, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .filter(|r| r.record.headers.get("correlation-id").map(String::as_str) == Some(correlation_id))
        .map(|r| r.record.headers["message-id"].clone())
        .collect()
}

/// Every record of `topic` that is on the broker when this is called,
/// partitions interleaved, each in offset order. Panics if they cannot be read
/// within `timeout`.
///
/// The high watermarks are only a lower bound of the end: the broker reports
/// the last batch's base offset + 1, which falls short when a producer
/// pipelined several records into one batch. So reading goes past them until
/// no record has arrived for [`TOPIC_QUIET`].
pub async fn read_topic_to_end(kafka: &KafkaConfig, topic: &str, timeout: Duration) -> Vec<PositionedRecord> {
    use rdkafka::{
        Message as _, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer as _},
    };
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("outside-reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("consumer");
        let mut below_watermark = std::collections::HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, partition, timeout).expect("watermarks");
            if high > low {
                below_watermark.insert(partition, high);
            }
            assignment.add_partition_offset(&topic, partition, Offset::Beginning).expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        let mut last_arrival = std::time::Instant::now();
        while !below_watermark.is_empty() || last_arrival.elapsed() < TOPIC_QUIET {
            assert!(
                started.elapsed() < timeout,
                "could not read {topic} to its end within {timeout:?}: partitions {below_watermark:?} short of their watermark"
            );
            let Some(received) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = received.expect("kafka record");
            last_arrival = std::time::Instant::now();
            let (partition, offset) = (message.partition(), message.offset());
            if below_watermark.get(&partition).is_some_and(|&high| offset + 1 >= high) {
                below_watermark.remove(&partition);
            }
            records.push(PositionedRecord { partition, offset, record: Record::of(&message) });
        }
        records
    })
    .await
    .expect("topic reader")
}

/// The offsets consumer group `group` has committed on `topic`, by partition
/// (partitions without a committed offset are absent). Read with an offset
/// fetch, without joining the group.
pub async fn committed_offsets(kafka: &KafkaConfig, group: &str, topic: &str) -> std::collections::HashMap<i32, i64> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer as _},
    };
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut partitions = TopicPartitionList::new();
        for partition in 0..kafka.partitions {
            partitions.add_partition(&topic, partition);
        }
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some((element.partition(), offset)),
                _ => None,
            })
            .collect()
    })
    .await
    .expect("offset fetch")
}
