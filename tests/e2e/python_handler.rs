//! The example push handler, `examples/python/handler.py` (the standard
//! library and the `standardwebhooks` library, no onceflow code), serving
//! the development command type `demo.greet` (its schema from
//! `config/development/`) against the real stack: it verifies what the
//! processor signs with the development secret, greets, and refuses with a
//! problem that ends the job `failed` with its code; and `demo.card`, which
//! it answers `202` and completes later through the attempt's callbacks,
//! heartbeating its progress.
//!
//! It needs the Python environment of `examples/python/requirements.txt`, so
//! it is ignored by a plain `cargo test`: `scripts/check-python-examples.sh`
//! makes the environment and runs it (CI does, through `.ci/run`).

use std::process::Stdio;

use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, TestEnv, python_example};
use onceflow_webhook::Allowlist;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::handlers::{ended, submit};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the Python environment of examples/python: run scripts/check-python-examples.sh"]
async fn the_python_handler_serves_its_command_type() {
    let mut handler = tokio::process::Command::from(python_example("handler.py"))
        .env("HANDLER_PORT", "0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the handler starts");
    let mut lines = BufReader::new(handler.stdout.take().expect("its stdout")).lines();
    let first = tokio::time::timeout(OUTCOME_TIMEOUT, lines.next_line())
        .await
        .expect("the handler says where it listens in time")
        .expect("its stdout")
        .expect("a first line");
    let listening: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("`{first}`: {e}"));
    let address = listening["listening"].as_str().expect("an address").to_owned();

    // The development declaration, pointed at this handler's port.
    let development = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/development");
    let declared = std::fs::read_to_string(development.join("command-types.toml")).unwrap();
    let schema = development.join("demo.greet.schema.json");
    let declared = declared
        .replace("http://127.0.0.1:8090/greet", &format!("http://{address}/greet"))
        .replace("http://127.0.0.1:8090/card", &format!("http://{address}/card"))
        .replace("\"demo.greet.schema.json\"", &format!("{:?}", schema.display().to_string()));
    let mut env = TestEnv::new();
    let types = env.command_types_file(&declared);
    let processor = env
        .start_processor_with(|config| {
            config.command_types_file = types.clone();
            config.executions.push.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
        })
        .await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);

    let greeted = submit(&client, "greet-ada", &json!({"type": "demo.greet", "payload": {"name": "Ada"}})).await;
    let job = ended(&client, &greeted).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"greeting": "Hello, Ada!", "attempt": 1}));

    let refused = submit(&client, "greet-nobody", &json!({"type": "demo.greet", "payload": {"name": "Nobody"}})).await;
    let job = ended(&client, &refused).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "unknown_name");

    let card = submit(&client, "card-ada", &json!({"type": "demo.card", "payload": {"name": "Ada"}})).await;
    let job = ended(&client, &card).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"card": "A card for Ada", "attempt": 1}), "completed through its callback");
    let db = crate::processor::processor_db(&env).await;
    let results = crate::processor::published_results(&env, &db).await;
    let progress: Vec<Option<i32>> = crate::processor::results_of(&results, &card)
        .iter()
        .filter(|event| event.status == onceflow_contracts::JobStatus::Processing)
        .map(|event| event.progress_percent)
        .collect();
    assert_eq!(progress, [Some(30), Some(60), Some(90)], "its heartbeats' progress, in order");

    // Cancelled while it draws: the handler answers the signed cancel request
    // 200, and the job ends `cancelled` with no result.
    let cancelled = submit(&client, "card-bob", &json!({"type": "demo.card", "payload": {"name": "Bob"}})).await;
    onceflow_tests::eventually("the card to be accepted", OUTCOME_TIMEOUT, || async {
        let job = client.job(&cancelled).await.json();
        (job["waiting_for"]["reason"] == "handler" && job["waiting_for"]["lease_expires_at"].is_string()).then_some(())
    })
    .await;
    let answer = client.cancel(&cancelled).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let job = ended(&client, &cancelled).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    let bad = client.submit("greet-bad", &json!({"type": "demo.greet", "payload": {"name": ""}})).await;
    assert_eq!(bad.status, 422, "the schema of config/development/ is enforced at the door");

    let _ = handler.start_kill();
    env.teardown().await;
}
