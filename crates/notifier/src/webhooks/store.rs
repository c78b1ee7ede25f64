//! The `webhook_deliveries` and `webhook_attempts` tables (see
//! `migrations/0002_webhooks.sql` and later): creating a delivery with its
//! event, and the per-tenant views and redrive the API serves. Claiming due
//! deliveries is [`super::claims`]; recording an attempt's outcome is
//! [`super::attempts`].

use chrono::{DateTime, Utc};
use onceflow_contracts::{ResultEvent, envelope::Envelope};
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

use super::endpoints;

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
    pub(super) fn as_str(self) -> &'static str {
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
/// Neither is ever attempted. A delivery to a destination whose breaker (the
/// tenant's, for that destination) is open is due when the cool-down ends.
/// Returns the delivery id (the `webhook-id`).
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
                 greatest(now(), (SELECT open_until FROM webhook_breakers
                                  WHERE tenant = $3 AND destination = $13 AND state = 'open')),
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
    /// `scheme://host:port`: the breaker is shared by every delivery of this
    /// tenant there (other tenants' deliveries there have breakers of their
    /// own).
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
    LEFT JOIN webhook_breakers b
           ON b.tenant = d.tenant AND b.destination = d.destination AND b.state <> 'closed' AND d.status = 'pending'";

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
