//! The long-running command: `ledger.statement` of an account with a few
//! hundred entries, submitted through ingest, reports its progress
//! (`job.processing` with increasing percents) on the notifier's job stream
//! before its `job.succeeded` result with the statement; the job status ends
//! succeeded with it; and a redelivered statement adds no second result.
//!
//! The account's history is written first by a processor on a private pair of
//! topics (commands produced straight onto them, as ingest's relay would), so
//! the few hundred deposit results do not flow through ingest's job-status
//! projection: that projection holds an entered span across `.await`, which
//! under load trips tracing-subscriber 0.3.23's "tried to clone a span that
//! already closed" panic (tokio-rs/tracing#3514) in whatever service task
//! shares the thread.

use std::time::{Duration, Instant};

use onceflow_contracts::{Command, Envelope, JobStatus, ResultEvent, payload::canonical_json, schema};
use onceflow_runtime::kafka::headers;
use onceflow_tests::{
    IngestClient, OUTCOME_TIMEOUT, SseClient, TestEnv, TopicReader, eventually, kafka_producer, read_topic_to_end,
};
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};

const ENTRIES: i64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_reports_progress_then_its_result_once() {
    let mut env = TestEnv::new();
    let account = "stella";

    // The account's history: opened, then ENTRIES deposits of 1, 2, 3, ...
    let mut seed_kafka = env.kafka.clone();
    seed_kafka.topic_prefix = format!("{}seed.", env.kafka.topic_prefix);
    let seeder = {
        let seed_kafka = seed_kafka.clone();
        env.start_processor_with(move |config| {
            config.kafka = seed_kafka;
            config.group_id.push_str("-seed");
        })
        .await
    };
    let producer = kafka_producer(&seed_kafka);
    let seed_topic = seed_kafka.topics().commands;
    let open = json!({"account_id": account, "currency": "EUR"});
    seed(&producer, &seed_topic, account, "ledger.open_account", &open).await;
    for amount in 1..=ENTRIES {
        seed(&producer, &seed_topic, account, "ledger.deposit", &json!({"account_id": account, "amount": amount}))
            .await;
    }
    let db = sqlx::PgPool::connect(&env.database_url("processor")).await.expect("processor database");
    eventually("every deposit to apply", OUTCOME_TIMEOUT, || async {
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM entries WHERE account_id = $1")
            .bind(account)
            .fetch_one(&db)
            .await
            .ok()?;
        (entries == ENTRIES).then_some(())
    })
    .await;
    db.close().await;
    seeder.stop().await;

    // The services on the test's own topics; the processor on the same database.
    let ingest = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier().await;
    let api = IngestClient::new(&ingest);

    let statement = json!({"type": "ledger.statement", "payload": {"account_id": account}});
    let accepted = api.submit("statement-stella", &statement).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    let submitted = Instant::now();

    // The job's stream: progress in order, then the result, then its end.
    let mut stream = SseClient::connect(&notifier.url(&format!("/v1/jobs/{job_id}/events")), None).await;
    let mut percents = Vec::new();
    let mut terminal = None;
    while let Some(event) = stream.next_event(OUTCOME_TIMEOUT).await {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["job_id"], job_id);
        match event.event.as_str() {
            "job.processing" => {
                assert!(terminal.is_none(), "progress after the result: {data}");
                percents.push(data["progress_percent"].as_i64().expect("a percent"));
            }
            "job.succeeded" => terminal = Some(data),
            other => panic!("unexpected event {other}: {data}"),
        }
    }
    let terminal = terminal.expect("the statement's result");
    let elapsed = submitted.elapsed();
    assert!(percents.len() >= 3, "progress before the result: {percents:?}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "percents increase: {percents:?}");
    assert!(percents.iter().all(|p| (0..100).contains(p)), "{percents:?}");
    let expected_balance = ENTRIES * (ENTRIES + 1) / 2;
    let result = &terminal["result"];
    assert_eq!(result["account_id"], account);
    assert_eq!(result["opening_balance"], 0);
    assert_eq!(result["closing_balance"], expected_balance);
    assert_eq!(result["entry_count"], ENTRIES);
    assert_eq!(result["truncated"], false);
    let entries = result["entries"].as_array().unwrap();
    assert_eq!(entries.len() as i64, ENTRIES);
    assert_eq!(entries[0]["amount"], 1, "in posting order");
    assert_eq!(entries[0]["kind"], "deposit");
    assert!(entries[0]["posting_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(entries.last().unwrap()["balance_after"], expected_balance);
    eprintln!(
        "statement of {ENTRIES} entries: progress {percents:?}, result {} bytes, {elapsed:?} from submission to the end of its stream",
        terminal.to_string().len()
    );

    // The job status ends succeeded, with the statement.
    let job = eventually("the statement job to succeed", OUTCOME_TIMEOUT, || async {
        let job = api.job(&job_id).await.json();
        (job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(job["type"], "ledger.statement");
    assert_eq!(job["result"]["closing_balance"], expected_balance);
    assert_eq!(job["result"]["entry_count"], ENTRIES);

    // Redelivered (as a broker would after a lost offset commit), the
    // statement adds no second result; a deposit behind it on its key shows
    // the redelivery was handled.
    let topics = env.kafka.topics();
    let commands = TopicReader::new(&env.kafka, &topics.commands);
    let original = commands.find(OUTCOME_TIMEOUT, |r| r.headers.get("message-id") == Some(&job_id)).await;
    let envelope =
        Envelope::from_headers(original.headers.iter().map(|(name, value)| (name.as_str(), Some(value.as_bytes()))))
            .unwrap();
    kafka_producer(&env.kafka)
        .send(
            FutureRecord::to(&topics.commands)
                .key(original.key.as_deref().unwrap())
                .payload(&original.payload)
                .headers(headers(&envelope)),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)
        .expect("redeliver the statement");
    let after = json!({"type": "ledger.deposit", "payload": {"account_id": account, "amount": 5}});
    let after = api.submit("deposit-stella-after", &after).await.json()["job_id"].as_str().unwrap().to_owned();
    eventually("the deposit behind the redelivery", OUTCOME_TIMEOUT, || async {
        (api.job(&after).await.json()["status"] == "succeeded").then_some(())
    })
    .await;
    let results: Vec<ResultEvent> = read_topic_to_end(&env.kafka, &topics.results, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .filter_map(|r| ResultEvent::decode(&r.record.headers["schema-id"], &r.record.payload).ok())
        .filter(|event| event.job_id == job_id)
        .collect();
    let terminals = results.iter().filter(|e| e.status.is_terminal()).count();
    assert_eq!(terminals, 1, "one result for the statement: {results:?}");
    let last = results.last().unwrap();
    assert_eq!(last.status, JobStatus::Succeeded, "progress is published before the result");

    drop((ingest, processor, notifier));
    env.teardown().await;
}

/// Put a command on `topic` as ingest's relay would (the job id is the message id).
async fn seed(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: &str,
    command_type: &str,
    payload: &Value,
) {
    let job_id = uuid::Uuid::now_v7();
    let command = Command {
        job_id: job_id.to_string(),
        tenant: "dev".to_owned(),
        command_type: command_type.to_owned(),
        payload_json: canonical_json(payload),
        callback_url: None,
        accepted_at: 0,
    };
    let envelope = Envelope {
        message_id: job_id,
        correlation_id: uuid::Uuid::new_v4().to_string(),
        causation_id: None,
        tenant: "dev".to_owned(),
        message_type: command_type.to_owned(),
        schema_id: schema::COMMAND.id.clone(),
        traceparent: None,
        tracestate: None,
    };
    let payload = command.encode().expect("encode command");
    producer
        .send(FutureRecord::to(topic).key(key).payload(&payload).headers(headers(&envelope)), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .expect("seed a command");
}

/// Entries of the long account: far more than a statement lists, and far
/// more than one Kafka record could carry.
const LONG_ENTRIES: i64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_of_fifty_thousand_entries_completes_with_a_bounded_result() {
    let mut env = TestEnv::new();
    let account = "lena";
    let processor = env.start_processor().await;
    let db = eventually("the processor's database to be migrated", OUTCOME_TIMEOUT, || async {
        let pool = sqlx::PgPool::connect(&env.database_url("processor")).await.ok()?;
        let migrated: bool =
            sqlx::query_scalar("SELECT to_regclass('dead_letters') IS NOT NULL").fetch_one(&pool).await.ok()?;
        migrated.then_some(pool)
    })
    .await;

    // The history written straight into the ledger, as LONG_ENTRIES deposits
    // of 1 would have written it: each posting's entries sum to zero and
    // the balances are their sums.
    sqlx::raw_sql(&format!(
        "INSERT INTO accounts (tenant, account_id, currency, balance)
             VALUES ('dev', '{account}', 'EUR', {LONG_ENTRIES}), ('dev', 'world:EUR', 'EUR', -{LONG_ENTRIES});
         CREATE TEMP TABLE seeded AS SELECT gen_random_uuid() AS posting_id FROM generate_series(1, {LONG_ENTRIES});
         INSERT INTO postings (posting_id, tenant, kind) SELECT posting_id, 'dev', 'deposit' FROM seeded;
         INSERT INTO entries (posting_id, tenant, account_id, amount)
             SELECT posting_id, 'dev', '{account}', 1 FROM seeded
             UNION ALL SELECT posting_id, 'dev', 'world:EUR', -1 FROM seeded;"
    ))
    .execute(&db)
    .await
    .expect("seed the ledger");

    let ingest = env.start_ingest().await;
    let notifier = env.start_notifier().await;
    let api = IngestClient::new(&ingest);
    let statement = json!({"type": "ledger.statement", "payload": {"account_id": account}});
    let accepted = api.submit("statement-lena", &statement).await;
    assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();

    let job = eventually("the statement job to end", OUTCOME_TIMEOUT, || async {
        let job = api.job(&job_id).await.json();
        ["succeeded", "failed", "dead_lettered"].contains(&job["status"].as_str()?).then_some(job)
    })
    .await;
    assert_eq!(job["status"], "succeeded", "{}", job["error"]);
    let result = &job["result"];
    assert_eq!(result["entry_count"], LONG_ENTRIES);
    assert_eq!(result["closing_balance"], LONG_ENTRIES);
    assert_eq!(result["truncated"], true);
    let entries = result["entries"].as_array().unwrap();
    let listed = i64::try_from(entries.len()).unwrap();
    assert!((1..LONG_ENTRIES).contains(&listed), "a bounded number of entries: {listed}");
    assert_eq!(result["opening_balance"], LONG_ENTRIES - listed, "the balance before the first entry listed");
    assert_eq!(entries.last().unwrap()["balance_after"], LONG_ENTRIES, "the most recent entries are listed");
    let size = result.to_string().len();
    assert!(size < onceflow_outbox::MAX_MESSAGE_BYTES / 2, "the result is {size} bytes");
    eprintln!("statement of {LONG_ENTRIES} entries: {listed} listed, {size} bytes");

    db.close().await;
    drop((ingest, processor, notifier));
    env.teardown().await;
}
