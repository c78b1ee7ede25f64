//! The outbox relay against the real PostgreSQL and broker: one active relay
//! per outbox, a second standing by that takes over when the first dies.

use std::{collections::HashSet, time::Duration};

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

async fn enqueue(pool: &PgPool, topic: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut tx = pool.begin().await.unwrap();
    for _ in 0..n {
        let id = uuid::Uuid::now_v7();
        ids.push(id.to_string());
        let envelope = Envelope {
            message_id: id,
            correlation_id: "relay-test".to_owned(),
            causation_id: None,
            tenant: "dev".to_owned(),
            message_type: "test".to_owned(),
            schema_id: "test".to_owned(),
            traceparent: None,
            tracestate: None,
        };
        let message =
            OutboxMessage { topic: topic.to_owned(), key: Some("one-key".to_owned()), payload: vec![1], envelope };
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
