//! Webhook endpoints: a tenant's callback URL, disabled when it answers
//! `410 Gone` and enabled again by the tenant (`webhook_endpoints`, see
//! `migrations/0004_breakers_and_endpoints.sql`).
//!
//! ```text
//! attempt answered 410 ──tx{delivery failed, endpoint disabled, pending deliveries ended, outbox row}
//!                                                             │ relay
//! POST /v1/webhook-endpoints/{id}/enable ──tx{enabled, outbox}─┴──▶ onceflow.webhook-endpoints (compacted)
//!                                                                        └──▶ ingest: commands naming a
//!                                                                             disabled endpoint get 422
//! ```
//!
//! A `410` is the receiver saying, per the Standard Webhooks specification,
//! that it wants no more deliveries at that URL; so it ends more than the one
//! delivery: the endpoint is disabled for its tenant (another tenant naming
//! the same URL is not affected), its pending deliveries end as
//! `endpoint_disabled`, later ones end so at once, and ingest refuses new
//! commands naming it. The change is published through the notifier's
//! transactional outbox in the transaction that makes it, so ingest learns of
//! exactly the changes that committed (the services share no database).
//!
//! An endpoint keeps one id for its tenant and URL forever; `version` grows
//! with every change and travels with the event, so ingest keeps the latest
//! state whatever order or how often the events arrive. Only URLs that were
//! ever disabled have a row.

use chrono::{DateTime, Utc};
use onceflow_contracts::{EndpointStatus, Envelope, WebhookEndpointState, endpoint::ENDPOINT_STATE};
use onceflow_outbox::OutboxMessage;
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgRow};
use uuid::Uuid;

/// How many endpoints `GET /v1/webhook-endpoints` lists at most (the most
/// recently changed first).
pub const LIST_LIMIT: i64 = 1000;

/// One endpoint as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct EndpointView {
    /// Use it to enable the endpoint: `POST /v1/webhook-endpoints/{id}/enable`.
    pub id: Uuid,
    /// The callback URL, as commands name it.
    pub url: String,
    /// `enabled` or `disabled`.
    #[schema(example = "disabled")]
    pub state: String,
    /// Why it was disabled; null when enabled.
    pub reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Grows with every change.
    pub version: i64,
}

const COLUMNS: &str = "id, tenant, url, state, reason, disabled_at, updated_at, version";

fn from_row(row: &PgRow) -> Result<EndpointView, sqlx::Error> {
    Ok(EndpointView {
        id: row.try_get("id")?,
        url: row.try_get("url")?,
        state: row.try_get("state")?,
        reason: row.try_get("reason")?,
        disabled_at: row.try_get("disabled_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// What caused a state change, for the event's envelope.
#[derive(Debug, Clone)]
pub struct Cause {
    pub correlation_id: String,
    /// The delivery whose answer caused it, if any.
    pub causation_id: Option<String>,
}

/// The id of `tenant`'s endpoint `url` if it is disabled.
pub async fn disabled_id(tx: &mut PgConnection, tenant: &str, url: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM webhook_endpoints WHERE tenant = $1 AND url = $2 AND state = 'disabled'")
        .bind(tenant)
        .bind(url)
        .fetch_optional(&mut *tx)
        .await
}

/// The `last_error` of a delivery ended because its endpoint is disabled.
pub fn disabled_error(id: Uuid) -> String {
    format!(
        "not sent: the webhook endpoint is disabled (it answered 410 Gone); \
         enable it with POST /v1/webhook-endpoints/{id}/enable, then redrive"
    )
}

/// Disable `tenant`'s endpoint `url` in the caller's transaction: end its
/// pending deliveries that are not in flight (`except` aside, the one whose
/// answer caused this) as `endpoint_disabled`, and publish the change to
/// `topic`. Returns the endpoint, or `None` if it was disabled already.
pub async fn disable(
    tx: &mut PgConnection,
    tenant: &str,
    url: &str,
    reason: &str,
    except: Uuid,
    cause: &Cause,
    topic: &str,
) -> Result<Option<EndpointView>, ChangeError> {
    let row = sqlx::query(&format!(
        "INSERT INTO webhook_endpoints (id, tenant, url, state, version, reason, disabled_at)
         VALUES ($1, $2, $3, 'disabled', 1, $4, now())
         ON CONFLICT (tenant, url) DO UPDATE
            SET state = 'disabled', version = webhook_endpoints.version + 1, reason = EXCLUDED.reason,
                disabled_at = now(), updated_at = now()
          WHERE webhook_endpoints.state <> 'disabled'
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(url)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let endpoint = from_row(&row)?;
    let ended = sqlx::query(
        "UPDATE webhook_deliveries
            SET status = 'endpoint_disabled', last_error = $4, finished_at = now(), updated_at = now()
          WHERE tenant = $1 AND url = $2 AND status = 'pending' AND id <> $3
            AND (lease_until IS NULL OR lease_until < now())",
    )
    .bind(tenant)
    .bind(url)
    .bind(except)
    .bind(disabled_error(endpoint.id))
    .execute(&mut *tx)
    .await?;
    publish(tx, tenant, &endpoint, cause, topic).await?;
    tracing::warn!(
        endpoint_id = %endpoint.id,
        tenant,
        url,
        reason,
        pending_deliveries_ended = ended.rows_affected(),
        "webhook endpoint disabled"
    );
    metrics::counter!("onceflow_webhook_endpoint_changes_total", "to" => "disabled").increment(1);
    Ok(Some(endpoint))
}

/// What enabling an endpoint came to.
#[derive(Debug)]
pub enum Enable {
    /// Enabled now (and published).
    Enabled(EndpointView),
    /// It was enabled already; nothing changed.
    AlreadyEnabled(EndpointView),
    NotFound,
}

/// Enable `tenant`'s endpoint `id` and publish the change to `topic`.
pub async fn enable(pool: &PgPool, tenant: &str, id: Uuid, topic: &str) -> Result<Enable, ChangeError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&format!(
        "UPDATE webhook_endpoints SET state = 'enabled', version = version + 1, reason = NULL, updated_at = now()
          WHERE id = $1 AND tenant = $2 AND state = 'disabled'
      RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.rollback().await?;
        return Ok(get(pool, tenant, id).await?.map_or(Enable::NotFound, Enable::AlreadyEnabled));
    };
    let endpoint = from_row(&row)?;
    let cause = Cause { correlation_id: Uuid::new_v4().to_string(), causation_id: None };
    publish(&mut tx, tenant, &endpoint, &cause, topic).await?;
    tx.commit().await?;
    // The destination, not the URL, whose path or query may carry the tenant's secrets.
    let destination = reqwest::Url::parse(&endpoint.url).ok().as_ref().and_then(onceflow_webhook::breaker::destination);
    tracing::info!(endpoint_id = %id, tenant, destination = destination.as_deref(), "webhook endpoint enabled");
    metrics::counter!("onceflow_webhook_endpoint_changes_total", "to" => "enabled").increment(1);
    Ok(Enable::Enabled(endpoint))
}

/// `tenant`'s endpoints, most recently changed first, at most [`LIST_LIMIT`].
pub async fn list(pool: &PgPool, tenant: &str) -> Result<Vec<EndpointView>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM webhook_endpoints WHERE tenant = $1 ORDER BY updated_at DESC, id LIMIT $2"
    ))
    .bind(tenant)
    .bind(LIST_LIMIT)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// `tenant`'s endpoint `id`, if it is theirs.
pub async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<EndpointView>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE tenant = $1 AND id = $2"))
        .bind(tenant)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// Why a state change could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] onceflow_outbox::Error),
    #[error("cannot encode the endpoint state: {0}")]
    Encode(#[from] onceflow_contracts::ContractError),
}

/// Put the endpoint's new state in the outbox, keyed by its id (the topic is
/// compacted on that key).
async fn publish(
    tx: &mut PgConnection,
    tenant: &str,
    endpoint: &EndpointView,
    cause: &Cause,
    topic: &str,
) -> Result<(), ChangeError> {
    let state = if endpoint.state == "disabled" { EndpointStatus::Disabled } else { EndpointStatus::Enabled };
    let event = WebhookEndpointState {
        endpoint_id: endpoint.id.to_string(),
        tenant: tenant.to_owned(),
        url: endpoint.url.clone(),
        state,
        version: endpoint.version,
        reason: endpoint.reason.clone(),
        changed_at: endpoint.updated_at.timestamp_millis(),
    };
    let (traceparent, tracestate) = onceflow_runtime::telemetry::current_trace_context();
    let message = OutboxMessage {
        headers: Vec::new(),
        topic: topic.to_owned(),
        key: Some(endpoint.id.to_string()),
        payload: event.encode()?,
        envelope: Envelope {
            message_id: Uuid::now_v7(),
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause.causation_id.clone(),
            tenant: tenant.to_owned(),
            message_type: state.message_type().to_owned(),
            schema_id: ENDPOINT_STATE.id.clone(),
            traceparent,
            tracestate,
        },
    };
    onceflow_outbox::enqueue(tx, &message).await?;
    Ok(())
}
