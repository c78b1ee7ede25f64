//! One attempt of a push execution: the call of its handler, and what the
//! answer makes of it (an end to record, or the execution put back to wait).

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use onceflow_contracts::JobStatus;
use onceflow_runtime::telemetry;
use onceflow_webhook::breaker::{Signal, signal_of_status};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument as _;

use super::{Dispatcher, PushSlot};
use crate::{
    executions::{
        builtin,
        endings::{AfterFailure, End, job_of},
        leases::{self, Counted},
        push::{Answer, PushRequest},
        store::{self, Execution, Wait},
    },
    worker::Poison,
};

impl Dispatcher {
    /// One attempt of a push execution, and what its answer makes of it.
    pub(super) async fn call(
        self: Arc<Self>,
        slot: Arc<PushSlot>,
        execution: Execution,
        permit: OwnedSemaphorePermit,
        ends: mpsc::Sender<End>,
    ) {
        let span = builtin::execution_span(&execution);
        let probe = self.health.lock().is_ok_and(|health| health.get(&slot.destination).is_some_and(|h| h.probing));
        async {
            let end = self.attempt(&slot, execution, probe).await;
            drop(permit);
            if let Some(end) = end
                && ends.send(end).await.is_err()
            {
                tracing::info!("shutting down before the end was recorded; the attempt expires and runs again");
            }
        }
        .instrument(span)
        .await;
        self.wake.notify_one();
    }

    /// Call the handler; an end to record, or `None` when the execution was
    /// put back to wait (or could not be).
    async fn attempt(&self, slot: &PushSlot, execution: Execution, probe: bool) -> Option<End> {
        let worker = &self.worker;
        let attempt = execution.attempts + 1;
        if attempt > i32::try_from(slot.retry.max_attempts).unwrap_or(i32::MAX) {
            // Its last attempt expired (its processor died): no call is left.
            let poison = Poison::new("attempts_exhausted", "every attempt of its retry policy was spent");
            let error = poison.job_error();
            return Some(worker.end_of(execution, JobStatus::DeadLettered, None, Some(error), Some(poison)));
        }
        let (command, job) = job_of(&execution);
        let Some(command) = command else {
            let poison = Poison::new("undecodable", "its command record no longer decodes");
            let error = poison.job_error();
            return Some(worker.end_of(execution, JobStatus::DeadLettered, None, Some(error), Some(poison)));
        };
        let payload: serde_json::Value = serde_json::from_str(&command.payload_json).unwrap_or_default();
        let deadline = (Utc::now() + slot.timeout).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let attempt_id = execution.attempt_id.map(|id| id.to_string()).unwrap_or_default();
        let request = PushRequest {
            job_id: &job.job_id,
            command_type: &job.command_type,
            tenant: &job.tenant,
            correlation_id: &execution.envelope.correlation_id,
            payload: &payload,
            attempt,
            attempt_id: &attempt_id,
            deadline: &deadline,
            callback_url: job.callback_url.as_deref(),
            callbacks: &self.callbacks.links(&execution, slot.timeout),
        };
        let (traceparent, _) = telemetry::current_trace_context();
        let Some(caller) = &self.caller else { return None };
        let started = std::time::Instant::now();
        let (answer, status) = caller.call(&slot.url, &request, slot.timeout, traceparent.as_deref()).await;
        let outcome = match &answer {
            Answer::Succeeded(_) => "succeeded",
            Answer::Accepted => "accepted",
            Answer::Refused { .. } | Answer::TooLarge { .. } => "refused",
            Answer::Unavailable { .. } => "unavailable",
            Answer::Failed { .. } => "failed",
        };
        metrics::counter!("onceflow_handler_calls_total", "type" => slot.name, "outcome" => outcome).increment(1);
        metrics::histogram!("onceflow_handler_call_duration_seconds", "type" => slot.name)
            .record(started.elapsed().as_secs_f64());
        let signal = match (&answer, status) {
            (_, Some(status)) => signal_of_status(status),
            (Answer::Failed { .. } | Answer::Unavailable { .. }, None) => Signal::Unhealthy,
            (_, None) => Signal::Healthy,
        };
        self.judge(slot, signal, probe).await;
        match answer {
            Answer::Succeeded(result) => {
                tracing::info!(attempt, "the handler succeeded");
                Some(worker.end_of(execution, JobStatus::Succeeded, Some(result.to_string()), None, None))
            }
            Answer::Refused { code, message } => {
                tracing::info!(attempt, %code, "the handler refused the command");
                let error = onceflow_contracts::JobError { code, message };
                Some(worker.end_of(execution, JobStatus::Failed, None, Some(error), None))
            }
            Answer::TooLarge { size } => {
                let message = format!("the handler's answer has more than {size} bytes; no message carries it");
                let error = onceflow_contracts::JobError { code: crate::worker::RESULT_TOO_LARGE.to_owned(), message };
                Some(worker.end_of(execution, JobStatus::Failed, None, Some(error), None))
            }
            Answer::Unavailable { reason, retry_after } => {
                let delay = worker.retry.delay_after(execution.outages).max(retry_after.unwrap_or_default());
                tracing::warn!(attempt, %reason, delay_ms = delay.as_millis(), "the handler is unavailable; waiting");
                let error = serde_json::json!({"code": "handler_unavailable", "message": reason});
                self.put_back(&execution, Counted::Outage, Wait::HandlerUnavailable, delay, &error).await;
                None
            }
            Answer::Accepted => {
                tracing::info!(attempt, "the handler accepted the command; it reports through callbacks");
                let (job_id, attempt_id) = (execution.job_id, execution.attempt_id.unwrap_or_default());
                if let Err(error) = leases::accept(&worker.pool, job_id, attempt_id, slot.heartbeat_timeout).await {
                    tracing::warn!(%error, "cannot record that the handler accepted; its call's deadline holds");
                }
                None
            }
            Answer::Failed { reason, retry_after } => {
                match worker.after_failure(&execution, &slot.retry, &reason, retry_after) {
                    AfterFailure::Retry(delay) => {
                        tracing::warn!(attempt, %reason, delay_ms = delay.as_millis(), "the handler failed; retrying");
                        let error = serde_json::json!({"code": "handler_failed", "message": reason});
                        self.put_back(&execution, Counted::Attempt, Wait::Retry, delay, &error).await;
                        None
                    }
                    AfterFailure::DeadLetter(end) => {
                        tracing::warn!(attempt, %reason, "the handler failed its last attempt; dead-lettering");
                        Some(*end)
                    }
                }
            }
        }
    }

    /// Put a running attempt back to wait, through outages of the database
    /// (until shutdown; then its deadline expires it).
    async fn put_back(
        &self,
        execution: &Execution,
        counted: Counted,
        wait: Wait,
        delay: Duration,
        error: &serde_json::Value,
    ) {
        let mut backoff = self.worker.retry.backoff();
        for _ in 0..10 {
            match store::retry_later(&self.worker.pool, execution, counted, wait, delay, error).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot put the execution back to wait; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        tracing::error!("the execution could not be put back; its attempt expires and it runs again");
    }
}
