//! Heads that wait: put back after a failed or unavailable attempt, held
//! for a delay or by an open breaker, and when the next one is ready.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Execution, QueueKey};
use crate::executions::leases;

/// Why a head waits before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Its handler failed (an attempt spent); the policy's backoff.
    Retry,
    /// Its handler is unreachable or shedding load (no attempt spent).
    HandlerUnavailable,
    /// A row it needs is locked by someone else.
    Locked,
    /// A pull worker handed it back (ready at once).
    Released,
}

impl Wait {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::HandlerUnavailable => "handler_unavailable",
            Self::Locked => "locked",
            Self::Released => "released",
        }
    }
}

/// Put a running attempt's execution back at the head of its queue, to
/// start again after `delay`, in a transaction of its own (see
/// [`leases::requeue`]).
pub async fn retry_later(
    pool: &PgPool,
    execution: &Execution,
    counted: leases::Counted,
    wait: Wait,
    delay: Duration,
    error: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    leases::requeue(&mut tx, execution, counted, wait, delay, Some(error)).await?;
    tx.commit().await
}

/// Let `key`'s head start again only after `delay`, saying why.
pub async fn hold(tx: &mut PgConnection, key: &QueueKey, wait: Wait, delay: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_queues SET ready_at = now() + make_interval(secs => $4), waiting = $5
         WHERE (tenant, scope, ordering_key) = ($1, $2, $3)",
    )
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .bind(delay.as_secs_f64())
    .bind(wait.as_str())
    .execute(tx)
    .await?;
    Ok(())
}

/// Let `key`'s head start again only after `delay`, if `head` is its head
/// (a command handed over with nothing ahead of it, or a built-in run that
/// met a lock), counting an outage of it.
pub async fn hold_head(
    tx: &mut PgConnection,
    key: &QueueKey,
    head: Uuid,
    wait: Wait,
    delay: Duration,
) -> Result<(), sqlx::Error> {
    let held = sqlx::query(
        "UPDATE key_queues SET ready_at = now() + make_interval(secs => $5), waiting = $6
         WHERE (tenant, scope, ordering_key) = ($1, $2, $3) AND head = $4",
    )
    .bind(&key.tenant)
    .bind(&key.scope)
    .bind(&key.value)
    .bind(head)
    .bind(delay.as_secs_f64())
    .bind(wait.as_str())
    .execute(&mut *tx)
    .await?;
    if held.rows_affected() == 1 {
        sqlx::query("UPDATE executions SET outages = outages + 1 WHERE job_id = $1")
            .bind(head)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Hold every waiting key whose head is of one of `command_types` until
/// `until`: their handler's breaker opened.
pub async fn hold_types(pool: &PgPool, command_types: &[&str], until: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_queues SET ready_at = greatest(ready_at, $2), waiting = 'breaker'
         WHERE command_type = ANY($1) AND ready_at IS NOT NULL",
    )
    .bind(command_types)
    .bind(until)
    .execute(pool)
    .await?;
    Ok(())
}

/// How long until the next head becomes ready, if any waits.
pub async fn next_ready_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(ready_at) - now())::float8 FROM key_queues WHERE ready_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}
