//! Creating the Kafka clients: the settings every client starts from, the
//! producer and the consumer, and the properties operators may pass through
//! (`kafka.client`, `kafka.producer`, `kafka.consumer`) without touching the
//! ones the delivery guarantees rest on.

use std::{collections::BTreeMap, time::Instant};

use rdkafka::{ClientConfig, consumer::StreamConsumer, producer::FutureProducer};

use super::Membership;
use crate::{Error, Result, config::KafkaConfig};

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
pub(super) fn pass_through(client: &mut ClientConfig, properties: &BTreeMap<String, String>, what: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use rdkafka::{admin::AdminClient, client::DefaultClientContext};

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
}
