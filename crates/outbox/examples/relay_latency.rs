//! Benchmark: how long a message takes from its transaction's commit to a
//! consumer, through the outbox relay, against a raw baseline measured in the
//! same run: producing the same message straight to Kafka.
//!
//! ```sh
//! scripts/stack.sh up        # or any broker on 127.0.0.1:9092 and PostgreSQL
//! cargo run --release -p onceflow-outbox --example relay_latency
//! ```
//!
//! It reports latency percentiles (one message at a time) and throughput (a
//! burst of messages) for both paths, and the outbox's figures as a ratio to
//! the baseline. The outbox's burst runs twice: every message under one key
//! (the relay publishes a key's messages one after another) and every
//! message under a key of its own (the relay pipelines a whole batch). Environment: `ONCEFLOW_BENCH_DATABASE_URL` (a server URL,
//! default `postgres://postgres@127.0.0.1:5432`), `ONCEFLOW_BENCH_KAFKA_BROKERS`
//! (default `127.0.0.1:9092`), `ONCEFLOW_BENCH_MESSAGES` (default 300).

use std::time::{Duration, Instant};

use onceflow_contracts::Envelope;
use onceflow_outbox::{OutboxMessage, Relay, RelayConfig};
use onceflow_runtime::config::{DatabaseConfig, KafkaConfig};
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
    producer::FutureRecord,
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server =
        std::env::var("ONCEFLOW_BENCH_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let brokers = std::env::var("ONCEFLOW_BENCH_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let messages: usize = std::env::var("ONCEFLOW_BENCH_MESSAGES").ok().and_then(|n| n.parse().ok()).unwrap_or(300);
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let kafka = KafkaConfig {
        brokers,
        topic_prefix: format!("bench{run}."),
        partitions: 1,
        replication_factor: 1,
        session_timeout_ms: 6000,
        client: Default::default(),
        consumer: Default::default(),
        producer: Default::default(),
    };
    let database =
        DatabaseConfig { url: format!("{server}/onceflow_bench_{run}"), max_connections: 4, acquire_timeout_ms: 5000 };
    let pool = onceflow_runtime::postgres::prepare(&database, [onceflow_outbox::migrator()]).await?;
    let (direct_topic, outbox_topic) = (format!("bench{run}.direct"), format!("bench{run}.outbox"));
    onceflow_runtime::kafka::ensure_topics(&kafka, &[&direct_topic, &outbox_topic]).await?;

    let producer = onceflow_runtime::kafka::producer(&kafka)?;
    let shutdown = CancellationToken::new();
    let relay = Relay::new(pool.clone(), producer.clone(), RelayConfig::default());
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let direct = reader(&kafka, &direct_topic)?;
    let outbox = reader(&kafka, &outbox_topic)?;
    let payload = vec![7u8; 256];

    // Warm both paths (connections, metadata, the relay's lock).
    send_direct(&producer, &direct_topic, &payload).await?;
    next(&direct).await?;
    send_outbox(&pool, &outbox_topic, &payload).await?;
    next(&outbox).await?;

    let mut direct_latency = Vec::with_capacity(messages);
    let mut outbox_latency = Vec::with_capacity(messages);
    for _ in 0..messages {
        let start = Instant::now();
        send_direct(&producer, &direct_topic, &payload).await?;
        next(&direct).await?;
        direct_latency.push(start.elapsed());

        let start = Instant::now();
        send_outbox(&pool, &outbox_topic, &payload).await?;
        next(&outbox).await?;
        outbox_latency.push(start.elapsed());
    }

    let burst = messages * 10;
    let start = Instant::now();
    futures::future::try_join_all((0..burst).map(|_| send_direct(&producer, &direct_topic, &payload))).await?;
    for _ in 0..burst {
        next(&direct).await?;
    }
    let direct_burst = start.elapsed();
    let (committed, one_key_burst) =
        outbox_burst(&pool, &outbox, &outbox_topic, &payload, burst, |_| "bench".into()).await?;
    let (committed_keyed, keyed_burst) =
        outbox_burst(&pool, &outbox, &outbox_topic, &payload, burst, |n| format!("bench-{n}")).await?;

    shutdown.cancel();
    relay_task.await?;
    pool.close().await;
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres")).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS onceflow_bench_{run} WITH (FORCE)")).execute(&admin).await?;

    let (d50, d99) = percentiles(&mut direct_latency);
    let (o50, o99) = percentiles(&mut outbox_latency);
    println!("latency, one message at a time ({messages} messages, 256-byte payload):");
    println!("  direct produce -> consume    p50 {:>8.2} ms   p99 {:>8.2} ms", ms(d50), ms(d99));
    println!("  outbox commit  -> consume    p50 {:>8.2} ms   p99 {:>8.2} ms", ms(o50), ms(o99));
    println!("  ratio outbox / direct        p50 {:>8.2}x     p99 {:>8.2}x", ratio(o50, d50), ratio(o99, d99));
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!("throughput, a burst of {burst} messages:");
    println!("  direct                       {:>10.0} msg/s", rate(burst, direct_burst));
    println!(
        "  outbox, one key (one tx, {:.0} ms to commit)  {:>10.0} msg/s",
        ms(committed),
        rate(burst, one_key_burst)
    );
    println!("  ratio outbox / direct        {:>10.2}x", rate(burst, one_key_burst) / rate(burst, direct_burst));
    println!(
        "  outbox, a key each (one tx, {:.0} ms to commit)  {:>10.0} msg/s",
        ms(committed_keyed),
        rate(burst, keyed_burst)
    );
    println!("  ratio outbox / direct        {:>10.2}x", rate(burst, keyed_burst) / rate(burst, direct_burst));
    Ok(())
}

/// Commit `burst` messages in one transaction, the n-th under `key(n)`, and
/// read them all back; returns the time to commit and the time until the last
/// was read, both from the start.
async fn outbox_burst(
    pool: &sqlx::PgPool,
    reader: &StreamConsumer,
    topic: &str,
    payload: &[u8],
    burst: usize,
    key: impl Fn(usize) -> String,
) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut tx = pool.begin().await?;
    for n in 0..burst {
        onceflow_outbox::enqueue(&mut tx, &message(topic, payload, key(n))).await?;
    }
    tx.commit().await?;
    let committed = start.elapsed();
    for _ in 0..burst {
        next(reader).await?;
    }
    Ok((committed, start.elapsed()))
}

fn message(topic: &str, payload: &[u8], key: String) -> OutboxMessage {
    OutboxMessage {
        headers: Vec::new(),
        topic: topic.to_owned(),
        key: Some(key),
        payload: payload.to_vec(),
        envelope: envelope(),
    }
}

fn envelope() -> Envelope {
    Envelope {
        message_id: uuid::Uuid::now_v7(),
        correlation_id: "bench".to_owned(),
        causation_id: None,
        tenant: "bench".to_owned(),
        message_type: "bench".to_owned(),
        schema_id: "bench".to_owned(),
        traceparent: None,
        tracestate: None,
    }
}

async fn send_direct(producer: &rdkafka::producer::FutureProducer, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
    let record =
        FutureRecord::to(topic).key("bench").payload(payload).headers(onceflow_runtime::kafka::headers(&envelope()));
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

async fn send_outbox(pool: &sqlx::PgPool, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    onceflow_outbox::enqueue(&mut tx, &message(topic, payload, "bench".into())).await?;
    tx.commit().await?;
    Ok(())
}

fn reader(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&partitions)?;
    Ok(consumer)
}

async fn next(consumer: &StreamConsumer) -> anyhow::Result<()> {
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
    anyhow::ensure!(message.payload().is_some(), "empty record");
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
