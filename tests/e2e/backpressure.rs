//! Backpressure that follows the processor: while the processor's backlog on
//! the commands topic is past what it can drain within the configured delay,
//! ingest refuses the tenant making it (here the only one: `429`
//! `over-share`, see tests/e2e/fair_share.rs for a tenant beside it) with a
//! `Retry-After`; once the processor has caught up, commands are accepted
//! again, and every accepted one takes effect.

use std::time::{Duration, Instant};

use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, TestEnv, eventually};
use serde_json::json;

/// Lags up to this many commands are never refused, in this test.
const MIN_LAG: i64 = 20;

fn open_account(n: usize) -> serde_json::Value {
    json!({"type": "ledger.open_account", "payload": {"account_id": format!("bp-{n}"), "currency": "EUR"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_are_refused_while_the_processor_is_behind_and_accepted_once_it_caught_up() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let ingest = env
        .start_ingest_with(|config| {
            config.shed.min_lag = MIN_LAG;
            config.shed.max_queue_delay_ms = 1_000;
        })
        .await;
    let api = IngestClient::new(&ingest);

    // No processor runs: its lag grows with every accepted command and
    // nothing drains, so once the lag passes MIN_LAG ingest refuses.
    let mut accepted = Vec::new();
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    let refusal = loop {
        assert!(Instant::now() < deadline, "{} commands accepted and none refused", accepted.len());
        let n = accepted.len();
        let response = api.submit(&format!("bp-{n}"), &open_account(n)).await;
        match response.status {
            202 => accepted.push(response.json()["job_id"].as_str().expect("a job id").to_owned()),
            429 => break response,
            other => panic!("unexpected {other}: {}", response.json()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(accepted.len() as i64 > MIN_LAG, "refused at a lag of {} only", accepted.len());
    assert_eq!(refusal.problem_type(), "https://onceflow.dev/problems/over-share", "{}", refusal.json());
    assert!(refusal.json()["detail"].as_str().unwrap_or_default().contains("waiting for the processor"));
    // Nothing drains: the configured wait.
    assert_eq!(refusal.header("retry-after"), Some("2"));
    // A refused command left nothing behind: its key is free.
    let refused_key = format!("bp-{}", accepted.len());

    // The processor catches up; then the refused command is accepted.
    let _processor = env.start_processor().await;
    let late = eventually("ingest to accept again", OUTCOME_TIMEOUT, || async {
        let response = api.submit(&refused_key, &open_account(accepted.len())).await;
        (response.status == 202).then(|| response.json()["job_id"].as_str().expect("a job id").to_owned())
    })
    .await;
    accepted.push(late);
    for job_id in &accepted {
        eventually("every accepted command to take effect", OUTCOME_TIMEOUT, || async {
            (api.job(job_id).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
    env.teardown().await;
}
