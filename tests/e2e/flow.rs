//! One command's whole journey: ingest → outbox → Kafka → processor →
//! results → notifier SSE and job status; and an idempotent replay.

use onceflow_contracts::{Command, JobStatus, ResultEvent};
use onceflow_tests::{DEV_API_KEY, OUTCOME_TIMEOUT, SseClient, TestEnv, TopicReader, eventually};
use serde_json::{Value, json};

struct Submitted {
    job_id: String,
    correlation_id: String,
    status: u16,
    location: String,
    content_type: String,
    replayed: Option<String>,
    body: Vec<u8>,
}

async fn submit(ingest: &str, key: &str, body: &Value) -> Submitted {
    let response = reqwest::Client::new()
        .post(format!("{ingest}/v1/commands"))
        .bearer_auth(DEV_API_KEY)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("POST /v1/commands");
    let status = response.status().as_u16();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let location = header("location").unwrap_or_default();
    let content_type = header("content-type").unwrap_or_default();
    let replayed = header("idempotent-replayed");
    let body = response.bytes().await.unwrap().to_vec();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Submitted {
        job_id: parsed["job_id"].as_str().unwrap_or_default().to_owned(),
        correlation_id: parsed["correlation_id"].as_str().unwrap_or_default().to_owned(),
        status,
        location,
        content_type,
        replayed,
        body,
    }
}

async fn job(ingest: &str, job_id: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{ingest}/v1/jobs/{job_id}"))
        .bearer_auth(DEV_API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_travels_end_to_end_and_a_replay_changes_nothing() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier().await;
    let ingest_url = ingest.url("");

    // Open an account, then deposit into it.
    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "alice", "currency": "EUR"}});
    let opened = submit(&ingest_url, "open-alice", &open).await;
    assert_eq!(opened.status, 202, "{}", String::from_utf8_lossy(&opened.body));
    assert_eq!(opened.location, format!("/v1/jobs/{}", opened.job_id));

    let deposit = json!({"type": "ledger.deposit", "payload": {"account_id": "alice", "amount": 500}});
    let deposited = submit(&ingest_url, "deposit-alice-1", &deposit).await;
    assert_eq!(deposited.status, 202);
    let accepted: Value = serde_json::from_slice(&deposited.body).unwrap();
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["status_url"], format!("/v1/jobs/{}", deposited.job_id));
    assert!(!deposited.correlation_id.is_empty());

    // The notifier streams the deposit's outcome to a subscriber of its correlation id.
    let mut stream =
        SseClient::connect(&notifier.url(&format!("/v1/events?correlation_id={}", deposited.correlation_id)), None)
            .await;
    let event = stream.next_event(OUTCOME_TIMEOUT).await.expect("an event");
    assert_eq!(event.event, "job.succeeded");
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["job_id"], deposited.job_id);
    assert_eq!(data["correlation_id"], deposited.correlation_id);
    assert_eq!(data["result"]["balance"], 500);

    // The one-job stream of the account opening replays its outcome and ends.
    let mut job_stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{}/events", opened.job_id)), None).await;
    let opened_event = job_stream.next_event(OUTCOME_TIMEOUT).await.expect("the opening's event");
    assert_eq!(opened_event.event, "job.succeeded");
    assert!(job_stream.next_event(OUTCOME_TIMEOUT).await.is_none(), "the job stream ends after the terminal event");

    // Ingest's job status says succeeded, from its projection of the results topic.
    let status = eventually("the deposit job to succeed", OUTCOME_TIMEOUT, || async {
        let job = job(&ingest_url, &deposited.job_id).await;
        (job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(status["type"], "ledger.deposit");
    assert_eq!(status["correlation_id"], deposited.correlation_id);

    // Same key, same request: the same response byte for byte, nothing new.
    let reordered = json!({"payload": {"amount": 500, "account_id": "alice"}, "type": "ledger.deposit"});
    let replay = submit(&ingest_url, "deposit-alice-1", &reordered).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.body, deposited.body, "replayed body differs");
    assert_eq!(replay.location, deposited.location);
    assert_eq!(replay.content_type, deposited.content_type);
    assert_eq!(replay.replayed.as_deref(), Some("true"));
    assert_eq!(deposited.replayed, None);

    // Same key, another request: refused, nothing created.
    let other = json!({"type": "ledger.deposit", "payload": {"account_id": "alice", "amount": 501}});
    let refused = submit(&ingest_url, "deposit-alice-1", &other).await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.content_type, "application/problem+json");

    let ingest_db = sqlx::PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&ingest_db).await.unwrap();
    assert_eq!(jobs, 2, "one job per distinct command");
    let processor_db = sqlx::PgPool::connect(&env.database_url("processor")).await.unwrap();
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE account_id = 'alice'")
        .fetch_one(&processor_db)
        .await
        .unwrap();
    assert_eq!(balance, 500, "the deposit took effect exactly once");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox").fetch_one(&processor_db).await.unwrap();
    assert_eq!(applied, 2);
    ingest_db.close().await;
    processor_db.close().await;

    // What went over Kafka, read by a plain consumer outside the services:
    // the envelope headers, Avro bodies that decode with the published schema,
    // and one trace from the command to its result.
    let topics = env.kafka.topics();
    let commands = TopicReader::new(&env.kafka, &topics.commands);
    let command = commands.find(OUTCOME_TIMEOUT, |r| r.headers["message-id"] == deposited.job_id).await;
    assert_eq!(command.key.as_deref(), Some("alice"), "commands are keyed by account");
    assert_eq!(command.headers["correlation-id"], deposited.correlation_id);
    assert_eq!(command.headers["tenant-id"], "dev");
    assert_eq!(command.headers["message-type"], "ledger.deposit");
    assert_eq!(command.headers["content-type"], "application/avro");
    let decoded = Command::decode(&command.headers["schema-id"], &command.payload).unwrap();
    assert_eq!(decoded.job_id, deposited.job_id);

    let results = TopicReader::new(&env.kafka, &topics.results);
    let result = results.find(OUTCOME_TIMEOUT, |r| r.headers.get("causation-id") == Some(&deposited.job_id)).await;
    assert_eq!(result.key.as_deref(), Some(deposited.job_id.as_str()), "results are keyed by job");
    assert_eq!(result.headers["correlation-id"], deposited.correlation_id);
    assert_eq!(result.headers["message-type"], "job.succeeded");
    let event = ResultEvent::decode(&result.headers["schema-id"], &result.payload).unwrap();
    assert_eq!(event.status, JobStatus::Succeeded);
    assert_eq!(event.event_id, result.headers["message-id"]);
    let trace_id = |traceparent: &str| traceparent.split('-').nth(1).unwrap().to_owned();
    assert_eq!(
        trace_id(&result.headers["traceparent"]),
        trace_id(&command.headers["traceparent"]),
        "the result continues the command's trace"
    );

    drop((ingest, processor, notifier));
    env.teardown().await;
}
