//! The `webhook_deliveries` and `webhook_attempts` tables (see
//! `migrations/0002_webhooks.sql` and `0004_breakers_and_endpoints.sql`):
//! creating a delivery with its event, claiming due deliveries under a lease
//! (past destinations whose circuit breaker is not closed, and one probe per
//! destination whose cool-down is over), recording each attempt's outcome
//! with its breaker and endpoint effects, and the per-tenant views the API
//! serves.

use std::time::Duration;

use chrono::{DateTime, Utc};
use onceflow_contracts::{ResultEvent, envelope::Envelope};
use onceflow_webhook::{BreakerPolicy, breaker::Signal};
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

use super::{
    breakers,
    endpoints::{self, Cause, ChangeError},
};

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
    /// Ended without an attempt: the tenant's endpoint (this callback URL) is
    /// disabled because it answered `410 Gone`.
    EndpointDisabled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::EndpointDisabled => "endpoint_disabled",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "endpoint_disabled" => Self::EndpointDisabled,
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

/// Where a delivery stands among those of its key: the deliveries of one
/// ordering key to one URL go out one at a time, in `seq` order (see
/// migration 0006).
#[derive(Debug, Clone, Copy)]
pub struct Order<'a> {
    /// The result record's Kafka key (its command's); `None`: no order.
    pub key: Option<&'a str>,
    /// The stored event's `seq`.
    pub seq: i64,
}

/// Record the delivery of `event` to `url`, in the transaction storing the
/// event. The event id is unique in the table, so this is idempotent too.
/// A `url` with a [`refusal`] gets a delivery that is `failed` from the
/// start, with the refusal as its `last_error` and the URL escaped; one whose
/// endpoint the tenant has disabled is `endpoint_disabled` from the start.
/// Neither is ever attempted. A delivery to a destination whose breaker is
/// open is due when the cool-down ends. Returns the delivery id (the
/// `webhook-id`).
pub async fn enqueue(
    tx: &mut PgConnection,
    event: &ResultEvent,
    job_id: Uuid,
    url: &str,
    envelope: &Envelope,
    order: Order<'_>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    // Serialised once: every attempt sends (and signs) the same bytes.
    let body = event.to_client_json().to_string();
    let refused = refusal(url);
    let disabled = match refused {
        Some(_) => None,
        None => endpoints::disabled_id(tx, &event.tenant, url).await?,
    };
    let destination = reqwest::Url::parse(url).ok().as_ref().and_then(onceflow_webhook::breaker::destination);
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
    if let Some(endpoint) = disabled {
        tracing::info!(
            correlation_id = %event.correlation_id,
            webhook_id = %id,
            endpoint_id = %endpoint,
            "webhook endpoint disabled; the delivery ends unsent"
        );
        metrics::counter!("onceflow_webhook_deliveries_total", "outcome" => "endpoint_disabled").increment(1);
    }
    let (status, ended_because) = match (&refused, disabled) {
        (Some(reason), _) => ("failed", Some(reason.clone())),
        (None, Some(endpoint)) => (Status::EndpointDisabled.as_str(), Some(endpoints::disabled_error(endpoint))),
        (None, None) => ("pending", None),
    };
    sqlx::query(
        "INSERT INTO webhook_deliveries
            (id, event_id, tenant, job_id, correlation_id, event_type, url, body, traceparent, tracestate,
             status, last_error, finished_at, destination, next_attempt_at, order_key, event_seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                 CASE WHEN $11 = 'pending' THEN NULL ELSE now() END, $13,
                 greatest(now(), (SELECT open_until FROM webhook_breakers WHERE destination = $13 AND state = 'open')),
                 $14, $15)
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
    .bind(status)
    .bind(&ended_because)
    .bind(&destination)
    .bind(order.key)
    .bind(order.seq)
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
    /// `scheme://host:port`, the key of its circuit breaker (`None` only for
    /// a URL without a host, which is never sent).
    pub destination: Option<String>,
    /// Claimed as the half-open probe of its destination's breaker.
    pub probe: bool,
    /// The tenant's endpoint (this URL) is disabled: end it unsent.
    pub endpoint_disabled: Option<Uuid>,
}

/// What a claim returns of each delivery: its fields, whether the previous
/// claim's lease ran out, and whether its endpoint is disabled.
const CLAIMED_COLUMNS: &str = "d.id, d.tenant, d.job_id, d.correlation_id, d.url, d.body, d.traceparent,
    d.tracestate, d.attempts, d.round_start, d.destination, expired_lease IS NOT NULL AS previous_abandoned,
    (SELECT e.id FROM webhook_endpoints e WHERE e.tenant = d.tenant AND e.url = d.url AND e.state = 'disabled')
        AS endpoint_disabled";

/// A delivery `w` may go only when no earlier one of its key to its URL is
/// still pending (see [`Order`]).
const NO_EARLIER_PENDING: &str = "NOT EXISTS (SELECT 1 FROM webhook_deliveries p
     WHERE p.tenant = w.tenant AND p.url = w.url AND p.order_key = w.order_key AND p.event_seq < w.event_seq
       AND p.status = 'pending')";

/// Claim up to `limit` due deliveries for `lease`, past those whose
/// destination's circuit breaker is open or probing (they wait, their
/// attempts untouched). `SKIP LOCKED` lets the workers of every instance
/// claim at once without waiting on each other or claiming the same row; the
/// lease (not a held transaction) keeps the row reserved while the HTTP
/// request runs.
pub async fn claim_due(pool: &PgPool, lease: Duration, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease_token = Uuid::new_v4();
    let rows = sqlx::query(&format!(
        "UPDATE webhook_deliveries d
            SET lease_token = $1,
                lease_until = now() + make_interval(secs => $2),
                attempts = d.attempts + 1,
                updated_at = now()
           FROM (SELECT id, lease_until AS expired_lease FROM webhook_deliveries w
                  WHERE status = 'pending' AND next_attempt_at <= now()
                    AND (lease_until IS NULL OR lease_until < now())
                    AND NOT EXISTS (SELECT 1 FROM webhook_breakers b
                                     WHERE b.destination = w.destination AND b.state <> 'closed')
                    AND {NO_EARLIER_PENDING}
                  ORDER BY next_attempt_at
                  LIMIT $3
                  FOR UPDATE OF w SKIP LOCKED) due
          WHERE d.id = due.id
      RETURNING {CLAIMED_COLUMNS}, false AS probe"
    ))
    .bind(lease_token)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|row| claimed_from_row(row, lease_token)).collect()
}

/// Claim the half-open probe of up to `limit` destinations whose breaker's
/// cool-down is over (or whose previous probe's lease ran out): for each,
/// its earliest due delivery, and the breaker becomes half-open with this
/// claim's lease, in one statement, so exactly one probe goes out per
/// destination whatever the number of workers and instances.
pub async fn claim_probes(pool: &PgPool, lease: Duration, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let lease_token = Uuid::new_v4();
    let rows = sqlx::query(&format!(
        "WITH ready AS (
             SELECT destination FROM webhook_breakers
              WHERE (state = 'open' AND open_until <= now()) OR (state = 'half_open' AND probe_until < now())
              ORDER BY open_until
              LIMIT $3
              FOR UPDATE SKIP LOCKED),
         picked AS (
             SELECT ready.destination, due.id, due.expired_lease FROM ready
              CROSS JOIN LATERAL (
                  SELECT id, lease_until AS expired_lease FROM webhook_deliveries w
                   WHERE w.destination = ready.destination AND status = 'pending' AND next_attempt_at <= now()
                     AND (lease_until IS NULL OR lease_until < now())
                     AND {NO_EARLIER_PENDING}
                   ORDER BY next_attempt_at
                   LIMIT 1
                   FOR UPDATE SKIP LOCKED) due),
         probing AS (
             UPDATE webhook_breakers b
                SET state = 'half_open', probe_token = $1, probe_until = now() + make_interval(secs => $2),
                    updated_at = now()
               FROM picked WHERE b.destination = picked.destination)
         UPDATE webhook_deliveries d
            SET lease_token = $1,
                lease_until = now() + make_interval(secs => $2),
                attempts = d.attempts + 1,
                updated_at = now()
           FROM picked
          WHERE d.id = picked.id
      RETURNING {CLAIMED_COLUMNS}, true AS probe"
    ))
    .bind(lease_token)
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|row| claimed_from_row(row, lease_token)).collect()
}

fn claimed_from_row(row: &PgRow, lease_token: Uuid) -> Result<Claimed, sqlx::Error> {
    let attempt: i32 = row.try_get("attempts")?;
    let round_start: i32 = row.try_get("round_start")?;
    let url: String = row.try_get("url")?;
    // Deliveries from before destinations were stored get theirs now.
    let destination = row
        .try_get::<Option<String>, _>("destination")?
        .or_else(|| reqwest::Url::parse(&url).ok().as_ref().and_then(onceflow_webhook::breaker::destination));
    Ok(Claimed {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        job_id: row.try_get("job_id")?,
        correlation_id: row.try_get("correlation_id")?,
        url,
        body: row.try_get("body")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
        attempt,
        attempts_in_round: u32::try_from(attempt - round_start).unwrap_or(1),
        previous_abandoned: row.try_get("previous_abandoned")?,
        lease_token,
        destination,
        probe: row.try_get("probe")?,
        endpoint_disabled: row.try_get("endpoint_disabled")?,
    })
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
/// the delivery: its destination's breaker records the outcome first (a
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
            breakers::record(&mut tx, effects.breaker, destination, effects.signal, claimed.lease_token).await?
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

/// How long until the next delivery becomes claimable (due, any lease
/// expired, and its destination's breaker closed, or ready for a probe, or
/// its probe's lease expired), or `None` when nothing is pending. A delivery
/// held by a probe in flight counts from the probe's lease: the probe's
/// outcome wakes the workers sooner (`NOTIFY` when the breaker closes).
pub async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    // `greatest` ignores NULLs: a delivery without a breaker, or whose
    // breaker is closed, is due at its own time.
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(greatest(
                    d.next_attempt_at, d.lease_until,
                    CASE b.state WHEN 'open' THEN b.open_until WHEN 'half_open' THEN b.probe_until END)) - now())::float8
           FROM webhook_deliveries d
           LEFT JOIN webhook_breakers b ON b.destination = d.destination AND b.state <> 'closed'
          WHERE d.status = 'pending'",
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

/// The circuit breaker a pending delivery waits on.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BreakerView {
    /// `scheme://host:port`: the breaker is shared by every delivery there.
    pub destination: String,
    /// `open` (cooling down until `next_probe_at`) or `half_open` (one
    /// delivery is out as the probe; the others wait for its outcome).
    #[schema(example = "open")]
    pub state: String,
    /// When one delivery goes out as the probe (while `open`).
    pub next_probe_at: Option<DateTime<Utc>>,
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
    /// When the next attempt is due, while pending (while its destination's
    /// breaker is open: the end of the cool-down, when the probe may go).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Present while the delivery is pending and waits on its destination's
    /// open circuit breaker: it is not attempted (and spends no attempts)
    /// until a probe to the destination succeeds.
    pub breaker: Option<BreakerView>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempts: Vec<AttemptView>,
}

const DELIVERY_COLUMNS: &str =
    "d.id, d.job_id, d.event_id, d.event_type, d.correlation_id, d.url, d.status, d.attempts,
    CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
    d.last_status_code, d.last_error, d.created_at, d.updated_at, d.finished_at,
    b.destination AS breaker_destination, b.state AS breaker_state,
    CASE WHEN b.state = 'open' THEN b.open_until END AS next_probe_at";

/// Deliveries with the breaker they wait on, if any.
const DELIVERIES: &str = "webhook_deliveries d
    LEFT JOIN webhook_breakers b ON b.destination = d.destination AND b.state <> 'closed' AND d.status = 'pending'";

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
        breaker: match row.try_get::<Option<String>, _>("breaker_state")? {
            Some(state) => Some(BreakerView {
                destination: row.try_get("breaker_destination")?,
                state,
                next_probe_at: row.try_get("next_probe_at")?,
            }),
            None => None,
        },
        attempts: Vec::new(),
    })
}

/// `tenant`'s deliveries of `job_id`, oldest first, with their attempts.
/// Another tenant's job looks exactly like one without deliveries.
pub async fn for_job(pool: &PgPool, tenant: &str, job_id: Uuid) -> Result<Vec<DeliveryView>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM {DELIVERIES} WHERE d.tenant = $1 AND d.job_id = $2 ORDER BY d.created_at, d.id"
    ))
    .bind(tenant)
    .bind(job_id)
    .fetch_all(pool)
    .await?;
    let mut deliveries = rows.iter().map(delivery_from_row).collect::<Result<Vec<_>, _>>()?;
    attach_attempts(&mut *pool.acquire().await?, &mut deliveries).await?;
    Ok(deliveries)
}

/// `tenant`'s delivery `id`, if it is theirs.
pub async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<DeliveryView>, sqlx::Error> {
    get_on(&mut *pool.acquire().await?, tenant, id).await
}

/// [`get`] on `connection`, e.g. inside the transaction that changed it.
async fn get_on(
    connection: &mut sqlx::PgConnection,
    tenant: &str,
    id: Uuid,
) -> Result<Option<DeliveryView>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {DELIVERY_COLUMNS} FROM {DELIVERIES} WHERE d.tenant = $1 AND d.id = $2"))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let mut deliveries = vec![delivery_from_row(&row)?];
    attach_attempts(connection, &mut deliveries).await?;
    Ok(deliveries.pop())
}

async fn attach_attempts(
    connection: &mut sqlx::PgConnection,
    deliveries: &mut [DeliveryView],
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = deliveries.iter().map(|d| d.id).collect();
    let rows = sqlx::query(
        "SELECT delivery_id, attempt, started_at, latency_ms, status_code, succeeded, error, response_excerpt,
                next_attempt_at
           FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(connection)
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
    /// Not ended unsuccessfully: still pending, or already delivered.
    NotFailed(Status),
    /// Its endpoint is disabled: enable it first.
    EndpointDisabled(Uuid),
    NotFound,
}

/// Make `tenant`'s `failed` or `endpoint_disabled` delivery `id` pending
/// again, due now, with the whole retry schedule ahead of it, unless its
/// endpoint is disabled (it would end again at once). The `webhook-id` stays
/// the same, so a receiver that did get an earlier attempt recognises the
/// duplicate.
pub async fn redrive(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Redrive, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT status, url FROM webhook_deliveries WHERE tenant = $1 AND id = $2 FOR UPDATE")
            .bind(tenant)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((status, url)) = row else { return Ok(Redrive::NotFound) };
    let status = Status::parse(&status);
    if !matches!(status, Status::Failed | Status::EndpointDisabled) {
        return Ok(Redrive::NotFailed(status));
    }
    if let Some(endpoint) = endpoints::disabled_id(&mut tx, tenant, &url).await? {
        return Ok(Redrive::EndpointDisabled(endpoint));
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
    // Read in the transaction: the state the redrive made, which a worker
    // woken by the commit may change at once.
    let view = get_on(&mut tx, tenant, id).await?;
    tx.commit().await?;
    Ok(view.map_or(Redrive::NotFound, |view| Redrive::Redriven(Box::new(view))))
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
