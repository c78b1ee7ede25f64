//! The outbox relay against the real PostgreSQL and broker: one active relay
//! per outbox, a second standing by that takes over when the first dies, and
//! a leader whose lock session dies stops before publishing beside the next.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use onceflow_contracts::Envelope;
use onceflow_outbox::{OutboxMessage, Relay, RelayConfig};
use onceflow_tests::{OUTCOME_TIMEOUT, TestEnv, TopicReader, eventually};
use sqlx::{ConnectOptions as _, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;

async fn pool_named(url: &str, name: &str) -> PgPool {
    let options: PgConnectOptions =
        url.parse::<PgConnectOptions>().unwrap().application_name(name).disable_statement_logging();
    sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(options).await.unwrap()
}

/// A message for `topic` with `key` and `payload`, under a fresh message id.
fn test_message(topic: &str, key: &str, payload: Vec<u8>) -> OutboxMessage {
    let envelope = Envelope {
        message_id: uuid::Uuid::now_v7(),
        correlation_id: "relay-test".to_owned(),
        causation_id: None,
        tenant: "dev".to_owned(),
        message_type: "test".to_owned(),
        schema_id: "test".to_owned(),
        traceparent: None,
        tracestate: None,
    };
    OutboxMessage { topic: topic.to_owned(), key: Some(key.to_owned()), payload, envelope, headers: Vec::new() }
}

async fn enqueue(pool: &PgPool, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut tx = pool.begin().await.unwrap();
    for _ in 0..n {
        let message = test_message(topic, "one-key", vec![1]);
        ids.push(message.envelope.message_id.to_string());
        onceflow_outbox::enqueue(&mut tx, &message).await.unwrap();
    }
    tx.commit().await.unwrap();
    ids
}

/// The application name of the session holding the relay's advisory lock.
async fn leader(db: &PgPool) -> Option<String> {
    sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()",
    )
    .fetch_optional(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_relay_publishes_while_another_stands_by_and_takes_over() {
    let mut env = TestEnv::new();
    let database = env.database("relay");
    let db = onceflow_runtime::postgres::prepare(&database, [onceflow_outbox::migrator()]).await.unwrap();
    let topic = env.kafka.topics().commands;
    onceflow_runtime::kafka::ensure_topics(&env.kafka, &[&topic]).await.unwrap();
    let config = RelayConfig { batch_size: 500, poll_interval: Duration::from_millis(200) };

    let mut relays = Vec::new();
    for name in ["relay-a", "relay-b"] {
        let pool = pool_named(&database.url, name).await;
        let producer = onceflow_runtime::kafka::producer(&env.kafka).unwrap();
        let token = CancellationToken::new();
        let task = tokio::spawn(Relay::new(pool.clone(), producer, config.clone()).run(token.clone()));
        relays.push((name, pool, task));
    }
    let first_leader = eventually("one relay to take the lock", Duration::from_secs(10), || leader(&db)).await;

    let reader = TopicReader::new(&env.kafka, &topic);
    let mut expected = enqueue(&db, &topic, 20).await;
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        seen.push(reader.next(OUTCOME_TIMEOUT).await.headers["message-id"].clone());
    }
    assert_eq!(leader(&db).await.as_deref(), Some(first_leader.as_str()), "the leader stays while it lives");
    // Let the leader delete what it published; a crash before that would make
    // the next leader publish those rows again (at least once, same message ids).
    eventually("the published rows to be deleted", Duration::from_secs(10), || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox").fetch_one(&db).await.unwrap();
        (left == 0).then_some(())
    })
    .await;

    // The leader dies: its task stops and the server ends its sessions, which
    // is what PostgreSQL sees when a relay's process is killed.
    let index = relays.iter().position(|(name, _, _)| *name == first_leader).unwrap();
    let (_, pool, task) = relays.remove(index);
    task.abort();
    let _ = task.await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(&first_leader)
    .execute(&db)
    .await
    .unwrap();
    drop(pool);

    let second_leader = eventually("the standby to take over", Duration::from_secs(30), || async {
        leader(&db).await.filter(|name| *name != first_leader)
    })
    .await;
    assert_eq!(second_leader, relays[0].0);
    expected.extend(enqueue(&db, &topic, 20).await);
    while seen.len() < expected.len() {
        seen.push(reader.next(OUTCOME_TIMEOUT).await.headers["message-id"].clone());
    }
    // Nothing more, nothing twice, and one key's records in commit order.
    let late = reader.records_until_quiet(Duration::from_secs(2)).await;
    assert!(late.is_empty(), "{} unexpected records", late.len());
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len(), "no record twice");
    assert_eq!(seen, expected, "one key's records arrive in commit order, across the takeover");
    db.close().await;
    env.teardown().await;
}

/// Enqueue one message per key in `keys`, in one transaction, each carrying
/// its key's next sequence number; returns (message id, key, sequence).
async fn enqueue_sequenced(
    pool: &PgPool,
    topic: &str,
    keys: &[String],
    next: &mut HashMap<String, u64>,
) -> Vec<(String, String, u64)> {
    let mut tx = pool.begin().await.unwrap();
    let mut sent = Vec::new();
    for key in keys {
        let sequence = next.entry(key.clone()).or_insert(0);
        *sequence += 1;
        let message = test_message(topic, key, sequence.to_be_bytes().to_vec());
        onceflow_outbox::enqueue(&mut tx, &message).await.unwrap();
        sent.push((message.envelope.message_id.to_string(), key.clone(), *sequence));
    }
    tx.commit().await.unwrap();
    sent
}

/// Under steady traffic, the leader's lock session dies while every other
/// connection of that relay lives on (its reads, deletes and listener). The
/// standby takes the lock; the old leader must stop before its next batch,
/// not go on publishing beside the new one. Two leaders at once publish the
/// same rows over and over; one batch in flight at the moment of the cut is
/// all that may appear twice (at least once, same message id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_lock_session_dies_stops_before_its_next_batch() {
    const BATCH: i64 = 20;
    let mut env = TestEnv::new();
    let database = env.database("relay");
    let db = onceflow_runtime::postgres::prepare(&database, [onceflow_outbox::migrator()]).await.unwrap();
    let topic = env.kafka.topics().commands;
    onceflow_runtime::kafka::ensure_topics(&env.kafka, &[&topic]).await.unwrap();
    let config = RelayConfig { batch_size: BATCH, poll_interval: Duration::from_millis(200) };
    let token = CancellationToken::new();
    let mut tasks = Vec::new();
    for name in ["lease-a", "lease-b"] {
        let pool = pool_named(&database.url, name).await;
        let producer = onceflow_runtime::kafka::producer(&env.kafka).unwrap();
        tasks.push(tokio::spawn(Relay::new(pool, producer, config.clone()).run(token.clone())));
    }
    let first_leader = eventually("one relay to take the lock", Duration::from_secs(10), || leader(&db)).await;
    let reader = TopicReader::new(&env.kafka, &topic);

    let keys: Vec<String> = (0..4).map(|k| format!("key-{k}")).collect();
    let mut next = HashMap::new();
    let mut sent = Vec::new();
    let traffic = |ms: u64| Duration::from_millis(ms);
    let started = tokio::time::Instant::now();
    while started.elapsed() < traffic(1_500) {
        sent.extend(enqueue_sequenced(&db, &topic, &keys, &mut next).await);
        tokio::time::sleep(traffic(10)).await;
    }
    // Cut only the lock holder's lock session.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(killed, [true], "exactly one lock session");
    let cut = tokio::time::Instant::now();
    while cut.elapsed() < traffic(4_000) {
        sent.extend(enqueue_sequenced(&db, &topic, &keys, &mut next).await);
        tokio::time::sleep(traffic(10)).await;
    }
    eventually("the outbox to drain", OUTCOME_TIMEOUT, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox").fetch_one(&db).await.unwrap();
        (left == 0).then_some(())
    })
    .await;
    assert!(leader(&db).await.is_some(), "a relay leads again (the first was {first_leader})");

    let records = reader.records_until_quiet(Duration::from_secs(3)).await;
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut first_seen: HashMap<String, Vec<u64>> = HashMap::new();
    for record in &records {
        let id = record.headers["message-id"].clone();
        let count = copies.entry(id).or_insert(0);
        *count += 1;
        if *count == 1 {
            let sequence = u64::from_be_bytes(record.payload.as_slice().try_into().unwrap());
            first_seen.entry(record.key.clone().unwrap()).or_default().push(sequence);
        }
    }
    let ids: HashSet<&String> = sent.iter().map(|(id, _, _)| id).collect();
    assert_eq!(copies.len(), ids.len(), "every message published");
    assert!(copies.keys().all(|id| ids.contains(id)), "nothing else published");
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    assert!(
        duplicates <= BATCH as usize,
        "{duplicates} duplicate records of {} messages: more than the one batch in flight at the cut, so two \
         relays led at once",
        sent.len()
    );
    for (key, sequences) in &first_seen {
        assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]), "{key}'s records out of order: {sequences:?}");
        assert_eq!(sequences.len() as u64, next[key], "every record of {key}");
    }
    token.cancel();
    for task in tasks {
        let _ = task.await;
    }
    db.close().await;
    env.teardown().await;
}
