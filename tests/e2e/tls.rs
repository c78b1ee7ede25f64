//! PostgreSQL over TLS: every service, given a URL with `sslmode=require`,
//! runs a command end to end with each of its connections encrypted, as
//! this machine's PostgreSQL reports them (`pg_stat_ssl`). (Kafka's TLS and
//! SASL and OTLP over https are checked where their clients are built:
//! `onceflow_runtime::kafka` and `onceflow_runtime::telemetry`; the local
//! nisshi broker cannot serve TLS: its `--cert` and `--key` flags refuse to be
//! given together.)

use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, SseClient, TestEnv, database_server, eventually};
use serde_json::json;

const REQUIRE_TLS: &str = "?sslmode=require";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_talks_to_postgresql_over_tls_when_its_url_says_so() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest_with(|config| config.database.url.push_str(REQUIRE_TLS)).await;
    let processor = env.start_processor_with(|config| config.database.url.push_str(REQUIRE_TLS)).await;
    let notifier = env.start_notifier_with(|config| config.database.url.push_str(REQUIRE_TLS)).await;
    let api = IngestClient::new(&ingest);

    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "tls-alice", "currency": "EUR"}});
    let accepted = api.submit("tls-open", &open).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    let mut stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{job_id}/events")), None).await;
    assert_eq!(stream.next_event(OUTCOME_TIMEOUT).await.expect("the outcome").event, "job.succeeded");
    eventually("the job to succeed", OUTCOME_TIMEOUT, || async {
        (api.job(&job_id).await.json()["status"] == "succeeded").then_some(())
    })
    .await;

    // Every connection each service holds to its database is encrypted.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", database_server())).await.expect("the server");
    for service in ["ingest", "processor", "notifier"] {
        let database = format!("onceflow_test_{}_{service}", env.id);
        let (encrypted, plain): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
        )
        .bind(&database)
        .fetch_one(&admin)
        .await
        .expect("pg_stat_ssl");
        assert!(encrypted > 0, "{service}: no TLS connection to {database}");
        assert_eq!(plain, 0, "{service}: {plain} connections to {database} without TLS");
    }
    admin.close().await;
    drop((stream, ingest, processor, notifier));
    env.teardown().await;
}
