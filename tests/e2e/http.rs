//! The HTTP hygiene every service shares: readiness answered from a cached
//! report, covering each service's consumers and vital tasks, and ingest
//! ready (degraded) while Kafka is down.

use std::time::Duration;

use onceflow_tests::{IngestClient, TestEnv, eventually};
use serde_json::{Value, json};

async fn readyz(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.expect("readyz answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stays_ready_but_degraded_while_kafka_is_down() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            // Nothing listens here: Kafka is "down" for this ingest.
            config.kafka.brokers = "127.0.0.1:9".to_owned();
        })
        .await;
    let url = ingest.url("/readyz");
    let (status, report) = eventually("a first readiness report", Duration::from_secs(20), || async {
        let (status, report) = readyz(&url).await;
        (report["status"] != "starting").then_some((status, report))
    })
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["status"], "degraded", "{report}");
    assert_eq!(report["checks"]["broker"]["status"], "degraded", "{report}");
    assert_eq!(report["checks"]["database"]["status"], "ok", "{report}");
    // And it really accepts: the command waits in the outbox.
    let accepted = IngestClient::new(&ingest)
        .submit("while-degraded", &json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 1}}))
        .await;
    assert_eq!(accepted.status, 202);
    env.teardown().await;
}

/// Once consuming, every service reports its consumer's group membership and
/// its vital tasks (lanes, relays, consumer loops, committers) as checks of
/// their own, beside the database and the broker. (What makes those checks
/// fail is tested where it is decided: `onceflow_runtime::kafka`'s membership
/// and `onceflow_runtime::vitals`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_reports_its_consumer_and_its_tasks() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier().await;
    for (service, url) in [
        ("ingest", ingest.url("/readyz")),
        ("processor", processor.url("/readyz")),
        ("notifier", notifier.url("/readyz")),
    ] {
        let report = eventually(&format!("{service} to report ready"), Duration::from_secs(60), || async {
            let (status, report) = readyz(&url).await;
            (status == 200 && report["status"] == "ready").then_some(report)
        })
        .await;
        for check in ["database", "broker", "consumer", "tasks"] {
            assert_eq!(report["checks"][check]["status"], "ok", "{service}: {report}");
        }
    }
    env.teardown().await;
}

/// `/readyz` needs no database connection of its own per call: with every
/// pooled connection held elsewhere, probes still answer at once from the
/// report the background task made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_answered_from_a_cached_report() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            config.kafka.brokers = "127.0.0.1:9".to_owned();
            config.database.max_connections = 3;
            config.database.acquire_timeout_ms = 30_000;
            config.in_flight_wait_ms = 30_000;
        })
        .await;
    let url = ingest.url("/readyz");
    eventually("ingest to report ready", Duration::from_secs(20), || async {
        (readyz(&url).await.0 == 200).then_some(())
    })
    .await;
    // Hold the rows of a key in an open transaction outside ingest, and make
    // requests with that key wait for it, each holding one of ingest's
    // connections, until none is free.
    let outside = sqlx::PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let mut holder = outside.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (tenant, idempotency_key, fingerprint, job_id, response_status,
             response_body, response_location, expires_at)
         VALUES ('dev', 'held', '\\x00', gen_random_uuid(), 202, '\\x00', '/', now() + interval '1 hour')",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let api = IngestClient::new(&ingest);
    let body = json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 1}});
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            let body = body.clone();
            tokio::spawn(async move { api.submit("held", &body).await })
        })
        .collect();
    // The outbox relay keeps one or two connections; once a request waits for
    // the lock, the seven others take whatever is left.
    eventually("ingest's connections to be taken", Duration::from_secs(20), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&outside)
        .await
        .unwrap();
        (waiting >= 1).then_some(())
    })
    .await;
    let probe = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    for _ in 0..20 {
        let response = probe.get(&url).send().await.expect("/readyz answers without a free connection");
        assert!(response.status().is_success() || response.status() == 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.rollback().await.unwrap();
    for request in waiting {
        request.await.unwrap();
    }
    outside.close().await;
    env.teardown().await;
}

/// Issue 22: with `http.operator_listen` set, every service answers its
/// probes and metrics there only; its API address answers them `404` (what
/// they show is no client's business) and keeps serving the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_move_to_the_operator_address() {
    let mut env = TestEnv::new();
    let operator = "127.0.0.1:0".to_owned();
    let ingest = env.start_ingest_with(|config| config.http.operator_listen = operator.clone()).await;
    let processor = env.start_processor_with(|config| config.http.operator_listen = operator.clone()).await;
    let notifier = env.start_notifier_with(|config| config.http.operator_listen = operator.clone()).await;
    let accepted = IngestClient::new(&ingest)
        .submit("operator-port", &json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 1}}))
        .await;
    assert_eq!(accepted.status, 202, "the API is served on its own address");
    for service in [&ingest, &processor, &notifier] {
        let operator = service.running.operator_addr.expect("an operator address");
        for path in ["/livez", "/readyz", "/metrics"] {
            let public = reqwest::get(service.url(path)).await.expect("the API address answers");
            assert_eq!(public.status(), 404, "{path} on the API address");
            let probe = reqwest::get(format!("http://{operator}{path}")).await.expect("the operator address answers");
            assert_ne!(probe.status(), 404, "{path} on the operator address");
        }
        let elsewhere = reqwest::get(format!("http://{operator}/openapi.json")).await.expect("answers");
        assert_eq!(elsewhere.status(), 404, "the operator address serves only the probes");
    }
    env.teardown().await;
}
