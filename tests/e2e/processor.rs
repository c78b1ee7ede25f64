//! The tools of the processor's tests, fed with records produced straight
//! onto its commands topic (the tests are in `processor_*.rs`; many other
//! modules use these too): a command record as ingest's relay puts it there,
//! and what the processor made of it (its inbox, the ledger, the results it
//! published, the operator's redrive of a dead letter).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use onceflow_contracts::{Command, Envelope, ResultEvent, payload::canonical_json, schema};
use onceflow_runtime::kafka::headers;
use onceflow_tests::{OUTCOME_TIMEOUT, PositionedRecord, Record, TestEnv, eventually, read_topic_to_end};
use rdkafka::{
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

pub(crate) const TENANT: &str = "dev";

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
    pub(crate) fn transfer(from: &str, to: &str, amount: i64) -> Self {
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
