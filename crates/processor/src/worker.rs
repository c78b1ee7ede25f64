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
//! Every message ends in one of three ways, or waits (guarantee G8):
//!
//! - **applied**: the effect and a `succeeded` result;
//! - **refused**: a `failed` result with a code and nothing of the effect
//!   (a business refusal such as `insufficient_funds` or
//!   `amount_out_of_range`, or `result_too_large` when the result would not
//!   fit in one Kafka record);
//! - **dead-lettered** (parked for an operator): a message that can never
//!   succeed as it is (no valid envelope, undecodable body, unknown type,
//!   payload that does not fit its type, or data the database refuses,
//!   PostgreSQL classes 22 and 23) goes to the dead-letter topic at once and,
//!   when its job is known, ends with a `dead_lettered` result whose error is
//!   a code and a message without database text (the full error is in the
//!   logs, the dead-letter headers and the `dead_letters` table);
//! - **waits**: an outage (lost connection, pool timeout, serialization
//!   failure, deadlock, server shutdown, broker unreachable), as sorted by
//!   [`Failure`], is waited out with [`onceflow_runtime::failure::Backoff`]
//!   and tried again, with no bound on the number of tries. An outage never
//!   dead-letters anything, and only the lane it hit waits.
//!
//! The dead-letter path follows the same rule: the record is kept
//! losslessly (its key as bytes, header values that are not UTF-8 text
//! base64-encoded, text cleaned of NUL where a text column needs it), so no
//! byte of it can make parking fail; a record the broker refuses on the
//! dead-letter topic as data (too large) is kept in the table only, with the
//! reason; only an outage makes it wait. A dead letter with an envelope is
//! kept in the `dead_letters` table, from which an operator redrives it
//! ([`crate::admin`]); a redriven message is applied once more, and only
//! once, because the pending redrive is consumed in the effect's transaction.
//!
//! A panic while handling one message (rdkafka panics on reading a header
//! whose name is not UTF-8) ends that message, dead-lettered without its
//! headers, never its lane.
//!
//! Assigned partitions are spread over `lanes` tasks (partition % lanes), each
//! applying its partitions' messages in order: a key's commands stay in
//! order (one key, one partition), and a slow or waiting command holds up
//! only its own lane. Under load a lane applies the messages it has waiting
//! as one batch, in one transaction ([`batch`]); anything out of the ordinary
//! sends the batch back through the one-message path described here.
//!
//! A message's offset is stored only once the message reached one of those
//! ends. A message abandoned half-way (shutdown while it waits out an outage)
//! keeps its offset unstored, so the next owner of its partition gets it again.

mod batch;

use std::{
    borrow::Cow,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use onceflow_contracts::{Command, Envelope, JobError, JobStatus, ResultEvent, schema, topics::Topics};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::{failure::Failure, kafka, telemetry, vitals::Vitals};
use rdkafka::{
    Message as _,
    consumer::Consumer as _,
    error::KafkaError,
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
    handlers::{CommandContext, HandlerError, Progress, Registered, Registry},
};

/// Headers the worker adds to a dead-lettered message.
pub const DLQ_ERROR_CODE: &str = "dlq-error-code";
pub const DLQ_ERROR_MESSAGE: &str = "dlq-error-message";
pub const DLQ_ORIGINAL_TOPIC: &str = "dlq-original-topic";
pub const DLQ_ORIGINAL_PARTITION: &str = "dlq-original-partition";
pub const DLQ_ORIGINAL_OFFSET: &str = "dlq-original-offset";

/// The job error code of a command whose data the database refused.
pub const INVALID_DATA: &str = "invalid_data";
/// The job error code of a command whose result does not fit in one Kafka record.
pub const RESULT_TOO_LARGE: &str = "result_too_large";

/// Everything the worker needs.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub registry: Registry,
    pub topics: Topics,
    /// The waits of a message whose database or broker is down.
    pub retry: RetryConfig,
    /// How many partitions-in-order lanes run in parallel.
    pub lanes: usize,
    /// The most commands a lane applies in one transaction.
    pub max_batch: usize,
    /// Where a lane that stops before shutdown is reported (`/readyz`).
    pub vitals: Vitals,
}

/// Messages queued per lane before the dispatcher waits for room.
const LANE_CAPACITY: usize = 64;
/// How long one send to the dead-letter topic may wait for the broker before
/// it counts as an outage and is tried again.
const DEAD_LETTER_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a message goes to the dead-letter topic.
#[derive(Debug)]
struct Poison {
    code: &'static str,
    /// The whole reason, for the logs, the dead-letter headers and the
    /// `dead_letters` table (operators' eyes only).
    detail: String,
    /// What the job's error tells the client, when the detail may carry text
    /// the client must not see (a database's error message).
    public: Option<String>,
}

impl Poison {
    fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into(), public: None }
    }

    /// Data the database refused (a PostgreSQL class 22 or 23 error).
    fn invalid_data(error: &sqlx::Error) -> Self {
        let sqlstate = match error {
            sqlx::Error::Database(database) => database.code().map(|code| format!(" (SQLSTATE {code})")),
            _ => None,
        };
        Self {
            code: INVALID_DATA,
            detail: error.to_string(),
            public: Some(format!("the database refused the command's data{}", sqlstate.unwrap_or_default())),
        }
    }

    fn job_error(&self) -> JobError {
        JobError {
            code: self.code.to_owned(),
            message: clean(self.public.as_ref().unwrap_or(&self.detail)).into_owned(),
        }
    }
}

/// Why applying a message stopped short of an end.
#[derive(Debug)]
enum Failed {
    /// It can never succeed as it is: dead-letter it.
    Poison(Poison),
    /// Something it needs is down: wait and try again.
    Outage(String),
}

impl Failed {
    /// Sorts it for [`Worker::through_outages`].
    fn into_poison(self) -> Result<Poison, Self> {
        match self {
            Self::Poison(poison) => Ok(poison),
            outage @ Self::Outage(_) => Err(outage),
        }
    }
}

/// Sorts a database error for [`Worker::through_outages`] with [`Failure::of_database`].
fn database_data(error: sqlx::Error) -> Result<sqlx::Error, sqlx::Error> {
    if Failure::of_database(&error).is_data() { Ok(error) } else { Err(error) }
}

/// Sorts a Kafka error for [`Worker::through_outages`] with [`Failure::of_kafka`].
fn kafka_data(error: KafkaError) -> Result<KafkaError, KafkaError> {
    if Failure::of_kafka(&error).is_data() { Ok(error) } else { Err(error) }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Poison(poison) => write!(f, "{}: {}", poison.code, poison.detail),
            Self::Outage(error) => f.write_str(error),
        }
    }
}

impl From<Poison> for Failed {
    fn from(poison: Poison) -> Self {
        Self::Poison(poison)
    }
}

impl From<sqlx::Error> for Failed {
    fn from(error: sqlx::Error) -> Self {
        match Failure::of_database(&error) {
            Failure::Data => Self::Poison(Poison::invalid_data(&error)),
            Failure::Outage => Self::Outage(error.to_string()),
        }
    }
}

impl From<onceflow_outbox::Error> for Failed {
    fn from(error: onceflow_outbox::Error) -> Self {
        match error {
            onceflow_outbox::Error::Database(error) => error.into(),
            // Refused before anything was written: no retry makes it fit.
            too_large @ onceflow_outbox::Error::TooLarge { .. } => {
                Self::Poison(Poison::new(RESULT_TOO_LARGE, too_large.to_string()))
            }
            // Only the relay reports these; enqueue never does.
            relay @ (onceflow_outbox::Error::Undelivered { .. } | onceflow_outbox::Error::LeaseLost(_)) => {
                Self::Outage(relay.to_string())
            }
        }
    }
}

/// The job a command message belongs to, as far as the message tells.
#[derive(Debug, Clone)]
struct JobRef {
    job_id: String,
    tenant: String,
    command_type: String,
    callback_url: Option<String>,
    /// The Kafka key of the job's results: the command's own (made from its
    /// tenant and ordering key), so one key's results stay on one partition
    /// in the order they were applied.
    result_key: String,
}

impl JobRef {
    fn of(command: &Command, message: &OwnedMessage) -> Self {
        Self {
            job_id: command.job_id.clone(),
            tenant: command.tenant.clone(),
            command_type: command.command_type.clone(),
            callback_url: command.callback_url.clone(),
            result_key: result_key(message, &command.job_id),
        }
    }

    /// The job of a message whose body cannot be read, from its envelope
    /// alone: a command's `message-id` is its job id (ingest sets it so; see
    /// `CommandHeaders` in asyncapi.yaml), so its job can still be ended.
    fn from_envelope(envelope: &Envelope, message: &OwnedMessage) -> Self {
        let job_id = envelope.message_id.to_string();
        Self {
            result_key: result_key(message, &job_id),
            job_id,
            tenant: envelope.tenant.clone(),
            command_type: envelope.message_type.clone(),
            callback_url: None,
        }
    }

    /// The same job with every text fit for a text column (see [`clean`]).
    fn cleaned(&self) -> Self {
        Self {
            job_id: clean(&self.job_id).into_owned(),
            tenant: clean(&self.tenant).into_owned(),
            command_type: clean(&self.command_type).into_owned(),
            callback_url: self.callback_url.as_deref().map(|url| clean(url).into_owned()),
            result_key: clean(&self.result_key).into_owned(),
        }
    }
}

/// The Kafka key of a command's results: the command record's own key, or
/// the job id for a record whose key is missing or not text (one no ingest
/// made).
fn result_key(message: &OwnedMessage, job_id: &str) -> String {
    match message.key().map(std::str::from_utf8) {
        Some(Ok(key)) if !key.is_empty() && !key.contains('\0') => key.to_owned(),
        _ => job_id.to_owned(),
    }
}

/// `text` without NUL, which no PostgreSQL text or JSON value can hold: each
/// becomes U+FFFD. Used where a dead letter's text goes into a column; the
/// record's exact bytes are kept beside it (key, headers, payload).
fn clean(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(text) }
}

/// `envelope` with every text fit for a text column (see [`clean`]).
fn cleaned_envelope(envelope: &Envelope) -> Envelope {
    let owned = |text: &str| clean(text).into_owned();
    Envelope {
        message_id: envelope.message_id,
        correlation_id: owned(&envelope.correlation_id),
        causation_id: envelope.causation_id.as_deref().map(owned),
        tenant: owned(&envelope.tenant),
        message_type: owned(&envelope.message_type),
        schema_id: owned(&envelope.schema_id),
        traceparent: envelope.traceparent.as_deref().map(owned),
        tracestate: envelope.tracestate.as_deref().map(owned),
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

impl Outcome {
    /// Its metrics and log line, inside the command's span; `took` is the
    /// time from the processor taking the command to its end's commit.
    fn report(&self, command_type: &'static str, took: Duration) {
        match self {
            Self::Applied(status) => {
                metrics::counter!("onceflow_commands_processed_total", "status" => status.as_str()).increment(1);
                record_duration(command_type, status.as_str(), took);
                tracing::info!(status = status.as_str(), "command applied");
            }
            Self::Duplicate => {
                metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                record_duration(command_type, "duplicate", took);
                tracing::info!("duplicate delivery; already applied");
            }
        }
    }
}

/// `onceflow_command_duration_seconds`: by command type (a registered one, or
/// `unknown`) and outcome.
fn record_duration(command_type: &'static str, outcome: &'static str, took: Duration) {
    metrics::histogram!("onceflow_command_duration_seconds", "type" => command_type, "outcome" => outcome)
        .record(took.as_secs_f64());
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
    pub async fn run(self, consumer: kafka::Consumer, shutdown: CancellationToken) {
        let consumer = Arc::new(consumer);
        let lanes = self.lanes.max(1);
        let mut queues = Vec::with_capacity(lanes);
        let mut running = JoinSet::new();
        for lane in 0..lanes {
            // Bounded: a busy lane makes the dispatcher wait, which pauses
            // consumption instead of buffering without bound.
            let (queue, receiver) = mpsc::channel::<OwnedMessage>(LANE_CAPACITY);
            queues.push(queue);
            let task = self.clone().lane(receiver, consumer.clone(), shutdown.clone());
            running.spawn(self.vitals.watch(format!("lane {lane}"), &shutdown, task));
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

    /// One lane: its messages in order, each offset stored once the message
    /// reached its end. The messages waiting in the queue when the lane is
    /// free are taken together, up to `max_batch`, and applied as one batch
    /// (see [`batch`]); a lane never waits to fill a batch, so a lone command
    /// costs no latency. A message of a partition this instance lost in a
    /// rebalance may still be handled here; its new owner gets it too, and
    /// the inbox makes the second handling a no-op.
    async fn lane(
        self,
        mut queue: mpsc::Receiver<OwnedMessage>,
        consumer: Arc<kafka::Consumer>,
        shutdown: CancellationToken,
    ) {
        let max_batch = self.max_batch.max(1);
        let mut batch = Vec::with_capacity(max_batch);
        while let Some(message) = queue.recv().await {
            batch.push(message);
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let done = self.handle_batch(&batch, &shutdown).await;
            for message in &batch[..done] {
                if let Err(error) = consumer.store_offset(message.topic(), message.partition(), message.offset()) {
                    tracing::warn!(%error, "cannot store offset; the message may be redelivered");
                }
            }
            if let Some(message) = batch.get(done) {
                // Storing this offset would skip a command that has not taken
                // effect; left unstored, the partition's next owner gets it.
                tracing::info!(
                    partition = message.partition(),
                    offset = message.offset(),
                    "shutdown before the message was handled; it will be redelivered"
                );
                return;
            }
            batch.clear();
        }
    }

    /// [`Self::handle`] in a task of its own, so that a panic handling one
    /// message ends that message, not the lane. The one known panic is
    /// rdkafka's on reading a header whose *name* is not UTF-8 (which the
    /// protocol allows): such a record is dead-lettered without its headers,
    /// the only part of it that cannot be read.
    async fn handle_guarded(&self, message: OwnedMessage, shutdown: &CancellationToken) -> Handled {
        let message = Arc::new(message);
        let task = {
            let (worker, message, shutdown) = (self.clone(), message.clone(), shutdown.clone());
            tokio::spawn(async move { worker.handle(&message, &shutdown).await })
        };
        match task.await {
            Ok(handled) => handled,
            Err(error) => {
                tracing::error!(
                    %error,
                    partition = message.partition(),
                    offset = message.offset(),
                    "handling the message panicked; dead-lettering it without its headers"
                );
                let poison = Poison::new("unreadable_headers", format!("handling the record panicked: {error}"));
                let send = || self.send_to_dead_letter_topic(&message, &poison, false);
                match self.through_outages("dead_letter", shutdown, kafka_data, send).await {
                    None => Handled::Abandoned,
                    Some(Ok(())) => Handled::Done,
                    Some(Err(error)) => {
                        tracing::error!(%error, "the dead-letter topic refused the record too; it is dropped");
                        Handled::Done
                    }
                }
            }
        }
    }

    /// Handle one message to its end: applied, refused, duplicate, or
    /// dead-lettered (or abandoned on shutdown while it waits out an outage).
    async fn handle(&self, message: &OwnedMessage, shutdown: &CancellationToken) -> Handled {
        let envelope = match kafka::envelope_of(message) {
            Ok(envelope) => envelope,
            Err(error) => {
                let poison = Poison::new("invalid_envelope", error.to_string());
                return self.dead_letter(message, None, &poison, shutdown).await;
            }
        };
        let span = command_span(message, &envelope);
        self.handle_enveloped(message, envelope, shutdown).instrument(span).await
    }

    async fn handle_enveloped(
        &self,
        message: &OwnedMessage,
        envelope: Envelope,
        shutdown: &CancellationToken,
    ) -> Handled {
        let started = Instant::now();
        let command_type = self.registry.label(&envelope.message_type);
        let parsed = match self.parse(message, &envelope) {
            Ok(parsed) => parsed,
            Err(poison) => {
                let job = match Command::decode(&envelope.schema_id, message.payload().unwrap_or_default()) {
                    Ok(command) => JobRef::of(&command, message),
                    Err(_) => JobRef::from_envelope(&envelope, message),
                };
                let handled = self.dead_letter(message, Some((&envelope, &job)), &poison, shutdown).await;
                record_duration(command_type, "dead_lettered", started.elapsed());
                return handled;
            }
        };
        let outcome =
            self.through_outages("apply", shutdown, Failed::into_poison, || self.apply(&envelope, &parsed)).await;
        match outcome {
            None => Handled::Abandoned,
            Some(Ok(outcome)) => {
                outcome.report(command_type, started.elapsed());
                Handled::Done
            }
            Some(Err(poison)) => {
                let handled = self.dead_letter(message, Some((&envelope, &parsed.job)), &poison, shutdown).await;
                record_duration(command_type, "dead_lettered", started.elapsed());
                handled
            }
        }
    }

    /// Run `attempt` until it ends in anything but an outage, waiting out
    /// each outage with the configured backoff and no bound on the number of
    /// tries (an outage must not end a record). `data` sorts an error: `Ok`
    /// with the data error that ends the record, or `Err` with the outage to
    /// wait out. `None` if shutdown came first.
    async fn through_outages<T, E, D, Fut>(
        &self,
        stage: &'static str,
        shutdown: &CancellationToken,
        data: impl Fn(E) -> Result<D, E>,
        mut attempt: impl FnMut() -> Fut,
    ) -> Option<Result<T, D>>
    where
        E: std::fmt::Display,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = self.retry.backoff();
        let mut waits = 0u64;
        loop {
            match attempt().await {
                Ok(value) => return Some(Ok(value)),
                Err(error) => match data(error) {
                    Ok(data_error) => return Some(Err(data_error)),
                    Err(outage) => {
                        waits += 1;
                        metrics::counter!("onceflow_outage_waits_total", "stage" => stage).increment(1);
                        tracing::warn!(error = %outage, stage, waits, "outage; the message waits and is tried again");
                        if !backoff.wait(shutdown).await {
                            return None;
                        }
                    }
                },
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
        Ok(Parsed { job: JobRef::of(&command, message), context })
    }

    /// The one transaction: inbox row, effect, result in the outbox.
    ///
    /// A result too large for one Kafka record ends the job `failed` with
    /// [`RESULT_TOO_LARGE`] and the effect rolled back: for a ledger, a
    /// `failed` job must mean that nothing moved, or a client retrying the
    /// "failed" deposit under a new key would apply it twice.
    async fn apply(&self, envelope: &Envelope, parsed: &Parsed) -> Result<Outcome, Failed> {
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, &parsed.job).await? {
            return Ok(Outcome::Duplicate);
        }
        let Some(Registered { handler, .. }) = self.registry.get(&parsed.job.command_type) else {
            let reason = format!("no handler for `{}`", parsed.job.command_type);
            return Err(Failed::Poison(Poison::new("unknown_command_type", reason)));
        };
        // The effect runs on a savepoint so a refusal leaves nothing behind but
        // the inbox row and the failed result.
        let mut context = parsed.context.clone();
        context.progress = self.progress_sink(envelope, &parsed.job);
        let mut effect = sqlx::Connection::begin(&mut *tx).await?;
        let error = match handler(&mut effect, &context).await {
            Ok(result) => {
                let event =
                    self.result_event(envelope, &parsed.job, JobStatus::Succeeded, Some(result.to_string()), None);
                match onceflow_outbox::enqueue(&mut effect, &self.result_message(envelope, &parsed.job, &event)?).await
                {
                    Ok(()) => {
                        effect.commit().await?;
                        None
                    }
                    Err(onceflow_outbox::Error::TooLarge { size, limit }) => {
                        effect.rollback().await?;
                        tracing::warn!(size, limit, "the result does not fit in one record; effect rolled back");
                        metrics::counter!("onceflow_results_too_large_total").increment(1);
                        Some(JobError {
                            code: RESULT_TOO_LARGE.to_owned(),
                            message: format!(
                                "the result would take {size} bytes, more than the {limit} one message carries; \
                                 nothing was changed"
                            ),
                        })
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            Err(HandlerError::Refused { code, message }) => {
                effect.rollback().await?;
                Some(JobError { code: code.to_owned(), message })
            }
            Err(HandlerError::Poison(reason)) => return Err(Failed::Poison(Poison::new("invalid_payload", reason))),
            Err(HandlerError::Database(error)) => return Err(error.into()),
        };
        let status = if error.is_some() { JobStatus::Failed } else { JobStatus::Succeeded };
        record_outcome(&mut tx, envelope.message_id, status).await?;
        if let Some(error) = error {
            let event = self.result_event(envelope, &parsed.job, status, None, Some(error));
            onceflow_outbox::enqueue(&mut tx, &self.result_message(envelope, &parsed.job, &event)?).await?;
        }
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
                let message =
                    worker.result_message(&envelope, &job, &event).map_err(|e| HandlerError::Poison(e.detail))?;
                let mut tx = worker.pool.begin().await?;
                onceflow_outbox::enqueue(&mut tx, &message).await.map_err(|error| match error {
                    onceflow_outbox::Error::Database(error) => HandlerError::Database(error),
                    other => HandlerError::Poison(other.to_string()),
                })?;
                tx.commit().await?;
                metrics::counter!("onceflow_progress_events_total").increment(1);
                Ok(())
            })
        }))
    }

    /// Park the message: the original record, with its headers and the
    /// error, on the dead-letter topic; then, when its job is known, its
    /// inbox row, its `dead_letters` row and a `dead_lettered` result, in one
    /// transaction. Each step waits out outages (storing the offset before
    /// the message is parked would lose the command) and gives up only on
    /// shutdown, leaving the offset unstored; no data error makes it loop.
    async fn dead_letter(
        &self,
        message: &OwnedMessage,
        job: Option<(&Envelope, &JobRef)>,
        poison: &Poison,
        shutdown: &CancellationToken,
    ) -> Handled {
        tracing::warn!(code = poison.code, reason = %poison.detail, "dead-lettering command");
        // A redelivery of a message already handled (dead-lettered, or even
        // applied) adds nothing: no second dead letter, no second result. Only
        // a crash between the send below and the inbox commit can duplicate
        // the dead letter (with the same `message-id`).
        // A redriven message that fails again is dead-lettered again.
        if let Some((envelope, _)) = job {
            let check = || already_handled(&self.pool, envelope.message_id);
            match self.through_outages("dead_letter", shutdown, database_data, check).await {
                None => return Handled::Abandoned,
                Some(Ok(true)) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already handled");
                    return Handled::Done;
                }
                Some(Ok(false)) => {}
                // Only a message id is bound: not reachable, and not a reason to stop.
                Some(Err(error)) => tracing::warn!(%error, "cannot tell whether the message was handled"),
            }
        }

        let send = || self.send_to_dead_letter_topic(message, poison, true);
        let topic_error = match self.through_outages("dead_letter", shutdown, kafka_data, send).await {
            None => return Handled::Abandoned,
            Some(Ok(())) => None,
            Some(Err(error)) => {
                // The broker will never take it (too large once the error
                // headers are added): the table keeps it, with why.
                tracing::error!(%error, "the dead-letter topic refused the record; it is kept in the table only");
                metrics::counter!("onceflow_dead_letters_off_topic_total").increment(1);
                Some(error.to_string())
            }
        };

        if let Some((envelope, job)) = job {
            let (envelope, job) = (cleaned_envelope(envelope), job.cleaned());
            let park = || self.park(message, &envelope, &job, poison, topic_error.as_deref());
            match self.through_outages("dead_letter", shutdown, database_data, park).await {
                None => return Handled::Abandoned,
                Some(Ok(Outcome::Applied(_))) => {}
                Some(Ok(Outcome::Duplicate)) => {
                    metrics::counter!("onceflow_commands_duplicate_total").increment(1);
                    tracing::info!("duplicate delivery; already handled");
                    return Handled::Done;
                }
                Some(Err(error)) => {
                    // Every text is cleaned and every byte kept as bytes, so
                    // this is not expected; looping on it would halt the lane.
                    tracing::error!(%error, on_topic = topic_error.is_none(), "cannot record the dead letter");
                    metrics::counter!("onceflow_dead_letters_unrecorded_total").increment(1);
                }
            }
        }
        metrics::counter!("onceflow_commands_dead_lettered_total", "code" => poison.code).increment(1);
        Handled::Done
    }

    /// The original record, its headers (unless `with_headers` is false) and
    /// the error's, on the dead-letter topic.
    async fn send_to_dead_letter_topic(
        &self,
        message: &OwnedMessage,
        poison: &Poison,
        with_headers: bool,
    ) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if with_headers && let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        for (key, value) in [
            (DLQ_ERROR_CODE, poison.code),
            (DLQ_ERROR_MESSAGE, poison.detail.as_str()),
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
        self.producer.send(record, DEAD_LETTER_SEND_TIMEOUT).await.map(|_| ()).map_err(|(error, _)| error)
    }

    /// The dead letter's inbox row, `dead_letters` row and `dead_lettered`
    /// result, in one transaction; `envelope` and `job` cleaned for text
    /// columns. A result that would not fit in one record is left out (only a
    /// record no ingest made can carry such texts): the dead letter is kept
    /// and listed all the same.
    async fn park(
        &self,
        message: &OwnedMessage,
        envelope: &Envelope,
        job: &JobRef,
        poison: &Poison,
        topic_error: Option<&str>,
    ) -> Result<Outcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !claim_inbox(&mut tx, envelope.message_id, job).await? {
            return Ok(Outcome::Duplicate);
        }
        record_outcome(&mut tx, envelope.message_id, JobStatus::DeadLettered).await?;
        record_dead_letter(&mut tx, message, envelope, job, poison, topic_error).await?;
        let event = self.result_event(envelope, job, JobStatus::DeadLettered, None, Some(poison.job_error()));
        match self.result_message(envelope, job, &event) {
            Ok(result) => match onceflow_outbox::enqueue(&mut tx, &result).await {
                Ok(()) => {}
                Err(onceflow_outbox::Error::Database(error)) => return Err(error),
                Err(error) => tracing::error!(%error, "the dead_lettered result is left out"),
            },
            Err(poison) => tracing::error!(reason = %poison.detail, "the dead_lettered result is left out"),
        }
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

    fn result_message(&self, cause: &Envelope, job: &JobRef, event: &ResultEvent) -> Result<OutboxMessage, Poison> {
        let payload = event.encode().map_err(|e| Poison::new("unencodable_result", e.to_string()))?;
        let (traceparent, tracestate) = telemetry::current_trace_context();
        Ok(OutboxMessage {
            topic: self.topics.results.clone(),
            key: Some(job.result_key.clone()),
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

/// The span of one command's handling: a CONSUMER span, a child of the
/// publish of `message`, whose envelope is `envelope`.
fn command_span(message: &OwnedMessage, envelope: &Envelope) -> tracing::Span {
    onceflow_runtime::consumer_span!(
        "process_command",
        message,
        envelope,
        message_id = %envelope.message_id,
        tenant = %envelope.tenant,
        command_type = %envelope.message_type,
    )
}

/// Insert the inbox row; `false` if the message was already handled.
///
/// The one exception: a message whose inbox outcome is `dead_lettered` and
/// that an operator redrove is claimed once more (see [`claim_redrive`]).
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
    claim_redrive(tx, message_id).await
}

/// Claim a message that already has its inbox row: `true` only if its
/// outcome is `dead_lettered` and an operator redrove it (see
/// [`crate::admin`]). The pending redrive is consumed here, in the caller's
/// transaction, so it is used up exactly when the effect commits; a
/// concurrent second delivery blocks on the dead letter's row and then finds
/// nothing pending.
async fn claim_redrive(tx: &mut sqlx::PgConnection, message_id: Uuid) -> Result<bool, sqlx::Error> {
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
/// message dead-lettered again after a redrive gets its row refreshed). Its
/// bytes are kept losslessly: the key as bytes, each header value as text when
/// it is UTF-8 without NUL and base64 otherwise; `envelope` and `job` are
/// already cleaned for text columns, and so is the error's text here.
async fn record_dead_letter(
    tx: &mut sqlx::PgConnection,
    message: &OwnedMessage,
    envelope: &Envelope,
    job: &JobRef,
    poison: &Poison,
    topic_error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let headers: Vec<serde_json::Value> = message
        .headers()
        .map(|headers| headers.iter().map(|header| stored_header(header.key, header.value)).collect())
        .unwrap_or_default();
    sqlx::query(
        "INSERT INTO dead_letters (message_id, tenant, command_type, job_id, original_topic, original_partition,
                                   original_offset, message_key, headers, payload, error_code, error_message,
                                   topic_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (message_id) DO UPDATE SET
             original_topic = EXCLUDED.original_topic, original_partition = EXCLUDED.original_partition,
             original_offset = EXCLUDED.original_offset, error_code = EXCLUDED.error_code,
             error_message = EXCLUDED.error_message, topic_error = EXCLUDED.topic_error,
             dead_lettered_at = now(), reapplied_at = NULL",
    )
    .bind(envelope.message_id)
    .bind(&job.tenant)
    .bind(&job.command_type)
    .bind(&job.job_id)
    .bind(clean(message.topic()))
    .bind(message.partition())
    .bind(message.offset())
    .bind(message.key())
    .bind(serde_json::Value::Array(headers))
    .bind(message.payload().unwrap_or_default())
    .bind(poison.code)
    .bind(clean(&poison.detail))
    .bind(topic_error.map(clean))
    .execute(tx)
    .await?;
    Ok(())
}

/// One header as the `dead_letters` table keeps it: `{"name", "value"}` for a
/// value that is UTF-8 text without NUL, `{"name", "base64"}` for any other
/// bytes, `{"name"}` for a header without a value (see migration 0003).
fn stored_header(name: &str, value: Option<&[u8]>) -> serde_json::Value {
    let name = clean(name);
    match value {
        None => serde_json::json!({"name": name}),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') => serde_json::json!({"name": name, "value": text}),
            _ => serde_json::json!({"name": name, "base64": base64::engine::general_purpose::STANDARD.encode(bytes)}),
        },
    }
}

async fn record_outcome(tx: &mut sqlx::PgConnection, message_id: Uuid, status: JobStatus) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE inbox SET outcome = $2 WHERE message_id = $1")
        .bind(message_id)
        .bind(status.as_str())
        .execute(tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_kept_as_text_or_as_base64_bytes() {
        assert_eq!(stored_header("tenant-id", Some(b"dev")), serde_json::json!({"name": "tenant-id", "value": "dev"}));
        assert_eq!(stored_header("x-nul", Some(b"a\0b")), serde_json::json!({"name": "x-nul", "base64": "YQBi"}));
        assert_eq!(stored_header("x-bin", Some(b"\xff\xfe")), serde_json::json!({"name": "x-bin", "base64": "//4="}));
        assert_eq!(stored_header("x-none", None), serde_json::json!({"name": "x-none"}));
    }

    #[test]
    fn only_nul_is_replaced_for_a_text_column() {
        assert!(matches!(clean("dev"), Cow::Borrowed("dev")));
        assert_eq!(clean("de\0v\0"), "de\u{FFFD}v\u{FFFD}");
    }

    #[test]
    fn a_data_error_tells_the_client_its_sqlstate_but_no_database_text() {
        let error = sqlx::Error::Encode("invalid byte sequence for encoding \"UTF8\": 0x00".into());
        let poison = Poison::invalid_data(&error);
        let job_error = poison.job_error();
        assert_eq!(job_error.code, INVALID_DATA);
        assert!(!job_error.message.contains("0x00"), "{}", job_error.message);
        assert!(poison.detail.contains("0x00"), "the operator still sees it: {}", poison.detail);
    }
}
