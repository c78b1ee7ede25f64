//! The results topic read by an outside client with standard Avro tooling:
//! `examples/python/results_consumer.py` (confluent-kafka and fastavro, no
//! onceflow code) finds each value's writer schema by its single-object
//! fingerprint and decodes what the real stack published to the same events
//! onceflow's own decoder reads.
//!
//! It needs the Python environment of `examples/python/requirements.txt`, so
//! it is ignored by a plain `cargo test`: `scripts/check-python-examples.sh`
//! makes the environment and runs it (CI does, through `.ci/run`).

use onceflow_contracts::{ResultEvent, schema};
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, TestEnv, eventually, python_example, read_topic_to_end};
use serde_json::{Value, json};

/// Run the consumer with `args`; its JSON lines, or a panic with its stderr.
async fn run_consumer(args: Vec<String>) -> Vec<Value> {
    let output = tokio::task::spawn_blocking(move || python_example("results_consumer.py").args(args).output())
        .await
        .expect("the consumer's thread")
        .expect("the consumer runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "results_consumer.py failed ({}): {stderr}", output.status);
    assert!(stderr.trim().is_empty(), "results_consumer.py reported: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    stdout.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("`{line}`: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the Python environment of examples/python: run scripts/check-python-examples.sh"]
async fn a_python_consumer_decodes_the_results_topic_as_onceflow_does() {
    // The consumer knows every released result schema, by the fingerprints
    // onceflow writes: fastavro and apache-avro agree on each.
    let listed = run_consumer(vec!["--list-schemas".to_owned()]).await;
    for release in schema::RELEASES.iter().filter(|r| r.family == "result") {
        let fingerprint: String = release.parse().fingerprint().iter().map(|b| format!("{b:02x}")).collect();
        let file = format!("history/{}", release.path());
        assert!(
            listed
                .iter()
                .any(|s| s["fingerprint"] == fingerprint && s["files"].as_array().unwrap().contains(&json!(file))),
            "fastavro's fingerprint of {file} is not onceflow's {fingerprint}: {listed:?}"
        );
    }

    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let api = IngestClient::new(&ingest);

    // Results of every shape: a result, an error, progress. One account, so
    // they are applied in this order.
    let commands = [
        json!({"type": "ledger.open_account", "payload": {"account_id": "py-alice", "currency": "EUR"}}),
        json!({"type": "ledger.deposit", "payload": {"account_id": "py-alice", "amount": 500}}),
        json!({"type": "ledger.transfer", "payload": {"from": "py-alice", "to": "py-nobody", "amount": 5}}),
        json!({"type": "ledger.statement", "payload": {"account_id": "py-alice"}}),
    ];
    let mut jobs = Vec::new();
    for (n, command) in commands.iter().enumerate() {
        let accepted = api.submit(&format!("py-{n}"), command).await;
        assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
        jobs.push(accepted.json()["job_id"].as_str().unwrap().to_owned());
    }
    for job in &jobs {
        eventually("every job to end", OUTCOME_TIMEOUT, || async {
            let status = api.job(job).await.json()["status"].clone();
            (status == "succeeded" || status == "failed").then_some(())
        })
        .await;
    }

    // What onceflow's own decoder reads: every value single-object encoded
    // with the current result schema.
    let topic = env.kafka.topics().results;
    let records = read_topic_to_end(&env.kafka, &topic, OUTCOME_TIMEOUT).await;
    let mut expected: Vec<Value> = records
        .iter()
        .map(|r| {
            let payload = &r.record.payload;
            assert_eq!(payload[..2], schema::MARKER, "single-object encoded");
            assert_eq!(&payload[2..10], schema::RESULT.fingerprint(), "written with the current result schema");
            let event = ResultEvent::decode(&r.record.headers["schema-id"], payload).expect("a result event");
            serde_json::to_value(event).unwrap()
        })
        .collect();
    let statuses: Vec<&str> = expected.iter().filter_map(|e| e["status"].as_str()).collect();
    assert!(statuses.contains(&"succeeded") && statuses.contains(&"failed"), "{statuses:?}");

    let mut decoded = run_consumer(vec![
        "--bootstrap-servers".to_owned(),
        env.kafka.brokers.clone(),
        "--topic".to_owned(),
        topic,
        "--count".to_owned(),
        expected.len().to_string(),
        "--idle-timeout".to_owned(),
        "60".to_owned(),
    ])
    .await;
    let by_event = |a: &Value, b: &Value| a["event_id"].as_str().cmp(&b["event_id"].as_str());
    expected.sort_by(by_event);
    decoded.sort_by(by_event);
    assert_eq!(decoded, expected, "the Python consumer decodes the events onceflow reads");

    drop((ingest, processor));
    env.teardown().await;
}
