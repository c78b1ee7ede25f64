//! The `webhook_deliveries` and `webhook_attempts` tables (see
//! `migrations/0002_webhooks.sql`): creating a delivery with its event,
//! claiming due deliveries under a lease, recording each attempt's outcome,
//! and the per-tenant views the API serves.

use std::time::Duration;

use chrono::{DateTime, Utc};
use onceflow_contracts::{ResultEvent, envelope::Envelope};
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

/// The channel `NOTIFY`ed when deliveries become due without a timer
/// (created, redriven).
pub const CHANNEL: &str = "onceflow_webhooks";

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Succeeded,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// The longest callback URL a delivery is made to (RFC 9110 recommends
/// senders support at least 8000 octets; 2048 is what browsers and most
/// servers take, and plenty for a webhook receiver).
pub const MAX_URL_BYTES: usize = 2048;

/// Why the notifier can never call `url`, if it cannot: control characters
/// (NUL included), more than [`MAX_URL_BYTES`], not an absolute `http` or
/// `https` URL with a host. Ingest refuses such URLs at the door; this is the
/// notifier's own check, for records that reach it anyway.
pub fn refusal(url: &str) -> Option<String> {
    if url.chars().any(char::is_control) {
        return Some("callback_url contains control characters; it can never be called".to_owned());
    }
    if url.len() > MAX_URL_BYTES {
        return Some(format!("callback_url is longer than {MAX_URL_BYTES} bytes; it is never called"));
    }
    match reqwest::Url::parse(url) {
        Err(error) => Some(format!("callback_url is not a valid absolute URL ({error}); it can never be called")),
        Ok(parsed) if !matches!(parsed.scheme(), "http" | "https") => {
            Some(format!("callback_url must use http or https, not `{}`; it is never called", parsed.scheme()))
        }
        Ok(parsed) if parsed.host().is_none() => Some("callback_url has no host; it can never be called".to_owned()),
        Ok(_) => None,
    }
}

/// `url` as it can be stored and shown: control characters escaped
/// (`\u{0}`), cut to [`MAX_URL_BYTES`].
fn displayable(url: &str) -> String {
    let mut shown = String::new();
    for c in url.chars() {
        if shown.len() >= MAX_URL_BYTES {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// Record the delivery of `event` to `url`, in the transaction storing the
/// event. The event id is unique in the table, so this is idempotent too.
/// A `url` with a [`refusal`] gets a delivery that is `failed` from the
/// start, with the refusal as its `last_error` and the URL escaped; it is
/// never attempted. Returns the delivery id (the `webhook-id`).
pub async fn enqueue(
    tx: &mut PgConnection,
    event: &ResultEvent,
    job_id: Uuid,
    url: &str,
    envelope: &Envelope,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    // Serialised once: every attempt sends (and signs) the same bytes.
    let body = event.to_client_json().to_string();
    let refused = refusal(url);
    if let Some(reason) = &refused {
        tracing::warn!(
            correlation_id = %event.correlation_id,
            event_id = %event.event_id,
            webhook_id = %id,
            reason,
            "webhook not deliverable; its delivery is failed"
        );
        metrics::counter!("onceflow_webhook_deliveries_total", "outcome" => "refused").increment(1);
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries
            (id, event_id, tenant, job_id, correlation_id, event_type, url, body, traceparent, tracestate,
             status, last_error, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                 CASE WHEN $11::text IS NULL THEN 'pending' ELSE 'failed' END, $11,
                 CASE WHEN $11::text IS NULL THEN NULL ELSE now() END)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(id)
    .bind(&event.event_id)
    .bind(&event.tenant)
    .bind(job_id)
    .bind(&event.correlation_id)
    .bind(event.status.event_type())
    .bind(if refused.is_some() { displayable(url) } else { url.to_owned() })
    .bind(&body)
    .bind(&envelope.traceparent)
    .bind(&envelope.tracestate)
    .bind(&refused)
    .execute(&mut *tx)
    .await?;
    Ok(id)
}

/// A delivery claimed by one worker for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub tenant: String,
    pub job_id: Uuid,
    pub correlation_id: String,
    pub url: String,
    pub body: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The number of this attempt (1 for the first).
    pub attempt: i32,
    /// Attempts made since the delivery was created or last redriven,
    /// this one included: what the retry schedule counts.
    pub attempts_in_round: u32,
    /// The previous attempt was claimed by a worker whose lease ran out
    /// before it recorded an outcome (it crashed or was cut off).
    pub previous_abandoned: bool,
    /// Fences this worker's writes: only the lease holder may record.
    pub lease_token: Uuid,
}

/// Claim up to `limit` due deliveries for `lease`. `SKIP LOCKED` lets the
/// workers of every instance claim at once without waiting on each other or
/// claiming the same row; the lease (not a held transaction) keeps the row
/// reserved while the HTTP request runs.
pub async fn claim_due(pool: &PgPool, lease: Duration, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease_token = Uuid::new_v4();
    let rows = sqlx::query(
        "UPDATE webhook_deliveries d
            SET lease_token = $1,
                lease_until = now() + make_interval(secs => $2),
                attempts = d.attempts + 1,
                updated_at = now()
           FROM (SELECT id, lease_until AS expired_lease FROM webhook_deliveries
                  WHERE status = 'pending' AND next_attempt_at <= now()
                    AND (lease_until IS NULL OR lease_until < now())
                  ORDER BY next_attempt_at
                  LIMIT $3
                  FOR UPDATE SKIP LOCKED) due
          WHERE d.id = due.id
      RETURNING d.id, d.tenant, d.job_id, d.correlation_id, d.url, d.body, d.traceparent, d.tracestate,
                d.attempts, d.round_start, due.expired_lease IS NOT NULL AS previous_abandoned",
    )
    .bind(lease_token)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let attempt: i32 = row.try_get("attempts")?;
            let round_start: i32 = row.try_get("round_start")?;
            Ok(Claimed {
                id: row.try_get("id")?,
                tenant: row.try_get("tenant")?,
                job_id: row.try_get("job_id")?,
                correlation_id: row.try_get("correlation_id")?,
                url: row.try_get("url")?,
                body: row.try_get("body")?,
                traceparent: row.try_get("traceparent")?,
                tracestate: row.try_get("tracestate")?,
                attempt,
                attempts_in_round: u32::try_from(attempt - round_start).unwrap_or(1),
                previous_abandoned: row.try_get("previous_abandoned")?,
                lease_token,
            })
        })
        .collect()
}

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
}

/// Record `attempt` and move the delivery on to `next`, if this worker still
/// holds its lease. Returns whether it did: `false` means the lease ran out
/// and another worker owns the delivery now (the attempt is still logged).
pub async fn finish(
    pool: &PgPool,
    claimed: &Claimed,
    attempt: &AttemptRecord,
    next: Next,
) -> Result<bool, sqlx::Error> {
    let (status, delay) = match next {
        Next::Succeeded => (Status::Succeeded, None),
        Next::RetryIn(delay) => (Status::Pending, Some(delay.as_secs_f64())),
        Next::Failed => (Status::Failed, None),
    };
    let mut tx = pool.begin().await?;
    let updated: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
        "UPDATE webhook_deliveries
            SET status = $3,
                next_attempt_at = CASE WHEN $4::float8 IS NULL THEN next_attempt_at
                                       ELSE now() + make_interval(secs => $4) END,
                lease_token = NULL, lease_until = NULL,
                last_status_code = $5, last_error = $6,
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
    .fetch_optional(&mut *tx)
    .await?;
    log_attempt(&mut tx, claimed.id, claimed.attempt, attempt, updated.flatten()).await?;
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

/// How long until the next delivery becomes claimable (due, and any lease
/// expired), or `None` when nothing is pending.
pub async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at))) - now())::float8
           FROM webhook_deliveries WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// One attempt, as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub latency_ms: i32,
    pub status_code: Option<i32>,
    pub succeeded: bool,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// One delivery with its attempts, as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// Also the `webhook-id` header of every attempt.
    pub id: Uuid,
    pub job_id: Uuid,
    pub event_id: String,
    pub event_type: String,
    pub correlation_id: String,
    pub url: String,
    pub status: Status,
    pub attempt_count: i32,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempts: Vec<AttemptView>,
}

const DELIVERY_COLUMNS: &str = "id, job_id, event_id, event_type, correlation_id, url, status, attempts,
    CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at,
    last_status_code, last_error, created_at, updated_at, finished_at";

fn delivery_from_row(row: &PgRow) -> Result<DeliveryView, sqlx::Error> {
    Ok(DeliveryView {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        correlation_id: row.try_get("correlation_id")?,
        url: row.try_get("url")?,
        status: Status::parse(row.try_get("status")?),
        attempt_count: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        attempts: Vec::new(),
    })
}

/// `tenant`'s deliveries of `job_id`, oldest first, with their attempts.
/// Another tenant's job looks exactly like one without deliveries.
pub async fn for_job(pool: &PgPool, tenant: &str, job_id: Uuid) -> Result<Vec<DeliveryView>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant = $1 AND job_id = $2 ORDER BY created_at, id"
    ))
    .bind(tenant)
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    let mut deliveries = rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, _>>()?;
    attach_attempts(pool, &mut deliveries).await?;
    Ok(deliveries)
}

/// `tenant`'s delivery `id`, if it is theirs.
pub async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<DeliveryView>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant = $1 AND id = $2"))
        .bind(tenant)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let mut deliveries = vec![delivery_from_row(&row)?];
    attach_attempts(pool, &mut deliveries).await?;
    Ok(deliveries.pop())
}

async fn attach_attempts(pool: &PgPool, deliveries: &mut [DeliveryView]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let rows = sqlx::query(
        "SELECT delivery_id, attempt, started_at, latency_ms, status_code, succeeded, error, response_excerpt,
                next_attempt_at
           FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    for row in rows {
        let delivery_id: Uuid = row.try_get("delivery_id")?;
        let view = AttemptView {
            attempt: row.try_get("attempt")?,
            started_at: row.try_get("started_at")?,
            latency_ms: row.try_get("latency_ms")?,
            status_code: row.try_get("status_code")?,
            succeeded: row.try_get("succeeded")?,
            error: row.try_get("error")?,
            response_excerpt: row.try_get("response_excerpt")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
        };
        if let Some(delivery) = deliveries.iter_mut().find(|d| d.id == delivery_id) {
            delivery.attempts.push(view);
        }
    }
    Ok(())
}

/// What a redrive request came to.
#[derive(Debug)]
pub enum Redrive {
    /// Pending again, due now, with a fresh retry schedule.
    Redriven(Box<DeliveryView>),
    /// Not `failed`: still pending, or already delivered.
    NotFailed(Status),
    NotFound,
}

/// Make `tenant`'s failed delivery `id` pending again, due now, with the
/// whole retry schedule ahead of it. The `webhook-id` stays the same, so a
/// receiver that did get an earlier attempt recognises the duplicate.
pub async fn redrive(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Redrive, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE tenant = $1 AND id = $2 FOR UPDATE")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(status) = status.as_deref().map(Status::parse) else { return Ok(Redrive::NotFound) };
    if status != Status::Failed {
        return Ok(Redrive::NotFailed(status));
    }
    sqlx::query(
        "UPDATE webhook_deliveries
            SET status = 'pending', next_attempt_at = now(), round_start = attempts,
                finished_at = NULL, updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(get(pool, tenant, id).await?.map_or(Redrive::NotFound, |view| Redrive::Redriven(Box::new(view))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_the_notifier_can_never_call_are_refused_with_a_reason() {
        assert_eq!(refusal("https://example.com/hook?a=1"), None);
        assert_eq!(refusal("http://127.0.0.1:9000/h"), None);
        for url in ["http://127.0.0.1:9/h\u{0}x", "http://a.example/\n", "ftp://a.example/", "/relative", "http://"] {
            assert!(refusal(url).is_some(), "{url:?}");
        }
        assert!(refusal(&format!("https://a.example/{}", "a".repeat(MAX_URL_BYTES))).is_some());
    }

    #[test]
    fn a_refused_url_is_stored_escaped_and_bounded() {
        assert_eq!(displayable("http://h/\u{0}x\u{1b}"), "http://h/\\u{0}x\\u{1b}");
        assert!(displayable(&"a".repeat(10 * MAX_URL_BYTES)).len() <= MAX_URL_BYTES + '…'.len_utf8());
    }
}
