//! Long work through the real stack: push handlers that answer `202` and
//! report through callbacks, pull workers that hold tasks with leases, and
//! the timeouts of a command type.
//!
//! - a worker that dies (no heartbeat) loses its task when its lease ends:
//!   the task is handed out again, by another processor instance too, with
//!   the same `Idempotency-Key`; the superseded attempt's heartbeat gets
//!   `409`, the first success of any attempt wins, a different completion
//!   after the end gets `409` with the stored outcome, and the job has one
//!   result;
//! - a push handler's `202` leaves the job running until its callbacks end
//!   it; a heartbeat's progress becomes a `processing` event; tokens are
//!   checked;
//! - a poll waits for work and wakes when it comes; a released task comes
//!   back without spending an attempt; a retryable failure spends one;
//! - start, lease and job timeouts end jobs `failed` with `timed_out`;
//! - a cancel ends a queued job at once and its key moves on; a running one
//!   ends `cancelled` when its worker or push handler confirms, or after the
//!   grace; an ended job gets `409`; each has one `job.cancelled` result.

use std::time::{Duration, Instant};

use onceflow_contracts::JobStatus;
use onceflow_processor::config::WorkerKey;
use onceflow_tests::{
    ApiResponse, IngestClient, OUTCOME_TIMEOUT, PushHandler, PushReply, Service, SseClient, TestEnv, eventually,
};
use onceflow_webhook::{Allowlist, Secret};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::{
    handlers::{ended, submit},
    processor::{processor_db, published_results, results_of},
};

const WORKER_KEY: &str = "test-worker-key";

/// Pull types of the tests, and a push type served by `handler`.
fn types(env: &TestEnv, handler: Option<&PushHandler>) -> String {
    let schema = r#"{ type = "object", required = ["id"], properties = { id = { type = "string", minLength = 1 } } }"#;
    let mut file = format!(
        r#"
[types."test.report"]
schema = {schema}
ordering_key = "/id"
handler = "pull"
heartbeat_timeout_ms = 5000
retry = {{ max_attempts = 3, initial_backoff_ms = 100, max_backoff_ms = 200 }}

[types."test.late"]
schema = {schema}
handler = "pull"
start_timeout_ms = 1000

[types."test.once"]
schema = {schema}
handler = "pull"
heartbeat_timeout_ms = 5000
retry = {{ max_attempts = 1 }}

[types."test.bounded"]
schema = {schema}
handler = "pull"
job_timeout_ms = 3000
"#
    );
    if let Some(handler) = handler {
        file.push_str(&format!(
            r#"
[types."test.render"]
schema = {schema}
handler = {{ push = "{}" }}
heartbeat_timeout_ms = 10000
"#,
            handler.url("/render")
        ));
    }
    env.command_types_file(&file)
}

fn worker_keys() -> Vec<WorkerKey> {
    vec![WorkerKey {
        name: "test-worker".to_owned(),
        api_key_sha256: hex::encode(sha2::Sha256::digest(WORKER_KEY)),
        types: ["test.report", "test.late", "test.once", "test.bounded"].map(str::to_owned).to_vec(),
    }]
}

async fn start_processor(env: &mut TestEnv, types: &str, secret: &Secret) -> Service {
    env.start_processor_with(|config| {
        config.command_types_file = types.to_owned();
        config.workers = worker_keys();
        config.executions.push.signing_secret = Some(secret.clone());
        config.executions.push.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
    })
    .await
}

async fn poll(processor: &Service, body: Value) -> ApiResponse {
    let client = reqwest::Client::new();
    ApiResponse::send(client.post(processor.url("/v1/workers/poll")).bearer_auth(WORKER_KEY).json(&body)).await
}

/// The tasks of a poll that must get some.
async fn tasks(processor: &Service, body: Value) -> Vec<Value> {
    let response = poll(processor, body).await;
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    response.json()["tasks"].as_array().cloned().unwrap_or_default()
}

/// POST `body` to one of an attempt's callback links, with its token.
async fn callback(task: &Value, action: &str, body: Value) -> ApiResponse {
    callback_at(task["callbacks"][action].as_str().unwrap(), task, body).await
}

async fn callback_at(url: &str, task: &Value, body: Value) -> ApiResponse {
    let token = task["callbacks"]["token"].as_str().unwrap();
    ApiResponse::send(reqwest::Client::new().post(url).bearer_auth(token).json(&body)).await
}

fn report(id: &str) -> Value {
    json!({"type": "test.report", "payload": {"id": id}})
}

/// The job's terminal results on the results topic.
async fn ends_of(env: &TestEnv, job_id: &str) -> Vec<JobStatus> {
    let db = processor_db(env).await;
    let results = published_results(env, &db).await;
    results_of(&results, job_id).iter().map(|e| e.status).filter(|s| *s != JobStatus::Processing).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_worker_s_task_runs_again_after_its_lease_with_one_key_and_one_result() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let types = types(&env, None);
    let first_instance = start_processor(&mut env, &types, &secret).await;
    let second_instance = start_processor(&mut env, &types, &secret).await;
    let ingest = env.start_ingest_beside(&types, &first_instance).await;
    let client = IngestClient::new(&ingest);
    let job_id = submit(&client, "report-1", &report("r1")).await;

    let first = tasks(&first_instance, json!({"wait_ms": 10_000})).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let first = &first[0];
    assert_eq!(first["job_id"], job_id);
    assert_eq!(first["type"], "test.report");
    assert_eq!(first["payload"], json!({"id": "r1"}));
    assert_eq!((first["attempt"].as_i64(), first["idempotency_key"].as_str()), (Some(1), Some(job_id.as_str())));
    let waiting = client.job(&job_id).await.json();
    assert_eq!(waiting["waiting_for"]["reason"], "worker", "{waiting}");
    assert_eq!(waiting["waiting_for"]["worker"], "test-worker", "{waiting}");

    // The worker dies: no heartbeat. Its lease (5 s) ends and the task is
    // handed out again, here by the other instance, with the same key.
    let lease_end: chrono::DateTime<chrono::Utc> = first["lease_expires_at"].as_str().unwrap().parse().unwrap();
    let second = tasks(&second_instance, json!({"wait_ms": 30_000})).await;
    let handed_out = chrono::Utc::now();
    assert_eq!(second.len(), 1, "the task is handed out again: {second:?}");
    let second = &second[0];
    assert_eq!(second["job_id"], job_id);
    assert_eq!(second["idempotency_key"], job_id, "the same key on every attempt");
    assert_eq!(second["attempt"], 2, "the lost attempt is spent");
    assert_ne!(second["attempt_id"], first["attempt_id"]);
    assert!(handed_out >= lease_end - chrono::Duration::milliseconds(100), "not before the lease ended");
    println!("handed out again {} ms after the lease ended", (handed_out - lease_end).num_milliseconds());

    // The superseded attempt's heartbeat and failure are refused.
    let late_beat = callback(first, "heartbeat", json!({})).await;
    assert_eq!((late_beat.status, late_beat.problem_type().ends_with("/superseded")), (409, true), "{late_beat:?}");
    let late_fail = callback(first, "fail", json!({"code": "gave_up"})).await;
    assert_eq!(late_fail.status, 409);
    // The current one heartbeats, through the other instance's links.
    let beat = callback(second, "heartbeat", json!({"progress_percent": 50, "details": {"page": 5}})).await;
    assert_eq!(beat.status, 200, "{beat:?}");
    assert!(beat.json()["lease_expires_at"].is_string());

    // The first success of any attempt wins: the dead worker's late
    // completion (it was only slow) ends the job; the current attempt's
    // different completion gets 409 with the stored outcome; a repeat of the
    // stored one answers it again.
    let won = callback(first, "complete", json!({"result": {"pages": 12}})).await;
    assert_eq!((won.status, won.json()["state"].as_str()), (200, Some("succeeded")), "{won:?}");
    let lost = callback(second, "complete", json!({"result": {"pages": 13}})).await;
    assert_eq!(lost.status, 409, "{lost:?}");
    assert_eq!(lost.json()["outcome"]["result"], json!({"pages": 12}), "{lost:?}");
    let repeat = callback(second, "complete", json!({"result": {"pages": 12}})).await;
    assert_eq!(repeat.status, 200, "{repeat:?}");
    let no_more = callback(second, "heartbeat", json!({})).await;
    assert_eq!((no_more.status, no_more.problem_type().ends_with("/already-ended")), (409, true));

    let job = ended(&client, &job_id).await;
    assert_eq!((job["status"].as_str(), &job["result"]), (Some("succeeded"), &json!({"pages": 12})), "{job}");
    eventually("the job's result on the results topic", OUTCOME_TIMEOUT, || async {
        (!ends_of(&env, &job_id).await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ends_of(&env, &job_id).await, [JobStatus::Succeeded], "one result");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_handler_that_answers_202_reports_through_callbacks() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let handler = PushHandler::start(|_| PushReply::Json(202, json!({"accepted": true}), None)).await;
    let types = types(&env, Some(&handler));
    let processor = start_processor(&mut env, &types, &secret).await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);
    let job_id = submit(&client, "render-1", &json!({"type": "test.render", "payload": {"id": "card"}})).await;

    let request = eventually("the handler's call", OUTCOME_TIMEOUT, || async { handler.of_job(&job_id).pop() }).await;
    let task = request.json();
    for action in ["heartbeat", "complete", "fail", "release"] {
        let link = task["callbacks"][action].as_str().unwrap_or_default();
        assert!(link.starts_with(&processor.url("/v1/executions/")), "{action}: {link}");
    }
    // Tokens are checked: none, altered, another job's.
    let heartbeat = task["callbacks"]["heartbeat"].as_str().unwrap();
    let bare = ApiResponse::send(reqwest::Client::new().post(heartbeat).json(&json!({}))).await;
    assert_eq!(bare.status, 401);
    let mut altered = task.clone();
    altered["callbacks"]["token"] = json!(format!("{}x", task["callbacks"]["token"].as_str().unwrap()));
    assert_eq!(callback(&altered, "heartbeat", json!({})).await.status, 401);
    let elsewhere = processor.url(&format!("/v1/executions/{}/heartbeat", uuid::Uuid::now_v7()));
    assert_eq!(callback_at(&elsewhere, &task, json!({})).await.status, 401, "a token works for its job only");
    assert_eq!(callback(&task, "heartbeat", json!({"progress_percent": 101})).await.status, 400);
    assert_eq!(callback(&task, "fail", json!({"code": "not a code"})).await.status, 400);

    let beat = callback(&task, "heartbeat", json!({"progress_percent": 40})).await;
    assert_eq!(beat.status, 200, "{beat:?}");
    let running = client.job(&job_id).await.json();
    assert_eq!(running["waiting_for"]["reason"], "handler", "{running}");
    // A result no consumer could store (NUL) is refused; the job goes on.
    let nul = callback(&task, "complete", json!({"result": {"card": "a\u{0}b"}})).await;
    assert_eq!(nul.status, 400, "{nul:?}");
    let done = callback(&task, "complete", json!({"result": {"card": "ready"}})).await;
    assert_eq!((done.status, done.json()["state"].as_str()), (200, Some("succeeded")), "{done:?}");
    let again = callback(&task, "fail", json!({"code": "too_late"})).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["outcome"]["state"], "succeeded");

    let job = ended(&client, &job_id).await;
    assert_eq!(job["result"], json!({"card": "ready"}), "{job}");
    assert_eq!(handler.of_job(&job_id).len(), 1, "an accepted call is not made again");
    let db = processor_db(&env).await;
    let results = eventually("the result and the progress on the results topic", OUTCOME_TIMEOUT, || async {
        let results = published_results(&env, &db).await;
        let statuses: Vec<(JobStatus, Option<i32>)> =
            results_of(&results, &job_id).iter().map(|e| (e.status, e.progress_percent)).collect();
        statuses.contains(&(JobStatus::Succeeded, None)).then_some(statuses)
    })
    .await;
    assert_eq!(results, [(JobStatus::Processing, Some(40)), (JobStatus::Succeeded, None)], "progress, then one result");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_waits_for_work_and_a_released_task_comes_back_without_spending_an_attempt() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let types = types(&env, None);
    let processor = start_processor(&mut env, &types, &secret).await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);

    let anonymous = reqwest::Client::new().post(processor.url("/v1/workers/poll")).json(&json!({}));
    assert_eq!(ApiResponse::send(anonymous).await.status, 401);
    assert_eq!(poll(&processor, json!({"types": ["ledger.deposit"]})).await.status, 403, "not its type");
    assert_eq!(poll(&processor, json!({"max_tasks": 0})).await.status, 400);
    assert_eq!(poll(&processor, json!({"wait_ms": 60_000})).await.status, 400);
    let empty = tasks(&processor, json!({"wait_ms": 0})).await;
    assert!(empty.is_empty(), "nothing queued: {empty:?}");

    // A poll waiting when the command arrives gets it then, not at its end.
    let waiting = {
        let processor_url = processor.url("/v1/workers/poll");
        tokio::spawn(async move {
            let started = Instant::now();
            let request = reqwest::Client::new().post(processor_url).bearer_auth(WORKER_KEY);
            let response = ApiResponse::send(request.json(&json!({"types": ["test.report"], "wait_ms": 25_000}))).await;
            (response, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job_id = submit(&client, "report-2", &report("r2")).await;
    let (response, waited) = waiting.await.unwrap();
    let task = response.json()["tasks"][0].clone();
    assert_eq!(task["job_id"], job_id, "{response:?}");
    assert!(waited < Duration::from_secs(20), "woken by the work, not at the end of its wait ({waited:?})");

    // Released (a worker shutting down): handed out again, no attempt spent.
    let released = callback(&task, "release", json!({})).await;
    assert_eq!((released.status, released.json()["state"].as_str()), (200, Some("queued")), "{released:?}");
    let again = tasks(&processor, json!({"wait_ms": 10_000})).await;
    assert_eq!((again[0]["job_id"].as_str(), again[0]["attempt"].as_i64()), (Some(job_id.as_str()), Some(1)));
    assert_ne!(again[0]["attempt_id"], task["attempt_id"]);

    // A retryable failure spends the attempt; the next one fails for good.
    let retry = callback(&again[0], "fail", json!({"code": "busy", "message": "later", "retryable": true})).await;
    assert_eq!((retry.status, retry.json()["state"].as_str()), (200, Some("queued")), "{retry:?}");
    let third = tasks(&processor, json!({"wait_ms": 10_000})).await;
    assert_eq!(third[0]["attempt"], 2);
    let failed = callback(&third[0], "fail", json!({"code": "bad_input", "message": "no such report"})).await;
    assert_eq!((failed.status, failed.json()["state"].as_str()), (200, Some("failed")), "{failed:?}");
    let job = ended(&client, &job_id).await;
    assert_eq!((job["status"].as_str(), job["error"]["code"].as_str()), (Some("failed"), Some("bad_input")), "{job}");
    let repeat = callback(&third[0], "fail", json!({"code": "bad_input"})).await;
    assert_eq!(repeat.status, 200, "a repeat of the stored outcome answers it again");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_lease_and_job_timeouts_end_jobs_timed_out() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let types = types(&env, None);
    let processor = start_processor(&mut env, &types, &secret).await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);

    // Nobody takes it within its start timeout (1 s).
    let late = submit(&client, "late-1", &json!({"type": "test.late", "payload": {"id": "l"}})).await;
    // Taken by a worker that dies on its only attempt (lease 5 s).
    let once = submit(&client, "once-1", &json!({"type": "test.once", "payload": {"id": "o"}})).await;
    let taken = tasks(&processor, json!({"types": ["test.once"], "wait_ms": 10_000})).await;
    assert_eq!(taken[0]["job_id"], once);
    // Taken and heartbeating, past its job timeout (3 s).
    let bounded = submit(&client, "bounded-1", &json!({"type": "test.bounded", "payload": {"id": "b"}})).await;
    let working = tasks(&processor, json!({"types": ["test.bounded"], "wait_ms": 10_000})).await;
    assert_eq!(working[0]["job_id"], bounded);

    let heartbeats = {
        let task = working[0].clone();
        tokio::spawn(async move {
            loop {
                let beat = callback(&task, "heartbeat", json!({})).await;
                if beat.status != 200 {
                    return beat;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    for job_id in [&late, &once, &bounded] {
        let job = ended(&client, job_id).await;
        assert_eq!(
            (job["status"].as_str(), job["error"]["code"].as_str()),
            (Some("failed"), Some("timed_out")),
            "{job}"
        );
    }
    let refused = heartbeats.await.unwrap();
    assert_eq!(refused.status, 409, "the timed-out attempt's heartbeat is refused: {refused:?}");
    assert_eq!(refused.json()["outcome"]["error"]["code"], "timed_out");
    env.teardown().await;
}

async fn cancel(client: &IngestClient, job_id: &str) -> (ApiResponse, Duration) {
    let started = Instant::now();
    let response = client.cancel(job_id).await;
    (response, started.elapsed())
}

/// Cancelling: a queued job at once, a worker's and a push handler's when
/// they confirm, an unconfirmed one after the grace; an ended job `409`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_job_ends_cancelled_once_queued_or_running() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    // The handler accepts every call (202) and confirms every cancel request.
    let handler = PushHandler::start(|request| match request.header("onceflow-action") {
        Some("cancel") => PushReply::ok(json!({"stopped": true})),
        _ => PushReply::Json(202, json!({"accepted": true}), None),
    })
    .await;
    let types = types(&env, Some(&handler));
    let processor = env
        .start_processor_with(|config| {
            config.command_types_file = types.clone();
            config.workers = worker_keys();
            config.executions.push.signing_secret = Some(secret.clone());
            config.executions.push.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.executions.cancel_grace_ms = 1_000;
        })
        .await;
    let ingest = env.start_ingest_beside(&types, &processor).await;
    let client = IngestClient::new(&ingest);

    // Queued (no worker polls): cancelled in the request's transaction, once
    // the processor recorded it (before, ingest asks again for 2 s, then
    // answers 409 with Retry-After).
    let queued = submit(&client, "cancel-queued", &report("c1")).await;
    let behind = submit(&client, "cancel-behind", &report("c1")).await;
    eventually("the processor to record the job", OUTCOME_TIMEOUT, || async {
        client.job(&behind).await.json()["waiting_for"]["reason"].as_str().map(|_| ())
    })
    .await;
    let (answer, took) = cancel(&client, &queued).await;
    assert_eq!((answer.status, answer.json()["state"].as_str()), (200, Some("cancelled")), "{answer:?}");
    println!("a queued job cancelled in {} ms", took.as_millis());
    let job = ended(&client, &queued).await;
    assert_eq!(
        (job["status"].as_str(), job["error"]["code"].as_str()),
        (Some("cancelled"), Some("cancelled")),
        "{job}"
    );
    assert_eq!(cancel(&client, &queued).await.0.status, 409, "an ended job cannot be cancelled");
    // Its key moved on: the next command of it is handed out.
    let next = tasks(&processor, json!({"wait_ms": 10_000})).await;
    assert_eq!(next[0]["job_id"], behind, "the key moves on");

    // Held by a worker: a waiting poll hears of it, the heartbeat says it,
    // the worker confirms with `fail`.
    let waiting = {
        let processor_url = processor.url("/v1/workers/poll");
        tokio::spawn(async move {
            let request = reqwest::Client::new().post(processor_url).bearer_auth(WORKER_KEY);
            ApiResponse::send(request.json(&json!({"wait_ms": 20_000}))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (answer, _) = cancel(&client, &behind).await;
    assert_eq!((answer.status, answer.json()["state"].as_str()), (202, Some("running")), "{answer:?}");
    let heard = waiting.await.unwrap();
    assert_eq!(heard.json()["cancelled"], json!([behind]), "the waiting poll is told: {heard:?}");
    let beat = callback(&next[0], "heartbeat", json!({"progress_percent": 10})).await;
    assert_eq!(beat.json()["cancel_requested"], true, "{beat:?}");
    let confirmed = callback(&next[0], "fail", json!({"code": "stopped"})).await;
    assert_eq!(confirmed.json()["state"], "cancelled", "{confirmed:?}");
    let job = ended(&client, &behind).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    // Accepted by a push handler: a signed cancel request, whose 200 ends it.
    let card = submit(&client, "cancel-card", &json!({"type": "test.render", "payload": {"id": "k"}})).await;
    eventually("the handler's call", OUTCOME_TIMEOUT, || async { handler.of_job(&card).pop() }).await;
    let asked = Instant::now();
    let (answer, _) = cancel(&client, &card).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let request = eventually("the cancel request", OUTCOME_TIMEOUT, || async {
        handler.of_job(&card).into_iter().find(|r| r.header("onceflow-action") == Some("cancel"))
    })
    .await;
    println!("the push handler was told {} ms after the cancel", request.at.duration_since(asked).as_millis());
    assert_eq!(request.header("webhook-id"), Some(format!("{card}.cancel").as_str()));
    assert!(request.header("webhook-signature").is_some());
    assert_eq!(request.json()["action"], "cancel");
    let job = ended(&client, &card).await;
    assert_eq!(job["status"], "cancelled", "{job}");

    // A worker that never confirms: cancelled after the grace (1 s).
    let ignored = submit(&client, "cancel-ignored", &report("c2")).await;
    let task = tasks(&processor, json!({"wait_ms": 10_000})).await;
    assert_eq!(task[0]["job_id"], ignored);
    assert_eq!(cancel(&client, &ignored).await.0.status, 202);
    let job = ended(&client, &ignored).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let late = callback(&task[0], "complete", json!({"result": 1})).await;
    assert_eq!(late.status, 409, "after the end, a completion changes nothing");

    // Each cancelled job has one result, `job.cancelled`.
    for job_id in [&queued, &behind, &card, &ignored] {
        let ends = eventually("the cancelled result", OUTCOME_TIMEOUT, || async {
            let ends = ends_of(&env, job_id).await;
            (!ends.is_empty()).then_some(ends)
        })
        .await;
        assert_eq!(ends, [JobStatus::Cancelled], "{job_id}");
    }

    // The notifier streams it as `job.cancelled`.
    let notifier = env.start_notifier().await;
    let mut events = SseClient::connect(&notifier.url(&format!("/v1/jobs/{queued}/events")), None).await;
    let event = events.next_event(OUTCOME_TIMEOUT).await.expect("the cancelled job's event");
    assert_eq!(event.event, "job.cancelled", "{event:?}");

    // An inline ledger job ends before any cancel; another tenant's is unknown.
    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "x", "currency": "EUR"}});
    let applied = submit(&client, "cancel-ledger", &open).await;
    ended(&client, &applied).await;
    assert_eq!(cancel(&client, &applied).await.0.status, 409);
    let stranger = cancel(&client, &uuid::Uuid::now_v7().to_string()).await.0;
    assert_eq!(stranger.status, 404);
    env.teardown().await;
}
