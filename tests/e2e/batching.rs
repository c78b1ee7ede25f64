//! The processor's batches against the real PostgreSQL and the real broker:
//! commands that pile up on one partition while no processor runs are then
//! applied many per transaction, and still each exactly once, in order, with
//! refusals, a duplicate and poison among them ending as they would alone;
//! a run of deposits, applied by one call, ends each deposit as it would
//! alone; a handler that refuses after writing leaves nothing behind in a
//! batch; a redriven dead letter applied in a batch is recorded as applied,
//! so no second redrive can apply it again.

use onceflow_contracts::JobStatus;
use onceflow_processor::handlers::{Builtins, CommandContext, HandlerError, HandlerFuture, Refusals};
use onceflow_tests::{OUTCOME_TIMEOUT, TestEnv, allow_postings, kafka_producer, refuse_postings};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::processor::{
    ADMIN_TOKEN, CommandMessage, TENANT, balance, count, inbox, outcome_of, processor_db, published_results, redrive,
    results_of, send, wait_handled,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_is_applied_in_batches_each_command_once_and_in_order() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let account = "batched";

    // Everything keyed by the account, so one partition, one lane, in this order.
    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;
    let mut deposits = Vec::new();
    let mut refusals = Vec::new();
    let mut poison = None;
    for round in 1..=3_i64 {
        for amount in 1..=15 {
            let deposit = CommandMessage::deposit(account, round * 100 + amount);
            send(&producer, &topics.commands, &deposit, None).await;
            deposits.push(deposit);
        }
        // A refusal in the middle of a batch: its effect rolls back, the
        // commands around it apply.
        let refused =
            CommandMessage::new("ledger.transfer", account, &json!({"from": account, "to": "nobody", "amount": 1}));
        send(&producer, &topics.commands, &refused, None).await;
        refusals.push(refused);
        // A copy of a deposit of this round, as a relay that died between
        // publishing and deleting would publish it.
        send(&producer, &topics.commands, &deposits[deposits.len() - 5], None).await;
        if round == 2 {
            // Poison in the middle of a backlog: its batch goes back to one
            // message at a time, which dead-letters it.
            let garbage = CommandMessage { payload: b"not avro".to_vec(), ..CommandMessage::deposit(account, 1) };
            send(&producer, &topics.commands, &garbage, None).await;
            poison = Some(garbage);
        }
    }
    let poison = poison.expect("the poison was sent");

    let processor = env.start_processor().await;
    let db = processor_db(&env).await;
    let mut all: Vec<Uuid> = deposits.iter().chain(&refusals).map(|c| c.job_id).collect();
    all.extend([open.job_id, poison.job_id]);
    wait_handled(&db, &all, OUTCOME_TIMEOUT).await;

    // Each deposit once, in order: every result's balance is the running sum.
    let deposited: i64 = deposits.iter().map(amount_of).sum();
    assert_eq!(balance(&db, account).await, deposited, "every deposit applied once");
    assert_eq!(balance(&db, "world:EUR").await, -deposited, "the books balance");
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, deposits.len() as i64, "one posting each");
    let inbox = inbox(&db).await;
    assert_eq!(inbox.len(), all.len(), "one inbox row per distinct command: {inbox:?}");
    for refused in &refusals {
        assert_eq!(inbox[&refused.job_id], "failed");
    }
    assert_eq!(inbox[&poison.job_id], "dead_lettered");

    let results = published_results(&env, &db).await;
    let mut running = 0;
    for deposit in &deposits {
        running += amount_of(deposit);
        let events = results_of(&results, &deposit.id());
        assert_eq!(events.len(), 1, "one result per deposit, duplicates add none: {events:?}");
        assert_eq!(events[0].status, JobStatus::Succeeded);
        let result: Value = serde_json::from_str(events[0].result_json.as_deref().unwrap()).unwrap();
        assert_eq!(result["balance"], running, "applied in the order sent");
    }
    for refused in &refusals {
        let events = results_of(&results, &refused.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::Failed);
        assert_eq!(events[0].error.as_ref().map(|e| e.code.as_str()), Some("unknown_account"));
    }
    let dead = results_of(&results, &poison.id());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].status, JobStatus::DeadLettered);
    assert_eq!(results.len(), all.len(), "one result per distinct command");

    // Batched: the inbox rows were written by fewer transactions than there
    // are commands (rows of one transaction share its id, `xmin`).
    let transactions = count(
        &db,
        &format!(
            "SELECT count(DISTINCT xmin::text) FROM inbox WHERE tenant = '{TENANT}' AND outcome <> 'dead_lettered'"
        ),
    )
    .await;
    assert!(
        transactions < (all.len() as i64 - 1) / 2,
        "{transactions} transactions for {} commands: the backlog was not batched",
        all.len() - 1
    );

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deposits_applied_in_one_call_end_each_as_they_would_alone() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let account = "bulk";

    // One key, so one lane, queued before the processor starts: deposits
    // only, so the batch hands them to the ledger's bulk handler as runs,
    // with every way a deposit can end in the middle of them.
    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    let deposit_of = |payload: Value| CommandMessage::new("ledger.deposit", account, &payload);
    for round in 1..=4_i64 {
        for amount in 1..=10 {
            let deposit = CommandMessage::deposit(account, round * 100 + amount);
            send(&producer, &topics.commands, &deposit, None).await;
            applied.push(deposit);
        }
        let refusal = match round {
            1 => (deposit_of(json!({"account_id": "nobody", "amount": 5})), "unknown_account"),
            // Past i64::MAX with the balance already in the thousands (a
            // double: canonical JSON writes numbers as doubles).
            2 => (
                deposit_of(json!({"account_id": account, "amount": 9_223_372_036_854_774_784_i64})),
                "amount_out_of_range",
            ),
            3 => (deposit_of(json!({"account_id": account, "amount": 0})), "amount_out_of_range"),
            _ => (deposit_of(json!({"account_id": "nobody-else", "amount": 1})), "unknown_account"),
        };
        send(&producer, &topics.commands, &refusal.0, None).await;
        refused.push(refusal);
    }
    // A deposit whose payload does not fit its type: poison in the middle of
    // a run, dead-lettered alone; the deposits after it still apply.
    let poison = deposit_of(json!({"account_id": account}));
    send(&producer, &topics.commands, &poison, None).await;
    for amount in 1..=10 {
        let deposit = CommandMessage::deposit(account, 1_000 + amount);
        send(&producer, &topics.commands, &deposit, None).await;
        applied.push(deposit);
    }

    let processor = env.start_processor().await;
    let db = processor_db(&env).await;
    let mut all: Vec<Uuid> = applied.iter().chain(refused.iter().map(|(c, _)| c)).map(|c| c.job_id).collect();
    all.extend([open.job_id, poison.job_id]);
    wait_handled(&db, &all, OUTCOME_TIMEOUT).await;

    let deposited: i64 = applied.iter().map(amount_of).sum();
    assert_eq!(balance(&db, account).await, deposited, "every deposit applied once, no refused one");
    assert_eq!(balance(&db, "world:EUR").await, -deposited, "the books balance");
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, applied.len() as i64, "one posting each");
    let inbox = inbox(&db).await;
    assert_eq!(inbox[&poison.job_id], "dead_lettered");
    let results = published_results(&env, &db).await;
    let mut running = 0;
    for deposit in &applied {
        running += amount_of(deposit);
        let events = results_of(&results, &deposit.id());
        assert_eq!(events.len(), 1, "{events:?}");
        let result: Value = serde_json::from_str(events[0].result_json.as_deref().unwrap()).unwrap();
        assert_eq!(result["balance"], running, "applied in the order sent");
    }
    for (command, code) in &refused {
        assert_eq!(inbox[&command.job_id], "failed");
        let events = results_of(&results, &command.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].error.as_ref().map(|e| e.code.as_str()), Some(*code), "{events:?}");
    }
    assert_eq!(results_of(&results, &poison.id())[0].status, JobStatus::DeadLettered);

    let transactions =
        count(&db, "SELECT count(DISTINCT xmin::text) FROM inbox WHERE outcome <> 'dead_lettered'").await;
    assert!(transactions < all.len() as i64 / 4, "{transactions} transactions for {} commands: not batched", all.len());

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

/// A test handler that opens the account of its payload and then refuses:
/// the write must not outlive the refusal.
fn open_then_refuse<'a>(tx: &'a mut sqlx::PgConnection, command: &'a CommandContext) -> HandlerFuture<'a> {
    Box::pin(async move {
        sqlx::query("INSERT INTO accounts (tenant, account_id, currency) VALUES ($1, $2, 'EUR')")
            .bind(&command.tenant)
            .bind(command.payload["account_id"].as_str().unwrap_or_default())
            .execute(&mut *tx)
            .await?;
        Err(HandlerError::refused("changed_its_mind", "wrote, then refused"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_refuses_after_writing_leaves_nothing_in_a_batch() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let account = "savepoints";

    // One key, so one lane, queued before the processor starts: one batch of
    // deposits with the refusing handler in the middle of it.
    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;
    let mut deposits = Vec::new();
    let mut refusals = Vec::new();
    for round in 0..3 {
        for _ in 0..5 {
            let deposit = CommandMessage::deposit(account, 10);
            send(&producer, &topics.commands, &deposit, None).await;
            deposits.push(deposit);
        }
        let refused = CommandMessage::new(OPEN_THEN_REFUSE, account, &json!({"account_id": format!("ghost-{round}")}));
        send(&producer, &topics.commands, &refused, None).await;
        refusals.push(refused);
    }

    let mut builtins = Builtins::shipped();
    builtins.register(OPEN_THEN_REFUSE, open_then_refuse, Refusals::AfterWriting);
    let types = env.command_types_file(&format!(
        "[types.\"{OPEN_THEN_REFUSE}\"]\nschema = {{}}\nhandler = {{ builtin = \"{OPEN_THEN_REFUSE}\" }}\n"
    ));
    let processor = env.start_processor_with_handlers(builtins, |config| config.command_types_file = types).await;
    let db = processor_db(&env).await;
    let mut all: Vec<Uuid> = deposits.iter().chain(&refusals).map(|c| c.job_id).collect();
    all.push(open.job_id);
    wait_handled(&db, &all, OUTCOME_TIMEOUT).await;

    assert_eq!(count(&db, "SELECT count(*) FROM accounts WHERE account_id LIKE 'ghost-%'").await, 0, "rolled back");
    assert_eq!(balance(&db, account).await, 10 * deposits.len() as i64, "the deposits around it applied");
    let inbox = inbox(&db).await;
    let results = published_results(&env, &db).await;
    for refused in &refusals {
        assert_eq!(inbox[&refused.job_id], "failed");
        let events = results_of(&results, &refused.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].error.as_ref().map(|e| e.code.as_str()), Some("changed_its_mind"));
    }
    let transactions = count(&db, "SELECT count(DISTINCT xmin::text) FROM inbox").await;
    assert!(transactions < all.len() as i64 / 2, "{transactions} transactions: not batched");

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redrive_applied_in_a_batch_cannot_be_redriven_again() {
    let mut env = TestEnv::new();
    env.create_topics().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let account = "redriven-in-a-batch";
    let with_admin = |config: &mut onceflow_processor::ProcessorConfig| {
        config.retry.base_delay_ms = 10;
        config.retry.max_delay_ms = 50;
        config.admin.token = ADMIN_TOKEN.to_owned();
    };

    // A deposit the database refuses is dead-lettered.
    let processor = env.start_processor_with(with_admin).await;
    let db = processor_db(&env).await;
    let open = CommandMessage::open_account(account);
    send(&producer, &topics.commands, &open, None).await;
    wait_handled(&db, &[open.job_id], OUTCOME_TIMEOUT).await;
    refuse_postings(&db, "check_violation").await;
    let deposit = CommandMessage::deposit(account, 700);
    send(&producer, &topics.commands, &deposit, None).await;
    wait_handled(&db, &[deposit.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(outcome_of(&db, deposit.job_id).await.as_deref(), Some("dead_lettered"));
    allow_postings(&db).await;
    processor.stop().await;

    // Its redrive (the pending flag the admin endpoint sets, and the record
    // back on the topic) reaches the processor in the middle of a backlog of
    // the same key, so it is applied in a batch.
    sqlx::query("UPDATE dead_letters SET redrive_pending = true, redrive_count = 1 WHERE message_id = $1")
        .bind(deposit.job_id)
        .execute(&db)
        .await
        .unwrap();
    let mut others = Vec::new();
    for _ in 0..10 {
        let other = CommandMessage::deposit(account, 1);
        send(&producer, &topics.commands, &other, None).await;
        others.push(other);
    }
    send(&producer, &topics.commands, &deposit, None).await;
    for _ in 0..10 {
        let other = CommandMessage::deposit(account, 1);
        send(&producer, &topics.commands, &other, None).await;
        others.push(other);
    }
    let processor = env.start_processor_with(with_admin).await;
    let ids: Vec<Uuid> = others.iter().map(|c| c.job_id).collect();
    wait_handled(&db, &ids, OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, account).await, 720, "the redriven deposit applied once, with the others");
    let in_its_batch = count(
        &db,
        &format!(
            "SELECT count(*) FROM inbox WHERE xmin = (SELECT xmin FROM inbox WHERE message_id = '{}')",
            deposit.job_id
        ),
    )
    .await;
    assert!(in_its_batch > 1, "the redriven deposit was not applied in a batch");

    // The inbox says it applied: a second redrive is refused, and the money
    // moved once.
    assert_eq!(outcome_of(&db, deposit.job_id).await.as_deref(), Some("succeeded"));
    let (status, body) = redrive(&processor, &deposit.id(), ADMIN_TOKEN).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["type"], "https://onceflow.dev/problems/already-redriven");
    let results = published_results(&env, &db).await;
    let statuses: Vec<JobStatus> = results_of(&results, &deposit.id()).iter().map(|e| e.status).collect();
    assert_eq!(statuses, [JobStatus::DeadLettered, JobStatus::Succeeded]);
    assert_eq!(balance(&db, account).await, 720);

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

const OPEN_THEN_REFUSE: &str = "test.open_then_refuse";

fn amount_of(command: &CommandMessage) -> i64 {
    let decoded =
        onceflow_contracts::Command::decode(&command.envelope.schema_id, &command.payload).expect("a command");
    let payload: Value = serde_json::from_str(&decoded.payload_json).expect("a payload");
    payload["amount"].as_i64().expect("an amount")
}
