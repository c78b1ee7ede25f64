//! The one-message path: a command's inbox row, effect and result in one
//! transaction, each outage waited out, each message that can never succeed
//! dead-lettered, a panic contained to its message.

use std::{future::Future, sync::Arc, time::Instant};

use onceflow_contracts::{Command, Envelope, JobError, JobStatus};
use onceflow_runtime::{failure::Failure, kafka};
use rdkafka::{Message as _, error::KafkaError, message::OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Handled, Outcome, RESULT_TOO_LARGE, Worker, command_span,
    dead_letter::Poison,
    inbox::{claim_inbox, record_outcome},
    record_duration,
    results::{JobRef, result_key},
};
use crate::{
    executions::store::{self, QueueKey, Wait},
    handlers::{CommandContext, HandlerError, Progress, Registered},
};

/// Why applying a message stopped short of an end.
#[derive(Debug)]
pub(super) enum Failed {
    /// It can never succeed as it is: dead-letter it.
    Poison(Poison),
    /// A row it needs is locked by someone else for longer than
    /// `inline_lock_timeout_ms`: hand it to an execution, so that only its
    /// key waits.
    Locked,
    /// Something it needs is down: wait and try again.
    Outage(String),
}

/// How an apply that did not end its message goes on.
#[derive(Debug)]
pub(super) enum Detour {
    DeadLetter(Poison),
    Defer,
}

impl Failed {
    /// Sorts it for [`Worker::through_outages`].
    pub(super) fn into_detour(self) -> Result<Detour, Self> {
        match self {
            Self::Poison(poison) => Ok(Detour::DeadLetter(poison)),
            Self::Locked => Ok(Detour::Defer),
            outage @ Self::Outage(_) => Err(outage),
        }
    }
}

/// Whether a database error is a lock wait that ran out (`lock_timeout`,
/// SQLSTATE 55P03): a row someone else holds, not an outage.
pub(crate) fn is_lock_timeout(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.code().as_deref() == Some("55P03"))
}

/// Sorts a database error for [`Worker::through_outages`] with [`Failure::of_database`].
pub(super) fn database_data(error: sqlx::Error) -> Result<sqlx::Error, sqlx::Error> {
    if Failure::of_database(&error).is_data() { Ok(error) } else { Err(error) }
}

/// Sorts a Kafka error for [`Worker::through_outages`] with [`Failure::of_kafka`].
pub(super) fn kafka_data(error: KafkaError) -> Result<KafkaError, KafkaError> {
    if Failure::of_kafka(&error).is_data() { Ok(error) } else { Err(error) }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Poison(poison) => write!(f, "{}: {}", poison.code, poison.detail),
            Self::Locked => f.write_str("a row it needs is locked"),
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
        if is_lock_timeout(&error) {
            return Self::Locked;
        }
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
/// A command that decoded and has a handler.
pub(crate) struct Parsed {
    pub(crate) job: JobRef,
    pub(crate) context: CommandContext,
    /// The queue it takes effect in: its ordering key, or its own.
    pub(crate) key: QueueKey,
}
impl Worker {
    /// [`Self::handle`] in a task of its own, so that a panic handling one
    /// message ends that message, not the lane. The one known panic is
    /// rdkafka's on reading a header whose *name* is not UTF-8 (which the
    /// protocol allows): such a record is dead-lettered without its headers,
    /// the only part of it that cannot be read.
    pub(super) async fn handle_guarded(&self, message: OwnedMessage, shutdown: &CancellationToken) -> Handled {
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
        let outcome = self
            .through_outages("apply", shutdown, Failed::into_detour, || self.apply(message, &envelope, &parsed))
            .await;
        let outcome = match outcome {
            None => return Handled::Abandoned,
            Some(Ok(outcome)) => outcome,
            Some(Err(Detour::DeadLetter(poison))) => {
                let handled = self.dead_letter(message, Some((&envelope, &parsed.job)), &poison, shutdown).await;
                record_duration(command_type, "dead_lettered", started.elapsed());
                return handled;
            }
            Some(Err(Detour::Defer)) => {
                // Its key waits for the row; the lane goes on. Recorded
                // without a lock timeout: only an outage stops it.
                let defer = || self.defer(message, &envelope, &parsed, Some(Wait::Locked));
                match self.through_outages("defer", shutdown, database_data, defer).await {
                    None => return Handled::Abandoned,
                    Some(Ok(outcome)) => outcome,
                    Some(Err(error)) => {
                        let poison = Poison::invalid_data(&error);
                        let handled =
                            self.dead_letter(message, Some((&envelope, &parsed.job)), &poison, shutdown).await;
                        record_duration(command_type, "dead_lettered", started.elapsed());
                        return handled;
                    }
                }
            }
        };
        outcome.report(command_type, started.elapsed());
        Handled::Done
    }

    /// Run `attempt` until it ends in anything but an outage, waiting out
    /// each outage with the configured backoff and no bound on the number of
    /// tries (an outage must not end a record). `data` sorts an error: `Ok`
    /// with the data error that ends the record, or `Err` with the outage to
    /// wait out. `None` if shutdown came first.
    pub(super) async fn through_outages<T, E, D, Fut>(
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

    pub(super) fn parse(&self, message: &OwnedMessage, envelope: &Envelope) -> Result<Parsed, Poison> {
        let command = Command::decode(&envelope.schema_id, message.payload().unwrap_or_default())
            .map_err(|e| Poison::new("undecodable", e.to_string()))?;
        let result_key = result_key(message, &command.job_id);
        self.parsed(&command, result_key)
    }

    /// A decoded command ready to apply or to queue, its results keyed by
    /// `result_key`.
    pub(crate) fn parsed(&self, command: &Command, result_key: String) -> Result<Parsed, Poison> {
        let Some(declared) = self.registry.declared(&command.command_type) else {
            return Err(Poison::new("unknown_command_type", format!("no handler for `{}`", command.command_type)));
        };
        let job_id =
            Uuid::parse_str(&command.job_id).map_err(|e| Poison::new("undecodable", format!("job_id: {e}")))?;
        let payload: serde_json::Value =
            serde_json::from_str(&command.payload_json).map_err(|e| Poison::new("invalid_payload", e.to_string()))?;
        // A record that bypassed ingest may lack its key: it then stands
        // alone rather than being refused here.
        let key = match declared.ordering.as_ref().and_then(|ordering| ordering.key_of(&payload).ok()) {
            Some(ordering) => QueueKey { tenant: command.tenant.clone(), scope: ordering.scope, value: ordering.value },
            None => QueueKey { tenant: command.tenant.clone(), scope: String::new(), value: command.job_id.clone() },
        };
        let context = CommandContext {
            job_id,
            tenant: command.tenant.clone(),
            command_type: command.command_type.clone(),
            payload,
            progress: Progress::default(),
        };
        Ok(Parsed { job: JobRef::keyed(command, result_key), context, key })
    }

    /// The one transaction: inbox row, effect, result in the outbox.
    ///
    /// A result too large for one Kafka record ends the job `failed` with
    /// [`RESULT_TOO_LARGE`] and the effect rolled back: for a ledger, a
    /// `failed` job must mean that nothing moved, or a client retrying the
    /// "failed" deposit under a new key would apply it twice.
    ///
    /// A command its built-in handler does not apply inline, or whose key
    /// has executions queued, is handed to an execution instead
    /// ([`Self::defer`]); a row lock that outlasts `inline_lock_timeout_ms`
    /// ends in [`Failed::Locked`], and the caller hands it over then.
    async fn apply(&self, message: &OwnedMessage, envelope: &Envelope, parsed: &Parsed) -> Result<Outcome, Failed> {
        let mut tx = self.begin_inline().await?;
        if !claim_inbox(&mut tx, envelope.message_id, &parsed.job).await? {
            return Ok(Outcome::Duplicate);
        }
        let free = self.registry.runs_inline(&parsed.job.command_type)
            && !store::busy(&mut tx, &[&parsed.key]).await?.contains(&parsed.key);
        if !free {
            self.hand_over(&mut tx, &[(message, envelope, parsed)]).await?;
            tx.commit().await?;
            return Ok(Outcome::Deferred);
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
        // Errors of the effect other than refusals end the transaction; a
        // lock timeout among them is `Failed::Locked`.
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
}
