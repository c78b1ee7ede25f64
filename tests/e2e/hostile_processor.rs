//! Hostile input to the processor, through the whole stack (guarantee G8):
//! records put straight on the commands topic, as a misbehaving producer
//! would, and amounts that overflow a balance. Each must end at once
//! (applied, refused, or dead-lettered), never halt its lane, and never stall
//! another tenant: every test ends with a canary command of another tenant
//! that completes within seconds.
//!
//! - a NUL or invalid UTF-8 in a record's key, envelope or other headers, a
//!   result too large for one Kafka record, and a record too large for the
//!   dead-letter topic: dead-lettered, kept losslessly in the `dead_letters`
//!   table (the last one there only, with why), and the command behind them
//!   on the same partition applies;
//! - a header whose name is not UTF-8 (put on the topic by speaking the
//!   Kafka protocol by hand): dead-lettered without its headers, where it
//!   used to panic the processor's lane and stop all consumption, alone or
//!   in the middle of a batch;
//! - two deposits of nearly `i64::MAX` into one account, and a deposit that
//!   would take `world:<CUR>` below `i64::MIN`: `failed` with
//!   `amount_out_of_range`, nothing changed, and the currency stays usable.

use std::time::Duration;

use onceflow_contracts::{JobStatus, payload::MAX_AMOUNT};
use onceflow_runtime::kafka::headers;
use onceflow_tests::{
    CANARY_TIMEOUT, OUTCOME_TIMEOUT, PositionedRecord, TestEnv, eventually, kafka_producer, produce_by_hand,
    read_topic_to_end,
};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use sqlx::Row as _;

use crate::processor::{
    CommandMessage, balance, inbox, processor_db, published_results, results_of, send, wait_handled,
};

/// Put `message` on `topic`'s partition 0 with `key` and `headers` exactly as given.
async fn produce_raw(producer: &FutureProducer, topic: &str, key: &[u8], headers: OwnedHeaders, payload: &[u8]) {
    producer
        .send(FutureRecord::to(topic).partition(0).key(key).headers(headers).payload(payload), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .expect("the broker takes the record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nul_and_invalid_utf8_in_keys_and_headers_are_dead_lettered_and_the_lane_goes_on() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let topic = env.kafka.topics().commands;
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let account = "hana";

    // Everything on partition 0, so one lane, in this order.
    let open = CommandMessage::open_account(account);
    send(&producer, &topic, &open, Some(0)).await;

    // 1. A NUL in the tenant (of the body, which the processor goes by, and
    //    of the envelope): no text column takes it.
    let nul_tenant =
        CommandMessage::deposit(account, 1).with_command(|command| command.tenant = "dev\0evil".to_owned());
    let mut envelope = nul_tenant.envelope.clone();
    envelope.tenant = "dev\0evil".to_owned();
    produce_raw(&producer, &topic, b"hana\0\xff", headers(&envelope), &nul_tenant.payload).await;

    // 2. A NUL in the correlation id, which the result's headers would carry.
    let mut nul_correlation = CommandMessage::deposit(account, 2);
    nul_correlation.envelope.correlation_id = "corr\0x".to_owned();
    send(&producer, &topic, &nul_correlation, Some(0)).await;

    // 3. A type without a handler, with a key and extra headers of NUL and
    //    invalid UTF-8: kept byte for byte.
    let unknown = CommandMessage::new("ledger.mint", account, &json!({"account_id": account, "amount": 1}));
    let odd_key: &[u8] = b"\xff\xfe\0key";
    let odd_headers = headers(&unknown.envelope)
        .insert(Header { key: "x-nul", value: Some(b"a\0b".as_slice()) })
        .insert(Header { key: "x-binary", value: Some(b"\xff\x00\xfe".as_slice()) });
    produce_raw(&producer, &topic, odd_key, odd_headers, &unknown.payload).await;

    // 4. An account opening whose result cannot fit in one Kafka record (its
    //    callback URL alone is 950,000 bytes): nothing is opened.
    let oversized = CommandMessage::open_account("huge")
        .with_command(|command| command.callback_url = Some(format!("https://example.com/{}", "x".repeat(950_000))));
    send(&producer, &topic, &oversized, Some(0)).await;

    // 5. A record the dead-letter topic cannot take: near the producer's
    //    1,000,000-byte limit already, and over it once the error headers
    //    (which name its 30,000-character type) are added. Kept in the
    //    table only, with why.
    let long_type = format!("ledger.{}", "m".repeat(30_000));
    let too_large_for_the_dlq =
        CommandMessage::new(&long_type, account, &json!({"account_id": account, "filler": "f".repeat(924_000)}));
    send(&producer, &topic, &too_large_for_the_dlq, Some(0)).await;

    // Behind all of them on the same partition: applies.
    let behind = CommandMessage::deposit(account, 42);
    send(&producer, &topic, &behind, Some(0)).await;
    wait_handled(&db, &[behind.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 42, "only the deposit behind the hostile records moved money");

    let outcomes = inbox(&db).await;
    for (message, what) in [
        (&nul_tenant, "NUL in the tenant"),
        (&nul_correlation, "NUL in the correlation id"),
        (&unknown, "odd key and headers"),
        (&oversized, "oversized result"),
        (&too_large_for_the_dlq, "too large for the dead-letter topic"),
    ] {
        assert_eq!(outcomes.get(&message.job_id).map(String::as_str), Some("dead_lettered"), "{what}");
    }
    assert_eq!(outcomes.get(&behind.job_id).map(String::as_str), Some("succeeded"));
    let opened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM accounts WHERE account_id = 'huge'").fetch_one(&db).await.unwrap();
    assert_eq!(opened, 0, "a command whose result cannot be published leaves nothing behind");

    // Each is parked for an operator, its bytes kept.
    let letters =
        sqlx::query("SELECT message_id, tenant, message_key, headers, error_code, topic_error FROM dead_letters")
            .fetch_all(&db)
            .await
            .unwrap();
    let letter = |id: uuid::Uuid| {
        letters
            .iter()
            .find(|row| row.get::<uuid::Uuid, _>("message_id") == id)
            .unwrap_or_else(|| panic!("no dead letter {id}"))
    };
    let tenant_letter = letter(nul_tenant.job_id);
    assert_eq!(tenant_letter.get::<String, _>("error_code"), "invalid_data");
    assert_eq!(tenant_letter.get::<Option<Vec<u8>>, _>("message_key").as_deref(), Some(b"hana\0\xff".as_slice()));
    assert_eq!(tenant_letter.get::<String, _>("tenant"), "dev\u{FFFD}evil");
    assert_eq!(letter(nul_correlation.job_id).get::<String, _>("error_code"), "invalid_data");
    let unknown_letter = letter(unknown.job_id);
    assert_eq!(unknown_letter.get::<String, _>("error_code"), "unknown_command_type");
    assert_eq!(unknown_letter.get::<Option<Vec<u8>>, _>("message_key").as_deref(), Some(odd_key));
    let stored: Value = unknown_letter.get("headers");
    assert!(stored.as_array().unwrap().contains(&json!({"name": "tenant-id", "value": "dev"})), "{stored}");
    for (name, bytes) in [("x-nul", b"a\0b".as_slice()), ("x-binary", b"\xff\x00\xfe".as_slice())] {
        let kept: Vec<u8> = sqlx::query_scalar(
            "SELECT decode(h ->> 'base64', 'base64') FROM dead_letters, jsonb_array_elements(headers) h
             WHERE message_id = $1 AND h ->> 'name' = $2",
        )
        .bind(unknown.job_id)
        .bind(name)
        .fetch_one(&db)
        .await
        .unwrap_or_else(|e| panic!("header {name} kept: {e}; {stored}"));
        assert_eq!(kept, bytes, "header {name} kept byte for byte");
    }
    assert_eq!(letter(oversized.job_id).get::<String, _>("error_code"), "result_too_large");
    let off_topic = letter(too_large_for_the_dlq.job_id);
    assert_eq!(off_topic.get::<String, _>("error_code"), "unknown_command_type");
    let topic_error: Option<String> = off_topic.get("topic_error");
    assert!(topic_error.is_some_and(|error| error.contains("too large")), "why it is not on the topic");
    assert!(letter(unknown.job_id).get::<Option<String>, _>("topic_error").is_none(), "the others are on the topic");
    let on_topic: Vec<String> = read_topic_to_end(&env.kafka, &env.kafka.topics().dead_letter, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .filter_map(|r| r.record.headers.get("message-id").cloned())
        .collect();
    assert!(on_topic.contains(&unknown.id()), "{on_topic:?}");
    assert!(!on_topic.contains(&too_large_for_the_dlq.id()), "{on_topic:?}");

    // The jobs that can be told end dead_lettered, with a code and no database text.
    let results = published_results(&env, &db).await;
    for message in [&nul_tenant, &nul_correlation, &unknown] {
        let events = results_of(&results, &message.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::DeadLettered);
        let error = events[0].error.as_ref().unwrap();
        assert!(!error.message.contains("invalid byte sequence"), "database text leaked: {}", error.message);
    }

    stack.canary_completes(CANARY_TIMEOUT).await;
    db.close().await;
    drop(stack);
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflowing_amounts_are_refused_and_the_currency_stays_usable() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let topic = env.kafka.topics().commands;
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // At the door: an amount above the bound is a 422.
    let too_much = json!({"type": "ledger.deposit", "payload": {"account_id": "olga", "amount": MAX_AMOUNT + 1}});
    let refused = stack.dev().submit("too-much", &too_much).await;
    assert_eq!(refused.status, 422, "{}", String::from_utf8_lossy(&refused.body));

    // Past the door (straight on the topic): two deposits of nearly i64::MAX.
    // (A number of at most 17 significant digits: canonical JSON writes
    // numbers as IEEE doubles, which hold every amount up to MAX_AMOUNT but
    // not every 19-digit one.)
    let near_max: i64 = 9_200_000_000_000_000_000;
    let open = CommandMessage::open_account("olga");
    let first = CommandMessage::deposit("olga", near_max);
    let second = CommandMessage::deposit("olga", near_max);
    for message in [&open, &first, &second] {
        send(&producer, &topic, message, Some(0)).await;
    }
    wait_handled(&db, &[open.job_id, first.job_id, second.job_id], OUTCOME_TIMEOUT).await;

    // Through ingest, another account in the currency.
    let submit = |key: &'static str, body: Value| {
        let api = stack.dev();
        async move {
            let accepted = api.submit(key, &body).await;
            assert_eq!(accepted.status, 202, "{}", String::from_utf8_lossy(&accepted.body));
            let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
            eventually("the job to end", OUTCOME_TIMEOUT, || async {
                let job = api.job(&job_id).await.json();
                ["succeeded", "failed", "dead_lettered"].contains(&job["status"].as_str()?).then_some(job)
            })
            .await
        }
    };
    let deposit = |amount: i64| json!({"type": "ledger.deposit", "payload": {"account_id": "pia", "amount": amount}});
    let opened =
        submit("open-pia", json!({"type": "ledger.open_account", "payload": {"account_id": "pia", "currency": "EUR"}}))
            .await;
    assert_eq!(opened["status"], "succeeded", "{opened}");

    // Past the door again: a deposit that would take world:EUR below i64::MIN.
    let below_min = CommandMessage::deposit("pia", near_max);
    send(&producer, &topic, &below_min, Some(0)).await;
    wait_handled(&db, &[below_min.job_id], OUTCOME_TIMEOUT).await;

    let outcomes = inbox(&db).await;
    assert_eq!(outcomes.get(&first.job_id).map(String::as_str), Some("succeeded"));
    for (message, what) in [(&second, "past i64::MAX"), (&below_min, "world below i64::MIN")] {
        assert_eq!(outcomes.get(&message.job_id).map(String::as_str), Some("failed"), "{what}: refused");
    }
    let results = published_results(&env, &db).await;
    for message in [&second, &below_min] {
        let events = results_of(&results, &message.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::Failed);
        assert_eq!(events[0].error.as_ref().unwrap().code, "amount_out_of_range");
    }

    // The currency stays usable: small deposits still work.
    for key in ["small-1", "small-2"] {
        let job = submit(key, deposit(5)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A transfer to the same account is a business refusal, not a 422: the
    // API document cannot say that two fields differ.
    let to_itself = json!({"type": "ledger.transfer", "payload": {"from": "pia", "to": "pia", "amount": 1}});
    let refused = submit("to-itself", to_itself).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "same_account", "{refused}");
    assert_eq!(balance(&db, "olga").await, near_max);
    assert_eq!(balance(&db, "pia").await, 10);
    assert_eq!(balance(&db, "world:EUR").await, -near_max - 10);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(&db).await.unwrap();
    assert_eq!(dead, 0, "an overflow is never dead-lettered");

    stack.canary_completes(CANARY_TIMEOUT).await;
    db.close().await;
    drop(stack);
    env.teardown().await;
}

/// Put `command` on partition 0 with its envelope and a header named by bytes
/// that are not UTF-8 (by hand: no client API allows that name).
async fn produce_with_odd_header(env: &TestEnv, topic: &str, key: &str, command: &CommandMessage) {
    let mut header_list: Vec<(Vec<u8>, Vec<u8>)> = command
        .envelope
        .to_headers()
        .into_iter()
        .map(|(name, value)| (name.as_bytes().to_vec(), value.into_bytes()))
        .collect();
    header_list.push((b"x-\xff\xfe".to_vec(), b"v".to_vec()));
    let header_refs: Vec<(&[u8], &[u8])> = header_list.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
    produce_by_hand(&env.kafka.brokers, topic, key.as_bytes(), &header_refs, &command.payload).await;
}

/// `command`'s record is on the dead-letter topic as one whose headers could not be read.
async fn assert_dead_lettered_without_headers(env: &TestEnv, command: &CommandMessage) {
    let parked: Vec<PositionedRecord> =
        read_topic_to_end(&env.kafka, &env.kafka.topics().dead_letter, OUTCOME_TIMEOUT).await;
    assert!(
        parked.iter().any(|r| r.record.payload == command.payload
            && r.record.headers.get("dlq-error-code").map(String::as_str) == Some("unreadable_headers")),
        "the record is on the dead-letter topic: {parked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_the_lane_goes_on() {
    let mut env = TestEnv::new();
    let stack = env.start_stack().await;
    let topic = env.kafka.topics().commands;
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let account = "ines";

    let open = CommandMessage::open_account(account);
    send(&producer, &topic, &open, Some(0)).await;
    // A well-formed deposit, envelope and all, plus a header named by bytes
    // that are not UTF-8.
    let odd = CommandMessage::deposit(account, 1);
    produce_with_odd_header(&env, &topic, account, &odd).await;
    let behind = CommandMessage::deposit(account, 42);
    send(&producer, &topic, &behind, Some(0)).await;

    wait_handled(&db, &[open.job_id, behind.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 42, "the record with the odd header name did not apply");
    assert_dead_lettered_without_headers(&env, &odd).await;

    stack.canary_completes(CANARY_TIMEOUT).await;
    db.close().await;
    drop(stack);
    env.teardown().await;
}

/// The same record among others that a lane takes as one batch: the batch
/// used to panic with it and end the lane (and all consumption); now the
/// batch falls back to one message at a time, which dead-letters it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_panics_goes_one_at_a_time_and_the_lane_goes_on() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let topic = env.kafka.topics().commands;
    let producer = kafka_producer(&env.kafka);
    let account = "batch-panic";

    // Queued before any processor runs, so its lane finds them waiting and
    // takes them as one batch.
    let open = CommandMessage::open_account(account);
    send(&producer, &topic, &open, Some(0)).await;
    let mut deposits = Vec::new();
    for amount in 1..=5 {
        let deposit = CommandMessage::deposit(account, amount);
        send(&producer, &topic, &deposit, Some(0)).await;
        deposits.push(deposit);
    }
    let odd = CommandMessage::deposit(account, 1_000);
    produce_with_odd_header(&env, &topic, account, &odd).await;
    for amount in 10..=14 {
        let deposit = CommandMessage::deposit(account, amount);
        send(&producer, &topic, &deposit, Some(0)).await;
        deposits.push(deposit);
    }

    let stack = env.start_stack().await;
    let db = processor_db(&env).await;
    let ids: Vec<uuid::Uuid> = std::iter::once(open.job_id).chain(deposits.iter().map(|d| d.job_id)).collect();
    wait_handled(&db, &ids, OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 15 + 60, "every deposit but the odd one");
    assert_dead_lettered_without_headers(&env, &odd).await;

    stack.canary_completes(CANARY_TIMEOUT).await;
    db.close().await;
    drop(stack);
    env.teardown().await;
}
