//! Ingest's idempotency and tenancy rules (G2, G6, G7) against the real
//! PostgreSQL and broker; its outages and shedding are in `ingest_outages`,
//! its callback checks in `ingest_callbacks`.

use std::time::Duration;

use futures::future::join_all;
use onceflow_contracts::{JobStatus, ResultEvent};
use onceflow_ingest::limits::SubmitLimits;
use onceflow_runtime::auth::TenantKey;
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, TestEnv, TopicReader, eventually, result_envelope};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use sqlx::PgPool;

/// Where every problem type of onceflow lives.
pub(crate) const PROBLEM: &str = "https://onceflow.dev/problems/";

/// A deposit into `acc-1`.
pub(crate) fn deposit(amount: i64) -> Value {
    json!({"type": "ledger.deposit", "payload": {"account_id": "acc-1", "amount": amount}})
}

/// The rows of `table`.
pub(crate) async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_with_one_key_create_one_job() {
    let mut env = TestEnv::new();
    // More at once than a tenant's default in-flight bound (32): every one of
    // them must meet the key, not the bound.
    let ingest = env
        .start_ingest_with(|config| {
            config
                .submit_limits
                .set("dev", SubmitLimits { rate_per_sec: 0, burst: 0, max_in_flight: 64, refusal_hold_ms: 0 });
        })
        .await;
    let api = IngestClient::new(&ingest);

    let responses = join_all((0..50).map(|_| {
        let api = api.clone();
        async move { api.submit("one-key", &deposit(10)).await }
    }))
    .await;

    let accepted: Vec<_> = responses.iter().filter(|r| r.status == 202).collect();
    let in_flight: Vec<_> = responses.iter().filter(|r| r.status == 409).collect();
    assert_eq!(
        accepted.len() + in_flight.len(),
        50,
        "only 202 and 409: {:?}",
        responses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(!accepted.is_empty());
    for response in &accepted {
        assert_eq!(response.body, accepted[0].body, "every 202 is the same response, byte for byte");
        assert_eq!(response.header("location"), accepted[0].header("location"));
    }
    for response in &in_flight {
        assert_eq!(response.problem_type(), format!("{PROBLEM}request-in-flight"));
        assert!(response.header("retry-after").is_some());
    }
    let replays = accepted.iter().filter(|r| r.header("idempotent-replayed") == Some("true")).count();
    assert_eq!(replays, accepted.len() - 1, "all but the first 202 are replays");

    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "jobs").await, 1);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
    // One outbox row: once the relay drained it, the topic holds one command.
    eventually("the outbox to drain", OUTCOME_TIMEOUT, || async {
        (count(&db, "onceflow_outbox").await == 0).then_some(())
    })
    .await;
    let commands = TopicReader::new(&env.kafka, &env.kafka.topics().commands);
    let job_id = accepted[0].json()["job_id"].as_str().unwrap().to_owned();
    let published = commands.records_until_quiet(Duration::from_secs(3)).await;
    assert_eq!(published.len(), 1, "exactly one command published");
    assert_eq!(published[0].headers["message-id"], job_id);
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_with_identical_bodies_are_independent_commands() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let api = IngestClient::new(&ingest);
    let first = api.submit("key-a", &deposit(10)).await;
    let second = api.submit("key-b", &deposit(10)).await;
    assert_eq!((first.status, second.status), (202, 202));
    assert_ne!(first.json()["job_id"], second.json()["job_id"]);
    assert_eq!(second.header("idempotent-replayed"), None);
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "jobs").await, 2);
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_store_nothing_and_leave_the_key_usable() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let api = IngestClient::new(&ingest);
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    const KEY: &str = "fix-and-retry";
    let key = KEY;
    let good = deposit(10);
    let json_post = |body: &'static str| {
        move |r: reqwest::RequestBuilder| {
            r.bearer_auth("dev-onceflow-key")
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(body)
        }
    };

    let cases: Vec<(ApiCase, u16, &str)> = vec![
        (Box::new(|r| r.header("idempotency-key", KEY).json(&deposit(10))), 401, "unauthorized"),
        (Box::new(|r| r.bearer_auth("wrong").header("idempotency-key", KEY).json(&deposit(10))), 401, "unauthorized"),
        (Box::new(|r| r.bearer_auth("dev-onceflow-key").json(&deposit(10))), 400, "invalid-idempotency-key"),
        (
            Box::new(|r| {
                r.bearer_auth("dev-onceflow-key").header("idempotency-key", "k".repeat(256)).json(&deposit(10))
            }),
            400,
            "invalid-idempotency-key",
        ),
        (
            Box::new(|r| {
                r.bearer_auth("dev-onceflow-key")
                    .header("idempotency-key", KEY)
                    .header("content-type", "text/plain")
                    .body("{}")
            }),
            415,
            "unsupported-media-type",
        ),
        (Box::new(json_post(r#"{"type": "ledger.deposit", "payload": "#)), 400, "malformed-json"),
        (Box::new(json_post(r#"{"type": "ledger.mint", "payload": {}}"#)), 422, "invalid-command"),
        (
            Box::new(json_post(r#"{"type": "ledger.deposit", "payload": {"account_id": "a", "amount": -5}}"#)),
            422,
            "invalid-command",
        ),
        (Box::new(json_post(r#"{"payload": {"account_id": "a", "amount": 5}}"#)), 422, "invalid-command"),
        (
            Box::new(json_post(
                r#"{"type": "ledger.deposit", "payload": {"account_id": "a", "amount": 5}, "callback_url": "ftp://example.com/x"}"#,
            )),
            422,
            "invalid-command",
        ),
        (
            Box::new(|r| {
                let huge =
                    json!({"type": "ledger.deposit", "payload": {"account_id": "a".repeat(70_000), "amount": 5}});
                r.bearer_auth("dev-onceflow-key").header("idempotency-key", KEY).json(&huge)
            }),
            413,
            "payload-too-large",
        ),
    ];
    for (index, (build, status, problem)) in cases.into_iter().enumerate() {
        let response = api.submit_raw(build).await;
        assert_eq!(response.status, status, "case {index}: {}", String::from_utf8_lossy(&response.body));
        assert_eq!(response.problem_type(), format!("{PROBLEM}{problem}"), "case {index}");
        assert!(!response.json()["detail"].as_str().unwrap_or_default().is_empty(), "case {index} explains itself");
    }
    for table in ["jobs", "idempotency_keys", "onceflow_outbox"] {
        assert_eq!(count(&db, table).await, 0, "a rejected request wrote to {table}");
    }

    let corrected = api.submit(key, &good).await;
    assert_eq!(corrected.status, 202, "the key is still free after rejections");
    assert_eq!(corrected.header("idempotent-replayed"), None);
    db.close().await;
    env.teardown().await;
}

type ApiCase = Box<dyn FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_jobs_and_keys() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            config.tenants.push(TenantKey {
                tenant: "acme".to_owned(),
                // sha256("acme-key")
                api_key_sha256: "afacab3575137afa4e00d9cbcafcb14c9ae25f779d964eb0ea5b2c4eb5dfd163".to_owned(),
            });
        })
        .await;
    let dev = IngestClient::new(&ingest);
    let acme = IngestClient::with_key(&ingest, "acme-key");

    let dev_job = dev.submit("shared-key", &deposit(10)).await;
    assert_eq!(dev_job.status, 202);
    let job_id = dev_job.json()["job_id"].as_str().unwrap().to_owned();

    // acme's own use of the same key is an independent command, not a 422.
    let acme_job = acme.submit("shared-key", &deposit(99)).await;
    assert_eq!(acme_job.status, 202, "{}", String::from_utf8_lossy(&acme_job.body));
    assert_eq!(acme_job.header("idempotent-replayed"), None);
    assert_ne!(acme_job.json()["job_id"], dev_job.json()["job_id"]);

    // acme cannot see dev's job: 404, the same as a job that does not exist.
    let foreign = acme.job(&job_id).await;
    assert_eq!(foreign.status, 404);
    assert_eq!(foreign.problem_type(), format!("{PROBLEM}job-not-found"));
    assert_eq!(dev.job(&job_id).await.status, 200);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_swept_and_can_be_used_afresh() {
    let mut env = TestEnv::new();
    let ingest = env
        .start_ingest_with(|config| {
            config.idempotency_ttl_secs = 1;
            config.sweep_interval_secs = std::num::NonZeroU64::MIN;
        })
        .await;
    let api = IngestClient::new(&ingest);
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    let first = api.submit("short-lived", &deposit(10)).await;
    assert_eq!(first.status, 202);
    eventually("the sweeper to remove the expired key", Duration::from_secs(30), || async {
        (count(&db, "idempotency_keys").await == 0).then_some(())
    })
    .await;
    let reused = api.submit("short-lived", &deposit(20)).await;
    assert_eq!(reused.status, 202, "after expiry the key is free, even for another body");
    assert_ne!(reused.json()["job_id"], first.json()["job_id"]);
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_status_only_moves_forward_and_says_when_to_poll_again() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let api = IngestClient::new(&ingest);
    let submitted = api.submit("forward-only", &deposit(10)).await;
    let job_id = submitted.json()["job_id"].as_str().unwrap().to_owned();
    let correlation_id = submitted.json()["correlation_id"].as_str().unwrap().to_owned();

    let pending = api.job(&job_id).await;
    assert_eq!(pending.json()["status"], "accepted");
    let retry_after: u64 = pending.header("retry-after").expect("Retry-After while pending").parse().unwrap();
    assert!((1..=3).contains(&retry_after));

    // Results arrive out of order and duplicated: terminal first, then an old
    // progress event, then the terminal again.
    let marker_job =
        api.submit("forward-only-marker", &deposit(11)).await.json()["job_id"].as_str().unwrap().to_owned();

    // Results arrive out of order and duplicated: terminal first, then an old
    // progress event, then the terminal again. Last, on the same partition (same
    // key), a marker event about another job: once the marker is projected,
    // everything before it was too.
    let producer = onceflow_tests::kafka_producer(&env.kafka);
    let results = env.kafka.topics().results;
    let events = [
        (job_id.as_str(), JobStatus::Succeeded, "00000000-0000-7000-8000-000000000002"),
        (job_id.as_str(), JobStatus::Processing, "00000000-0000-7000-8000-000000000001"),
        (job_id.as_str(), JobStatus::Succeeded, "00000000-0000-7000-8000-000000000002"),
        (marker_job.as_str(), JobStatus::Processing, "00000000-0000-7000-8000-000000000003"),
    ];
    for (event_job, status, event_id) in events {
        let event = ResultEvent {
            event_id: event_id.to_owned(),
            job_id: event_job.to_owned(),
            tenant: "dev".to_owned(),
            correlation_id: correlation_id.clone(),
            command_type: "ledger.deposit".to_owned(),
            status,
            progress_percent: (status == JobStatus::Processing).then_some(50),
            result_json: (status == JobStatus::Succeeded).then(|| r#"{"balance":10}"#.to_owned()),
            error: None,
            callback_url: None,
            occurred_at: 0,
        };
        let envelope = result_envelope(&event);
        let payload = event.encode().unwrap();
        let record = FutureRecord::to(&results)
            .key(&job_id)
            .payload(&payload)
            .headers(onceflow_runtime::kafka::headers(&envelope));
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    eventually("the marker to be projected", OUTCOME_TIMEOUT, || async {
        (api.job(&marker_job).await.json()["status"] == "processing").then_some(())
    })
    .await;
    let done = api.job(&job_id).await;
    assert_eq!(done.json()["status"], "succeeded", "a late progress event must not move the job back");
    assert_eq!(done.json()["result"]["balance"], 10);
    assert_eq!(done.header("retry-after"), None, "no Retry-After once terminal");
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_openapi_document_of_the_idempotency_contract() {
    let mut env = TestEnv::new();
    let ingest = env.start_ingest().await;
    let document: Value = reqwest::get(ingest.url("/openapi.json")).await.unwrap().json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"), "{}", document["openapi"]);
    let submit = &document["paths"]["/v1/commands"]["post"];
    for status in ["202", "400", "401", "409", "413", "415", "422", "503"] {
        assert!(submit["responses"][status].is_object(), "POST /v1/commands documents {status}");
    }
    assert!(document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["404"].is_object());
    assert!(document["info"]["description"].as_str().unwrap().contains("Idempotent-Replayed"));
    let parameters = submit["parameters"].as_array().unwrap();
    let key = parameters.iter().find(|p| p["name"] == "Idempotency-Key").expect("the key is documented");
    assert_eq!(key["required"], true);
    assert_eq!((key["schema"]["minLength"].as_u64(), key["schema"]["maxLength"].as_u64()), (Some(1), Some(255)));
    assert_eq!(key["schema"]["pattern"], "^[!-~]{1,255}$");
    // One schema per command type, told apart by `type`.
    let body = &submit["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    let name = body.as_str().unwrap().rsplit('/').next().unwrap();
    let variants = document["components"]["schemas"][name]["oneOf"].as_array().expect("a oneOf");
    let mut types: Vec<&str> =
        variants.iter().map(|v| v["properties"]["type"]["enum"][0].as_str().expect("a fixed type")).collect();
    types.sort_unstable();
    let declared = onceflow_catalogue::CommandTypes::builtin();
    assert_eq!(types, declared.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
    env.teardown().await;
}

/// Once a key is recorded, its answer does not depend on what validation, the
/// callback allowlist or load shedding would say now: a refusal is given only
/// to a key with no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_key_replays_before_validation_allowlist_or_shedding() {
    let mut env = TestEnv::new();
    // Kafka is not needed: the command waits in the outbox.
    let offline = |config: &mut onceflow_ingest::IngestConfig| config.kafka.brokers = "127.0.0.1:9".to_owned();
    let ingest = env.start_ingest_with(offline).await;
    let api = IngestClient::new(&ingest);
    let body = json!({
        "type": "ledger.deposit",
        "payload": {"account_id": "acc-1", "amount": 5},
        "callback_url": "http://127.0.0.1:9/hook",
    });
    let first = api.submit("replay-first", &body).await;
    assert_eq!(first.status, 202, "{}", String::from_utf8_lossy(&first.body));
    ingest.stop().await;

    // The same database, but now the callback's address is no longer allowed
    // and every new command is shed (a backlog of 0 is above -1).
    let ingest = env
        .start_ingest_with(|config| {
            offline(config);
            config.webhooks.allowlist = Default::default();
            config.shed.max_outbox_backlog = -1;
        })
        .await;
    let api = IngestClient::new(&ingest);
    let replay = api.submit("replay-first", &body).await;
    assert_eq!(replay.status, 202, "{}", String::from_utf8_lossy(&replay.body));
    assert_eq!(replay.body, first.body, "the same response, byte for byte");
    assert_eq!(replay.header("location"), first.header("location"));
    assert_eq!(replay.header("content-type"), first.header("content-type"));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // An invalid X-Correlation-Id does not matter to a replay either.
    let with_bad_header = api
        .submit_raw(|r| {
            r.bearer_auth(onceflow_tests::DEV_API_KEY)
                .header("idempotency-key", "replay-first")
                .header("x-correlation-id", "has space")
                .json(&body)
        })
        .await;
    assert_eq!((with_bad_header.status, &with_bad_header.body), (202, &first.body));

    let reused = api.submit("replay-first", &deposit(6)).await;
    assert_eq!(reused.status, 422);
    assert_eq!(reused.problem_type(), format!("{PROBLEM}idempotency-key-reused"));
    // First requests are judged by today's rules.
    let refused = api.submit("new-key", &body).await;
    assert_eq!(refused.status, 422, "{}", String::from_utf8_lossy(&refused.body));
    assert_eq!(refused.problem_type(), format!("{PROBLEM}invalid-command"));
    let shed = api.submit("another-new-key", &deposit(5)).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.problem_type(), format!("{PROBLEM}overloaded"));
    let db = PgPool::connect(&env.database_url("ingest")).await.unwrap();
    assert_eq!(count(&db, "jobs").await, 1, "only the first command was stored");
    db.close().await;
    env.teardown().await;
}
