//! Result events: what becomes of a command, as published on the results
//! topic through the outbox, keyed by the command's own key.

use onceflow_contracts::{Command, Envelope, JobError, JobStatus, ResultEvent, schema};
use onceflow_outbox::OutboxMessage;
use onceflow_runtime::telemetry;
use rdkafka::{Message as _, message::OwnedMessage};
use uuid::Uuid;

use super::{
    Worker,
    dead_letter::{Poison, clean},
};
use crate::handlers::{HandlerError, Progress};

/// The job a command message belongs to, as far as the message tells.
#[derive(Debug, Clone)]
pub(crate) struct JobRef {
    pub(crate) job_id: String,
    pub(crate) tenant: String,
    pub(crate) command_type: String,
    pub(crate) callback_url: Option<String>,
    /// The Kafka key of the job's results: the command's own (made from its
    /// tenant and ordering key), so one key's results stay on one partition
    /// in the order they were applied.
    pub(crate) result_key: String,
}

impl JobRef {
    pub(super) fn of(command: &Command, message: &OwnedMessage) -> Self {
        Self::keyed(command, result_key(message, &command.job_id))
    }

    /// The job of `command`, its results keyed by `result_key`.
    pub(crate) fn keyed(command: &Command, result_key: String) -> Self {
        Self {
            job_id: command.job_id.clone(),
            tenant: command.tenant.clone(),
            command_type: command.command_type.clone(),
            callback_url: command.callback_url.clone(),
            result_key,
        }
    }

    /// The job of a message whose body cannot be read, from its envelope
    /// alone: a command's `message-id` is its job id (ingest sets it so; see
    /// `CommandHeaders` in asyncapi.yaml), so its job can still be ended.
    pub(super) fn from_envelope(envelope: &Envelope, message: &OwnedMessage) -> Self {
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
    pub(crate) fn cleaned(&self) -> Self {
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
pub(super) fn result_key(message: &OwnedMessage, job_id: &str) -> String {
    match message.key().map(std::str::from_utf8) {
        Some(Ok(key)) if !key.is_empty() && !key.contains('\0') => key.to_owned(),
        _ => job_id.to_owned(),
    }
}
impl Worker {
    pub(crate) fn result_event(
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

    pub(crate) fn result_message(
        &self,
        cause: &Envelope,
        job: &JobRef,
        event: &ResultEvent,
    ) -> Result<OutboxMessage, Poison> {
        let payload = event.encode().map_err(|e| Poison::new("unencodable_result", e.to_string()))?;
        let (traceparent, tracestate) = telemetry::current_trace_context();
        Ok(OutboxMessage {
            headers: Vec::new(),
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

    /// A `processing` result event with `percent`, for the outbox.
    pub(crate) fn progress_message(
        &self,
        envelope: &Envelope,
        job: &JobRef,
        percent: i32,
    ) -> Result<OutboxMessage, Poison> {
        let mut event = self.result_event(envelope, job, JobStatus::Processing, None, None);
        event.progress_percent = Some(percent);
        self.result_message(envelope, job, &event)
    }

    /// Where a handler's progress goes: each report is a `processing` result
    /// event committed to the outbox in its own transaction (on another
    /// connection), so it is published, in order, before the command's result.
    pub(crate) fn progress_sink(&self, envelope: &Envelope, job: &JobRef) -> Progress {
        let worker = self.clone();
        let envelope = envelope.clone();
        let job = job.clone();
        Progress::new(std::sync::Arc::new(move |percent| {
            let (worker, envelope, job) = (worker.clone(), envelope.clone(), job.clone());
            Box::pin(async move {
                let message =
                    worker.progress_message(&envelope, &job, percent).map_err(|e| HandlerError::Poison(e.detail))?;
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
}
