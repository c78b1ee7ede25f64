//! The command worker: consumes `onceflow.commands` and applies each command
//! exactly once.
//!
//! For every message, one PostgreSQL transaction holds the inbox row (keyed by
//! the message id), the handler's effect and the result's outbox row. The
//! message's offset is stored only after that transaction commits, so a crash
//! anywhere means redelivery, and redelivery of an applied message finds its
//! inbox row and does nothing. Effects are therefore exactly once even though
//! Kafka delivers at least once.
//!
//! Failures are classified: a business refusal is a `failed` result; a
//! transient error is retried with full-jitter backoff up to a bound; a poison
//! message (no valid envelope, undecodable body, unknown type, payload that
//! does not fit its type) or one that exhausted its retries goes to the
//! dead-letter topic and, when its job is known, ends with a `dead_lettered`
//! result. The worker never stops on a message. A dead letter with an envelope
//! is also kept in the `dead_letters` table, from which an operator redrives
//! it ([`crate::admin`]); a redriven message is applied once more, and only
//! once, because the pending redrive is consumed in the effect's transaction.
//!
//! Assigned partitions are spread over `lanes` tasks (partition % lanes), each
//! applying its partitions' messages one at a time: a key's commands stay in
//! order (one key, one partition), and a slow or retrying command holds up
//! only its own lane.
//!
//! A message's offset is stored only once the message reached one of those
//! ends. A message abandoned half-way (shutdown during a retry's backoff, or
//! while the dead-letter topic is unreachable) keeps its offset unstored, so
//! the next owner of its partition gets it again.

use std::{sync::Arc, time::Duration};

use onceflow_contracts::{Command, Envelope, JobError, JobStatus, ResultEvent, schema, topics::Topics};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::{kafka, telemetry};
use rdkafka::{
    Message as _,
    consumer::{Consumer as _, StreamConsumer},
    message::{Header, Headers as _, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    config::RetryConfig,
    handlers::{CommandContext, HandlerError, Progress, Registry},
};

/// Headers the worker adds to a dead-lettered message.
pub const DLQ_ERROR_CODE: &str = "dlq-error-code";
pub const DLQ_ERROR_MESSAGE: &str = "dlq-error-message";
pub const DLQ_ORIGINAL_TOPIC: &str = "dlq-original-topic";
pub const DLQ_ORIGINAL_PARTITION: &str = "dlq-original-partition";
pub const DLQ_ORIGINAL_OFFSET: &str = "dlq-original-offset";

/// Everything the worker needs.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub registry: Registry,
    pub topics: Topics,
    pub retry: RetryConfig,
    /// How many partitions-in-order lanes run in parallel.
    pub lanes: usize,
}

/// Messages queued per lane before the dispatcher waits for room.
const LANE_CAPACITY: usize = 64;

/// Why a message goes to the dead-letter topic.
#[derive(Debug)]
struct Poison {
    code: &'static str,
    message: String,
}

impl Poison {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// The job a command message belongs to, as far as the message tells.
#[derive(Debug, Clone)]
struct JobRef {
    job_id: String,
    tenant: String,
    command_type: String,
    callback_url: Option<String>,
}

impl JobRef {
    fn of(command: &Command) -> Self {
        Self {
            job_id: command.job_id.clone(),
            tenant: command.tenant.clone(),
            command_type: command.command_type.clone(),
            callback_url: command.callback_url.clone(),
        }
    }

    /// The job of a message whose body cannot be read, from its envelope
    /// alone: a command's `message-id` is its job id (ingest sets it so; see
    /// `CommandHeaders` in asyncapi.yaml), so its job can still be ended.
    fn from_envelope(envelope: &Envelope) -> Self {
        Self {
            job_id: envelope.message_id.to_string(),
            tenant: envelope.tenant.clone(),
            command_type: envelope.message_type.clone(),
            callback_url: None,
        }
    }
}

/// A command that decoded and has a handler.
struct Parsed {
    job: JobRef,
    context: CommandContext,
}

/// What became of one message.
enum Outcome {
    Applied(JobStatus),
    Duplicate,
}

/// Whether a message reached its end, so its offset may be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
enum Handled {
    /// Applied, refused, recognised as a duplicate, or dead-lettered.
    Done,
    /// Shutdown came first: the message must be delivered again.
    Abandoned,
}

impl Worker {
    /// Consume until `shutdown`, then return (offsets stored so far are
    /// committed when the consumer is dropped).
    pub async fn run(self, consumer: StreamConsumer, shutdown: CancellationToken) {
        let consumer = Arc::new(consumer);
        let lanes = self.lanes.max(1);
        let mut queues = Vec::with_capacity(lanes);
        let mut running = JoinSet::new();
        for _ in 0..lanes {
            // Bounded: a busy lane makes the dispatcher wait, which pauses
            // consumption instead of buffering without bound.
            let (queue, receiver) = mpsc::channel::<OwnedMessage>(LANE_CAPACITY);
            queues.push(queue);
            running.spawn(self.clone().lane(receiver, consumer.clone(), shutdown.clone()));
        }
        while let Some(message) = kafka::next_message(&consumer, &shutdown).await {
            // One lane per partition keeps each partition (and so each key) in order.
            let lane = usize::try_from(message.partition()).unwrap_or(0) % lanes;
            let sent = tokio::select! {
                () = shutdown.cancelled() => break,
                sent = queues[lane].send(message) => sent,
            };
            if sent.is_err() {
                // The lane stopped (it abandoned a message on shutdown).
                break;
            }
        }
        drop(queues);
        while running.join_next().await.is_some() {}
        // Send the offsets stored since the last automatic commit.
        if let Err(error) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(%error, "final offset commit");
        }
    }

    /// One lane: its messages one at a time, each offset stored once the
    /// message reached its end. A message of a partition this instance lost in
    /// a rebalance may still be handled here; its new owner gets it too, and
    /// the inbox makes the second handling a no-op.
    async fn lane(
        self,
        mut queue: mpsc::Receiver<OwnedMessage>,
        consumer: Arc<StreamConsumer>,
        shutdown: CancellationToken,
    ) {
        while let Some(message) = queue.recv().await {
            if shutdown.is_cancelled() || self.handle(&message, &shutdown).await == Handled::Abandoned {
                // Storing this offset would skip a command that has not taken
                // effect; left unstored, the partition's next owner gets it.
                tracing::info!(
                    partition = message.partition(),
                    offset = message.offset(),
                    "shutdown before the message was handled; it will be redelivered"
                );
                return;
            }
            if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
                tracing::warn!(%error, "cannot store offset; the message may be redelivered");
            }
        }
    }

    /// Handle one message to its end: applied, duplicate, or dead-lettered
    /// (or abandoned on shutdown).
    async fn handle(&self, message: &OwnedMessage, shutdown: &CancellationToken) -> Handled {
        let envelope = match kafka::envelope_of(message) {
            Ok(envelope) => envelope,
            Err(error) => {
                let poison = Poison::new("invalid_envelope", error.to_string());
                return self.dead_letter(message, None, &poison, shutdown).await;
            }
        };
        let span = tracing::info_span!(
            "process_command",
            correlation_id = %envelope.correlation_id,
            message_id = %envelope.message_id,
            tenant = %envelope.tenant,
            command_type = %envelope.message_type,
        );
        telemetry::set_parent_from(&span, envelope.traceparent.as_deref(), envelope.tracestate.as_deref());
        self.handle_enveloped(message, envelope, shutdown).instrument(span).await
    }

    async fn handle_enveloped(
        &self,
        message: &OwnedMessage,
        envelope: Envelope,
        shutdown: &CancellationToken,
    ) -> Handled {
        let parsed = match self.parse(message, &envelope) {
            Ok(parsed) => parsed,
            Err(poison) => {
                let job = match Command::decode(&envelope.schema_id, message.payload().unwrap_or_default()) {
                    Ok(command) => JobRef::of(&command),
                    Err(_) => JobRef::from_envelope(&envelope),
                };
                return self.dead_letter(message, Some((&envelope, &job)), &poison, shutdown).await;
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.apply(&envelope, &parsed).await {
                Ok(Outcome::Applied(status)) => {
                    metrics::counter!("onceflow_commands_processed_total", "status" => status.as_str()).increment(1);
                    tracing::info!(status = status.as_str(), attempt, "command applied");
                    return Handled::Done;
                }
                Ok(Outcome::Duplicate) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already applied");
                    return Handled::Done;
                }
                Err(HandlerError::Poison(reason)) => {
                    let poison = Poison::new("invalid_payload", reason);
                    return self.dead_letter(message, Some((&envelope, &parsed.job)), &poison, shutdown).await;
                }
                Err(error) if attempt >= self.retry.max_attempts => {
                    let poison = Poison::new("retries_exhausted", format!("after {attempt} attempts: {error}"));
                    return self.dead_letter(message, Some((&envelope, &parsed.job)), &poison, shutdown).await;
                }
                Err(error) => {
                    let delay = self.retry.delay(attempt);
                    tracing::warn!(%error, attempt, ?delay, "transient failure; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Handled::Abandoned,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn parse(&self, message: &OwnedMessage, envelope: &Envelope) -> Result<Parsed, Poison> {
        let command = Command::decode(&envelope.schema_id, message.payload().unwrap_or_default())
            .map_err(|e| Poison::new("undecodable", e.to_string()))?;
        if self.registry.get(&command.command_type).is_none() {
            return Err(Poison::new("unknown_command_type", format!("no handler for `{}`", command.command_type)));
        }
        let context = CommandContext {
            job_id: Uuid::parse_str(&command.job_id).map_err(|e| Poison::new("undecodable", format!("job_id: {e}")))?,
            tenant: command.tenant.clone(),
            command_type: command.command_type.clone(),
            payload: serde_json::from_str(&command.payload_json)
                .map_err(|e| Poison::new("invalid_payload", e.to_string()))?,
            progress: Progress::default(),
        };
        Ok(Parsed { job: JobRef::of(&command), context })
    }

    /// The one transaction: inbox row, effect, result in the outbox.
    async fn apply(&self, envelope: &Envelope, parsed: &Parsed) -> Result<Outcome, HandlerError> {
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, &parsed.job).await? {
            return Ok(Outcome::Duplicate);
        }
        let Some(handler) = self.registry.get(&parsed.job.command_type) else {
            return Err(HandlerError::Poison(format!("no handler for `{}`", parsed.job.command_type)));
        };
        // The effect runs on a savepoint so a refusal leaves nothing behind but
        // the inbox row and the failed result.
        let mut context = parsed.context.clone();
        context.progress = self.progress_sink(envelope, &parsed.job);
        let mut effect = sqlx::Connection::begin(&mut *tx).await?;
        let (status, result_json, error) = match handler(&mut effect, &context).await {
            Ok(result) => {
                effect.commit().await?;
                (JobStatus::Succeeded, Some(result.to_string()), None)
            }
            Err(HandlerError::Refused { code, message }) => {
                effect.rollback().await?;
                (JobStatus::Failed, None, Some(JobError { code: code.to_owned(), message }))
            }
            Err(other) => return Err(other),
        };
        record_outcome(&mut tx, envelope.message_id, status).await?;
        let event = self.result_event(envelope, &parsed.job, status, result_json, error);
        onceflow_outbox::enqueue(&mut tx, &self.result_message(envelope, &event)?).await.map_err(outbox_error)?;
        tx.commit().await?;
        Ok(Outcome::Applied(status))
    }

    /// Where a handler's progress goes: each report is a `processing` result
    /// event committed to the outbox in its own transaction (on another
    /// connection), so it is published, in order, before the command's result.
    fn progress_sink(&self, envelope: &Envelope, job: &JobRef) -> Progress {
        let worker = self.clone();
        let envelope = envelope.clone();
        let job = job.clone();
        Progress::new(std::sync::Arc::new(move |percent| {
            let (worker, envelope, job) = (worker.clone(), envelope.clone(), job.clone());
            Box::pin(async move {
                let mut event = worker.result_event(&envelope, &job, JobStatus::Processing, None, None);
                event.progress_percent = Some(percent);
                let message = worker.result_message(&envelope, &event)?;
                let mut tx = worker.pool.begin().await?;
                onceflow_outbox::enqueue(&mut tx, &message).await.map_err(outbox_error)?;
                tx.commit().await?;
                metrics::counter!("onceflow_progress_events_total").increment(1);
                Ok(())
            })
        }))
    }

    /// Send the original record, with its headers and the error, to the
    /// dead-letter topic; then end its job with a `dead_lettered` result when
    /// the job is known. Keeps trying while the broker or database is down,
    /// because storing the offset before this succeeds would lose the command;
    /// gives up only on shutdown, leaving the offset unstored.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        job: Option<(&Envelope, &JobRef)>,
        poison: &Poison,
        shutdown: &CancellationToken,
    ) -> Handled {
        tracing::warn!(code = poison.code, reason = %poison.message, "dead-lettering command");
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_dead_letter(message, job, poison).await {
                Ok(Outcome::Applied(_)) => break,
                Ok(Outcome::Duplicate) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already handled");
                    return Handled::Done;
                }
                Err(error) => {
                    tracing::warn!(%error, "dead-lettering failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Handled::Abandoned,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics::counter!("onceflow_commands_dead_lettered_total", "code" => poison.code).increment(1);
        Handled::Done
    }

    async fn try_dead_letter(
        &self,
        message: &OwnedMessage,
        job: Option<(&Envelope, &JobRef)>,
        poison: &Poison,
    ) -> anyhow::Result<Outcome> {
        // A redelivery of a message already handled (dead-lettered, or even
        // applied) adds nothing: no second dead letter, no second result. Only
        // a crash between the send below and the inbox commit can duplicate
        // the dead letter (with the same `message-id`).
        // A redriven message that fails again is dead-lettered again.
        if let Some((envelope, _)) = job
            && already_handled(&self.pool, envelope.message_id).await?
        {
            return Ok(Outcome::Duplicate);
        }
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        for (key, value) in [
            (DLQ_ERROR_CODE, poison.code),
            (DLQ_ERROR_MESSAGE, poison.message.as_str()),
            (DLQ_ORIGINAL_TOPIC, message.topic()),
            (DLQ_ORIGINAL_PARTITION, partition.as_str()),
            (DLQ_ORIGINAL_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        let mut record = FutureRecord::to(&self.topics.dead_letter).headers(headers);
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        self.producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error)?;

        let Some((envelope, job)) = job else { return Ok(Outcome::Applied(JobStatus::DeadLettered)) };
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, job).await? {
            return Ok(Outcome::Duplicate);
        }
        record_outcome(&mut tx, envelope.message_id, JobStatus::DeadLettered).await?;
        record_dead_letter(&mut tx, message, envelope, job, poison).await?;
        let error = JobError { code: poison.code.to_owned(), message: poison.message.clone() };
        let event = self.result_event(envelope, job, JobStatus::DeadLettered, None, Some(error));
        onceflow_outbox::enqueue(&mut tx, &self.result_message(envelope, &event)?).await?;
        tx.commit().await?;
        Ok(Outcome::Applied(JobStatus::DeadLettered))
    }

    fn result_event(
        &self,
        envelope: &Envelope,
        job: &JobRef,
        status: JobStatus,
        result_json: Option<String>,
        error: Option<JobError>,
    ) -> ResultEvent {
        ResultEvent {
            event_id: Uuid::now_v7().to_string(),
            job_id: job.job_id.clone(),
            tenant: job.tenant.clone(),
            correlation_id: envelope.correlation_id.clone(),
            command_type: job.command_type.clone(),
            status,
            progress_percent: None,
            result_json,
            error,
            callback_url: job.callback_url.clone(),
            occurred_at: chrono::Utc::now().timestamp_millis(),
        }
    }

    fn result_message(&self, cause: &Envelope, event: &ResultEvent) -> Result<OutboxMessage, HandlerError> {
        let payload = event.encode().map_err(|e| HandlerError::Poison(e.to_string()))?;
        let (traceparent, tracestate) = telemetry::current_trace_context();
        Ok(OutboxMessage {
            topic: self.topics.results.clone(),
            key: Some(event.job_id.clone()),
            payload,
            envelope: Envelope {
                message_id: Uuid::parse_str(&event.event_id).unwrap_or_else(|_| Uuid::now_v7()),
                correlation_id: cause.correlation_id.clone(),
                causation_id: Some(cause.message_id.to_string()),
                tenant: event.tenant.clone(),
                message_type: event.status.event_type(),
                schema_id: schema::RESULT.id.clone(),
                traceparent,
                tracestate,
            },
        })
    }
}

/// Insert the inbox row; `false` if the message was already handled.
///
/// The one exception: a message whose inbox outcome is `dead_lettered` and
/// that an operator redrove (see [`crate::admin`]) is claimed once more. The
/// pending redrive is consumed here, in the caller's transaction, so it is
/// used up exactly when the effect commits; a concurrent second delivery
/// blocks on the dead letter's row and then finds nothing pending.
async fn claim_inbox(tx: &mut sqlx::PgConnection, message_id: Uuid, job: &JobRef) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id, tenant, command_type, outcome) VALUES ($1, $2, $3, 'succeeded')
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(&job.tenant)
    .bind(&job.command_type)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(true);
    }
    let redriven = sqlx::query(
        "UPDATE dead_letters d SET redrive_pending = false, reapplied_at = now()
         FROM inbox i
         WHERE d.message_id = $1 AND d.redrive_pending AND i.message_id = d.message_id AND i.outcome = 'dead_lettered'",
    )
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    if redriven.rows_affected() == 1 {
        tracing::info!("redriven dead letter: applying it once more");
        metrics::counter!("onceflow_commands_redriven_total").increment(1);
        return Ok(true);
    }
    Ok(false)
}

/// Whether the message already has its inbox row (committed) and no redrive
/// of it is pending.
async fn already_handled(pool: &PgPool, message_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM inbox WHERE message_id = $1)
            AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE message_id = $1 AND redrive_pending)",
    )
    .bind(message_id)
    .fetch_one(pool)
    .await
}

/// Keep the dead-lettered record, as it arrived, for listing and redrive (a
/// message dead-lettered again after a redrive gets its row refreshed).
async fn record_dead_letter(
    tx: &mut sqlx::PgConnection,
    message: &OwnedMessage,
    envelope: &Envelope,
    job: &JobRef,
    poison: &Poison,
) -> Result<(), sqlx::Error> {
    let headers: Vec<serde_json::Value> = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .filter_map(|h| Some(serde_json::json!([h.key, std::str::from_utf8(h.value?).ok()?])))
                .collect()
        })
        .unwrap_or_default();
    sqlx::query(
        "INSERT INTO dead_letters (message_id, tenant, command_type, job_id, original_topic, original_partition,
                                   original_offset, message_key, headers, payload, error_code, error_message)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (message_id) DO UPDATE SET
             original_topic = EXCLUDED.original_topic, original_partition = EXCLUDED.original_partition,
             original_offset = EXCLUDED.original_offset, error_code = EXCLUDED.error_code,
             error_message = EXCLUDED.error_message, dead_lettered_at = now(), reapplied_at = NULL",
    )
    .bind(envelope.message_id)
    .bind(&job.tenant)
    .bind(&job.command_type)
    .bind(&job.job_id)
    .bind(message.topic())
    .bind(message.partition())
    .bind(message.offset())
    .bind(message.key().map(|key| String::from_utf8_lossy(key).into_owned()))
    .bind(serde_json::Value::Array(headers))
    .bind(message.payload().unwrap_or_default())
    .bind(poison.code)
    .bind(&poison.message)
    .execute(tx)
    .await?;
    Ok(())
}

async fn record_outcome(tx: &mut sqlx::PgConnection, message_id: Uuid, status: JobStatus) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE inbox SET outcome = $2 WHERE message_id = $1")
        .bind(message_id)
        .bind(status.as_str())
        .execute(tx)
        .await?;
    Ok(())
}

fn outbox_error(error: onceflow_outbox::Error) -> HandlerError {
    match error {
        onceflow_outbox::Error::Database(error) => HandlerError::Transient(error),
        other => HandlerError::Poison(other.to_string()),
    }
}
