//! The example pull worker, `examples/typescript` (Node's built-in `fetch`,
//! no onceflow code), serving the development command type `demo.report`
//! against the real stack: it polls, heartbeats its progress and completes;
//! killed (SIGKILL) in the middle of a job, its lease ends and a second
//! worker runs the job again, with the same idempotency key, to one result;
//! cancelled mid-job, it stops and confirms.
//!
//! It needs the built example (`npm ci && npm run build`), so it is ignored
//! by a plain `cargo test`: `scripts/check-typescript-example.sh` builds it
//! and runs it (CI does, through `.ci/run`).

use std::process::Stdio;

use onceflow_contracts::JobStatus;
use onceflow_processor::config::WorkerKey;
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, Service, TestEnv, eventually};
use serde_json::json;
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::{
    handlers::{ended, submit},
    processor::{processor_db, published_results, results_of},
};

/// The development worker's key (config/development/processor.toml).
const WORKER_KEY: &str = "dev-worker-key";

/// The example worker, polling `processor`, once it says it polls.
async fn start_worker(processor: &Service) -> tokio::process::Child {
    let node = std::env::var("ONCEFLOW_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/typescript/dist/worker.js");
    let mut worker = tokio::process::Command::new(node)
        .arg(script)
        .env("ONCEFLOW_PROCESSOR_URL", processor.url(""))
        .env("ONCEFLOW_WORKER_KEY", WORKER_KEY)
        .env("PAGE_MS", "200")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts (is examples/typescript built?)");
    let mut lines = BufReader::new(worker.stdout.take().expect("its stdout")).lines();
    let first = tokio::time::timeout(OUTCOME_TIMEOUT, lines.next_line()).await.expect("in time").unwrap().unwrap();
    assert!(first.contains("\"polling\""), "{first}");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("worker: {line}");
        }
    });
    worker
}

/// Wait until the worker reported progress on `job_id` (the processor's view of it).
async fn first_heartbeat(processor: &Service, job_id: &str) {
    let execution = processor.url(&format!("/v1/executions/{job_id}"));
    eventually("the worker's first heartbeat", OUTCOME_TIMEOUT, || async {
        let response = reqwest::Client::new().get(&execution).bearer_auth("dev-onceflow-key").send().await.ok()?;
        let view: serde_json::Value = response.json().await.ok()?;
        view["progress_percent"].as_i64().filter(|percent| *percent > 0).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the built TypeScript example: run scripts/check-typescript-example.sh"]
async fn the_typescript_worker_serves_its_type_and_a_killed_worker_s_job_runs_again_once() {
    // The development declarations, with a shorter lease (5 s) for the test.
    let development = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/development");
    let declared = std::fs::read_to_string(development.join("command-types.toml")).unwrap();
    let schema = development.join("demo.greet.schema.json");
    let declared = declared
        .replace("\"demo.greet.schema.json\"", &format!("{:?}", schema.display().to_string()))
        .replace("heartbeat_timeout_ms = 10000", "heartbeat_timeout_ms = 5000");
    let mut env = TestEnv::new();
    let types = env.command_types_file(&declared);
    let processor = env
        .start_processor_with(|config| {
            config.command_types_file = types.clone();
            config.workers = vec![WorkerKey {
                name: "dev-worker".to_owned(),
                api_key_sha256: hex::encode(sha2::Sha256::digest(WORKER_KEY)),
                types: vec!["demo.report".to_owned()],
            }];
        })
        .await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);

    let first_worker = start_worker(&processor).await;
    let report = json!({"type": "demo.report", "payload": {"report_id": "q1", "pages": 3}});
    let quick = submit(&client, "report-q1", &report).await;
    let job = ended(&client, &quick).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"report_id": "q1", "pages": 3, "attempt": 1}));

    // A long one: the worker is killed after its first heartbeat.
    let report = json!({"type": "demo.report", "payload": {"report_id": "q2", "pages": 25}});
    let long = submit(&client, "report-q2", &report).await;
    first_heartbeat(&processor, &long).await;
    let mut first_worker = first_worker;
    first_worker.start_kill().expect("SIGKILL the worker");
    let _ = first_worker.wait().await;

    let _second_worker = start_worker(&processor).await;
    let job = ended(&client, &long).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"report_id": "q2", "pages": 25, "attempt": 2}), "run again after the lease");

    // Cancelled while it builds: the heartbeat's answer says so, the worker
    // stops and confirms, and the job ends `cancelled`.
    let report = json!({"type": "demo.report", "payload": {"report_id": "q3", "pages": 25}});
    let stopped = submit(&client, "report-q3", &report).await;
    first_heartbeat(&processor, &stopped).await;
    assert_eq!(client.cancel(&stopped).await.status, 202);
    let job = ended(&client, &stopped).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["error"]["message"].as_str().unwrap_or_default().contains("confirmed"), "{job}");

    let db = processor_db(&env).await;
    let results = published_results(&env, &db).await;
    for job_id in [&quick, &long] {
        let ends: Vec<JobStatus> =
            results_of(&results, job_id).iter().map(|e| e.status).filter(|s| *s != JobStatus::Processing).collect();
        assert_eq!(ends, [JobStatus::Succeeded], "one result of {job_id}");
    }
    let progress: Vec<Option<i32>> = results_of(&results, &quick).iter().map(|e| e.progress_percent).collect();
    assert_eq!(progress, [Some(33), Some(66), Some(100), None], "its heartbeats' progress, then the result");
    env.teardown().await;
}
