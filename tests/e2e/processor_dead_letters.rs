//! Dead letters of the processor: poison goes to the dead-letter topic with
//! its original bytes and the error, ends its job visibly, and the commands
//! behind it still apply; a dead-lettered command, redriven by the operator
//! once its cause is fixed, applies exactly once, and a plain redelivery or a
//! second redrive does nothing.

use onceflow_contracts::{JobStatus, schema};
use onceflow_tests::{
    OUTCOME_TIMEOUT, Record, TestEnv, allow_postings, eventually, kafka_producer, read_topic_to_end, refuse_postings,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::processor::{
    ADMIN_TOKEN, CommandMessage, Placed, TENANT, balance, count, inbox, outcome_of, processor_db, produce,
    published_results, redrive, results_of, send, wait_handled,
};

/// One dead letter as the test expects to find it.
struct ExpectedDeadLetter<'a> {
    what: &'static str,
    original: &'a [u8],
    message_id: Option<String>,
    placed: Placed,
    code: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_dead_lettered_and_the_commands_behind_it_still_apply() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let account = "pat";

    // Everything on one key, so one partition, in this order.
    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;

    // 1. A valid envelope around bytes that are not an Avro command.
    let garbage = CommandMessage {
        payload: b"\xde\xad\xbe\xef this is not avro".to_vec(),
        ..CommandMessage::deposit(account, 1)
    };
    let garbage_at = send(&producer, &topics.commands, &garbage, None).await;
    let after_garbage = CommandMessage::deposit(account, 100);
    send(&producer, &topics.commands, &after_garbage, None).await;

    // 2. A record without any header (a well-formed command body, even).
    let headerless_body = CommandMessage::deposit(account, 7).payload;
    let headerless_at = produce(&producer, &topics.commands, Some(account), None, &headerless_body, None).await;
    let after_headerless = CommandMessage::deposit(account, 200);
    send(&producer, &topics.commands, &after_headerless, None).await;

    // 3. A command type no handler serves, delivered twice.
    let unknown = CommandMessage::new("ledger.mint", account, &json!({"account_id": account, "amount": 1_000_000}));
    let unknown_at = send(&producer, &topics.commands, &unknown, None).await;
    send(&producer, &topics.commands, &unknown, None).await;
    let after_unknown = CommandMessage::deposit(account, 300);
    send(&producer, &topics.commands, &after_unknown, None).await;

    // 4. A known type whose payload does not fit it.
    let misfit = CommandMessage::new("ledger.deposit", account, &json!({"account_id": account, "amount": "lots"}));
    let misfit_at = send(&producer, &topics.commands, &misfit, None).await;
    let after_misfit = CommandMessage::deposit(account, 400);
    send(&producer, &topics.commands, &after_misfit, None).await;

    for placed in [headerless_at, unknown_at, misfit_at] {
        assert_eq!(placed.partition, garbage_at.partition, "one key, one partition");
    }
    let applied =
        [open.job_id, after_garbage.job_id, after_headerless.job_id, after_unknown.job_id, after_misfit.job_id];
    wait_handled(&db, &applied, OUTCOME_TIMEOUT).await;

    // The commands behind the poison took effect, in order.
    assert_eq!(balance(&db, account).await, 1000, "every deposit behind the poison applied, once");
    let inbox = inbox(&db).await;
    for id in applied {
        assert_eq!(inbox.get(&id).map(String::as_str), Some("succeeded"));
    }
    for (poison, what) in [(&garbage, "garbage body"), (&unknown, "unknown type"), (&misfit, "misfit payload")] {
        assert_eq!(inbox.get(&poison.job_id).map(String::as_str), Some("dead_lettered"), "{what}");
    }
    assert_eq!(inbox.len(), 8, "{inbox:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 4, "poison posts nothing");

    // Each poison record is on the dead-letter topic once, as it was, plus the error.
    let expected = [
        ExpectedDeadLetter {
            what: "garbage body",
            original: &garbage.payload,
            message_id: Some(garbage.id()),
            placed: garbage_at,
            code: "undecodable",
        },
        ExpectedDeadLetter {
            what: "no headers",
            original: &headerless_body,
            message_id: None,
            placed: headerless_at,
            code: "invalid_envelope",
        },
        ExpectedDeadLetter {
            what: "unknown type",
            original: &unknown.payload,
            message_id: Some(unknown.id()),
            placed: unknown_at,
            code: "unknown_command_type",
        },
        ExpectedDeadLetter {
            what: "misfit payload",
            original: &misfit.payload,
            message_id: Some(misfit.id()),
            placed: misfit_at,
            code: "invalid_payload",
        },
    ];
    let dead_letters = read_topic_to_end(&env.kafka, &topics.dead_letter, OUTCOME_TIMEOUT).await;
    assert_eq!(
        dead_letters.len(),
        expected.len(),
        "one dead letter per poison record (the unknown type's redelivery adds none): {dead_letters:?}"
    );
    for poison in &expected {
        let found: Vec<&Record> = dead_letters
            .iter()
            .map(|r| &r.record)
            .filter(|r| r.headers.get("dlq-original-offset") == Some(&poison.placed.offset.to_string()))
            .collect();
        assert_eq!(found.len(), 1, "{}: one dead letter", poison.what);
        let letter = found[0];
        assert_eq!(letter.payload, poison.original, "{}: the original bytes", poison.what);
        assert_eq!(letter.key.as_deref(), Some(account), "{}: the original key", poison.what);
        assert_eq!(letter.headers["dlq-error-code"], poison.code, "{}", poison.what);
        assert!(!letter.headers["dlq-error-message"].is_empty(), "{}: an error message", poison.what);
        assert_eq!(letter.headers["dlq-original-topic"], topics.commands, "{}", poison.what);
        assert_eq!(letter.headers["dlq-original-partition"], poison.placed.partition.to_string(), "{}", poison.what);
        assert_eq!(letter.headers.get("message-id"), poison.message_id.as_ref(), "{}: original headers", poison.what);
        if poison.message_id.is_some() {
            assert_eq!(letter.headers["tenant-id"], TENANT, "{}: original headers", poison.what);
            assert_eq!(letter.headers["schema-id"], schema::COMMAND.id, "{}: original headers", poison.what);
        }
    }
    let garbage_letter = dead_letters.iter().find(|r| r.record.headers["dlq-error-code"] == "undecodable").unwrap();
    assert_eq!(garbage_letter.record.headers["correlation-id"], garbage.envelope.correlation_id);

    // Every known job ended: the poison ones dead-lettered (once), the others succeeded.
    let results = published_results(&env, &db).await;
    for (poison, code) in [(&garbage, "undecodable"), (&unknown, "unknown_command_type"), (&misfit, "invalid_payload")]
    {
        let events = results_of(&results, &poison.id());
        assert_eq!(events.len(), 1, "{code}: one result: {events:?}");
        assert_eq!(events[0].status, JobStatus::DeadLettered, "{code}");
        assert_eq!(events[0].error.as_ref().map(|e| e.code.as_str()), Some(code));
        assert_eq!(events[0].tenant, TENANT);
        assert_eq!(events[0].correlation_id, poison.envelope.correlation_id);
    }
    for (command, expected_balance) in
        [(&after_garbage, 100), (&after_headerless, 300), (&after_unknown, 600), (&after_misfit, 1000)]
    {
        let events = results_of(&results, &command.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::Succeeded);
        let result: Value = serde_json::from_str(events[0].result_json.as_deref().unwrap()).unwrap();
        assert_eq!(result["balance"], expected_balance, "applied in order");
    }
    assert_eq!(results.len(), 8, "no result for the headerless record, whose job is unknown");

    // The processor is still up and answering.
    let live = reqwest::get(processor.url("/livez")).await.expect("livez");
    assert!(live.status().is_success());

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_dead_letter_is_applied_exactly_once() {
    let mut env = TestEnv::new();
    let processor = env
        .start_processor_with(|config| {
            config.retry.base_delay_ms = 10;
            config.retry.max_delay_ms = 50;
            config.admin.token = ADMIN_TOKEN.to_owned();
        })
        .await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let account = "remy";

    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;
    wait_handled(&db, &[open.job_id], OUTCOME_TIMEOUT).await;

    // Data the database refuses (a constraint an operator will fix): the
    // deposit is dead-lettered at once.
    refuse_postings(&db, "check_violation").await;
    let callback_url = "https://example.com/hooks/remy";
    let deposit = CommandMessage::deposit(account, 700)
        .with_command(|command| command.callback_url = Some(callback_url.to_owned()));
    send(&producer, &topics.commands, &deposit, None).await;
    wait_handled(&db, &[deposit.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(outcome_of(&db, deposit.job_id).await.as_deref(), Some("dead_lettered"));

    // The operator lists it, with the error and where it came from.
    let unauthorized = reqwest::Client::new().get(processor.url("/admin/dead-letters")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401, "the admin endpoints need the token");
    let listed: Value = reqwest::Client::new()
        .get(processor.url("/admin/dead-letters"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["message_id"], deposit.id());
    assert_eq!(letters[0]["error"]["code"], "invalid_data");
    assert!(letters[0]["error"]["message"].as_str().unwrap().contains("injected fault"), "the operator sees why");
    assert_eq!(letters[0]["original_topic"], topics.commands);
    assert_eq!(letters[0]["key"], account);
    assert_eq!(letters[0]["redrive_count"], 0);

    // Refused: a wrong token, an id that was applied normally, an unknown id.
    assert_eq!(redrive(&processor, &deposit.id(), "wrong").await.0, 401);
    assert_eq!(redrive(&processor, &open.id(), ADMIN_TOKEN).await.0, 404, "not a dead letter");
    assert_eq!(redrive(&processor, &Uuid::now_v7().to_string(), ADMIN_TOKEN).await.0, 404);

    // The cause is fixed. A plain redelivery of the dead letter still does nothing.
    allow_postings(&db).await;
    send(&producer, &topics.commands, &deposit, None).await;
    let marker = CommandMessage::deposit(account, 1);
    send(&producer, &topics.commands, &marker, None).await;
    wait_handled(&db, &[marker.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 1, "a plain redelivery of a dead letter is a no-op");

    // Redriven: applied once.
    let (status, body) = redrive(&processor, &deposit.id(), ADMIN_TOKEN).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["redrive_count"], 1);
    eventually("the redriven deposit to apply", OUTCOME_TIMEOUT, || async {
        (outcome_of(&db, deposit.job_id).await.as_deref() == Some("succeeded")).then_some(())
    })
    .await;
    assert_eq!(balance(&db, account).await, 701, "the redriven deposit took effect");

    // Again: refused, and neither the redriven record delivered once more nor
    // another redrive changes anything.
    let (status, body) = redrive(&processor, &deposit.id(), ADMIN_TOKEN).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["type"], "https://onceflow.dev/problems/already-redriven");
    send(&producer, &topics.commands, &deposit, None).await;
    let marker = CommandMessage::deposit(account, 2);
    send(&producer, &topics.commands, &marker, None).await;
    wait_handled(&db, &[marker.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 703, "the deposit applied exactly once");
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 3);

    // Its job ended dead_lettered, then succeeded once after the redrive.
    let results = published_results(&env, &db).await;
    let events = results_of(&results, &deposit.id());
    let statuses: Vec<JobStatus> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [JobStatus::DeadLettered, JobStatus::Succeeded]);
    // The client sees a code and no database text.
    let error = events[0].error.as_ref().expect("the dead letter's error");
    assert_eq!(error.code, "invalid_data");
    assert!(!error.message.contains("injected fault"), "database text leaked to the job: {}", error.message);
    assert!(events[1].occurred_at > events[0].occurred_at, "the redriven outcome is the later one");
    for event in &events {
        assert_eq!(event.callback_url.as_deref(), Some(callback_url), "each outcome goes to the job's webhook");
    }
    let redriven = read_topic_to_end(&env.kafka, &topics.commands, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .filter(|r| r.record.headers.get("message-id") == Some(&deposit.id()))
        .count();
    assert_eq!(redriven, 4, "sent, redelivered, redriven (through the outbox), redelivered again");

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}
