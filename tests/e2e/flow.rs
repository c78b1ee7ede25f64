//! One command's whole journey: ingest → outbox → Kafka → processor →
//! results → notifier SSE and job status; and an idempotent replay.

use onceflow_contracts::{Command, JobStatus, ResultEvent};
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, SseClient, TestEnv, TopicReader, eventually};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_travels_end_to_end_and_a_replay_changes_nothing() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier().await;
    let api = IngestClient::new(&ingest);

    // Open an account, then deposit into it.
    let open = json!({"type": "ledger.open_account", "payload": {"account_id": "alice", "currency": "EUR"}});
    let opened = api.submit("open-alice", &open).await;
    assert_eq!(opened.status, 202, "{}", String::from_utf8_lossy(&opened.body));
    let opened_job = opened.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(opened.header("location"), Some(format!("/v1/jobs/{opened_job}").as_str()));

    let deposit = json!({"type": "ledger.deposit", "payload": {"account_id": "alice", "amount": 500}});
    let deposited = api.submit("deposit-alice-1", &deposit).await;
    assert_eq!(deposited.status, 202);
    let accepted = deposited.json();
    let job_id = accepted["job_id"].as_str().unwrap().to_owned();
    let correlation_id = accepted["correlation_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(accepted["status_url"], format!("/v1/jobs/{job_id}"));
    assert!(!correlation_id.is_empty());

    // The notifier streams the deposit's outcome to a subscriber of its correlation id.
    let mut stream =
        SseClient::connect(&notifier.url(&format!("/v1/events?correlation_id={correlation_id}")), None).await;
    let event = stream.next_event(OUTCOME_TIMEOUT).await.expect("an event");
    assert_eq!(event.event, "job.succeeded");
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["job_id"], job_id);
    assert_eq!(data["correlation_id"], correlation_id);
    assert_eq!(data["result"]["balance"], 500);

    // The one-job stream of the account opening replays its outcome and ends.
    let mut job_stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{opened_job}/events")), None).await;
    let opened_event = job_stream.next_event(OUTCOME_TIMEOUT).await.expect("the opening's event");
    assert_eq!(opened_event.event, "job.succeeded");
    assert!(job_stream.next_event(OUTCOME_TIMEOUT).await.is_none(), "the job stream ends after the terminal event");

    // Ingest's job status says succeeded, from its projection of the results topic.
    let status = eventually("the deposit job to succeed", OUTCOME_TIMEOUT, || async {
        let job = api.job(&job_id).await.json();
        (job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(status["type"], "ledger.deposit");
    assert_eq!(status["correlation_id"], correlation_id);

    // Same key, same request: the same response byte for byte, nothing new.
    let reordered = json!({"payload": {"amount": 500, "account_id": "alice"}, "type": "ledger.deposit"});
    let replay = api.submit("deposit-alice-1", &reordered).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.body, deposited.body, "replayed body differs");
    assert_eq!(replay.header("location"), deposited.header("location"));
    assert_eq!(replay.header("content-type"), deposited.header("content-type"));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(deposited.header("idempotent-replayed"), None);

    // Same key, another request: refused, nothing created.
    let other = json!({"type": "ledger.deposit", "payload": {"account_id": "alice", "amount": 501}});
    let refused = api.submit("deposit-alice-1", &other).await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.problem_type(), "https://onceflow.dev/problems/idempotency-key-reused");

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
    let command = commands.find(OUTCOME_TIMEOUT, |r| r.headers["message-id"] == job_id).await;
    assert_eq!(command.key.as_deref(), Some("dev/ledger/alice"), "commands are keyed by tenant and account");
    assert_eq!(command.headers["correlation-id"], correlation_id);
    assert_eq!(command.headers["tenant-id"], "dev");
    assert_eq!(command.headers["message-type"], "ledger.deposit");
    assert_eq!(command.headers["content-type"], "application/avro");
    let decoded = Command::decode(&command.headers["schema-id"], &command.payload).unwrap();
    assert_eq!(decoded.job_id, job_id);

    let results = TopicReader::new(&env.kafka, &topics.results);
    let result = results.find(OUTCOME_TIMEOUT, |r| r.headers.get("causation-id") == Some(&job_id)).await;
    assert_eq!(result.key, command.key, "a result has its command's key, so one account's results stay in order");
    assert_eq!(result.headers["correlation-id"], correlation_id);
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
