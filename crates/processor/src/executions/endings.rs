//! Ending executions: in one transaction, each execution's end (fenced by
//! its attempt), its result in the outbox, its inbox outcome, a dead
//! letter's record (its `dead_letters` row and, through the outbox, the
//! dead-letter topic) and the move of its key's queue.

use onceflow_contracts::{Command, JobError, JobStatus, topics::Topics};
use onceflow_outbox::OutboxMessage;
use rdkafka::{
    Timestamp,
    message::{Header, OwnedHeaders, OwnedMessage},
};
use sqlx::PgConnection;

use super::store::{self, Ending, Execution, QueueKey};
use crate::worker::{
    DLQ_ERROR_CODE, DLQ_ERROR_MESSAGE, DLQ_ORIGINAL_OFFSET, DLQ_ORIGINAL_PARTITION, DLQ_ORIGINAL_TOPIC, JobRef, Poison,
    RESULT_TOO_LARGE, Worker, clean, record_dead_letter, record_outcomes,
};

/// How one execution ends.
#[derive(Debug)]
pub struct End {
    pub execution: Execution,
    pub status: JobStatus,
    /// Its result event, ready for the outbox (`None`: it cannot be
    /// published, which the log says).
    pub message: Option<OutboxMessage>,
    /// Why it failed or was dead-lettered, kept with the execution.
    pub error: Option<JobError>,
    /// A dead letter's whole reason (operators' eyes only).
    pub poison: Option<Poison>,
    /// Attempts spent, this one included when it failed.
    pub attempts: i32,
    /// The result's JSON text, kept with the execution.
    pub result: Option<String>,
}

impl Worker {
    /// `execution`'s end with `status`, its result event made now (in the
    /// caller's span, whose trace the event then carries). A result too
    /// large for one record ends it `failed` (`result_too_large`) instead.
    pub(crate) fn end_of(
        &self,
        execution: Execution,
        status: JobStatus,
        result: Option<String>,
        error: Option<JobError>,
        poison: Option<Poison>,
    ) -> End {
        let (_, job) = job_of(&execution);
        let event = self.result_event(&execution.envelope, &job, status, result.clone(), error.clone());
        let message = match self.result_message(&execution.envelope, &job, &event) {
            Ok(message) if message.size() > onceflow_outbox::MAX_MESSAGE_BYTES => {
                let size = message.size();
                tracing::warn!(size, "the result does not fit in one record; the job fails");
                metrics::counter!("onceflow_results_too_large_total").increment(1);
                let error = JobError {
                    code: RESULT_TOO_LARGE.to_owned(),
                    message: format!(
                        "the result would take {size} bytes, more than the {} one message carries",
                        onceflow_outbox::MAX_MESSAGE_BYTES
                    ),
                };
                return self.end_of(execution, JobStatus::Failed, None, Some(error), None);
            }
            Ok(message) => Some(message),
            Err(poison) => {
                tracing::error!(reason = %poison.detail, "the result is left out: it cannot be encoded");
                None
            }
        };
        let attempts = execution.attempts;
        End { execution, status, message, error, poison, attempts, result }
    }
}

impl Worker {
    /// `execution`'s end `cancelled`, with why.
    pub(crate) fn cancelled(&self, execution: Execution, message: &str) -> End {
        metrics::counter!("onceflow_executions_cancelled_total", "type" => self.registry.label(&execution.command_type))
            .increment(1);
        let error = JobError { code: "cancelled".to_owned(), message: message.to_owned() };
        self.end_of(execution, JobStatus::Cancelled, None, Some(error), None)
    }
}

/// What a failed attempt leads to under its type's retry policy.
#[derive(Debug)]
pub enum AfterFailure {
    /// Try again after this wait (the attempt is spent).
    Retry(std::time::Duration),
    /// That was the last attempt: the job is dead-lettered.
    DeadLetter(Box<End>),
}

impl Worker {
    /// The attempt of `execution` failed (its handler's `5xx`, a timeout, a
    /// worker's retryable failure) for `reason`: wait and try again, or,
    /// after the policy's last attempt, dead-letter it (`handler_failed`).
    pub(crate) fn after_failure(
        &self,
        execution: &Execution,
        retry: &onceflow_webhook::RetryPolicy,
        reason: &str,
        retry_after: Option<std::time::Duration>,
    ) -> AfterFailure {
        let attempt = execution.attempts + 1;
        match retry.next_delay(u32::try_from(attempt).unwrap_or(u32::MAX), retry_after) {
            Some(delay) => AfterFailure::Retry(delay),
            None => {
                let poison = Poison::new("handler_failed", reason.to_owned());
                let error = poison.job_error();
                let mut end = self.end_of(execution.clone(), JobStatus::DeadLettered, None, Some(error), Some(poison));
                end.attempts = attempt;
                AfterFailure::DeadLetter(Box::new(end))
            }
        }
    }
}

impl Worker {
    /// A `job.processing` event of `execution` with `percent` (a heartbeat's
    /// progress), in the caller's transaction. An event that cannot be
    /// encoded is left out (progress is advisory).
    pub(crate) async fn record_progress(
        &self,
        tx: &mut PgConnection,
        execution: &Execution,
        percent: i32,
    ) -> Result<(), sqlx::Error> {
        let (_, job) = job_of(execution);
        let Ok(message) = self.progress_message(&execution.envelope, &job, percent) else { return Ok(()) };
        onceflow_outbox::enqueue(tx, &message).await.map_err(as_database_error)?;
        metrics::counter!("onceflow_progress_events_total").increment(1);
        Ok(())
    }
}

/// An outbox error as the database error it is (or a protocol error, for
/// a message the outbox refuses).
fn as_database_error(error: onceflow_outbox::Error) -> sqlx::Error {
    match error {
        onceflow_outbox::Error::Database(error) => error,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// The job of an execution, as its command record tells (its envelope only,
/// for a record that no longer decodes).
pub fn job_of(execution: &Execution) -> (Option<Command>, JobRef) {
    match Command::decode(&execution.envelope.schema_id, &execution.record) {
        Ok(command) => {
            let job = JobRef::keyed(&command, execution.result_key.clone());
            (Some(command), job)
        }
        Err(_) => {
            let job = JobRef {
                job_id: execution.job_id.to_string(),
                tenant: execution.key.tenant.clone(),
                command_type: execution.command_type.clone(),
                callback_url: None,
                result_key: execution.result_key.clone(),
            };
            (None, job)
        }
    }
}

/// The command record an execution was made from, as the dead-letter path
/// keeps records.
fn record_of(execution: &Execution, topics: &Topics) -> OwnedMessage {
    let headers = execution.envelope.to_headers().iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header { key, value: Some(value.as_bytes()) })
    });
    OwnedMessage::new(
        Some(execution.record.clone()),
        Some(execution.result_key.clone().into_bytes()),
        topics.commands.clone(),
        Timestamp::NotAvailable,
        execution.partition,
        execution.offset,
        Some(headers),
    )
}

impl Worker {
    /// Record `ends` in `tx`: those still theirs to end (see
    /// [`store::end`]) get their result, inbox outcome and dead letter, and
    /// their keys move on. Returns how many ended.
    pub(crate) async fn record_ends(&self, tx: &mut PgConnection, ends: &[End]) -> Result<usize, sqlx::Error> {
        let endings: Vec<Ending> = ends
            .iter()
            .map(|end| Ending {
                job_id: end.execution.job_id,
                attempt_id: end.execution.attempt_id,
                state: end.status.as_str(),
                attempts: end.attempts,
                error: end.error.as_ref().map(|e| serde_json::json!({"code": e.code, "message": e.message})),
                result: end.result.clone(),
            })
            .collect();
        let ended = store::end(&mut *tx, &endings).await?;
        let mut messages = Vec::new();
        let mut ids = Vec::new();
        let mut outcomes = Vec::new();
        let mut keys: Vec<&QueueKey> = Vec::new();
        for end in ends.iter().filter(|end| ended.contains(&end.execution.job_id)) {
            let execution = &end.execution;
            messages.extend(end.message.clone());
            if let Some(poison) = &end.poison {
                let (_, job) = job_of(execution);
                let record = record_of(execution, &self.topics);
                record_dead_letter(&mut *tx, &record, &execution.envelope, &job.cleaned(), poison, None).await?;
                messages.push(self.dead_letter_message(execution, poison));
                metrics::counter!("onceflow_commands_dead_lettered_total", "code" => poison.code).increment(1);
            }
            ids.push(execution.job_id);
            outcomes.push(end.status.as_str());
            metrics::counter!("onceflow_executions_ended_total", "type" => self.registry.label(&execution.command_type),
                "outcome" => end.status.as_str())
            .increment(1);
            keys.push(&execution.key);
        }
        onceflow_outbox::enqueue_all(&mut *tx, &messages).await.map_err(as_database_error)?;
        record_outcomes(&mut *tx, &ids, &outcomes).await?;
        store::advance(&mut *tx, &keys).await?;
        Ok(ids.len())
    }

    /// The execution's command record on the dead-letter topic, with the
    /// error and where it came from, through the outbox.
    fn dead_letter_message(&self, execution: &Execution, poison: &Poison) -> OutboxMessage {
        OutboxMessage {
            topic: self.topics.dead_letter.clone(),
            key: Some(execution.result_key.clone()),
            payload: execution.record.clone(),
            envelope: execution.envelope.clone(),
            headers: vec![
                (DLQ_ERROR_CODE.to_owned(), poison.code.to_owned()),
                (DLQ_ERROR_MESSAGE.to_owned(), clean(&poison.detail).into_owned()),
                (DLQ_ORIGINAL_TOPIC.to_owned(), self.topics.commands.clone()),
                (DLQ_ORIGINAL_PARTITION.to_owned(), execution.partition.to_string()),
                (DLQ_ORIGINAL_OFFSET.to_owned(), execution.offset.to_string()),
            ],
        }
    }
}
