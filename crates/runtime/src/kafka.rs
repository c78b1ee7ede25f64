//! Kafka set-up shared by the services: producers, consumers, topic creation,
//! and envelope headers on records.
//!
//! Producers are idempotent (`enable.idempotence`), so a retry inside
//! librdkafka neither duplicates nor reorders a partition's records.
//! Consumers never let librdkafka store offsets on their own
//! (`enable.auto.offset.store=false`): a service stores an offset only after
//! the message's effect is durable, and the background commit then sends it.

use std::time::Duration;

use onceflow_contracts::Envelope;
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer as _, StreamConsumer},
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, Producer as _},
    types::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result, config::KafkaConfig};

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    client
}

/// An idempotent producer that waits for every in-sync replica.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    Ok(base(config)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()?)
}

/// A consumer in `group_id` that reads from the earliest offset of a new group
/// and commits only offsets the service stored explicitly.
pub fn consumer(config: &KafkaConfig, group_id: &str) -> Result<StreamConsumer> {
    Ok(base(config)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (config.session_timeout_ms / 3).max(100).to_string())
        .set("isolation.level", "read_uncommitted")
        .create()?)
}

/// Create `topics` with the configured partition count unless they exist.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let new_topics: Vec<NewTopic<'_>> =
        topics.iter().map(|name| NewTopic::new(name, config.partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for outcome in admin.create_topics(&new_topics, &options).await? {
        match outcome {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Config(format!("cannot create topic {topic}: {code}")));
            }
        }
    }
    Ok(())
}

/// The envelope as Kafka record headers.
pub fn headers(envelope: &Envelope) -> OwnedHeaders {
    envelope.to_headers().iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header { key, value: Some(value.as_bytes()) })
    })
}

/// Read the envelope from a consumed record's headers.
pub fn envelope_of(message: &impl Message) -> Result<Envelope> {
    let pairs = message
        .headers()
        .map(|headers| headers.iter().map(|h| (h.key, h.value)).collect::<Vec<_>>())
        .unwrap_or_default();
    Ok(Envelope::from_headers(pairs)?)
}

/// Whether the broker answers a metadata request within `timeout`.
pub async fn broker_reachable(config: &KafkaConfig, timeout: Duration) -> bool {
    let client: std::result::Result<rdkafka::producer::BaseProducer, _> = base(config).create();
    let Ok(client) = client else { return false };
    tokio::task::spawn_blocking(move || client.client().fetch_metadata(None, timeout).is_ok()).await.unwrap_or(false)
}

/// The next message of `consumer`, or `None` once `shutdown` is cancelled.
///
/// Consumer errors (the broker unreachable, a rebalance in progress) are
/// logged and waited out with a backoff that grows to 5 s, so a broker outage
/// is not a busy loop of errors.
pub async fn next_message(consumer: &StreamConsumer, shutdown: &CancellationToken) -> Option<OwnedMessage> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return None,
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => return Some(message.detach()),
            Err(error) => {
                tracing::warn!(%error, ?backoff, "consumer error; waiting before the next poll");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Feed every message of `consumer` to `handle`, one at a time, until
/// `shutdown`; store each message's offset once `handle` succeeded.
///
/// A failing `handle` is retried on the same message with exponential backoff
/// (capped at `max_backoff`): the callers are projections whose errors are the
/// database's, so waiting is right and skipping would lose an update. Messages
/// a projection cannot use at all are for `handle` to log and accept.
pub async fn consume_each<F, Fut, E>(consumer: &StreamConsumer, shutdown: &CancellationToken, mut handle: F)
where
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), E>>,
    E: std::fmt::Display,
{
    let max_backoff = Duration::from_secs(5);
    while let Some(message) = next_message(consumer, shutdown).await {
        let mut backoff = Duration::from_millis(100);
        loop {
            match handle(message.clone()).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, topic = message.topic(), partition = message.partition(), offset = message.offset(), "handling failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
            tracing::warn!(%error, "cannot store offset; the message may be redelivered");
        }
    }
}

/// [`ensure_topics`] until it succeeds (or `shutdown`), so a service starts
/// and accepts work while the broker is still down.
pub async fn ensure_topics_eventually(config: KafkaConfig, topics: Vec<String>, shutdown: CancellationToken) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut backoff = Duration::from_millis(200);
    loop {
        match ensure_topics(&config, &names).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "cannot create topics yet; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
