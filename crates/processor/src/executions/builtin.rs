//! Built-in executions: the head of a key's queue, with the built-in
//! executions queued right after it, applied in one transaction that holds
//! the key's row from the start: their effects, their ends, their results and
//! the move of the queue commit together, or not at all (a crash leaves the
//! key as it was, ready). The transaction's lock waits end after
//! `executions.inline_lock_timeout_ms`: a row someone else holds sends the
//! key back to wait (`waiting_for: locked`), with a backoff that grows with
//! each try, and holds up nothing else.

use onceflow_contracts::{Command, JobStatus};
use onceflow_runtime::telemetry;

use super::{
    endings::End,
    store::{self, Execution, QueueKey, Wait},
};
use crate::worker::{Claimed, Parsed, Poison, RESULT_TOO_LARGE, Worker};

/// What one run did with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// Someone else has the key, or its head is not built-in after all.
    NotTaken,
    /// This many executions ended.
    Ended(usize),
    /// The key waits (a row lock, an outage).
    Held,
}

/// The span of one execution's run: a child of its command's trace.
pub(super) fn execution_span(execution: &Execution) -> tracing::Span {
    let span = tracing::info_span!(
        "run_execution",
        job_id = %execution.job_id,
        tenant = %execution.key.tenant,
        command_type = %execution.command_type,
        correlation_id = %execution.envelope.correlation_id,
    );
    telemetry::set_parent_from(
        &span,
        execution.envelope.traceparent.as_deref(),
        execution.envelope.tracestate.as_deref(),
    );
    span
}

impl Worker {
    /// Run `key`'s head and the built-in executions after it, at most
    /// `max` of them, in one transaction.
    pub(crate) async fn run_builtin(&self, key: &QueueKey, max: usize) -> Result<Ran, sqlx::Error> {
        let mut limit = max.max(1);
        loop {
            let mut tx = self.begin_inline().await?;
            if !store::lock_ready(&mut tx, key).await? {
                return Ok(Ran::NotTaken);
            }
            let queued = store::queued(&mut tx, key, i64::try_from(limit).unwrap_or(i64::MAX)).await?;
            let run: Vec<Execution> = queued
                .into_iter()
                .take_while(|execution| self.registry.get(&execution.command_type).is_some())
                .collect();
            let Some(head) = run.first().cloned() else { return Ok(Ran::NotTaken) };
            // Decoded before anything is applied: the lane decoded each
            // already, so a failure here is a record changed since (or a
            // type no longer built-in), which ends that execution alone.
            let mut parsed = Vec::with_capacity(run.len());
            for execution in &run {
                match self.parse_execution(execution) {
                    Ok(one) => parsed.push(one),
                    Err(poison) if parsed.is_empty() => {
                        let end =
                            self.end_of(head, JobStatus::DeadLettered, None, Some(poison.job_error()), Some(poison));
                        let ended = self.record_ends(&mut tx, std::slice::from_ref(&end)).await?;
                        tx.commit().await?;
                        return Ok(Ran::Ended(ended));
                    }
                    Err(_) => break,
                }
            }
            let run = &run[..parsed.len()];
            let spans: Vec<tracing::Span> = run.iter().map(execution_span).collect();
            let claimed: Vec<Claimed<'_>> = run
                .iter()
                .zip(&parsed)
                .enumerate()
                .map(|(position, (execution, parsed))| Claimed { position, envelope: &execution.envelope, parsed })
                .collect();
            let mut effects = vec![None; run.len()];
            match self.effects(&mut tx, &claimed, &spans, &mut effects).await {
                Ok(()) => {
                    let ends: Vec<End> = run
                        .iter()
                        .cloned()
                        .zip(effects)
                        .map(|(execution, effect)| {
                            let (status, message) = effect.unwrap_or_else(|| unreachable!("every command has its end"));
                            let attempts = execution.attempts;
                            End {
                                execution,
                                status,
                                message: Some(message),
                                error: None,
                                poison: None,
                                attempts,
                                result: None,
                            }
                        })
                        .collect();
                    let ended = self.record_ends(&mut tx, &ends).await?;
                    tx.commit().await?;
                    return Ok(Ran::Ended(ended));
                }
                Err(fallback) => {
                    drop(tx);
                    match fallback.culprit {
                        // The ones before it go as a run of their own.
                        Some(culprit) if culprit > 0 => limit = culprit,
                        // The head alone cannot be applied as it is: it ends.
                        Some(_) => return self.end_head(key, head, fallback.reason).await,
                        // A row someone else holds, or an outage: the key waits.
                        None => {
                            let wait = if fallback.reason == "locked" { Wait::Locked } else { Wait::Retry };
                            let mut tx = self.pool.begin().await?;
                            store::hold_head(&mut tx, key, head.job_id, wait, self.retry.delay_after(head.outages))
                                .await?;
                            tx.commit().await?;
                            return Ok(Ran::Held);
                        }
                    }
                }
            }
        }
    }

    /// End a head whose effect cannot be applied as it is: `failed` when its
    /// result does not fit in one record (nothing applied), dead-lettered
    /// otherwise (data the database refuses, a payload its handler cannot
    /// read).
    async fn end_head(&self, key: &QueueKey, head: Execution, reason: &'static str) -> Result<Ran, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !store::lock_ready(&mut tx, key).await? {
            return Ok(Ran::NotTaken);
        }
        let end = execution_span(&head).in_scope(|| {
            if reason == "result_too_large" {
                let message = "the result would not fit in one message; nothing was changed".to_owned();
                let error = onceflow_contracts::JobError { code: RESULT_TOO_LARGE.to_owned(), message };
                self.end_of(head, JobStatus::Failed, None, Some(error), None)
            } else {
                let poison = Poison::new(reason, format!("its built-in handler cannot apply it ({reason})"));
                self.end_of(head, JobStatus::DeadLettered, None, Some(poison.job_error()), Some(poison))
            }
        });
        let ended = self.record_ends(&mut tx, std::slice::from_ref(&end)).await?;
        tx.commit().await?;
        Ok(Ran::Ended(ended))
    }

    /// An execution's command, ready to apply.
    fn parse_execution(&self, execution: &Execution) -> Result<Parsed, Poison> {
        let command = Command::decode(&execution.envelope.schema_id, &execution.record)
            .map_err(|e| Poison::new("undecodable", e.to_string()))?;
        self.parsed(&command, execution.result_key.clone())
    }
}
