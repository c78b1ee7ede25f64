//! Kafka set-up shared by the services: producers, consumers, topic creation,
//! envelope headers on records, and [`consume_parking`] (or its batched
//! form [`consume_parking_batched`]), the one loop every consumer of a topic
//! runs its records through.
//!
//! Producers are idempotent (`enable.idempotence`), so a retry inside
//! librdkafka neither duplicates nor reorders a partition's records.
//! Consumers never let librdkafka store offsets on their own
//! (`enable.auto.offset.store=false`): a service stores an offset only after
//! the message's effect is durable, and the background commit then sends it.
//!
//! Sizes are set together ([`MAX_RECORD_BYTES`]): producers refuse a request
//! above it, and consumers fetch at least that much per partition and per
//! request, so any record a service can produce its consumers can fetch. The
//! outbox refuses messages that could not fit (`onceflow_outbox::MAX_MESSAGE_BYTES`,
//! below this with room for framing), and the Avro decoder's allocation cap
//! (`onceflow_contracts::schema::MAX_DECODE_ALLOCATION`, 4 MiB) is above it, so
//! no record that fits is refused by the decoder for its size.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use onceflow_contracts::Envelope;
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance, StreamConsumer},
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::FutureProducer,
    types::RDKafkaErrorCode,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    config::KafkaConfig,
    failure::{Backoff, Failure},
    parking::Parking,
};

/// The largest request a producer sends (`message.max.bytes`, librdkafka's
/// default made explicit), so the largest record batch, and so the largest
/// single record, a consumer must be able to fetch.
pub const MAX_RECORD_BYTES: usize = 1_000_000;
/// What a consumer asks per partition (`max.partition.fetch.bytes`): a whole
/// producer batch fits, with the protocol's framing.
pub const MAX_PARTITION_FETCH_BYTES: usize = 1024 * 1024;
/// What a consumer asks per fetch request (`fetch.max.bytes`): several
/// partitions' worth, and never below [`MAX_RECORD_BYTES`] (librdkafka
/// requires that too).
pub const MAX_FETCH_BYTES: usize = 4 * MAX_PARTITION_FETCH_BYTES;
const _: () = assert!(MAX_PARTITION_FETCH_BYTES >= MAX_RECORD_BYTES && MAX_FETCH_BYTES >= MAX_PARTITION_FETCH_BYTES);

/// How long a consumer's fetch may wait at the broker for data
/// (`fetch.wait.max.ms`; librdkafka's default is 500). The nisshi broker
/// answers a fetch only when this expires, even if data arrived meanwhile, so
/// there it is the latency of every Kafka hop (two per command: commands, then
/// results); Apache Kafka answers as soon as data arrives, so there it only
/// bounds how often an idle consumer asks. The cost of a small value is that
/// polling: an idle consumer sends up to 1000 / this fetches a second.
/// Measured on the local stack (2026-12-07, in-memory broker): 10 instead
/// of 20 took accept → SSE at 100/s from p50 21 ms to 13 ms, and a push
/// handler's 202 → request from 13 ms to 10 ms, for 5 % more of a core
/// while idle (15 % in all against 10 %); 5 gained nothing more.
pub const FETCH_WAIT_MAX_MS: u32 = 10;

/// Properties the guarantees rest on, which the pass-through maps
/// (`kafka.consumer`, `kafka.producer`) may not change: offsets stored only
/// after the effect is durable, the idempotent producer waiting for every
/// replica, and the client's identity.
const PROTECTED: &[&str] =
    &["bootstrap.servers", "group.id", "enable.auto.offset.store", "enable.idempotence", "acks", "message.max.bytes"];

/// Set `properties` on `client`, refusing any of [`PROTECTED`].
fn pass_through(client: &mut ClientConfig, properties: &BTreeMap<String, String>, what: &str) -> Result<()> {
    for (name, value) in properties {
        if PROTECTED.contains(&name.as_str()) {
            return Err(Error::Config(format!(
                "kafka.{what}.\"{name}\" cannot be set: onceflow's delivery guarantees depend on it"
            )));
        }
        client.set(name, value);
    }
    Ok(())
}

/// The settings every Kafka client of a service starts from: the brokers and
/// the `kafka.client` properties (TLS, SASL), which the admin clients of
/// topic creation, readiness and lag need as much as consumers and producers.
pub fn client_config(config: &KafkaConfig) -> Result<ClientConfig> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    pass_through(&mut client, &config.client, "client")?;
    Ok(client)
}

/// How long a producer holds a record to batch it with the next
/// (`linger.ms`; librdkafka's default is 5). Every Kafka hop of a command
/// paid it in full at low rates (two hops per command); under load the
/// relay hands a whole round of rows to the producer at once, and records
/// queued while a request is in flight are batched whatever this says.
pub const LINGER_MS: u32 = 1;

/// An idempotent producer that waits for every in-sync replica and sends no
/// request above [`MAX_RECORD_BYTES`].
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    let mut client = client_config(config)?;
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("linger.ms", LINGER_MS.to_string())
        .set("message.timeout.ms", "30000");
    pass_through(&mut client, &config.producer, "producer")?;
    Ok(client.create()?)
}

/// Every service's consumer: its group membership is watched ([`Membership`]).
pub type Consumer = StreamConsumer<Membership>;

/// A consumer in `group_id` that reads from the earliest offset of a new group
/// and commits only offsets the service stored explicitly; it fetches any
/// record up to [`MAX_RECORD_BYTES`].
pub fn consumer(config: &KafkaConfig, group_id: &str) -> Result<Consumer> {
    let mut client = client_config(config)?;
    client
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (config.session_timeout_ms / 3).max(100).to_string())
        .set("isolation.level", "read_uncommitted")
        .set("message.max.bytes", MAX_RECORD_BYTES.to_string())
        .set("max.partition.fetch.bytes", MAX_PARTITION_FETCH_BYTES.to_string())
        .set("fetch.max.bytes", MAX_FETCH_BYTES.to_string())
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS.to_string());
    pass_through(&mut client, &config.consumer, "consumer")?;
    Ok(client.create_with_context(Membership::new(Instant::now()))?)
}

/// How long a consumer may be outside its group (joining after start, or
/// after a revocation or a group error) before it counts as having lost its
/// assignment: far longer than a rebalance takes, so only a consumer that
/// stays out (the group coordinator unreachable, the consumer removed for
/// not polling) is reported.
pub const MEMBERSHIP_GRACE: Duration = Duration::from_secs(30);

/// Whether a consumer holds an assignment, kept current by the rebalance
/// callbacks, for readiness (`/readyz`'s consumer checks).
///
/// An assignment of no partitions (more members than partitions) is a
/// membership like any other: that consumer is a standby, not broken.
#[derive(Debug)]
pub struct Membership {
    /// `Some(since)` while outside the group, `None` while a member.
    outside_since: Mutex<Option<Instant>>,
}

impl Membership {
    /// A consumer that has not joined its group yet, as of `now`.
    fn new(now: Instant) -> Self {
        Self { outside_since: Mutex::new(Some(now)) }
    }

    fn set(&self, outside: bool, now: Instant) {
        let mut since = self.outside_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = match (outside, *since) {
            (false, _) => None,
            (true, Some(earlier)) => Some(earlier),
            (true, None) => Some(now),
        };
    }

    /// `Err` when the consumer has been outside its group for longer than
    /// `grace` as of `now`.
    pub fn check(&self, now: Instant, grace: Duration) -> std::result::Result<(), String> {
        let since = *self.outside_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since.map(|since| now.saturating_duration_since(since)) {
            Some(outside) if outside > grace => {
                Err(format!("no partition assignment from its group for {}s", outside.as_secs()))
            }
            _ => Ok(()),
        }
    }
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let outside = match rebalance {
            Rebalance::Assign(_) => false,
            // Under the cooperative protocol a revocation may leave partitions assigned.
            Rebalance::Revoke(_) => consumer.assignment().map_or(true, |assigned| assigned.count() == 0),
            Rebalance::Error(error) => {
                tracing::warn!(%error, "consumer group rebalance failed");
                true
            }
        };
        self.set(outside, Instant::now());
    }
}

/// Create `topics` with the configured partition count unless they exist.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<()> {
    create_topics(config, topics, &[]).await
}

/// [`ensure_topics`] for topics that hold state rather than events: the
/// broker keeps the latest record of each key (`cleanup.policy=compact`),
/// so a new consumer reading from the start gets every key's current value.
pub async fn ensure_compacted_topics(config: &KafkaConfig, topics: &[&str]) -> Result<()> {
    create_topics(config, topics, &[("cleanup.policy", "compact")]).await
}

async fn create_topics(config: &KafkaConfig, topics: &[&str], settings: &[(&str, &str)]) -> Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)?.create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            settings.iter().fold(
                NewTopic::new(name, config.partitions, TopicReplication::Fixed(config.replication_factor)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
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
    let pairs = header_pairs(message)?;
    Ok(Envelope::from_headers(pairs.iter().map(|(name, value)| (name.as_str(), value.as_deref())))?)
}

/// Every header of `message`, in order, as (name, value) pairs.
///
/// rdkafka panics on a header name that is not UTF-8 (it unwraps the
/// conversion); a hostile producer must not be able to kill a consumer, so the
/// panic is caught here and the record reported as malformed instead.
pub fn header_pairs(message: &impl Message) -> Result<Vec<(String, Option<Vec<u8>>)>> {
    let Some(headers) = message.headers() else { return Ok(Vec::new()) };
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        headers.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect::<Vec<_>>()
    }));
    read.map_err(|_| {
        Error::Contract(onceflow_contracts::ContractError::InvalidHeader {
            name: "unknown",
            reason: "a header name is not UTF-8".to_owned(),
        })
    })
}

/// The next message of `consumer`, or `None` once `shutdown` is cancelled.
///
/// Consumer errors (the broker unreachable, a rebalance in progress) are
/// logged and waited out with a backoff that grows to 5 s, so a broker outage
/// is not a busy loop of errors.
pub async fn next_message(consumer: &Consumer, shutdown: &CancellationToken) -> Option<OwnedMessage> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return None,
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => return Some(message.detach()),
            Err(error) => {
                tracing::warn!(%error, "consumer error; waiting before the next poll");
                if !backoff.wait(shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Why a consumer's handler could not apply a record, and what kind of
/// failure that is: [`Failure::Data`] ends the record (parked, or refused),
/// [`Failure::Outage`] makes the consumer wait and try the same record again.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct RecordError {
    pub failure: Failure,
    pub reason: String,
}

impl RecordError {
    /// The record itself is unusable (undecodable, invalid, refused by the database).
    pub fn data(reason: impl Into<String>) -> Self {
        Self { failure: Failure::Data, reason: reason.into() }
    }
}

impl From<sqlx::Error> for RecordError {
    fn from(error: sqlx::Error) -> Self {
        Self { failure: Failure::of_database(&error), reason: error.to_string() }
    }
}

/// Feed every message of `consumer` to `handle`, one at a time, until
/// `shutdown`, storing each message's offset once it has ended; a record that
/// can never be applied is parked in `parking` for an operator (see
/// [`crate::parking`]) and consumption moves on.
///
/// The rule every consumer of a record follows (guarantee G8):
/// - `Ok`: applied (or deliberately ignored by `handle`); next.
/// - [`Failure::Data`]: the record is parked (topic, partition, offset, key,
///   headers, payload and the error), logged and counted
///   (`onceflow_records_parked_total`); next. An undecodable record is
///   `handle`'s data error like any other.
/// - [`Failure::Outage`]: wait with [`Backoff`] and try the same record again,
///   with no count bound; nothing is parked, so an outage destroys no work.
pub async fn consume_parking<F, Fut>(
    consumer: &Consumer,
    shutdown: &CancellationToken,
    parking: &Parking,
    mut handle: F,
) where
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    while let Some(message) = next_message(consumer, shutdown).await {
        if !end_one(&message, shutdown, parking, &mut handle).await {
            return;
        }
        store_offset(consumer, &message);
    }
}

/// Why a batch was not applied: the error, and the position of the message
/// it came from.
#[derive(Debug)]
pub struct BatchError {
    pub position: usize,
    pub error: RecordError,
}

impl BatchError {
    /// An error of the message at `position`.
    pub fn at(position: usize) -> impl Fn(RecordError) -> Self {
        move |error| Self { position, error }
    }

    /// An error of the batch's transaction itself (begin, lock, commit),
    /// charged to its first message: that one is tried alone, which sorts
    /// an outage from a record of its own that cannot be applied.
    pub fn whole(error: sqlx::Error) -> Self {
        Self { position: 0, error: error.into() }
    }

    /// Every message of a batch decoded, or the error of the first that is not.
    pub fn decode_all<T>(
        messages: &[OwnedMessage],
        decode: impl Fn(&OwnedMessage) -> std::result::Result<T, RecordError>,
    ) -> std::result::Result<Vec<T>, Self> {
        messages.iter().enumerate().map(|(position, message)| decode(message).map_err(Self::at(position))).collect()
    }
}

/// [`consume_parking`] in batches, for a consumer whose records cost a
/// commit each: the messages ready when the consumer is free (up to
/// `max_batch`; it never waits to fill a batch, so a lone record costs no
/// latency) go to `handle_batch` together, which applies all of them in one
/// transaction or none. A batch that fails on a data error of one message is
/// split there: the messages before it are batched again, it goes alone
/// through `handle`, which ends it by the rule of [`consume_parking`]
/// (parked), and the rest are batched again; any other failure (an outage)
/// sends the rest one at a time through `handle`, which waits it out. A
/// batch changes how fast records end, never how.
pub async fn consume_parking_batched<B, BFut, F, Fut>(
    consumer: &Consumer,
    shutdown: &CancellationToken,
    parking: &Parking,
    max_batch: usize,
    mut handle_batch: B,
    mut handle: F,
) where
    B: FnMut(Vec<OwnedMessage>) -> BFut,
    BFut: std::future::Future<Output = std::result::Result<(), BatchError>>,
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    let max_batch = max_batch.max(1);
    while let Some(first) = next_message(consumer, shutdown).await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            // Only what librdkafka already holds: polled once, never awaited.
            match futures::FutureExt::now_or_never(consumer.recv()) {
                Some(Ok(message)) => batch.push(message.detach()),
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer error while taking a batch");
                    break;
                }
                None => break,
            }
        }
        let mut rest = batch.as_slice();
        while !rest.is_empty() {
            let alone = if rest.len() == 1 {
                rest.len()
            } else {
                match handle_batch(rest.to_vec()).await {
                    Ok(()) => {
                        rest.iter().for_each(|message| store_offset(consumer, message));
                        break;
                    }
                    Err(BatchError { position, error }) => {
                        tracing::info!(error = %error.reason, size = rest.len(), position, "batch not applied");
                        metrics::counter!("onceflow_record_batch_fallbacks_total", "consumer" => parking.consumer())
                            .increment(1);
                        if !error.failure.is_data() || position >= rest.len() {
                            rest.len()
                        } else {
                            // The messages before the culprit met nothing wrong.
                            let before = &rest[..position];
                            if before.len() > 1 && handle_batch(before.to_vec()).await.is_ok() {
                                before.iter().for_each(|message| store_offset(consumer, message));
                                rest = &rest[position..];
                                1
                            } else {
                                position + 1
                            }
                        }
                    }
                }
            };
            for message in &rest[..alone] {
                if !end_one(message, shutdown, parking, &mut handle).await {
                    return;
                }
                store_offset(consumer, message);
            }
            rest = &rest[alone..];
        }
    }
}

/// Bring `message` to its end with `handle` (applied, or parked), waiting out
/// outages; `false` if `shutdown` came first (its offset must not be stored).
async fn end_one<F, Fut>(
    message: &OwnedMessage,
    shutdown: &CancellationToken,
    parking: &Parking,
    handle: &mut F,
) -> bool
where
    F: FnMut(OwnedMessage) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), RecordError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let error = match handle(message.clone()).await {
            Ok(()) => return true,
            Err(error) => error,
        };
        if error.failure.is_data() {
            return end_record(message, &error, parking, shutdown).await;
        }
        tracing::warn!(
            error = %error.reason,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            "cannot handle the record while a dependency is down; waiting"
        );
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}

fn store_offset(consumer: &Consumer, message: &OwnedMessage) {
    if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
        tracing::warn!(%error, "cannot store offset; the message may be redelivered");
    }
}

/// End a record that can never be applied: park it. `false` if `shutdown`
/// came while parking waited on an outage.
async fn end_record(
    message: &OwnedMessage,
    error: &RecordError,
    parking: &Parking,
    shutdown: &CancellationToken,
) -> bool {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match parking.park(message, &error.reason).await {
            Ok(id) => {
                tracing::error!(
                    error = %error.reason,
                    topic,
                    partition,
                    offset,
                    parked_id = id,
                    consumer = parking.consumer(),
                    "record can never be applied; parked for an operator"
                );
                metrics::counter!("onceflow_records_parked_total", "consumer" => parking.consumer()).increment(1);
                return true;
            }
            // Parking writes only bytes and sanitised text: a data error here
            // is unexpected, and must not stall the topic either.
            Err(park_error) if Failure::of_database(&park_error).is_data() => {
                tracing::error!(error = %error.reason, %park_error, topic, partition, offset, "record cannot be parked; refused");
                metrics::counter!("onceflow_records_refused_total", "topic" => topic.to_owned()).increment(1);
                return true;
            }
            Err(park_error) => {
                tracing::warn!(%park_error, topic, partition, offset, "cannot park the record yet; waiting");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}

/// [`ensure_topics`] of `topics` and [`ensure_compacted_topics`] of
/// `compacted` until both succeed (or `shutdown`), so a service starts and
/// accepts work while the broker is still down.
pub async fn ensure_topics_eventually(
    config: KafkaConfig,
    topics: Vec<String>,
    compacted: Vec<String>,
    shutdown: CancellationToken,
) {
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let compacted: Vec<&str> = compacted.iter().map(String::as_str).collect();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let created = match ensure_topics(&config, &names).await {
            Ok(()) => ensure_compacted_topics(&config, &compacted).await,
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "cannot create topics yet; retrying"),
        }
        if !backoff.wait(&shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(consumer: &[(&str, &str)], producer: &[(&str, &str)]) -> KafkaConfig {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        KafkaConfig {
            brokers: "127.0.0.1:9".to_owned(),
            topic_prefix: String::new(),
            partitions: 1,
            replication_factor: 1,
            session_timeout_ms: 6000,
            client: BTreeMap::new(),
            consumer: map(consumer),
            producer: map(producer),
        }
    }

    #[tokio::test]
    async fn properties_pass_through_but_not_the_ones_the_guarantees_rest_on() {
        assert!(consumer(&config(&[("fetch.wait.max.ms", "100")], &[]), "g").is_ok());
        assert!(producer(&config(&[], &[("linger.ms", "5")])).is_ok());
        for (name, value) in [("enable.auto.offset.store", "true"), ("group.id", "other")] {
            let error = consumer(&config(&[(name, value)], &[]), "g").err().expect("refused");
            assert!(matches!(&error, Error::Config(text) if text.contains(name)), "{error}");
        }
        for (name, value) in [("enable.idempotence", "false"), ("acks", "1")] {
            let error = producer(&config(&[], &[(name, value)])).err().expect("refused");
            assert!(matches!(&error, Error::Config(text) if text.contains(name)), "{error}");
        }
        // librdkafka itself refuses what it does not know, at start.
        assert!(consumer(&config(&[("no.such.property", "1")], &[]), "g").is_err());
    }

    /// TLS and SASL/SCRAM are compiled in and reach every client through
    /// `kafka.client` (librdkafka refuses `SSL` at creation when built without
    /// OpenSSL); the guarantees' properties stay protected there too.
    #[tokio::test]
    async fn tls_and_sasl_settings_reach_every_client() {
        let mut secured = config(&[], &[]);
        secured.client = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "onceflow"),
            ("sasl.password", "secret"),
            ("ssl.endpoint.identification.algorithm", "https"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert!(consumer(&secured, "g").is_ok());
        assert!(producer(&secured).is_ok());
        let admin: std::result::Result<AdminClient<DefaultClientContext>, _> =
            client_config(&secured).unwrap().create();
        assert!(admin.is_ok());
        secured.client.insert("enable.idempotence".to_owned(), "false".to_owned());
        assert!(matches!(producer(&secured), Err(Error::Config(text)) if text.contains("kafka.client")));
    }

    /// Outside the group for longer than the grace (never joined, or revoked
    /// and not assigned again) is reported; a rebalance's short gap is not,
    /// and a membership of no partitions counts as one.
    #[test]
    fn membership_reports_a_consumer_outside_its_group_for_longer_than_the_grace() {
        let grace = Duration::from_secs(30);
        let start = Instant::now();
        let membership = Membership::new(start);
        assert!(membership.check(start + Duration::from_secs(29), grace).is_ok(), "joining");
        let error = membership.check(start + Duration::from_secs(31), grace).unwrap_err();
        assert!(error.contains("31s"), "{error}");

        membership.set(false, start + Duration::from_secs(32));
        assert!(membership.check(start + Duration::from_secs(100), grace).is_ok(), "a member");

        // Revoked, then revoked again (or an error): the gap runs from the first.
        membership.set(true, start + Duration::from_secs(100));
        membership.set(true, start + Duration::from_secs(120));
        assert!(membership.check(start + Duration::from_secs(129), grace).is_ok(), "a rebalance");
        assert!(membership.check(start + Duration::from_secs(131), grace).is_err(), "stayed out");
        membership.set(false, start + Duration::from_secs(140));
        assert!(membership.check(start + Duration::from_secs(400), grace).is_ok(), "assigned again");
    }
}

/// How far a consumer group is behind on one partition of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Records the group has not committed yet.
    pub lag: i64,
    /// The group's committed offset (the partition's first offset while it
    /// never committed).
    pub committed: i64,
}

/// How far a consumer group is behind on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    pub partitions: Vec<PartitionLag>,
}

impl GroupLag {
    /// Records on the topic that the group has not committed yet.
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }

    /// Records the group has committed, counted from each partition's start:
    /// its increase over time is the group's drain rate.
    pub fn committed(&self) -> i64 {
        self.partitions.iter().map(|p| p.committed).sum()
    }
}

/// Reads a consumer group's progress on a topic: a consumer that carries
/// the group's id but never subscribes, so it reads the group's committed
/// offsets (as `kafka-consumer-groups --describe` does) without joining the
/// group or taking part in its rebalances, and never commits.
pub struct LagProbe {
    consumer: rdkafka::consumer::BaseConsumer,
    topic: String,
}

impl LagProbe {
    pub fn new(config: &KafkaConfig, group_id: &str, topic: &str) -> Result<Self> {
        let mut client = client_config(config)?;
        client.set("group.id", group_id).set("enable.auto.commit", "false");
        pass_through(&mut client, &config.consumer, "consumer")?;
        Ok(Self { consumer: client.create()?, topic: topic.to_owned() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The group's lag now. Blocking (several broker round trips, each at
    /// most `timeout`): call it from `spawn_blocking`.
    pub fn measure(&self, timeout: Duration) -> Result<GroupLag> {
        use rdkafka::{Offset, TopicPartitionList};
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout)?;
        let ids: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|topic| topic.name() == self.topic)
            .flat_map(|topic| topic.partitions().iter().map(|partition| partition.id()))
            .collect();
        let mut wanted = TopicPartitionList::new();
        for id in &ids {
            wanted.add_partition(&self.topic, *id);
        }
        let committed = self.consumer.committed_offsets(wanted, timeout)?;
        let mut partitions = Vec::with_capacity(ids.len());
        for partition in ids {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, partition, timeout)?;
            let position = match committed.find_partition(&self.topic, partition).map(|p| p.offset()) {
                Some(Offset::Offset(offset)) => offset.clamp(low, high),
                _ => low,
            };
            partitions.push(PartitionLag { partition, lag: high - position, committed: position });
        }
        Ok(GroupLag { partitions })
    }
}
