//! Hostile records on the results topic (guarantee G8): whatever lands there,
//! the notifier and ingest's projection end each record at once (stored,
//! stored with a failed webhook, or parked for an operator) and every tenant's
//! results keep flowing; a database outage parks nothing. A backlog is stored
//! in batches, and a hostile record among it is parked alone.

use std::time::Duration;

use onceflow_contracts::JobStatus;
use onceflow_tests::{
    CANARY_TIMEOUT, DEV_API_KEY, DeliveriesClient, OUTCOME_TIMEOUT, SseClient, Stack, TestEnv, canary_tenant_key,
    committed_offsets, eventually, kafka_producer, produce_by_hand, result_envelope, result_event,
};
use rdkafka::producer::FutureRecord;
use serde_json::Value;

const ADMIN_TOKEN: &str = "parked-admin-token";

/// The whole stack with tenants `dev` and canary, the notifier's admin
/// endpoints on, warmed up by a first canary command.
async fn stack(env: &mut TestEnv) -> Stack {
    let ingest = env.start_ingest_with(|config| config.tenants.push(canary_tenant_key())).await;
    let processor = env.start_processor().await;
    let notifier = env
        .start_notifier_with(|config| {
            config.tenants.push(canary_tenant_key());
            config.admin.token = ADMIN_TOKEN.to_owned();
        })
        .await;
    let stack = Stack { ingest, processor, notifier };
    stack.canary_completes(OUTCOME_TIMEOUT).await;
    stack
}

/// Put a raw record on the results topic; its (partition, offset).
async fn publish_raw(
    env: &TestEnv,
    key: &str,
    payload: &[u8],
    headers: Option<rdkafka::message::OwnedHeaders>,
) -> (i32, i64) {
    let topic = env.kafka.topics().results;
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic).key(key).payload(payload);
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    kafka_producer(&env.kafka)
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .map(|delivery| (delivery.partition, delivery.offset))
        .expect("published")
}

/// Publish `event` as the processor would; its (partition, offset).
async fn publish_event(env: &TestEnv, event: &onceflow_contracts::ResultEvent) -> (i32, i64) {
    let headers = onceflow_runtime::kafka::headers(&result_envelope(event));
    publish_raw(env, &event.job_id, &event.encode().expect("encodable"), Some(headers)).await
}

async fn parked(notifier: &onceflow_tests::Service) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(notifier.url("/admin/parked"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin answers");
    assert_eq!(response.status(), 200, "the parked-records endpoint is served");
    let body: Value = response.json().await.expect("JSON");
    body["parked"].as_array().expect("a list").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_results_are_parked_or_tolerated_and_every_tenant_keeps_flowing() {
    let mut env = TestEnv::new();
    let stack = stack(&mut env).await;

    // A NUL in the callback URL: the event is stored (SSE works), its webhook
    // is failed at once, saying why; nothing is parked for it.
    let bad_callback = result_event(JobStatus::Succeeded, Some("http://127.0.0.1:9/h\u{0}x"));
    let mut positions = vec![publish_event(&env, &bad_callback).await];
    // `\u0000` inside the result's JSON: PostgreSQL's jsonb cannot hold it.
    let mut nul_result = result_event(JobStatus::Succeeded, None);
    nul_result.result_json = Some(r#"{"note": "a\u0000b"}"#.to_owned());
    positions.push(publish_event(&env, &nul_result).await);
    // No envelope at all, and a valid envelope over bytes that are not Avro.
    positions.push(publish_raw(&env, "no-envelope", b"{\"not\": \"avro\"}", None).await);
    let garbage = result_event(JobStatus::Succeeded, None);
    let headers = onceflow_runtime::kafka::headers(&result_envelope(&garbage));
    positions.push(publish_raw(&env, &garbage.job_id, &[0xff, 0xfe, 0x00, 0x80, 0x81], Some(headers)).await);

    let notifier = &stack.notifier;
    let records = eventually("three records parked", OUTCOME_TIMEOUT, || async {
        let records = parked(notifier).await;
        (records.len() >= 3).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 3, "{records:?}");
    let by_key = |key: &str| {
        records.iter().find(|r| r["key"] == key).unwrap_or_else(|| panic!("{key} parked: {records:?}")).clone()
    };
    let nul = by_key(&nul_result.job_id);
    assert_eq!(nul["consumer"], "notifier.results");
    assert!(nul["error"].as_str().unwrap().contains("unsupported Unicode escape sequence"), "{nul}");
    let no_envelope = by_key("no-envelope");
    assert!(no_envelope["error"].as_str().unwrap().contains("envelope"), "{no_envelope}");
    assert_eq!(no_envelope["headers"], serde_json::json!([]));
    assert_eq!(no_envelope["payload_hex"], hex::encode(b"{\"not\": \"avro\"}"));
    let undecodable = by_key(&garbage.job_id);
    assert!(undecodable["error"].as_str().unwrap().contains("undecodable"), "{undecodable}");
    assert_eq!(undecodable["payload_hex"], "fffe008081", "the payload is kept byte for byte");
    let names: Vec<&str> =
        undecodable["headers"].as_array().unwrap().iter().filter_map(|h| h["name"].as_str()).collect();
    assert!(names.contains(&"message-id") && names.contains(&"schema-id"), "headers are kept: {names:?}");
    assert!(!records.iter().any(|r| r["key"] == bad_callback.job_id), "a bad callback parks nothing");

    // The bad callback's event is streamed, and its delivery failed without an attempt.
    let mut stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{}/events", bad_callback.job_id)), None).await;
    let event = stream.next_event(OUTCOME_TIMEOUT).await.expect("the event of the bad callback");
    assert_eq!(event.event, "job.succeeded");
    let deliveries = DeliveriesClient::new(notifier, Some(DEV_API_KEY));
    let failed = deliveries.wait_for_delivery(&bad_callback.job_id, OUTCOME_TIMEOUT, |d| d["status"] == "failed").await;
    assert!(failed["last_error"].as_str().unwrap().contains("control characters"), "{failed}");
    assert_eq!(failed["attempt_count"], 0, "never attempted: {failed}");
    assert_eq!(failed["url"], "http://127.0.0.1:9/h\\u{0}x", "stored escaped");

    // Another tenant's command still goes all the way through.
    stack.canary_completes(CANARY_TIMEOUT).await;

    // Ingest's projection moved past every hostile record too.
    let topic = env.kafka.topics().results;
    let group = format!("ingest-{}", env.id);
    eventually("ingest's projection to commit past the hostile records", OUTCOME_TIMEOUT, || async {
        let committed = committed_offsets(&env.kafka, &group, &topic).await;
        positions.iter().all(|(partition, offset)| committed.get(partition).is_some_and(|c| c > offset)).then_some(())
    })
    .await;

    // Unauthorised and unknown redrives are refused; a record that still
    // cannot be stored stays parked with its error.
    let client = reqwest::Client::new();
    let redrive = |id: String, token: &'static str| {
        let request = client.post(notifier.url(&format!("/admin/parked/{id}/redrive"))).bearer_auth(token);
        async move { request.send().await.expect("admin answers").status().as_u16() }
    };
    let nul_id = nul["id"].to_string();
    assert_eq!(redrive(nul_id.clone(), "wrong").await, 401);
    assert_eq!(redrive("999999".to_owned(), ADMIN_TOKEN).await, 404);
    assert_eq!(redrive(nul_id.clone(), ADMIN_TOKEN).await, 422, "still not storable");
    let again = parked(notifier).await;
    let nul_again = again.iter().find(|r| r["id"] == nul["id"]).expect("still parked");
    assert_eq!(nul_again["redrive_count"], 1);
    let unauthorised = client.get(notifier.url("/admin/parked")).send().await.unwrap();
    assert_eq!(unauthorised.status(), 401);

    // A parked record that becomes storable is stored by its redrive and leaves the list.
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    sqlx::query("UPDATE parked_records SET payload = $2 WHERE id = $1")
        .bind(undecodable["id"].as_i64().unwrap())
        .bind(garbage.encode().unwrap())
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(redrive(undecodable["id"].to_string(), ADMIN_TOKEN).await, 200);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
        .bind(&garbage.event_id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the redriven record is stored");
    assert!(!parked(notifier).await.iter().any(|r| r["id"] == undecodable["id"]), "and no longer parked");
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_parks_nothing_and_every_event_is_stored_once() {
    let mut env = TestEnv::new();
    let notifier = env.start_notifier_with(|config| config.admin.token = ADMIN_TOKEN.to_owned()).await;
    let notifier_db = format!("onceflow_test_{}_notifier", env.id);
    let observer = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let count_stored =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events").fetch_one(&observer).await.unwrap() };
    // Warm up: the consumer group has joined once the first event is stored.
    let first = result_event(JobStatus::Succeeded, None);
    env.publish_result(&first).await;
    eventually("the first event stored", OUTCOME_TIMEOUT, || async { (count_stored().await == 1).then_some(()) }).await;
    observer.close().await;

    // Cut every connection of the notifier's database again and again while
    // results arrive.
    let admin = sqlx::PgPool::connect(&env.database_url("notifier").replace(&notifier_db, "postgres")).await.unwrap();
    let mut events = vec![first];
    for round in 0..20 {
        let event = result_event(JobStatus::Succeeded, None);
        env.publish_result(&event).await;
        events.push(event);
        if round % 2 == 0 {
            env.publish_result(&events[round]).await; // a redelivery too
        }
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&notifier_db)
            .execute(&admin)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    admin.close().await;

    let observer = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    eventually("every event stored after the outage", OUTCOME_TIMEOUT, || async {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&observer).await.ok()?;
        (stored == events.len() as i64).then_some(())
    })
    .await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM events ORDER BY event_id").fetch_all(&observer).await.unwrap();
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected, "every event once");
    assert!(parked(&notifier).await.is_empty(), "an outage parks nothing");
    observer.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_results_is_stored_in_batches_and_a_hostile_one_among_them_is_parked_alone() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    // One key, so one partition, queued before the notifier starts: it finds
    // them all ready and stores them in batches.
    let mut events = Vec::new();
    let mut hostile = None;
    for n in 0..40 {
        let mut event = result_event(JobStatus::Succeeded, None);
        if n == 20 {
            // `\u0000` in the result's JSON: jsonb refuses it, so its batch fails.
            event.result_json = Some(r#"{"note": "a\u0000b"}"#.to_owned());
            hostile = Some(event.clone());
        } else {
            events.push(event.clone());
        }
        let headers = onceflow_runtime::kafka::headers(&result_envelope(&event));
        publish_raw(&env, "backlog", &event.encode().expect("encodable"), Some(headers.clone())).await;
        if n == 10 {
            // A redelivery within the backlog stores nothing twice.
            publish_raw(&env, "backlog", &event.encode().expect("encodable"), Some(headers)).await;
        }
    }
    let hostile = hostile.expect("the hostile event was published");

    let notifier = env.start_notifier_with(|config| config.admin.token = ADMIN_TOKEN.to_owned()).await;
    let db = sqlx::PgPool::connect(&env.database_url("notifier")).await.unwrap();
    let count = |sql: &'static str| {
        let db = db.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&db).await.unwrap() }
    };
    eventually("every ordinary event stored", OUTCOME_TIMEOUT, || async {
        (count("SELECT count(*) FROM events").await >= events.len() as i64).then_some(())
    })
    .await;
    let records = eventually("the hostile record parked", OUTCOME_TIMEOUT, || async {
        let records = parked(&notifier).await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]["payload_hex"].as_str().is_some_and(|p| p == hex::encode(hostile.encode().unwrap())));

    let stored: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM events ORDER BY seq").fetch_all(&db).await.unwrap();
    let expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(stored, expected, "each once, in the order published");
    let transactions = count("SELECT count(DISTINCT xmin::text) FROM events").await;
    assert!(transactions < events.len() as i64 / 2, "{transactions} transactions for {} events", events.len());

    db.close().await;
    env.teardown().await;
}

/// A value past one of PostgreSQL's program limits (class 54: here an index
/// row too large, from a correlation id of 8,000 characters put straight on
/// the topic) is the record's, not an outage: it is parked at once, and the
/// next event of its partition is stored and streamed. It used to wait
/// forever, holding up SSE and webhooks of every tenant on the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_past_a_program_limit_is_parked_and_the_next_event_flows() {
    use sha2::Digest as _;
    let mut env = TestEnv::new();
    let stack = stack(&mut env).await;
    let mut huge = result_event(JobStatus::Processing, None);
    // Hex of hashes: compresses too little to fit an index row (~2.7 KB).
    huge.correlation_id = (0..125u32).map(|n| hex::encode(sha2::Sha256::digest(n.to_be_bytes()))).collect();
    publish_event(&env, &huge).await;
    let mut next = result_event(JobStatus::Succeeded, None);
    next.job_id.clone_from(&huge.job_id);
    publish_event(&env, &next).await;

    let notifier = &stack.notifier;
    let records = eventually("the record past the limit to be parked", OUTCOME_TIMEOUT, || async {
        let records = parked(notifier).await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]["error"].as_str().unwrap_or_default().contains("index row"), "{records:?}");
    let mut stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{}/events", next.job_id)), None).await;
    let event = stream.next_event(OUTCOME_TIMEOUT).await.expect("the next event of the partition");
    assert_eq!(event.event, "job.succeeded");
    stack.canary_completes(CANARY_TIMEOUT).await;
    env.teardown().await;
}

/// A record that must be parked, with a NUL in a header's name: parked with
/// the name printable (`\u0000`). Parking used to fail on it as data, so the
/// record was neither stored nor parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_name_with_nul_is_parked_printable() {
    let mut env = TestEnv::new();
    let stack = stack(&mut env).await;
    // By hand: librdkafka cuts a header name at its first NUL.
    let topic = env.kafka.topics().results;
    produce_by_hand(&env.kafka.brokers, &topic, b"nul-header-name", &[(b"x-\0odd", b"v")], b"not avro").await;
    let notifier = &stack.notifier;
    let records = eventually("the record to be parked", OUTCOME_TIMEOUT, || async {
        let records = parked(notifier).await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    let names: Vec<&str> =
        records[0]["headers"].as_array().unwrap().iter().filter_map(|h| h["name"].as_str()).collect();
    assert!(
        names == ["x-\\u0000odd"] || names == ["x-"],
        "the name, NUL made printable (or cut by the client): {records:?}"
    );
    stack.canary_completes(CANARY_TIMEOUT).await;
    env.teardown().await;
}
