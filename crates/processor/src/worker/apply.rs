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
    results::JobRef,
};
use crate::handlers::{CommandContext, HandlerError, Progress, Registered};

/// Why applying a message stopped short of an end.
#[derive(Debug)]
pub(super) enum Failed {
    /// It can never succeed as it is: dead-letter it.
    Poison(Poison),
    /// Something it needs is down: wait and try again.
    Outage(String),
}

impl Failed {
    /// Sorts it for [`Worker::through_outages`].
    pub(super) fn into_poison(self) -> Result<Poison, Self> {
        match self {
            Self::Poison(poison) => Ok(poison),
            outage @ Self::Outage(_) => Err(outage),
        }
    }
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
/// A command that decoded and has a handler.
pub(super) struct Parsed {
    pub(super) job: JobRef,
    pub(super) context: CommandContext,
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
}
