//! Recording an attempt's outcome (`webhook_attempts`, and the delivery in
//! `webhook_deliveries`): the next step of the delivery, its breaker's
//! count, and a `410`'s disabled endpoint, in one transaction, written only
//! by the worker that still holds the delivery's lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use onceflow_webhook::{BreakerPolicy, breaker::Signal};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{
    breakers,
    claims::Claimed,
    endpoints::{self, Cause, ChangeError},
    store::Status,
};

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
}

/// What happens to the delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Succeeded,
    RetryIn(Duration),
    Failed,
    /// `410 Gone`: failed, and its endpoint disabled for the tenant.
    Gone,
    /// Not sent, because its endpoint is disabled: it ends so, and the claim
    /// does not count as an attempt.
    EndpointDisabled,
}

/// What recording an attempt needs beyond the attempt.
#[derive(Debug, Clone, Copy)]
pub struct Effects<'a> {
    /// What the attempt says about its destination (`None`: nothing).
    pub signal: Option<Signal>,
    pub breaker: &'a BreakerPolicy,
    /// Where endpoint state changes are published.
    pub endpoints_topic: &'a str,
}

/// Record `attempt` and move the delivery on to `next`, if this worker still
/// holds its lease, in one transaction with what the attempt means beyond
/// the delivery: its (tenant, destination) breaker records the outcome first (a
/// retry is never due before an open breaker's cool-down ends), and a `410`
/// disables the endpoint. Returns whether the delivery moved on: `false`
/// means the lease ran out and another worker owns the delivery now (the
/// attempt is still logged and still counts for the breaker).
pub async fn finish(
    pool: &PgPool,
    claimed: &Claimed,
    attempt: &AttemptRecord,
    next: Next,
    effects: Effects<'_>,
) -> Result<bool, ChangeError> {
    let (status, delay) = match next {
        Next::Succeeded => (Status::Succeeded, None),
        Next::RetryIn(delay) => (Status::Pending, Some(delay.as_secs_f64())),
        Next::Failed | Next::Gone => (Status::Failed, None),
        Next::EndpointDisabled => (Status::EndpointDisabled, None),
    };
    let unsent = next == Next::EndpointDisabled;
    let mut tx = pool.begin().await?;
    // The breaker first: its row is always locked before delivery rows.
    let hold_until = match &claimed.destination {
        Some(destination) if effects.breaker.enabled => {
            let breaker = breakers::Key { tenant: &claimed.tenant, destination };
            breakers::record(&mut tx, effects.breaker, breaker, effects.signal, claimed.lease_token).await?
        }
        _ => None,
    };
    let updated: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "UPDATE webhook_deliveries
            SET status = $3,
                next_attempt_at = CASE WHEN $4::float8 IS NULL THEN next_attempt_at
                                       ELSE greatest(now() + make_interval(secs => $4), $7) END,
                lease_token = NULL, lease_until = NULL,
                last_status_code = coalesce($5, CASE WHEN $8 THEN last_status_code END), last_error = $6,
                attempts = attempts - CASE WHEN $8 THEN 1 ELSE 0 END,
                destination = coalesce(destination, $9),
                updated_at = now(),
                finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END
          WHERE id = $1 AND lease_token = $2
      RETURNING CASE WHEN status = 'pending' THEN next_attempt_at END",
    )
    .bind(claimed.id)
    .bind(claimed.lease_token)
    .bind(status.as_str())
    .bind(delay)
    .bind(attempt.status_code.map(i32::from))
    .bind(&attempt.error)
    .bind(hold_until)
    .bind(unsent)
    .bind(&claimed.destination)
    .fetch_optional(&mut *tx)
    .await?;
    if !unsent {
        log_attempt(&mut tx, claimed.id, claimed.attempt, attempt, updated.flatten()).await?;
    }
    if next == Next::Gone {
        let cause =
            Cause { correlation_id: claimed.correlation_id.clone(), causation_id: Some(claimed.id.to_string()) };
        endpoints::disable(
            &mut tx,
            &claimed.tenant,
            &claimed.url,
            "it answered 410 Gone",
            claimed.id,
            &cause,
            effects.endpoints_topic,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(updated.is_some())
}

/// Log the attempt a dead worker made but could not record.
pub async fn log_abandoned(pool: &PgPool, claimed: &Claimed) -> Result<(), sqlx::Error> {
    let record = AttemptRecord {
        started_at: Utc::now(),
        latency: Duration::ZERO,
        status_code: None,
        error: Some("abandoned: the notifier making this attempt stopped before recording its outcome".to_owned()),
        response_excerpt: None,
    };
    let mut connection = pool.acquire().await?;
    log_attempt(&mut connection, claimed.id, claimed.attempt - 1, &record, Some(Utc::now())).await
}

async fn log_attempt(
    connection: &mut PgConnection,
    delivery_id: Uuid,
    number: i32,
    attempt: &AttemptRecord,
    next_attempt_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_attempts
            (delivery_id, attempt, started_at, latency_ms, status_code, succeeded, error, response_excerpt, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(delivery_id)
    .bind(number)
    .bind(attempt.started_at)
    .bind(i32::try_from(attempt.latency.as_millis()).unwrap_or(i32::MAX))
    .bind(attempt.status_code.map(i32::from))
    .bind(attempt.error.is_none())
    .bind(&attempt.error)
    .bind(&attempt.response_excerpt)
    .bind(next_attempt_at)
    .execute(connection)
    .await?;
    Ok(())
}
