//! The example webhook receiver, `examples/python/webhook_receiver.py`, which
//! verifies signatures with the Python `standardwebhooks` library (no
//! onceflow code), against the real stack: it accepts what the notifier
//! signs, under a secret rotation, every retry under one `webhook-id`, and
//! refuses a forgery.
//!
//! It needs the Python environment of `examples/python/requirements.txt`, so
//! it is ignored by a plain `cargo test`: `scripts/check-python-examples.sh`
//! makes the environment and runs it (CI does, through `.ci/run`).

use std::process::Stdio;

use onceflow_notifier::NotifierConfig;
use onceflow_tests::{
    DEV_API_KEY, DeliveriesClient, IngestClient, OUTCOME_TIMEOUT, TestEnv, eventually, python_example,
};
use onceflow_webhook::{Allowlist, RetryPolicy, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// The receiver, running on a free port of 127.0.0.1 until dropped.
struct PythonReceiver {
    process: tokio::process::Child,
    base: String,
}

impl PythonReceiver {
    /// Start it with `secrets` (newest first) and wait until it listens.
    async fn start(secrets: &[&Secret]) -> Self {
        let secrets: Vec<String> = secrets.iter().map(|s| s.reveal()).collect();
        let mut process = tokio::process::Command::from(python_example("webhook_receiver.py"))
            .env("WEBHOOK_SECRETS", secrets.join(" "))
            .env("RECEIVER_HOST", "127.0.0.1")
            .env("RECEIVER_PORT", "0")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the receiver starts");
        let mut lines = BufReader::new(process.stdout.take().expect("its stdout")).lines();
        let first = tokio::time::timeout(OUTCOME_TIMEOUT, lines.next_line())
            .await
            .expect("the receiver says where it listens in time")
            .expect("its stdout")
            .expect("a first line");
        let listening: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("`{first}`: {e}"));
        let base = format!("http://{}", listening["listening"].as_str().expect("an address"));
        // Its later lines (one per request) are read through GET /requests.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { process, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What it logged of every request so far.
    async fn requests(&self) -> Vec<Value> {
        reqwest::get(self.url("/requests")).await.expect("the receiver answers").json().await.expect("JSON")
    }
}

impl Drop for PythonReceiver {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the Python environment of examples/python: run scripts/check-python-examples.sh"]
async fn the_python_receiver_verifies_real_deliveries_and_refuses_a_forgery() {
    // Mid-rotation: the notifier signs with both; the receiver knows only the old one.
    let (new_secret, old_secret) = (Secret::generate(), Secret::generate());
    let receiver = PythonReceiver::start(&[&old_secret]).await;
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let secrets = vec![new_secret.clone(), old_secret.clone()];
    let notifier = env
        .start_notifier_with(move |config: &mut NotifierConfig| {
            config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.webhooks.retry = RetryPolicy {
                max_attempts: 2,
                initial_backoff_ms: 300,
                backoff_multiplier: 2.0,
                max_backoff_ms: 1_000,
                jitter: 0.0,
            };
            config.webhooks.poll_interval_ms = 200;
            config.webhooks.secrets.insert("dev".to_owned(), secrets);
        })
        .await;
    let api = IngestClient::new(&ingest);
    let deliveries = DeliveriesClient::new(&notifier, Some(DEV_API_KEY));

    // One accepted delivery, one the receiver answers 503 (retried once, then failed).
    let mut jobs = Vec::new();
    for (key, account, path) in [("py-hook-ok", "py-hook-a", "/hooks"), ("py-hook-503", "py-hook-b", "/status/503")] {
        let command = json!({
            "type": "ledger.open_account",
            "payload": {"account_id": account, "currency": "EUR"},
            "callback_url": receiver.url(path),
        });
        let accepted = api.submit(key, &command).await;
        assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
        jobs.push(accepted.json()["job_id"].as_str().unwrap().to_owned());
    }
    let succeeded = deliveries.wait_for_delivery(&jobs[0], OUTCOME_TIMEOUT, |d| d["status"] == "succeeded").await;
    let failed = deliveries.wait_for_delivery(&jobs[1], OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;

    let requests = receiver.requests().await;
    let of = |delivery: &Value| -> Vec<Value> {
        requests.iter().filter(|r| r["webhook_id"] == delivery["id"]).cloned().collect()
    };
    let accepted = of(&succeeded);
    assert_eq!(accepted.len(), 1, "{requests:#?}");
    assert_eq!(accepted[0]["signature"], "valid", "standardwebhooks verified it: {:#?}", accepted[0]);
    assert_eq!(accepted[0]["answer"], 204);
    assert_eq!(accepted[0]["body"]["job_id"], jobs[0].as_str());
    assert_eq!(accepted[0]["body"]["type"], "job.succeeded");
    let retried = of(&failed);
    assert_eq!(retried.len(), 2, "two attempts under one webhook-id: {requests:#?}");
    assert!(retried.iter().all(|r| r["signature"] == "valid" && r["answer"] == 503), "{retried:#?}");

    // A forgery: the accepted delivery's headers on another body.
    let original = &accepted[0];
    let forged = reqwest::Client::new()
        .post(receiver.url("/hooks"))
        .header("webhook-id", original["webhook_id"].as_str().unwrap())
        .header("webhook-timestamp", original["webhook_timestamp"].as_str().unwrap())
        .header("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")
        .body(r#"{"type":"job.succeeded","job_id":"someone-else"}"#)
        .send()
        .await
        .expect("the receiver answers");
    assert_eq!(forged.status(), 401);
    let last = eventually("the forgery to be logged", OUTCOME_TIMEOUT, || async {
        receiver.requests().await.into_iter().last().filter(|r| r["answer"] == 401)
    })
    .await;
    assert_ne!(last["signature"], "valid", "{last:#?}");

    drop((ingest, processor, notifier));
    env.teardown().await;
}
