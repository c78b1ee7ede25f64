//! Per-key order of the relay when one record of a key fails and a later one
//! of the same key would succeed: librdkafka's mock cluster refuses one
//! produce request, the outbox lives in a PostgreSQL database of the test's
//! own, and the topic is read back from its beginning.
//!
//! Environment: `ONCEFLOW_TEST_DATABASE_URL` (a server URL, default
//! `postgres://postgres@127.0.0.1:5432`).

use std::{collections::HashMap, time::Duration};

use onceflow_contracts::Envelope;
use onceflow_outbox::{OutboxMessage, Relay, RelayConfig};
use onceflow_runtime::config::{DatabaseConfig, KafkaConfig};
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer as _},
    mocking::MockCluster,
    producer::DefaultProducerContext,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "relay-order";

/// A fresh database with the outbox's migrations; dropped by [`drop_database`].
async fn database() -> (PgPool, String, String) {
    let server =
        std::env::var("ONCEFLOW_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("onceflow_outbox_test_{}", uuid::Uuid::new_v4().simple());
    let config = DatabaseConfig { url: format!("{server}/{name}"), max_connections: 4, acquire_timeout_ms: 5000 };
    let pool = onceflow_runtime::postgres::prepare(&config, [onceflow_outbox::migrator()]).await.unwrap();
    (pool, server, name)
}

async fn drop_database(pool: PgPool, server: &str, name: &str) {
    pool.close().await;
    let admin = PgPool::connect(&format!("{server}/postgres")).await.unwrap();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await.unwrap();
}

/// librdkafka settings over the services' producer that put every record in a
/// produce request of its own, so that each record can fail on its own.
fn one_record_per_request() -> serde_json::Value {
    serde_json::json!({"batch.num.messages": "1"})
}

/// Run a relay with the services' producer
/// (`onceflow_runtime::kafka::producer`, with `producer` settings over it) on
/// `brokers` until the outbox is empty.
async fn relay_until_empty(pool: &PgPool, brokers: &str, producer: &serde_json::Value) {
    let kafka: KafkaConfig = serde_json::from_value(serde_json::json!({
        "brokers": brokers,
        "partitions": 1,
        "session_timeout_ms": 6000,
        "producer": producer,
    }))
    .unwrap();
    let producer = onceflow_runtime::kafka::producer(&kafka).unwrap();
    let shutdown = CancellationToken::new();
    let config = RelayConfig { batch_size: 500, poll_interval: Duration::from_millis(100) };
    let relay = tokio::spawn(Relay::new(pool.clone(), producer, config).run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox").fetch_one(pool).await.unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} outbox rows never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    relay.await.unwrap();
}

/// Enqueue `(key, sequence)` messages in one transaction, in order; returns
/// their message ids.
async fn enqueue(pool: &PgPool, messages: &[(&str, u64)]) -> Vec<String> {
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for (key, sequence) in messages {
        let envelope = Envelope {
            message_id: uuid::Uuid::now_v7(),
            correlation_id: "relay-order".to_owned(),
            causation_id: None,
            tenant: "dev".to_owned(),
            message_type: "test".to_owned(),
            schema_id: "test".to_owned(),
            traceparent: None,
            tracestate: None,
        };
        ids.push(envelope.message_id.to_string());
        let message = OutboxMessage {
            topic: TOPIC.to_owned(),
            key: Some((*key).to_owned()),
            payload: sequence.to_be_bytes().to_vec(),
            envelope,
            headers: Vec::new(),
        };
        onceflow_outbox::enqueue(&mut tx, &message).await.unwrap();
    }
    tx.commit().await.unwrap();
    ids
}

/// Every record of the topic, from its beginning until nothing more arrives
/// for a second: (key, message id, sequence).
fn read_topic(brokers: &str) -> Vec<(String, String, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "relay-order-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(TOPIC, 0, Offset::Beginning).unwrap();
    consumer.assign(&partitions).unwrap();
    let mut records = Vec::new();
    while let Some(message) = consumer.poll(Duration::from_secs(1)) {
        let message = message.unwrap();
        let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
        let id = rdkafka::message::Headers::iter(message.headers().unwrap())
            .find(|header| header.key == "message-id")
            .map(|header| String::from_utf8(header.value.unwrap().to_vec()).unwrap())
            .unwrap();
        let sequence = u64::from_be_bytes(message.payload().unwrap().try_into().unwrap());
        records.push((key, id, sequence));
    }
    records
}

/// After an outage (the broker down longer than the producer's message
/// timeout, shortened here, so the relay's rounds fail and it turns careful),
/// the broker comes back refusing the produce request of a key's first
/// record (a permission error, which librdkafka does not retry) while it
/// accepts the next requests, which carry that key's later records (one
/// record per request here). The relay must not put a later record of the
/// key on the topic before an earlier one: the topic holds each key's
/// records in outbox order, by first appearance; a copy of a record already
/// seen (same message id) is the most a retry may add. Another key's records
/// flow meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_a_failed_record_keeps_its_keys_later_records_behind_it() {
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let (pool, server, name) = database().await;

    cluster.broker_down(1).unwrap();
    let sent = enqueue(&pool, &[("account-a", 1), ("account-a", 2), ("account-a", 3), ("account-b", 1)]).await;
    let outage = async {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED]);
        cluster.broker_up(1).unwrap();
    };
    let settings = serde_json::json!({"message.timeout.ms": "1000", "batch.num.messages": "1"});
    tokio::join!(outage, relay_until_empty(&pool, &brokers, &settings));

    let records = tokio::task::spawn_blocking(move || read_topic(&brokers)).await.unwrap();
    let mut first_seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for (key, id, sequence) in &records {
        let count = copies.entry(id).or_default();
        *count += 1;
        if *count == 1 {
            first_seen.entry(key.clone()).or_default().push(*sequence);
        }
    }
    assert_eq!(first_seen["account-a"], [1, 2, 3], "account-a's records in outbox order: {records:?}");
    assert_eq!(first_seen["account-b"], [1], "account-b's record: {records:?}");
    assert!(sent.iter().all(|id| copies.contains_key(id.as_str())), "every message published: {records:?}");
    assert_eq!(copies.len(), sent.len(), "nothing else published: {records:?}");
    drop_database(pool, &server, &name).await;
}

/// The broker refuses a key's first record for what it is (an invalid
/// record, which no retry can change): the relay parks that row with its
/// error for an operator and goes on with the key's later records, in order,
/// and with everyone else's (here in a pipelined round: the later records
/// were handed over with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_for_good_is_parked_and_its_key_goes_on() {
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let (pool, server, name) = database().await;

    let sent = enqueue(&pool, &[("account-a", 1), ("account-a", 2), ("account-a", 3), ("account-b", 1)]).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD]);
    relay_until_empty(&pool, &brokers, &one_record_per_request()).await;

    let parked: Vec<(String, String)> = sqlx::query_as(
        "SELECT (SELECT header->>1 FROM jsonb_array_elements(headers) AS header WHERE header->>0 = 'message-id'), error
         FROM onceflow_outbox_parked ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(parked.len(), 1, "one row parked: {parked:?}");
    assert_eq!(parked[0].0, sent[0], "account-a's first row is the one parked");
    assert!(parked[0].1.contains("InvalidRecord"), "with the broker's error: {}", parked[0].1);

    let records = tokio::task::spawn_blocking(move || read_topic(&brokers)).await.unwrap();
    let keyed: Vec<(&str, u64)> = records.iter().map(|(key, _, sequence)| (key.as_str(), *sequence)).collect();
    let of = |wanted: &str| keyed.iter().filter(|(key, _)| *key == wanted).map(|(_, n)| *n).collect::<Vec<_>>();
    assert_eq!(of("account-a"), [2, 3], "account-a's later records, once each, in order: {records:?}");
    assert_eq!(of("account-b"), [1], "account-b's record: {records:?}");
    drop_database(pool, &server, &name).await;
}

/// The broker is down while rows wait, longer than the producer's message
/// timeout (shortened here): the relay only waits. Once the broker is back,
/// every row is published, in order, and none is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_only_makes_the_relay_wait() {
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let (pool, server, name) = database().await;

    cluster.broker_down(1).unwrap();
    enqueue(&pool, &[("account-a", 1), ("account-a", 2), ("account-b", 1), ("account-a", 3)]).await;
    let outage = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        cluster.broker_up(1).unwrap();
    };
    let settings = serde_json::json!({"message.timeout.ms": "1000", "batch.num.messages": "1"});
    tokio::join!(outage, relay_until_empty(&pool, &brokers, &settings));

    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox_parked").fetch_one(&pool).await.unwrap();
    assert_eq!(parked, 0, "an outage parks nothing");
    let records = tokio::task::spawn_blocking(move || read_topic(&brokers)).await.unwrap();
    let mut first_seen: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (key, id, sequence) in &records {
        if seen.insert(id) {
            first_seen.entry(key).or_default().push(*sequence);
        }
    }
    assert_eq!(first_seen["account-a"], [1, 2, 3], "account-a's records in outbox order: {records:?}");
    assert_eq!(first_seen["account-b"], [1], "account-b's record: {records:?}");
    drop_database(pool, &server, &name).await;
}

/// The ordinary batch, every row under a key of its own, is handed to the
/// producer at once, not row after row: with the broker answering each
/// request only after a long round trip, 500 rows take a few round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_distinct_keys_is_handed_over_at_once() {
    const ROWS: u64 = 500;
    const ROUND_TRIP: Duration = Duration::from_millis(500);
    let cluster = MockCluster::<DefaultProducerContext>::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    cluster.broker_round_trip_time(-1, ROUND_TRIP).unwrap();
    let brokers = cluster.bootstrap_servers();
    let (pool, server, name) = database().await;

    let keys: Vec<String> = (0..ROWS).map(|n| format!("account-{n}")).collect();
    let messages: Vec<(&str, u64)> = keys.iter().map(|key| (key.as_str(), 1)).collect();
    enqueue(&pool, &messages).await;
    let started = tokio::time::Instant::now();
    relay_until_empty(&pool, &brokers, &serde_json::json!({})).await;
    // Connecting takes a few round trips too; one row at a time would take
    // ROWS of them.
    let took = started.elapsed();
    assert!(took < ROUND_TRIP * 30, "{ROWS} rows of distinct keys took {took:?}, {ROUND_TRIP:?} a round trip");
    drop_database(pool, &server, &name).await;
}
