//! The timeouts of executions, swept four times a second by every instance
//! (rows are taken with `SKIP LOCKED`, so instances share the work):
//!
//! - **an attempt's lease** (its type's `heartbeat_timeout_ms` for an
//!   attempt a handler accepted or a worker holds; its `attempt_timeout_ms`
//!   for a call, plus `expiry_grace_ms`, since the calling processor's own
//!   timeout ends it first unless that processor died): the attempt is
//!   spent and the command is ready again at once, with the same
//!   `Idempotency-Key`; after the retry policy's last attempt it ends
//!   `failed` (`timed_out`);
//! - **waiting to start** (`start_timeout_ms`, from the `202` until the
//!   first attempt starts) and **the whole job** (`job_timeout_ms`, from the
//!   `202` to the end): the command ends `failed` (`timed_out`), whatever
//!   it was doing; a late answer of its attempt changes nothing.
//!
//! - **a cancellation's grace** (`executions.cancel_grace_ms` after its
//!   tenant asked, or sooner when its lease ends): a running execution whose
//!   handler or worker did not confirm ends `cancelled`.
//!
//! Each end goes through the same fenced end as any other
//! ([`Worker::record_ends`]): its result, its inbox outcome, the move of its
//! key's queue.

use std::{collections::HashSet, time::Duration};

use onceflow_contracts::{JobError, JobStatus};
use tokio_util::sync::CancellationToken;

use super::{
    endings::End,
    leases::{self, Counted},
    store::{Execution, Wait},
};
use crate::{config::ExecutionsConfig, worker::Worker};

/// How often the sweep runs: a lease that ends is given up within this.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Executions handled per sweep and kind, at most (the next sweep goes on).
const PER_SWEEP: i64 = 256;

/// Sweep until `shutdown`; `wake` is told when something became ready.
pub async fn sweep(
    worker: Worker,
    config: ExecutionsConfig,
    wake: std::sync::Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let grace = Duration::from_millis(config.expiry_grace_ms);
    let cancel_grace = Duration::from_millis(config.cancel_grace_ms);
    while !shutdown.is_cancelled() {
        match sweep_once(&worker, grace, cancel_grace).await {
            Ok(0) => {}
            Ok(_) => wake.notify_one(),
            Err(error) => tracing::warn!(%error, "cannot sweep the executions' timeouts now"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
    }
}

/// One sweep: how many executions it moved on or ended.
async fn sweep_once(worker: &Worker, grace: Duration, cancel_grace: Duration) -> Result<usize, sqlx::Error> {
    let mut tx = worker.pool.begin().await?;
    let mut ends = Vec::new();
    let mut seen = HashSet::new();
    let mut requeued = 0;
    for execution in leases::expired(&mut tx, grace, PER_SWEEP).await? {
        seen.insert(execution.job_id);
        let declared = worker.registry.declared(&execution.command_type);
        let label = worker.registry.label(&execution.command_type);
        metrics::counter!("onceflow_execution_attempts_expired_total", "type" => label).increment(1);
        let max_attempts = declared.map_or(1, |t| i32::try_from(t.retry.max_attempts).unwrap_or(i32::MAX));
        if execution.attempts + 1 >= max_attempts {
            let message = "its last attempt's lease ended without an answer, a heartbeat or a completion";
            let mut end = timed_out(worker, execution, "attempt", message);
            end.attempts += 1;
            ends.push(end);
        } else {
            let error = serde_json::json!({
                "code": "attempt_expired",
                "message": "no answer, heartbeat or completion came before the attempt's lease ended",
            });
            leases::requeue(&mut tx, &execution, Counted::Attempt, Wait::Retry, Duration::ZERO, Some(&error)).await?;
            requeued += 1;
        }
    }
    for (execution, late_start) in leases::overdue(&mut tx, PER_SWEEP).await? {
        if seen.insert(execution.job_id) {
            ends.push(if late_start {
                timed_out(worker, execution, "start", "it did not start within its type's start_timeout_ms")
            } else {
                timed_out(worker, execution, "job", "it did not end within its type's job_timeout_ms")
            });
        }
    }
    for execution in leases::cancelling(&mut tx, cancel_grace, PER_SWEEP).await? {
        if seen.insert(execution.job_id) {
            let message = "cancelled by its tenant; its handler or worker did not confirm within the grace period";
            ends.push(worker.cancelled(execution, message));
        }
    }
    let ended = worker.record_ends(&mut tx, &ends).await?;
    tx.commit().await?;
    if requeued + ended > 0 {
        tracing::warn!(requeued, ended, "executions given up or ended by a timeout or a cancellation's grace");
    }
    Ok(requeued + ended)
}

/// `execution`'s end `failed` with `timed_out`.
fn timed_out(worker: &Worker, execution: Execution, which: &'static str, message: &str) -> End {
    metrics::counter!("onceflow_execution_timeouts_total", "type" => worker.registry.label(&execution.command_type),
        "timeout" => which)
    .increment(1);
    let error = JobError { code: "timed_out".to_owned(), message: message.to_owned() };
    worker.end_of(execution, JobStatus::Failed, None, Some(error), None)
}
