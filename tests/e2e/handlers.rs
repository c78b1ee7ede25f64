//! Push handlers through the real stack: a command type declared in a file,
//! served by an HTTP endpoint of the test (a bare TCP server, so it can drop
//! a connection mid-request as a killed handler would).
//!
//! - every call of a job carries its job id as `Idempotency-Key`, whatever
//!   happened to the calls before (a handler killed mid-request, an answer
//!   too late), is signed per Standard Webhooks, and the job has one result,
//!   also when its command record is delivered again;
//! - each answer ends the job as the protocol says: a `4xx` problem fails it
//!   with its code, `503` waits without spending an attempt, `5xx` spends
//!   attempts until the job is dead-lettered (and a redrive calls again with
//!   the same key), a result too large fails it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use onceflow_contracts::JobStatus;
use onceflow_tests::{
    IngestClient, OUTCOME_TIMEOUT, PushHandler, PushReply, PushRequest, Service, TestEnv, TopicReader,
    canary_tenant_key, eventually, kafka_producer,
};
use onceflow_webhook::{Allowlist, Secret};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use serde_json::{Value, json};

use crate::processor::{ADMIN_TOKEN, processor_db, published_results, redrive, results_of};

/// The command type the tests declare, served by `handler`, each call
/// given `attempt_timeout_ms`.
pub(crate) fn greet_type(env: &TestEnv, handler: &PushHandler, attempt_timeout_ms: u64) -> String {
    env.command_types_file(&format!(
        r#"
[types."test.greet"]
description = "Greets a name (the test's push handler)."
schema = {{ type = "object", required = ["name"], additionalProperties = false, properties = {{ name = {{ type = "string", minLength = 1, maxLength = 64 }} }} }}
ordering_key = "/name"
handler = {{ push = "{}" }}
attempt_timeout_ms = {attempt_timeout_ms}
retry = {{ max_attempts = 3, initial_backoff_ms = 100, max_backoff_ms = 400 }}
"#,
        handler.url("/greet")
    ))
}

/// Ingest (with the canary tenant beside `dev`, asking the processor what
/// jobs wait for) and a processor reading `types`, the processor signing
/// with `secret` and allowed to call 127.0.0.1.
pub(crate) async fn stack(env: &mut TestEnv, types: &str, secret: &Secret) -> (Service, Service) {
    let processor = env
        .start_processor_with(|config| {
            config.command_types_file = types.to_owned();
            config.executions.push.signing_secret = Some(secret.clone());
            config.executions.push.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.retry.base_delay_ms = 50;
            config.retry.max_delay_ms = 200;
            config.admin.token = ADMIN_TOKEN.to_owned();
        })
        .await;
    let ingest = env
        .start_ingest_with(|config| {
            config.command_types_file = types.to_owned();
            config.tenants.push(canary_tenant_key());
            config.execution_status_url = processor.url("");
        })
        .await;
    (ingest, processor)
}

pub(crate) fn greet(name: &str) -> Value {
    json!({"type": "test.greet", "payload": {"name": name}})
}

/// Submit and return the job id.
pub(crate) async fn submit(client: &IngestClient, key: &str, body: &Value) -> String {
    let response = client.submit(key, body).await;
    assert_eq!(response.status, 202, "{}", String::from_utf8_lossy(&response.body));
    response.json()["job_id"].as_str().unwrap().to_owned()
}

/// Wait for the job to end; its status document.
pub(crate) async fn ended(client: &IngestClient, job_id: &str) -> Value {
    eventually(&format!("job {job_id} to end"), OUTCOME_TIMEOUT, || async {
        let job = client.job(job_id).await.json();
        matches!(job["status"].as_str(), Some("succeeded" | "failed" | "dead_lettered" | "cancelled")).then_some(job)
    })
    .await
}

fn verified(request: &PushRequest, secret: &Secret) -> bool {
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), axum::http::HeaderValue::from_str(value))
        {
            headers.insert(name, value);
        }
    }
    standardwebhooks::Webhook::new(&secret.reveal()).unwrap().verify(&request.body, &headers).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_of_a_job_carries_one_key_and_the_job_has_one_result() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    // The first call finds the handler killed mid-request, the second
    // answers after the attempt's deadline (2 s), the third answers.
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        PushHandler::start(move |request| {
            let name = request.json()["payload"]["name"].as_str().unwrap_or_default().to_owned();
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => PushReply::Close,
                1 => PushReply::After(Duration::from_secs(4), Box::new(PushReply::ok(json!({"late": true})))),
                _ => PushReply::ok(json!({"greeting": format!("hello {name}")})),
            }
        })
        .await
    };
    let types = greet_type(&env, &handler, 2_000);
    let (ingest, processor) = stack(&mut env, &types, &secret).await;
    let client = IngestClient::new(&ingest);

    let job_id = submit(&client, "greet-ada", &greet("ada")).await;
    let job = ended(&client, &job_id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["result"], json!({"greeting": "hello ada"}));

    let requests = handler.of_job(&job_id);
    assert_eq!(requests.len(), 3, "killed, late, answered: {requests:?}");
    for request in &requests {
        assert_eq!(request.path, "/greet");
        assert_eq!(request.header("idempotency-key"), Some(job_id.as_str()), "one key on every call");
        assert_eq!(request.header("webhook-id"), Some(job_id.as_str()));
        assert!(verified(request, &secret), "signed per Standard Webhooks: {request:?}");
        assert!(request.header("traceparent").is_some(), "the call carries the command's trace");
        assert!(request.header("onceflow-deadline").is_some());
        let body = request.json();
        assert_eq!(body["payload"], json!({"name": "ada"}));
        assert_eq!(body["type"], "test.greet");
        assert_eq!(body["tenant"], "dev");
        assert_eq!(body["attempt_id"].as_str(), request.header("onceflow-attempt-id"));
    }
    let attempt_ids: std::collections::HashSet<&str> =
        requests.iter().filter_map(|r| r.header("onceflow-attempt-id")).collect();
    assert_eq!(attempt_ids.len(), 3, "a fresh attempt id per call");
    let attempts: Vec<&str> = requests.iter().filter_map(|r| r.header("onceflow-attempt")).collect();
    assert_eq!(attempts, ["1", "1", "2"], "a killed handler is an outage (no attempt spent), a late answer spends one");

    // The late answer of the second call came after its deadline: it changed
    // nothing, and the job has exactly one result.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let db = processor_db(&env).await;
    let results = published_results(&env, &db).await;
    let ends: Vec<JobStatus> =
        results_of(&results, &job_id).iter().map(|e| e.status).filter(|s| *s != JobStatus::Processing).collect();
    assert_eq!(ends, [JobStatus::Succeeded], "one result");
    assert_eq!(client.job(&job_id).await.json()["result"], json!({"greeting": "hello ada"}));

    // The command's record delivered again, as a relay that died between
    // publishing and deleting would: no second call, no second result (a
    // later command of the same key, after it on its partition, shows it
    // was read).
    let topic = env.kafka.topics().commands;
    let record = TopicReader::new(&env.kafka, &topic)
        .find(OUTCOME_TIMEOUT, |record| record.headers.get("message-id") == Some(&job_id))
        .await;
    let headers = record.headers.iter().fold(OwnedHeaders::new(), |headers, (name, value)| {
        headers.insert(Header { key: name, value: Some(value.as_bytes()) })
    });
    let again = FutureRecord::to(&topic)
        .key(record.key.as_deref().expect("a key"))
        .payload(record.payload.as_slice())
        .headers(headers);
    kafka_producer(&env.kafka).send(again, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    let later = submit(&client, "greet-ada-again", &greet("ada")).await;
    assert_eq!(ended(&client, &later).await["status"], "succeeded");
    assert_eq!(handler.of_job(&job_id).len(), 3, "the redelivered command was not called again");
    let results = published_results(&env, &db).await;
    let ends = results_of(&results, &job_id).iter().filter(|e| e.status != JobStatus::Processing).count();
    assert_eq!(ends, 1, "nor did it get a second result");

    db.close().await;
    drop(processor);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_answer_ends_a_job_as_the_protocol_says() {
    let mut env = TestEnv::new();
    let secret = Secret::generate();
    let repaired = Arc::new(AtomicBool::new(false));
    let busy_calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (repaired, busy_calls) = (repaired.clone(), busy_calls.clone());
        PushHandler::start(move |request| match request.json()["payload"]["name"].as_str().unwrap_or_default() {
            "refused" => PushReply::Json(
                422,
                json!({"type": "https://greeter.example/problems/unknown-name", "title": "Unknown name",
                           "detail": "nobody is called that", "status": 422}),
                None,
            ),
            "busy" if busy_calls.fetch_add(1, Ordering::SeqCst) == 0 => PushReply::Json(503, json!({}), Some(1)),
            "broken" if !repaired.load(Ordering::SeqCst) => PushReply::Json(500, json!({}), None),
            "big" => PushReply::ok(json!({"blob": "x".repeat(1_000_000)})),
            // NUL, which no PostgreSQL text takes, in what ends the job.
            "nul" => PushReply::Json(422, json!({"code": "bad\u{0}code", "detail": "nul: \u{0}"}), None),
            name => PushReply::ok(json!({"greeting": format!("hello {name}")})),
        })
        .await
    };
    let types = greet_type(&env, &handler, 2_000);
    let (ingest, processor) = stack(&mut env, &types, &secret).await;
    let client = IngestClient::new(&ingest);

    // A 4xx problem: failed with its code, never retried.
    let refused = submit(&client, "refused", &greet("refused")).await;
    let job = ended(&client, &refused).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "unknown-name");
    assert_eq!(job["error"]["message"], "nobody is called that");
    assert_eq!(handler.of_job(&refused).len(), 1, "a refusal is not retried");

    // 503 + Retry-After: waited out, no attempt spent.
    let busy = submit(&client, "busy", &greet("busy")).await;
    let job = ended(&client, &busy).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let calls = handler.of_job(&busy);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(900), "Retry-After: 1 honoured");
    let attempts: Vec<&str> = calls.iter().filter_map(|r| r.header("onceflow-attempt")).collect();
    assert_eq!(attempts, ["1", "1"], "an outage spends no attempt");

    // 5xx on every attempt: dead-lettered after the policy's three.
    let broken = submit(&client, "broken", &greet("broken")).await;
    let job = ended(&client, &broken).await;
    assert_eq!(job["status"], "dead_lettered", "{job}");
    assert_eq!(job["error"]["code"], "handler_failed");
    assert_eq!(handler.of_job(&broken).len(), 3, "max_attempts = 3");

    // Repaired and redriven: called again with the same key, and it succeeds.
    repaired.store(true, Ordering::SeqCst);
    let (status, body) = redrive(&processor, &broken, ADMIN_TOKEN).await;
    assert_eq!(status, 202, "{body}");
    eventually("the redriven job to succeed", OUTCOME_TIMEOUT, || async {
        (client.job(&broken).await.json()["status"] == "succeeded").then_some(())
    })
    .await;
    let calls = handler.of_job(&broken);
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[3].header("idempotency-key"), Some(broken.as_str()), "a redrive keeps the job's key");
    let (status, _) = redrive(&processor, &broken, ADMIN_TOKEN).await;
    assert_eq!(status, 409, "applied after its redrive: no second one");

    // An answer larger than one result can carry: failed, with a reason.
    let big = submit(&client, "big", &greet("big")).await;
    let job = ended(&client, &big).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "result_too_large");

    // A refusal carrying NUL ends its job all the same (the text cleaned),
    // and the handler's other commands go on.
    let nul = submit(&client, "nul", &greet("nul")).await;
    let job = ended(&client, &nul).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "handler_refused", "a code that does not fit is replaced: {job}");
    assert_eq!(job["error"]["message"], "nul: \u{FFFD}");
    let after = submit(&client, "after-nul", &greet("after")).await;
    assert_eq!(ended(&client, &after).await["status"], "succeeded");

    // An unknown payload shape never reaches the handler.
    let refused_at_the_door = client.submit("bad", &json!({"type": "test.greet", "payload": {"nom": "x"}})).await;
    assert_eq!(refused_at_the_door.status, 422);

    drop(processor);
    env.teardown().await;
}
