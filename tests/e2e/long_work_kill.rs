//! Executions and leases live in PostgreSQL: a processor SIGKILLed while
//! 1,000 tasks are leased to pull workers loses none and hands none out
//! again while their leases hold, and the workers' completions reach the
//! other instance (callbacks go to any), each job ending once.

use std::{collections::HashSet, time::Duration};

use futures::{StreamExt as _, stream};
use onceflow_contracts::JobStatus;
use onceflow_tests::{ApiResponse, IngestClient, OUTCOME_TIMEOUT, ServiceProcess, TestEnv, eventually, free_addr};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::processor::{processor_db, published_results, results_of};

const WORKER_KEY: &str = "kill-test-worker-key";
const IN_FLIGHT: usize = 1_000;

/// A processor process of this test listening on `addr`.
fn spawn_processor(env: &mut TestEnv, config: &std::path::Path, addr: &str, name: &str) -> ServiceProcess {
    let database = env.database("processor");
    let variables = [
        ("ONCEFLOW_CONFIG", config.display().to_string()),
        ("ONCEFLOW_LISTEN", addr.to_owned()),
        ("ONCEFLOW_DATABASE__URL", database.url),
        ("ONCEFLOW_KAFKA__BROKERS", env.kafka.brokers.clone()),
        ("ONCEFLOW_KAFKA__TOPIC_PREFIX", env.kafka.topic_prefix.clone()),
        ("ONCEFLOW_KAFKA__PARTITIONS", env.kafka.partitions.to_string()),
        ("ONCEFLOW_GROUP_ID", format!("processor-{}", env.id)),
        ("ONCEFLOW_TELEMETRY__LOG_FILTER", "warn".to_owned()),
    ];
    ServiceProcess::spawn("onceflow-processor", &variables, &env.scratch_dir().join(format!("{name}.log")))
}

async fn answers(addr: &str) {
    let url = format!("http://{addr}/readyz");
    eventually(&format!("the processor at {addr} to be ready"), Duration::from_secs(60), || async {
        reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(drop)
    })
    .await;
}

async fn poll(addr: &str, body: Value) -> Vec<Value> {
    let request = reqwest::Client::new().post(format!("http://{addr}/v1/workers/poll")).bearer_auth(WORKER_KEY);
    let response = ApiResponse::send(request.json(&body)).await;
    assert_eq!(response.status, 200, "{response:?}");
    response.json()["tasks"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processor_killed_with_a_thousand_leases_out_loses_none_and_hands_none_out_again() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let types = env.command_types_file(
        r#"
[types."test.hold"]
schema = { type = "object", required = ["n"], properties = { n = { type = "integer" } } }
handler = "pull"
attempt_timeout_ms = 600000
heartbeat_timeout_ms = 120000
"#,
    );
    let config = env.scratch_dir().join("processor.toml");
    std::fs::write(
        &config,
        format!(
            r#"command_types_file = {types:?}

[executions.callbacks]
token_secret = "kill-test-callback-token-secret-0123456789"

[[tenants]]
tenant = "dev"
api_key_sha256 = "074c2219380b418dfc50cabcb6c6ab84ba8ec229709d90fdd6932426b3423478"

[[workers]]
name = "holder"
api_key_sha256 = "{}"
types = ["test.hold"]
"#,
            hex::encode(sha2::Sha256::digest(WORKER_KEY))
        ),
    )
    .unwrap();
    let (first_addr, second_addr) = (free_addr(), free_addr());
    let first = spawn_processor(&mut env, &config, &first_addr, "processor-first");
    let _second = spawn_processor(&mut env, &config, &second_addr, "processor-second");
    answers(&first_addr).await;
    answers(&second_addr).await;
    let ingest = env
        .start_ingest_with(|settings| {
            settings.command_types_file = types.clone();
            settings.execution_status_url = format!("http://{first_addr}");
        })
        .await;
    let client = IngestClient::new(&ingest);

    let jobs: Vec<String> = stream::iter(0..IN_FLIGHT)
        .map(|n| {
            let client = &client;
            async move {
                let response =
                    client.submit(&format!("hold-{n}"), &json!({"type": "test.hold", "payload": {"n": n}})).await;
                assert_eq!(response.status, 202, "{response:?}");
                response.json()["job_id"].as_str().unwrap().to_owned()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    // A worker takes every one from the first instance: 1,000 leases out.
    let mut held: Vec<Value> = Vec::new();
    while held.len() < IN_FLIGHT {
        let tasks =
            tokio::time::timeout(OUTCOME_TIMEOUT, poll(&first_addr, json!({"max_tasks": 64, "wait_ms": 5_000})))
                .await
                .expect("tasks in time");
        assert!(!tasks.is_empty() || held.len() < IN_FLIGHT, "no task came");
        held.extend(tasks);
    }
    let ids: HashSet<&str> = held.iter().filter_map(|t| t["job_id"].as_str()).collect();
    assert_eq!(ids.len(), IN_FLIGHT, "each job handed out once");
    assert_eq!(ids, jobs.iter().map(String::as_str).collect(), "the jobs submitted");

    first.kill();

    // None is handed out again while its lease holds.
    let again = poll(&second_addr, json!({"max_tasks": 64, "wait_ms": 3_000})).await;
    assert!(again.is_empty(), "a task was handed out again while its lease held: {again:?}");

    // The worker completes through the other instance.
    let completed: Vec<u16> = stream::iter(&held)
        .map(|task| {
            let url = task["callbacks"]["complete"].as_str().unwrap().replace(&first_addr, &second_addr);
            let token = task["callbacks"]["token"].as_str().unwrap().to_owned();
            let n = task["payload"]["n"].clone();
            async move {
                let request = reqwest::Client::new().post(url).bearer_auth(token).json(&json!({"result": {"n": n}}));
                ApiResponse::send(request).await.status
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(completed.iter().all(|status| *status == 200), "every completion recorded: {completed:?}");

    let db = processor_db(&env).await;
    let results = eventually("every job's result on the results topic", OUTCOME_TIMEOUT, || async {
        let results = published_results(&env, &db).await;
        let ended = jobs.iter().filter(|job| !results_of(&results, job).is_empty()).count();
        (ended == IN_FLIGHT).then_some(results)
    })
    .await;
    for job in &jobs {
        let statuses: Vec<JobStatus> = results_of(&results, job).iter().map(|e| e.status).collect();
        assert_eq!(statuses, [JobStatus::Succeeded], "one result of {job}");
    }
    env.teardown().await;
}
