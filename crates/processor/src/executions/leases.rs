//! The SQL of long work (migration `0008_long_work.sql`): attempts a push
//! handler accepted (`202`) or a pull worker leased, their heartbeats and
//! hand-backs, and the executions whose lease or own deadlines passed.
//!
//! Every change to a running attempt is fenced by its attempt id, as its end
//! is ([`super::store::end`]): a superseded attempt changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::store::{EXECUTION_COLUMNS, Execution, Wait};

/// An execution as a callback finds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub execution: Execution,
    /// `queued`, `running`, `succeeded`, `failed` or `dead_lettered`.
    pub state: String,
    /// The result it ended with (JSON text), and its last error.
    pub result: Option<String>,
    pub last_error: Option<serde_json::Value>,
    /// Its tenant asked to cancel it while it ran.
    pub cancel_requested: bool,
    /// Who holds its running attempt: `call`, `handler` or `worker`.
    pub holder: Option<String>,
}

impl Stored {
    pub fn ended(&self) -> bool {
        !matches!(self.state.as_str(), "queued" | "running")
    }

    /// Whether `attempt_id` is the running attempt.
    pub fn runs(&self, attempt_id: Uuid) -> bool {
        self.state == "running" && self.execution.attempt_id == Some(attempt_id)
    }
}

/// The execution `job_id`, locked for the caller's transaction (callbacks of
/// one job take their turns).
pub async fn load(tx: &mut PgConnection, job_id: Uuid) -> Result<Option<Stored>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS}, e.state, e.result, e.last_error, e.holder,
                e.cancel_requested_at IS NOT NULL AS cancel_requested
         FROM executions e WHERE e.job_id = $1 FOR UPDATE"
    ))
    .bind(job_id)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|row| {
        Ok(Stored {
            execution: Execution::of_row(&row)?,
            state: row.try_get("state")?,
            result: row.try_get("result")?,
            last_error: row.try_get("last_error")?,
            cancel_requested: row.try_get("cancel_requested")?,
            holder: row.try_get("holder")?,
        })
    })
    .transpose()
}

/// A push handler answered `202` to `attempt_id`: it now reports through
/// callbacks, and its lease runs `heartbeat_timeout` from now (never past the
/// attempt's end). `false` if the attempt was superseded meanwhile.
pub async fn accept(
    pool: &PgPool,
    job_id: Uuid,
    attempt_id: Uuid,
    heartbeat_timeout: Duration,
) -> Result<bool, sqlx::Error> {
    let accepted = sqlx::query(
        "UPDATE executions SET holder = 'handler',
             deadline = least(attempt_deadline, now() + make_interval(secs => $3))
         WHERE job_id = $1 AND attempt_id = $2 AND state = 'running'",
    )
    .bind(job_id)
    .bind(attempt_id)
    .bind(heartbeat_timeout.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(accepted.rows_affected() == 1)
}

/// What a heartbeat did.
#[derive(Debug, Clone)]
pub struct Beat {
    /// The lease's new end.
    pub lease_expires_at: DateTime<Utc>,
    /// The progress before this heartbeat.
    pub previous_progress: Option<i32>,
    /// Its tenant asked to cancel the job: stop, and confirm with `fail`.
    pub cancel_requested: bool,
}

/// Extend the lease of the running attempt `attempt_id` by
/// `heartbeat_timeout` (never past the attempt's end), and record its
/// progress; `None` if it is not the running attempt. A push handler that
/// heartbeats before its `202` reached the dispatcher reports through
/// callbacks from then on.
pub async fn heartbeat(
    tx: &mut PgConnection,
    job_id: Uuid,
    attempt_id: Uuid,
    heartbeat_timeout: Duration,
    progress: Option<i32>,
    details: Option<&serde_json::Value>,
) -> Result<Option<Beat>, sqlx::Error> {
    let row = sqlx::query(
        "WITH before AS (SELECT progress_percent FROM executions WHERE job_id = $1)
         UPDATE executions e SET heartbeat_at = now(), holder = CASE WHEN e.holder = 'call' THEN 'handler' ELSE e.holder END,
             deadline = least(e.attempt_deadline, now() + make_interval(secs => $3)),
             progress_percent = coalesce($4, e.progress_percent),
             progress_details = coalesce($5, e.progress_details)
         FROM before
         WHERE e.job_id = $1 AND e.attempt_id = $2 AND e.state = 'running'
         RETURNING e.deadline, before.progress_percent AS previous,
                   e.cancel_requested_at IS NOT NULL AS cancel_requested",
    )
    .bind(job_id)
    .bind(attempt_id)
    .bind(heartbeat_timeout.as_secs_f64())
    .bind(progress)
    .bind(details)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|row| {
        Ok(Beat {
            lease_expires_at: row.try_get("deadline")?,
            previous_progress: row.try_get("previous")?,
            cancel_requested: row.try_get("cancel_requested")?,
        })
    })
    .transpose()
}

/// What an attempt put back counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A failure of the handler: an attempt of the retry policy.
    Attempt,
    /// An outage of the handler: no attempt.
    Outage,
    /// A worker handing its task back: nothing.
    Nothing,
}

/// Put the running attempt of `execution` back at the head of its queue,
/// ready after `delay`, counted as `counted`. `false` if it is no longer the
/// running attempt, or its cancellation was asked (then nothing changes: it
/// ends `cancelled` when its grace runs out, see [`cancelling`]).
pub async fn requeue(
    tx: &mut PgConnection,
    execution: &Execution,
    counted: Counted,
    wait: Wait,
    delay: Duration,
    error: Option<&serde_json::Value>,
) -> Result<bool, sqlx::Error> {
    let requeued = sqlx::query(
        "UPDATE executions SET state = 'queued', attempt_id = NULL, deadline = NULL, attempt_deadline = NULL,
             holder = NULL, worker = NULL, last_error = coalesce($3, last_error),
             attempts = attempts + CASE WHEN $4 THEN 1 ELSE 0 END,
             outages = outages + CASE WHEN $5 THEN 1 ELSE 0 END
         WHERE job_id = $1 AND attempt_id = $2 AND state = 'running' AND cancel_requested_at IS NULL",
    )
    .bind(execution.job_id)
    .bind(execution.attempt_id)
    .bind(error)
    .bind(counted == Counted::Attempt)
    .bind(counted == Counted::Outage)
    .execute(&mut *tx)
    .await?;
    if requeued.rows_affected() == 0 {
        return Ok(false);
    }
    super::store::hold(&mut *tx, &execution.key, wait, delay).await?;
    super::store::notify(tx).await?;
    Ok(true)
}

/// Running attempts whose lease passed, at most `limit`, locked for the
/// caller's transaction: a call's `grace` after its deadline (the
/// processor's own timeout ends it first, unless that processor died); a
/// handler's or worker's lease at once.
pub async fn expired(tx: &mut PgConnection, grace: Duration, limit: i64) -> Result<Vec<Execution>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions e
         WHERE e.state = 'running' AND e.cancel_requested_at IS NULL
           -- The plain bound first: the index on deadline finds the few rows
           -- past it, not every running one.
           AND e.deadline < now()
           AND e.deadline < now() - CASE WHEN e.holder = 'call' THEN make_interval(secs => $1) ELSE '0'::interval END
         ORDER BY e.deadline LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter().map(Execution::of_row).collect()
}

/// Executions past their own deadlines, at most `limit`, locked for the
/// caller's transaction, each with whether it is late to start (never
/// started by its `start_by`) rather than to end (not ended by its
/// `end_by`).
pub async fn overdue(tx: &mut PgConnection, limit: i64) -> Result<Vec<(Execution, bool)>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS}, (e.state = 'queued' AND e.started_at IS NULL AND e.start_by < now()) AS late_start
         FROM executions e
         WHERE e.job_id IN (
             (SELECT job_id FROM executions
              WHERE state = 'queued' AND start_by < now() AND started_at IS NULL LIMIT $1)
             UNION
             (SELECT job_id FROM executions WHERE state IN ('queued', 'running') AND end_by < now() LIMIT $1))
           AND e.state IN ('queued', 'running')
         LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter().map(|row| Ok((Execution::of_row(row)?, row.try_get("late_start")?))).collect()
}

/// Ask the running execution `job_id` to stop: from now on its heartbeats,
/// its worker's polls and a cancel request to its push handler say so.
pub async fn request_cancel(tx: &mut PgConnection, job_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE executions SET cancel_requested_at = coalesce(cancel_requested_at, now())
         WHERE job_id = $1 AND state = 'running'",
    )
    .bind(job_id)
    .execute(tx)
    .await?;
    Ok(())
}

/// Running executions asked to stop `grace` ago or more (or whose lease
/// ended since), at most `limit`, locked for the caller's transaction: they
/// end `cancelled` without their handler's word.
pub async fn cancelling(tx: &mut PgConnection, grace: Duration, limit: i64) -> Result<Vec<Execution>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions e
         WHERE e.state = 'running' AND e.cancel_requested_at IS NOT NULL
           AND (e.cancel_requested_at < now() - make_interval(secs => $1) OR e.deadline < now())
         LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter().map(Execution::of_row).collect()
}

/// The jobs `worker` holds whose cancellation was asked.
pub async fn cancelled_for(pool: &PgPool, worker: &str) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT job_id FROM executions
         WHERE state = 'running' AND holder = 'worker' AND worker = $1 AND cancel_requested_at IS NOT NULL",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
}
