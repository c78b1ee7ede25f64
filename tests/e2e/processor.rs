//! The processor against the real PostgreSQL and the real broker, fed with
//! records produced straight onto its commands topic:
//!
//! - a command delivered twice (three times) takes effect once;
//! - poison goes to the dead-letter topic with its original bytes and the
//!   error, ends its job visibly, and the commands behind it still apply;
//! - a shutdown in the middle of a command's retries leaves the command for
//!   redelivery instead of skipping it;
//! - a dead-lettered command, redriven by the operator once its cause is
//!   fixed, applies exactly once; a plain redelivery or a second redrive does
//!   nothing;
//! - processor processes SIGKILLed again and again (two in one consumer
//!   group) leave every command applied exactly once and the ledger balanced.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use onceflow_contracts::{Command, Envelope, JobStatus, ResultEvent, payload::canonical_json, schema};
use onceflow_runtime::kafka::headers;
use onceflow_tests::{
    OUTCOME_TIMEOUT, PositionedRecord, Record, ServiceProcess, TestEnv, allow_postings, committed_offsets, eventually,
    kafka_producer, read_topic_to_end, refuse_postings,
};
use rdkafka::{
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use sqlx::{PgPool, Row as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) const TENANT: &str = "dev";
const PROCESSOR_BINARY: &str = "onceflow-processor";

/// A command record as ingest's relay puts it on the commands topic.
#[derive(Debug, Clone)]
pub(crate) struct CommandMessage {
    pub(crate) job_id: Uuid,
    pub(crate) key: String,
    pub(crate) envelope: Envelope,
    pub(crate) payload: Vec<u8>,
}

impl CommandMessage {
    pub(crate) fn new(command_type: &str, key: &str, payload: &Value) -> Self {
        // As ingest does: the job id is the message id.
        let job_id = Uuid::now_v7();
        let command = Command {
            job_id: job_id.to_string(),
            tenant: TENANT.to_owned(),
            command_type: command_type.to_owned(),
            payload_json: canonical_json(payload),
            callback_url: None,
            accepted_at: now_ms(),
        };
        let envelope = Envelope {
            message_id: job_id,
            correlation_id: Uuid::new_v4().to_string(),
            causation_id: None,
            tenant: TENANT.to_owned(),
            message_type: command_type.to_owned(),
            schema_id: schema::COMMAND.id.clone(),
            traceparent: None,
            tracestate: None,
        };
        Self { job_id, key: key.to_owned(), envelope, payload: command.encode().expect("encode command") }
    }

    pub(crate) fn open_account(account: &str) -> Self {
        Self::new("ledger.open_account", account, &json!({"account_id": account, "currency": "EUR"}))
    }

    pub(crate) fn deposit(account: &str, amount: i64) -> Self {
        Self::new("ledger.deposit", account, &json!({"account_id": account, "amount": amount}))
    }

    /// Keyed by its source account, as ingest keys transfers.
    fn transfer(from: &str, to: &str, amount: i64) -> Self {
        Self::new("ledger.transfer", from, &json!({"from": from, "to": to, "amount": amount}))
    }

    /// The same record with its command body changed by `change`.
    pub(crate) fn with_command(self, change: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::decode(&self.envelope.schema_id, &self.payload).expect("a command");
        change(&mut command);
        Self { payload: command.encode().expect("encode the command"), ..self }
    }

    pub(crate) fn id(&self) -> String {
        self.job_id.to_string()
    }
}

fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Where the broker put a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

pub(crate) async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    headers: Option<OwnedHeaders>,
    payload: &[u8],
    partition: Option<i32>,
) -> Placed {
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .expect("the broker acknowledges the record");
    Placed { partition: delivery.partition, offset: delivery.offset }
}

/// Put `message` on `topic` with its envelope headers, on the partition of its
/// key unless `partition` is given.
pub(crate) async fn send(
    producer: &FutureProducer,
    topic: &str,
    message: &CommandMessage,
    partition: Option<i32>,
) -> Placed {
    produce(producer, topic, Some(&message.key), Some(headers(&message.envelope)), &message.payload, partition).await
}

/// The processor database of `env`, once its service created and migrated it.
pub(crate) async fn processor_db(env: &TestEnv) -> PgPool {
    let url = env.database_url("processor");
    eventually("the processor's database to be migrated", OUTCOME_TIMEOUT, || async {
        let pool = PgPool::connect(&url).await.ok()?;
        let migrated: Option<bool> = sqlx::query_scalar(
            "SELECT to_regclass('inbox') IS NOT NULL AND to_regclass('onceflow_outbox') IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .ok();
        if migrated == Some(true) {
            Some(pool)
        } else {
            pool.close().await;
            None
        }
    })
    .await
}

/// The inbox: outcome by message id.
pub(crate) async fn inbox(db: &PgPool) -> HashMap<Uuid, String> {
    sqlx::query("SELECT message_id, outcome FROM inbox")
        .fetch_all(db)
        .await
        .expect("read the inbox")
        .into_iter()
        .map(|row| (row.get("message_id"), row.get("outcome")))
        .collect()
}

pub(crate) async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub(crate) async fn balance(db: &PgPool, account: &str) -> i64 {
    sqlx::query_scalar("SELECT balance FROM accounts WHERE tenant = $1 AND account_id = $2")
        .bind(TENANT)
        .bind(account)
        .fetch_one(db)
        .await
        .unwrap_or_else(|e| panic!("balance of {account}: {e}"))
}

/// Wait until every message of `ids` has its inbox row.
pub(crate) async fn wait_handled(db: &PgPool, ids: &[Uuid], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = ANY($1)")
            .bind(ids)
            .fetch_one(db)
            .await
            .expect("count handled commands");
        if handled == ids.len() as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {timeout:?}, {handled} of {} commands are handled; the others are lost or stuck",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every result event on the results topic, once the processor's outbox is
/// drained (so everything committed so far has been published).
pub(crate) async fn published_results(env: &TestEnv, db: &PgPool) -> Vec<(Record, ResultEvent)> {
    eventually("the outbox relay to publish every result", OUTCOME_TIMEOUT, || async {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM onceflow_outbox").fetch_one(db).await.ok()?;
        (waiting == 0).then_some(())
    })
    .await;
    read_topic_to_end(&env.kafka, &env.kafka.topics().results, OUTCOME_TIMEOUT)
        .await
        .into_iter()
        .map(|PositionedRecord { record, .. }| {
            let event = ResultEvent::decode(&record.headers["schema-id"], &record.payload).expect("a result event");
            assert_eq!(record.headers["message-id"], event.event_id, "a result's message id is its event id");
            (record, event)
        })
        .collect()
}

/// The results of one job.
pub(crate) fn results_of<'a>(results: &'a [(Record, ResultEvent)], job_id: &str) -> Vec<&'a ResultEvent> {
    results.iter().filter(|(_, event)| event.job_id == job_id).map(|(_, event)| event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_delivered_twice_takes_effect_once() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // An account opening delivered twice: applied a second time, it would be
    // refused (`account_exists`) and show as a second, failed result.
    let open = CommandMessage::open_account("alice");
    let open_at = send(&producer, &topics.commands, &open, None).await;
    send(&producer, &topics.commands, &open, None).await;
    // A command behind the copies on their partition: once it is handled, so
    // are the copies (a partition is consumed in order). It also makes sure
    // the account is open before any copy of the deposit arrives.
    let behind_open = CommandMessage::open_account("bob");
    send(&producer, &topics.commands, &behind_open, Some(open_at.partition)).await;
    wait_handled(&db, &[open.job_id, behind_open.job_id], OUTCOME_TIMEOUT).await;

    // A deposit delivered three times. The identical record again, as a relay
    // that died between publishing and deleting its outbox row publishes it...
    let deposit = CommandMessage::deposit("alice", 500);
    let first = send(&producer, &topics.commands, &deposit, None).await;
    let second = send(&producer, &topics.commands, &deposit, None).await;
    assert_eq!(second.partition, first.partition, "same key, same partition");
    // ...and once more on another partition, where another consumer of the
    // group may be the one to get it.
    let other_partition = (first.partition + 1) % env.kafka.partitions;
    send(&producer, &topics.commands, &deposit, Some(other_partition)).await;
    let behind_first = CommandMessage::open_account("carol");
    let behind_other = CommandMessage::open_account("dave");
    send(&producer, &topics.commands, &behind_first, Some(first.partition)).await;
    send(&producer, &topics.commands, &behind_other, Some(other_partition)).await;
    wait_handled(&db, &[deposit.job_id, behind_first.job_id, behind_other.job_id], OUTCOME_TIMEOUT).await;

    // The copies really were on the topic, byte for byte the same.
    let commands = read_topic_to_end(&env.kafka, &topics.commands, OUTCOME_TIMEOUT).await;
    let copies_of = |message: &CommandMessage| -> Vec<&PositionedRecord> {
        commands.iter().filter(|r| r.record.headers.get("message-id") == Some(&message.id())).collect()
    };
    assert_eq!(copies_of(&open).len(), 2, "the opening was delivered twice");
    let copies = copies_of(&deposit);
    assert_eq!(copies.len(), 3, "the deposit was delivered three times");
    assert!(copies.iter().all(|c| c.record.payload == deposit.payload), "the copies are identical");

    // One inbox row, one posting, the balance moved once.
    let inbox = inbox(&db).await;
    assert_eq!(inbox.len(), 5, "one inbox row per distinct command: {inbox:?}");
    assert_eq!(inbox.get(&open.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(inbox.get(&deposit.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 1, "one posting");
    let entries: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, amount FROM entries WHERE posting_id = $1 ORDER BY amount")
            .bind(deposit.job_id)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(entries, [("world:EUR".to_owned(), -500), ("alice".to_owned(), 500)]);
    assert_eq!(balance(&db, "alice").await, 500, "the deposit moved the balance once");
    assert_eq!(balance(&db, "world:EUR").await, -500);

    // Exactly one result for the deposit's job, and one for each other job.
    let results = published_results(&env, &db).await;
    let open_results = results_of(&results, &open.id());
    assert_eq!(open_results.len(), 1, "one result for the opening: {open_results:?}");
    assert_eq!(open_results[0].status, JobStatus::Succeeded);
    let deposit_results = results_of(&results, &deposit.id());
    assert_eq!(deposit_results.len(), 1, "one result for the deposit: {deposit_results:?}");
    assert_eq!(deposit_results[0].status, JobStatus::Succeeded);
    let result: Value = serde_json::from_str(deposit_results[0].result_json.as_deref().unwrap()).unwrap();
    assert_eq!(result["balance"], 500);
    let (record, _) = results.iter().find(|(_, event)| event.job_id == deposit.id()).unwrap();
    assert_eq!(record.headers["causation-id"], deposit.id());
    assert_eq!(record.headers["correlation-id"], deposit.envelope.correlation_id);
    assert_eq!(results.len(), 5, "one result per distinct command");

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

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
async fn a_shutdown_during_retries_leaves_the_command_for_redelivery() {
    let mut env = TestEnv::new();
    // Retries that outlast the test's patience: the shutdown comes mid-retry.
    let patient = |config: &mut onceflow_processor::ProcessorConfig| {
        config.retry.base_delay_ms = 20;
        config.retry.max_delay_ms = 100;
    };
    let processor = env.start_processor_with(patient).await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // A database fault that the processor sees as transient, counted outside
    // every transaction.
    refuse_postings(&db, "serialization_failure").await;

    let open = CommandMessage::open_account("rita");
    let deposit = CommandMessage::deposit("rita", 500);
    send(&producer, &topics.commands, &open, None).await;
    send(&producer, &topics.commands, &deposit, None).await;
    wait_handled(&db, &[open.job_id], OUTCOME_TIMEOUT).await;
    eventually("the deposit to be retried", OUTCOME_TIMEOUT, || async {
        let failures: i64 =
            sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refused_postings")
                .fetch_one(&db)
                .await
                .ok()?;
        (failures >= 3).then_some(())
    })
    .await;

    // A graceful stop while the deposit is being retried.
    processor.stop().await;
    assert!(!inbox(&db).await.contains_key(&deposit.job_id), "the deposit did not take effect");

    // The fault is repaired; the next processor of the group gets the deposit again.
    allow_postings(&db).await;
    let processor = env.start_processor_with(patient).await;
    wait_handled(&db, &[deposit.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(inbox(&db).await.get(&deposit.job_id).map(String::as_str), Some("succeeded"));
    assert_eq!(balance(&db, "rita").await, 500);
    let results = published_results(&env, &db).await;
    let events = results_of(&results, &deposit.id());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].status, JobStatus::Succeeded);

    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

// ---------------------------------------------------------------------------
// The crash test.
// ---------------------------------------------------------------------------

/// Customer accounts of the crash test.
const ACCOUNTS: [&str; 6] = ["acc-a", "acc-b", "acc-c", "acc-d", "acc-e", "acc-f"];
/// Inbox rows that must appear after a (re)start before the next kill, so
/// every kill lands while commands are being applied.
const PROGRESS_BEFORE_KILL: usize = 40;
/// Commands produced but not yet handled, at most: keeps the stream flowing
/// during the kills without piling up more than the end can drain quickly.
const MAX_BACKLOG: usize = 300;
/// A hard bound on the stream.
const MAX_COMMANDS: usize = 20_000;

/// What a produced command should do to the ledger.
#[derive(Debug, Clone)]
enum Kind {
    Open,
    Deposit {
        account: &'static str,
        amount: i64,
    },
    Transfer {
        from: &'static str,
        to: &'static str,
        amount: i64,
    },
    /// A command type without a handler: dead-lettered.
    Poison,
}

#[derive(Debug, Clone)]
struct Produced {
    message: CommandMessage,
    kind: Kind,
    placed: Placed,
}

/// SplitMix64: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn amount(&mut self, max: u64) -> i64 {
        i64::try_from(1 + self.below(max)).unwrap_or(1)
    }

    fn account(&mut self) -> &'static str {
        ACCOUNTS[usize::try_from(self.below(ACCOUNTS.len() as u64)).unwrap_or(0)]
    }
}

fn random_command(rng: &mut Rng) -> (CommandMessage, Kind) {
    match rng.below(100) {
        0..2 => {
            let account = rng.account();
            let message = CommandMessage::new("ledger.mint", account, &json!({"account_id": account, "amount": 1}));
            (message, Kind::Poison)
        }
        // Opened once, never used: applied twice, an opening would be refused
        // and leave a second, failed result.
        2..6 => {
            let account = format!("new-{:016x}", rng.next());
            (CommandMessage::open_account(&account), Kind::Open)
        }
        6..50 => {
            let (account, amount) = (rng.account(), rng.amount(1000));
            (CommandMessage::deposit(account, amount), Kind::Deposit { account, amount })
        }
        _ => {
            let from = rng.account();
            let to = loop {
                let to = rng.account();
                if to != from {
                    break to;
                }
            };
            let amount = rng.amount(700);
            (CommandMessage::transfer(from, to, amount), Kind::Transfer { from, to, amount })
        }
    }
}

/// Produce a stream of ledger commands until `stop`, keeping at most
/// [`MAX_BACKLOG`] of them unhandled.
async fn stream_commands(
    producer: FutureProducer,
    topic: String,
    db: PgPool,
    produced: Arc<Mutex<Vec<Produced>>>,
    mut rng: Rng,
    stop: CancellationToken,
) {
    let len = |produced: &Arc<Mutex<Vec<Produced>>>| produced.lock().map(|p| p.len()).unwrap_or(usize::MAX);
    while !stop.is_cancelled() && len(&produced) < MAX_COMMANDS {
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox").fetch_one(&db).await.unwrap_or(0);
        let backlog = len(&produced).saturating_sub(usize::try_from(handled).unwrap_or(0));
        if backlog < MAX_BACKLOG {
            let batch: Vec<(CommandMessage, Kind)> = (0..10).map(|_| random_command(&mut rng)).collect();
            // Enqueued in order, acknowledged together; each key's order holds.
            let placements =
                futures::future::join_all(batch.iter().map(|(message, _)| send(&producer, &topic, message, None)))
                    .await;
            let mut list = produced.lock().expect("produced list");
            for ((message, kind), placed) in batch.into_iter().zip(placements) {
                list.push(Produced { message, kind, placed });
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// The processor processes of the crash test, in two slots.
struct Fleet {
    env: Vec<(&'static str, String)>,
    logs: std::path::PathBuf,
    slots: [Option<ServiceProcess>; 2],
    started: usize,
    killed: usize,
}

impl Fleet {
    fn start(&mut self, slot: usize) {
        assert!(self.slots[slot].is_none());
        self.started += 1;
        let log = self.logs.join(format!("processor-{}.log", self.started));
        self.slots[slot] = Some(ServiceProcess::spawn(PROCESSOR_BINARY, &self.env, &log));
    }

    fn kill(&mut self, slot: usize) {
        self.assert_alive();
        self.slots[slot].take().expect("a process in the slot").kill();
        self.killed += 1;
    }

    /// Nobody died on their own (a processor must never stop on a message).
    fn assert_alive(&mut self) {
        for process in self.slots.iter_mut().flatten() {
            if let Some(status) = process.exit_status() {
                panic!("processor {} exited by itself ({status}); see {}", process.id(), process.log.display());
            }
        }
    }
}

/// Commands handled (inbox row committed) whose offsets the group has not
/// committed: the ones a restarted group must get again and recognise.
async fn handled_but_uncommitted(env: &TestEnv, group: &str, db: &PgPool, produced: &[Produced]) -> usize {
    let committed = committed_offsets(&env.kafka, group, &env.kafka.topics().commands).await;
    let handled = inbox(db).await;
    produced
        .iter()
        .filter(|p| {
            p.placed.offset >= committed.get(&p.placed.partition).copied().unwrap_or(0)
                && handled.contains_key(&p.message.job_id)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_processors_apply_every_command_exactly_once() {
    let began = Instant::now();
    let mut env = TestEnv::new();
    env.kafka.partitions = 4;
    env.create_topics().await;
    let topics = env.kafka.topics();
    let database = env.database_config("processor");
    let group = format!("processor-crash-{}", env.id);
    let seed = u64::from_str_radix(&env.id, 16).unwrap_or(7);
    eprintln!("crash test: seed {seed:#x}, logs in {}", env.scratch_dir().display());
    let mut fleet = Fleet {
        env: vec![
            ("ONCEFLOW_LISTEN", "127.0.0.1:0".to_owned()),
            ("ONCEFLOW_DATABASE__URL", database.url.clone()),
            ("ONCEFLOW_KAFKA__BROKERS", env.kafka.brokers.clone()),
            ("ONCEFLOW_KAFKA__TOPIC_PREFIX", env.kafka.topic_prefix.clone()),
            ("ONCEFLOW_KAFKA__PARTITIONS", env.kafka.partitions.to_string()),
            ("ONCEFLOW_GROUP_ID", group.clone()),
            ("ONCEFLOW_TELEMETRY__LOG_FILTER", "warn".to_owned()),
        ],
        logs: env.scratch_dir(),
        slots: [None, None],
        started: 0,
        killed: 0,
    };
    let producer = kafka_producer(&env.kafka);
    let produced: Arc<Mutex<Vec<Produced>>> = Arc::default();

    // The accounts first, applied before the stream refers to them.
    for account in ACCOUNTS {
        let message = CommandMessage::open_account(account);
        let placed = send(&producer, &topics.commands, &message, None).await;
        produced.lock().unwrap().push(Produced { message, kind: Kind::Open, placed });
    }
    fleet.start(0);
    fleet.start(1);
    let db = processor_db(&env).await;
    let opens: Vec<Uuid> = produced.lock().unwrap().iter().map(|p| p.message.job_id).collect();
    wait_handled(&db, &opens, OUTCOME_TIMEOUT).await;

    let stop_stream = CancellationToken::new();
    let stream = tokio::spawn(stream_commands(
        producer.clone(),
        topics.commands.clone(),
        db.clone(),
        produced.clone(),
        Rng(seed),
        stop_stream.clone(),
    ));

    // Kill rounds: one of the two (its partitions move to the survivor once
    // its session times out), or both at once (the group starts over from
    // its committed offsets). The last kill leaves one survivor to finish.
    enum Kill {
        One(usize),
        Both,
        LastOne(usize),
    }
    let rounds = [Kill::One(0), Kill::Both, Kill::One(1), Kill::Both, Kill::One(0), Kill::Both, Kill::LastOne(1)];
    let mut redelivered_after_kills = Vec::new();
    for (round, kill) in rounds.iter().enumerate() {
        let from = count(&db, "SELECT count(*) FROM inbox").await;
        let what = format!("{PROGRESS_BEFORE_KILL} more commands handled before kill round {round}");
        eventually(&what, OUTCOME_TIMEOUT, || async {
            fleet_progress(&db, from).await.filter(|&progress| progress >= PROGRESS_BEFORE_KILL)
        })
        .await;
        match *kill {
            Kill::One(slot) => {
                fleet.kill(slot);
                fleet.start(slot);
            }
            Kill::LastOne(slot) => fleet.kill(slot),
            Kill::Both => {
                fleet.kill(0);
                fleet.kill(1);
                // Nobody commits now: what is handled but uncommitted is
                // exactly what the restarted group gets again.
                let snapshot = produced.lock().unwrap().clone();
                redelivered_after_kills.push(handled_but_uncommitted(&env, &group, &db, &snapshot).await);
                fleet.start(0);
                fleet.start(1);
            }
        }
    }
    stop_stream.cancel();
    stream.await.expect("the command stream");
    let produced = produced.lock().unwrap().clone();
    let ids: Vec<Uuid> = produced.iter().map(|p| p.message.job_id).collect();
    wait_handled(&db, &ids, OUTCOME_TIMEOUT * 2).await;
    fleet.assert_alive();
    let results = published_results(&env, &db).await;
    let run_time = began.elapsed();

    // Every command handled exactly once, with the outcome its kind allows.
    let inbox = inbox(&db).await;
    assert_eq!(inbox.len(), produced.len(), "one inbox row per distinct command");
    let mut succeeded_deposits = 0;
    let mut expected_postings = HashMap::new();
    for p in &produced {
        let outcome = inbox.get(&p.message.job_id).map(String::as_str);
        match &p.kind {
            Kind::Open => assert_eq!(outcome, Some("succeeded"), "opening {}", p.message.id()),
            Kind::Deposit { amount, .. } => {
                assert_eq!(outcome, Some("succeeded"), "deposit {} into an open account", p.message.id());
                succeeded_deposits += amount;
                expected_postings.insert(p.message.job_id, &p.kind);
            }
            Kind::Transfer { .. } => {
                assert!(matches!(outcome, Some("succeeded" | "failed")), "transfer {}: {outcome:?}", p.message.id());
                if outcome == Some("succeeded") {
                    expected_postings.insert(p.message.job_id, &p.kind);
                }
            }
            Kind::Poison => assert_eq!(outcome, Some("dead_lettered"), "poison {}", p.message.id()),
        }
    }

    // One posting per applied deposit or transfer, each balanced and as commanded.
    let postings: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT posting_id, kind FROM postings").fetch_all(&db).await.unwrap();
    assert_eq!(postings.len(), expected_postings.len(), "one posting per applied deposit and transfer");
    let entries: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT posting_id, account_id, amount FROM entries").fetch_all(&db).await.unwrap();
    let mut by_posting: HashMap<Uuid, Vec<(String, i64)>> = HashMap::new();
    for (posting, account, amount) in entries {
        by_posting.entry(posting).or_default().push((account, amount));
    }
    assert_eq!(by_posting.len(), postings.len(), "every posting has entries, and no entry lacks its posting");
    for (posting, kind) in &postings {
        let expected =
            expected_postings.get(posting).unwrap_or_else(|| panic!("posting {posting} of no applied command"));
        let mut lines = by_posting[posting].clone();
        lines.sort_by_key(|(_, amount)| *amount);
        assert_eq!(lines.iter().map(|(_, amount)| amount).sum::<i64>(), 0, "posting {posting} balances");
        let wanted = match expected {
            Kind::Deposit { account, amount } => {
                assert_eq!(kind, "deposit");
                vec![("world:EUR".to_owned(), -amount), ((*account).to_owned(), *amount)]
            }
            Kind::Transfer { from, to, amount } => {
                assert_eq!(kind, "transfer");
                vec![((*from).to_owned(), -amount), ((*to).to_owned(), *amount)]
            }
            other => panic!("no posting expected for {other:?}"),
        };
        assert_eq!(lines, wanted, "posting {posting}");
    }

    // The ledger's invariant: customer money is exactly what was deposited,
    // and each balance is the sum of its entries.
    let balances: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT a.account_id, a.balance, coalesce(sum(e.amount), 0)::bigint
         FROM accounts a LEFT JOIN entries e USING (tenant, account_id) GROUP BY a.account_id, a.balance",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    for (account, balance, entries) in &balances {
        assert_eq!(balance, entries, "{account}'s balance is the sum of its entries");
    }
    let customer_money: i64 = balances.iter().filter(|(a, ..)| !a.starts_with("world:")).map(|(_, b, _)| b).sum();
    let deposited: i64 =
        produced.iter().map(|p| if let Kind::Deposit { amount, .. } = p.kind { amount } else { 0 }).sum();
    assert_eq!(customer_money, deposited, "the sum of all balances is the sum of all deposits");
    assert_eq!(customer_money, succeeded_deposits);
    assert_eq!(balance(&db, "world:EUR").await, -deposited);

    // Every job has exactly one terminal result (a relay killed before deleting
    // its outbox rows publishes some again, with the same event id).
    let mut terminal: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (_, event) in &results {
        assert!(event.status.is_terminal(), "{event:?}");
        terminal.entry(event.job_id.as_str()).or_default().insert(event.event_id.as_str());
    }
    assert_eq!(terminal.len(), produced.len(), "a result for every job and no other");
    for p in &produced {
        let job_id = p.message.id();
        let events = terminal.get(job_id.as_str()).unwrap_or_else(|| panic!("no result for {job_id}"));
        assert_eq!(events.len(), 1, "job {job_id} has {} distinct terminal results", events.len());
        let event = &results.iter().find(|(_, e)| e.job_id == job_id).unwrap().1;
        assert_eq!(Some(event.status.as_str()), inbox.get(&p.message.job_id).map(String::as_str), "job {job_id}");
        if event.status == JobStatus::Failed {
            assert_eq!(event.error.as_ref().map(|e| e.code.as_str()), Some("insufficient_funds"));
        }
    }
    let republished_results = results.len() - produced.len();

    // Every poison command reached the dead-letter topic.
    let dead_letters = read_topic_to_end(&env.kafka, &topics.dead_letter, OUTCOME_TIMEOUT).await;
    let dead_lettered: HashSet<&str> =
        dead_letters.iter().filter_map(|r| r.record.headers.get("message-id").map(String::as_str)).collect();
    let poison: Vec<String> =
        produced.iter().filter(|p| matches!(p.kind, Kind::Poison)).map(|p| p.message.id()).collect();
    for id in &poison {
        assert!(dead_lettered.contains(id.as_str()), "poison {id} is on the dead-letter topic");
    }

    // The kills really hit the window between the database commit and the
    // offset commit; otherwise this test proved less than it claims.
    let redelivered: usize = redelivered_after_kills.iter().sum();
    assert!(redelivered > 0, "no kill left a handled command with an uncommitted offset: {redelivered_after_kills:?}");

    let transfers = produced.iter().filter(|p| matches!(p.kind, Kind::Transfer { .. })).count();
    let failed = inbox.values().filter(|outcome| *outcome == "failed").count();
    eprintln!(
        "crash test: {} commands ({} opens, {} deposits, {transfers} transfers of which {failed} refused, {} poison); \
         {} processes started, {} SIGKILLed; handled-but-uncommitted at the kill-both rounds \
         {redelivered_after_kills:?} (redelivered and deduplicated); {republished_results} results republished \
         (same event id), {} dead letters for {} poison; {:.1} s",
        produced.len(),
        produced.iter().filter(|p| matches!(p.kind, Kind::Open)).count(),
        produced.iter().filter(|p| matches!(p.kind, Kind::Deposit { .. })).count(),
        poison.len(),
        fleet.started,
        fleet.killed,
        dead_letters.len(),
        poison.len(),
        run_time.as_secs_f64(),
    );

    let logs = fleet.logs.clone();
    drop(fleet);
    db.close().await;
    env.teardown().await;
    // Passed: the processes' logs are of no more use.
    let _ = std::fs::remove_dir_all(logs);
}

/// Inbox rows added since `from`.
async fn fleet_progress(db: &PgPool, from: i64) -> Option<usize> {
    let now: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox").fetch_one(db).await.ok()?;
    usize::try_from(now - from).ok()
}

// ---------------------------------------------------------------------------
// Redrive of dead letters.
// ---------------------------------------------------------------------------

pub(crate) const ADMIN_TOKEN: &str = "test-admin-token";

pub(crate) async fn redrive(processor: &onceflow_tests::Service, message_id: &str, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(processor.url(&format!("/admin/dead-letters/{message_id}/redrive")))
        .bearer_auth(token)
        .send()
        .await
        .expect("redrive request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn outcome_of(db: &PgPool, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT outcome FROM inbox WHERE message_id = $1").bind(id).fetch_optional(db).await.unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retrying_command_holds_up_only_its_own_partition() {
    let mut env = TestEnv::new();
    let processor = env
        .start_processor_with(|config| {
            config.lanes = 4;
            config.retry.base_delay_ms = 20;
            config.retry.max_delay_ms = 100;
        })
        .await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;

    // Postings of account `stuck` fail transiently until repaired.
    sqlx::raw_sql(
        "CREATE FUNCTION fail_stuck() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.account_id = 'stuck' THEN
                 RAISE EXCEPTION 'injected fault' USING ERRCODE = 'serialization_failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_stuck BEFORE INSERT ON entries FOR EACH ROW EXECUTE FUNCTION fail_stuck();",
    )
    .execute(&db)
    .await
    .expect("inject the fault");

    // `stuck` on partition 0, `free` on partition 1: different lanes.
    let opens = [CommandMessage::open_account("stuck"), CommandMessage::open_account("free")];
    send(&producer, &topics.commands, &opens[0], Some(0)).await;
    send(&producer, &topics.commands, &opens[1], Some(1)).await;
    wait_handled(&db, &[opens[0].job_id, opens[1].job_id], OUTCOME_TIMEOUT).await;
    let stuck = CommandMessage::deposit("stuck", 100);
    send(&producer, &topics.commands, &stuck, Some(0)).await;
    let free: Vec<CommandMessage> = (0..5).map(|_| CommandMessage::deposit("free", 10)).collect();
    for message in &free {
        send(&producer, &topics.commands, message, Some(1)).await;
    }

    // The other partition's commands all apply while `stuck` is still retrying.
    wait_handled(&db, &free.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;
    assert!(!inbox(&db).await.contains_key(&stuck.job_id), "the stuck deposit is still being retried");
    assert_eq!(balance(&db, "free").await, 50);

    // Repaired, the stuck one applies too, once.
    sqlx::raw_sql("DROP TRIGGER fail_stuck ON entries").execute(&db).await.expect("repair");
    wait_handled(&db, &[stuck.job_id], OUTCOME_TIMEOUT).await;
    assert_eq!(balance(&db, "stuck").await, 100);
    processor.stop().await;
    db.close().await;
    env.teardown().await;
}

// ---------------------------------------------------------------------------
// A database outage.
// ---------------------------------------------------------------------------

/// How long the outage lasts: longer than the old bound on retries (five
/// attempts, each up to the pool's 5 s acquire timeout, about 30 s), after
/// which the head command of every lane used to be dead-lettered.
const OUTAGE: Duration = Duration::from_secs(35);

/// Refuse (or allow again) every connection to `database`, from a session
/// on another database: ALLOW_CONNECTIONS binds superusers too, which a
/// CONNECTION LIMIT does not.
async fn allow_connections(admin: &PgPool, database: &str, allow: bool) {
    sqlx::query(&format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allow}"))
        .execute(admin)
        .await
        .expect("alter the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_dead_letters_nothing_and_every_command_applies_once() {
    let mut env = TestEnv::new();
    let processor = env.start_processor().await;
    let topics = env.kafka.topics();
    let producer = kafka_producer(&env.kafka);
    let db = processor_db(&env).await;
    let url = env.database_url("processor");
    let (server, database) = url.rsplit_once('/').expect("a database url");
    let admin = PgPool::connect(&format!("{server}/postgres")).await.expect("the server's admin database");

    let accounts = ["ola", "oskar"];
    let opens: Vec<CommandMessage> = accounts.iter().map(|a| CommandMessage::open_account(a)).collect();
    for (partition, open) in (0..).zip(&opens) {
        send(&producer, &topics.commands, open, Some(partition)).await;
    }
    wait_handled(&db, &opens.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;

    // The database goes away: no new session, every session of the processor cut.
    allow_connections(&admin, database, false).await;
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE datname = $1 AND pid <> pg_backend_pid()) AS t",
    )
    .bind(database)
    .fetch_one(&admin)
    .await
    .expect("cut the processor's sessions");
    eprintln!("outage: {cut} sessions cut");
    db.close().await;

    // Commands arrive on both partitions during the outage.
    let deposits: Vec<CommandMessage> =
        (0..10).map(|i| CommandMessage::deposit(accounts[i % 2], i64::try_from(i).unwrap() + 1)).collect();
    for (i, deposit) in deposits.iter().enumerate() {
        send(&producer, &topics.commands, deposit, Some(i32::try_from(i % 2).unwrap())).await;
    }
    tokio::time::sleep(OUTAGE).await;
    allow_connections(&admin, database, true).await;

    // Back: every command applies, once, and nothing was dead-lettered.
    let db = processor_db(&env).await;
    wait_handled(&db, &deposits.iter().map(|m| m.job_id).collect::<Vec<_>>(), OUTCOME_TIMEOUT).await;
    let outcomes = inbox(&db).await;
    assert!(outcomes.values().all(|outcome| outcome == "succeeded"), "{outcomes:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0, "an outage dead-letters nothing");
    assert_eq!(balance(&db, "ola").await, 1 + 3 + 5 + 7 + 9);
    assert_eq!(balance(&db, "oskar").await, 2 + 4 + 6 + 8 + 10);
    assert_eq!(count(&db, "SELECT count(*) FROM postings").await, 10, "each deposit applied once");
    let results = published_results(&env, &db).await;
    for deposit in &deposits {
        let events = results_of(&results, &deposit.id());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].status, JobStatus::Succeeded);
    }

    processor.stop().await;
    db.close().await;
    admin.close().await;
    env.teardown().await;
}
