//! Ingest's checks of `callback_url` at submission (SSRF rules and the
//! allowlist), against the real PostgreSQL and broker.

use onceflow_tests::{IngestClient, TestEnv};
use serde_json::json;
use sqlx::PgPool;

use crate::ingest::{PROBLEM, count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_callback_urls_that_point_inside_the_network() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest_with(|config| config.webhooks.allowlist = Default::default()).await;
    let api = IngestClient::new(&ingest);
    for (n, url) in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "ftp://example.com/hook",
    ]
    .into_iter()
    .enumerate()
    {
        let body = json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 5}, "callback_url": url});
        let response = api.submit(&format!("ssrf-{n}"), &body).await;
        assert_eq!(response.status, 422, "{url}: {}", String::from_utf8_lossy(&response.body));
        assert_eq!(response.problem_type(), format!("{PROBLEM}invalid-command"));
        assert!(response.json()["detail"].as_str().unwrap().contains("callback_url"), "{url}");
    }
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "jobs").await, 0, "a refused callback stores nothing");
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlist_entry_with_a_port_permits_that_port_only() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            config.kafka.brokers = "127.0.0.1:9".to_owned();
            config.webhooks.allowlist = onceflow_webhook::Allowlist::new(["127.0.0.1:8099", "169.254.0.0/16"]).unwrap();
        })
        .await;
    let api = IngestClient::new(&ingest);
    let with_callback =
        |url: &str| json!({"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 5}, "callback_url": url});
    let permitted = api.submit("port-8099", &with_callback("http://127.0.0.1:8099/hook")).await;
    assert_eq!(permitted.status, 202, "{}", String::from_utf8_lossy(&permitted.body));
    for (n, url) in ["http://127.0.0.1:8100/hook", "http://127.0.0.1/hook", "http://169.254.169.254/latest/meta-data"]
        .into_iter()
        .enumerate()
    {
        let refused = api.submit(&format!("port-refused-{n}"), &with_callback(url)).await;
        assert_eq!(refused.status, 422, "{url}: {}", String::from_utf8_lossy(&refused.body));
        assert_eq!(refused.problem_type(), format!("{PROBLEM}invalid-command"));
    }
    env.teardown().await;
}
