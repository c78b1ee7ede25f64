//! Ingest while its dependencies fail or are saturated (G1: `202` means
//! durable even with Kafka down; shedding with `503`), against the real
//! PostgreSQL and broker.

use std::time::Duration;

use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, OwnBroker, TestEnv, eventually};
use serde_json::json;
use sqlx::PgPool;

use crate::ingest::{PROBLEM, count, deposit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_while_kafka_is_unreachable_and_sheds_past_the_backlog_bound() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            // Nothing listens here: Kafka is "down" for this ingest.
            config.kafka.brokers = "127.0.0.1:9".to_owned();
            config.shed.max_outbox_backlog = 2;
            config.shed.retry_after_secs = 7;
        })
        .await;
    let api = IngestClient::new(&ingest);
    for n in 0..3 {
        let response = api.submit(&format!("offline-{n}"), &deposit(10)).await;
        assert_eq!(response.status, 202, "202 while Kafka is down: the command is durable in PostgreSQL");
    }
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "onceflow_outbox").await, 3, "the commands wait in the outbox");
    // The backlog gauge refreshes every 500 ms; until it does, more are accepted.
    let mut attempt = 0;
    let shed = eventually("ingest to shed load", Duration::from_secs(10), || {
        attempt += 1;
        let api = api.clone();
        async move {
            let response = api.submit(&format!("offline-more-{attempt}"), &deposit(10)).await;
            (response.status == 503).then_some(response)
        }
    })
    .await;
    let jobs_before = count(&db, "jobs").await;
    let again = api.submit("offline-shed-again", &deposit(10)).await;
    assert_eq!(again.status, 503);
    assert_eq!(shed.problem_type(), format!("{PROBLEM}overloaded"));
    assert_eq!(shed.header("retry-after"), Some("7"));
    assert_eq!(count(&db, "jobs").await, jobs_before, "a shed request stores nothing");
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_accepted_while_the_broker_is_down_are_processed_when_it_returns() {
    let mut env = TestEnv::new();
    let broker = OwnBroker::start(&env.scratch_dir()).await;
    env.kafka.brokers = broker.addr.clone();
    let ingest = env.start_ingest().await;
    let _processor = env.start_processor().await;
    let api = IngestClient::new(&ingest);

    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "acc-1", "currency": "EUR"}});
    let opened = api.submit("open", &open).await.json()["job_id"].as_str().unwrap().to_owned();
    eventually("the account to open", OUTCOME_TIMEOUT, || async {
        (api.job(&opened).await.json()["status"] == "succeeded").then_some(())
    })
    .await;

    broker.stop();
    let mut jobs = Vec::new();
    for n in 0..5 {
        let response = api.submit(&format!("while-down-{n}"), &deposit(100)).await;
        assert_eq!(response.status, 202, "202 while the broker is down");
        jobs.push(response.json()["job_id"].as_str().unwrap().to_owned());
    }
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "onceflow_outbox").await, 5, "accepted commands wait in the outbox");

    broker.resume();
    for job in &jobs {
        eventually("a command accepted while the broker was down to succeed", Duration::from_secs(180), || async {
            (api.job(job).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
    assert_eq!(count(&db, "onceflow_outbox").await, 0, "the outbox drained");
    let processor_db = PgPool::connect(&env.database_url("processor")).await.unwrap();
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = 'acc-1'")
        .fetch_one(&processor_db)
        .await
        .unwrap();
    assert_eq!(balance, 500, "each command accepted while down took effect once");
    db.close().await;
    processor_db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheds_with_503_when_no_database_connection_is_free() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            config.database.max_connections = 2;
            config.database.acquire_timeout_ms = 200;
            config.in_flight_wait_ms = 5000;
        })
        .await;
    let api = IngestClient::new(&ingest);
    // With two connections (one is the outbox relay's lock) and a 200 ms
    // acquire timeout, start-up work can make a first request wait too long.
    eventually("ingest to accept a request", Duration::from_secs(20), || async {
        (api.submit("warm-up", &deposit(1)).await.status == 202).then_some(())
    })
    .await;

    // Hold the idempotency row of key "held" in an open transaction outside
    // ingest: requests with that key wait for it, each holding one of ingest's
    // two connections, so a request with any other key finds none free.
    let outside = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let mut holder = outside.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant, idempotency_key, fingerprint, job_id, response_status,
             response_body, response_location, expires_at)
         VALUES ('dev', 'held', '\\x00', gen_random_uuid(), 202, '\\x00', '/', now() + interval '1 hour')",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.submit("held", &deposit(1)).await })
        })
        .collect();
    let shed = eventually("a request to be shed for want of a connection", Duration::from_secs(10), || async {
        let response = api.submit("another-key", &deposit(1)).await;
        (response.status == 503).then_some(response)
    })
    .await;
    assert_eq!(shed.problem_type(), format!("{PROBLEM}overloaded"));
    assert!(shed.header("retry-after").is_some());
    holder.rollback().await.unwrap();
    for request in waiting {
        let response = request.await.unwrap();
        assert!(matches!(response.status, 202 | 409 | 503), "{}", response.status);
    }
    outside.close().await;
    env.teardown().await;
}
