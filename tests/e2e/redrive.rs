//! A dead-lettered command that an operator redrives, through the real stack:
//! its job follows the latest terminal result (`dead_lettered`, then
//! `succeeded`) in `GET /v1/jobs/{id}`, the per-job stream shows both and ends
//! after the redriven one, and a webhook is delivered for each outcome.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use onceflow_tests::{
    IngestClient, OUTCOME_TIMEOUT, SseClient, TestEnv, WebhookReceiver, allow_postings, committed_offsets, eventually,
    kafka_producer, refuse_postings, result_envelope, result_event,
};
use onceflow_webhook::Allowlist;
use rdkafka::producer::FutureRecord;
use serde_json::Value;

const ADMIN_TOKEN: &str = "redrive-admin-token";

async fn job_status(client: &IngestClient, job_id: &str) -> String {
    client.job(job_id).await.json()["status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_command_s_success_shows_in_its_job_its_stream_and_its_webhooks() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let processor = env
        .start_processor_with(|config| {
            config.retry.base_delay_ms = 10;
            config.retry.max_delay_ms = 50;
            config.admin.token = ADMIN_TOKEN.to_owned();
        })
        .await;
    let notifier = env
        .start_notifier_with(|config| {
            config.webhooks.allowlist = Allowlist::new(["127.0.0.1"]).unwrap();
            config.webhooks.poll_interval_ms = 200;
        })
        .await;
    let receiver = WebhookReceiver::start().await;
    let client = IngestClient::new(&ingest);
    let account = format!("redrive-{}", env.id);

    let opened = client
        .submit(
            &format!("open-{account}"),
            &serde_json::json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}}),
        )
        .await;
    assert_eq!(opened.status, 202);
    let opened = opened.json()["job_id"].as_str().unwrap().to_owned();
    eventually("the account to open", OUTCOME_TIMEOUT, || async {
        (job_status(&client, &opened).await == "succeeded").then_some(())
    })
    .await;

    // Postings refuse every insert for now: the deposit cannot apply and is
    // dead-lettered (whether the processor takes the refusal for a poison at
    // once or retries it first).
    let processor_db = sqlx::PgPool::connect(&env.database_url("processor")).await.unwrap();
    refuse_postings(&processor_db, "check_violation").await;
    let deposit = client
        .submit(
            &format!("deposit-{account}"),
            &serde_json::json!({
                "type": "ledger.deposit",
                "payload": {"account_id": account, "amount": 500},
                "callback_url": receiver.url("/hook"),
            }),
        )
        .await;
    assert_eq!(deposit.status, 202, "{}", String::from_utf8_lossy(&deposit.body));
    let job_id = deposit.json()["job_id"].as_str().unwrap().to_owned();
    eventually("the deposit to be dead-lettered", OUTCOME_TIMEOUT, || async {
        (job_status(&client, &job_id).await == "dead_lettered").then_some(())
    })
    .await;

    // The cause is fixed and the operator redrives the command.
    allow_postings(&processor_db).await;
    let redriven = reqwest::Client::new()
        .post(processor.url(&format!("/admin/dead-letters/{job_id}/redrive")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(redriven.status(), 202, "{:?}", redriven.text().await);

    // The job follows its latest terminal result.
    eventually("the redriven deposit to show as succeeded", OUTCOME_TIMEOUT, || async {
        (job_status(&client, &job_id).await == "succeeded").then_some(())
    })
    .await;
    let job = client.job(&job_id).await;
    assert!(job.header("retry-after").is_none(), "a terminal job has no Retry-After");
    let job = job.json();
    assert_eq!(job["result"]["balance"], 500, "{job}");
    assert!(job["error"].is_null(), "the dead letter's error is gone: {job}");

    // A client connecting once the notifier has stored the redriven outcome
    // (it consumes the results on its own, so possibly after ingest) sees
    // both outcomes, and the stream ends after the redriven one.
    let url = notifier.url(&format!("/v1/jobs/{job_id}/events"));
    let outcomes = eventually("the job's stream to show the redriven outcome", OUTCOME_TIMEOUT, || async {
        let mut stream = SseClient::connect(&url, None).await;
        let mut outcomes = Vec::new();
        while let Some(event) = stream.next_event(OUTCOME_TIMEOUT).await {
            if event.event.starts_with("job.") && event.event != "job.processing" {
                outcomes.push(event.event);
            }
        }
        (outcomes.len() > 1).then_some(outcomes)
    })
    .await;
    assert_eq!(outcomes, ["job.dead_lettered", "job.succeeded"], "the stream ended after the latest outcome");

    // Each outcome is a webhook of its own. Deliveries run concurrently, so
    // they may arrive in either order (the two results may even be stored in
    // one batch); the receiver orders them by the event's `occurred_at`.
    let received = receiver.wait_for(2, OUTCOME_TIMEOUT).await;
    let mut outcomes: Vec<(i64, Value)> = received
        .iter()
        .map(|r| (r.json()["occurred_at"].as_i64().expect("occurred_at"), r.json()["type"].clone()))
        .collect();
    outcomes.sort_by_key(|(occurred_at, _)| *occurred_at);
    let types: Vec<&Value> = outcomes.iter().map(|(_, event_type)| event_type).collect();
    assert_eq!(types, ["job.dead_lettered", "job.succeeded"]);
    assert_ne!(received[0].header("webhook-id"), received[1].header("webhook-id"), "two deliveries");

    // An older terminal result arriving late (reordered, or redelivered from
    // before the redrive) moves nothing back.
    let mut stale = result_event(JobStatus::DeadLettered, None);
    stale.job_id.clone_from(&job_id);
    stale.occurred_at = 1;
    let topic = env.kafka.topics().results;
    let payload = stale.encode().unwrap();
    let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
        .key(job_id.as_str())
        .payload(payload.as_slice())
        .headers(onceflow_runtime::kafka::headers(&result_envelope(&stale)));
    let delivery = kafka_producer(&env.kafka).send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    let (partition, offset) = (delivery.partition, delivery.offset);
    let group = format!("ingest-{}", env.id);
    eventually("ingest's projection to read the stale result", OUTCOME_TIMEOUT, || async {
        let committed = committed_offsets(&env.kafka, &group, &topic).await;
        committed.get(&partition).is_some_and(|c| *c > offset).then_some(())
    })
    .await;
    assert_eq!(job_status(&client, &job_id).await, "succeeded", "an older outcome does not move the job back");
    processor_db.close().await;
    env.teardown().await;
}
