//! Webhook endpoint states: which tenants' callback URLs the notifier has
//! disabled (they answered `410 Gone`), so `POST /v1/commands` can refuse a
//! command naming one with `422 endpoint-disabled` instead of accepting work
//! whose webhook would never be sent.
//!
//! ```text
//! notifier ──outbox──▶ onceflow.webhook-endpoints (compacted) ──▶ apply ──▶ webhook_endpoint_states
//!                                                                                 ▲
//!                               POST /v1/commands ── disabled(tenant, url)? ──────┘ (primary key)
//! ```
//!
//! The two services share no database, so the notifier publishes every
//! change and this consumer keeps the latest state per (tenant, URL): a
//! record whose `version` is not above the stored one (a redelivery, or one
//! overtaken by a later change) changes nothing. The topic is compacted, so
//! a new ingest database reading it from the start gets every endpoint's
//! current state.
//!
//! G8: a record that is not a valid endpoint state (no envelope, undecodable,
//! a tenant that disagrees with its envelope, a URL no command could name) is
//! a data error: parked under [`PARKING_CONSUMER`] and consumption goes on; a
//! database outage makes the consumer wait.
//!
//! The check is eventually consistent: a command submitted between the `410`
//! and this consumer applying the change is accepted, and its delivery ends
//! at once as `endpoint_disabled` in the notifier, which holds the
//! authoritative state.

use chrono::{DateTime, Utc};
use onceflow_contracts::{EndpointStatus, WebhookEndpointState};
use onceflow_runtime::kafka::RecordError;
use rdkafka::{Message as _, message::OwnedMessage};
use sqlx::PgPool;
use uuid::Uuid;

/// The name this consumer parks records under.
pub const PARKING_CONSUMER: &str = "ingest.webhook-endpoints";

/// The longest tenant name a state may carry (tenants are configured names,
/// far shorter).
const MAX_TENANT_BYTES: usize = 255;

/// Apply one endpoint state record.
pub async fn apply(pool: &PgPool, message: OwnedMessage) -> Result<(), RecordError> {
    let event = decode(&message)?;
    let endpoint_id = Uuid::parse_str(&event.endpoint_id)
        .map_err(|_| RecordError::data(format!("endpoint state with a malformed id `{}`", event.endpoint_id)))?;
    let changed_at = DateTime::<Utc>::from_timestamp_millis(event.changed_at).ok_or_else(|| {
        RecordError::data(format!("endpoint state with an impossible changed_at {}", event.changed_at))
    })?;
    let applied = sqlx::query(
        "INSERT INTO webhook_endpoint_states (tenant, url, endpoint_id, state, version, reason, changed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (tenant, url) DO UPDATE
            SET endpoint_id = EXCLUDED.endpoint_id, state = EXCLUDED.state, version = EXCLUDED.version,
                reason = EXCLUDED.reason, changed_at = EXCLUDED.changed_at, updated_at = now()
          WHERE webhook_endpoint_states.version < EXCLUDED.version",
    )
    .bind(&event.tenant)
    .bind(&event.url)
    .bind(endpoint_id)
    .bind(event.state.as_str())
    .bind(event.version)
    .bind(&event.reason)
    .bind(changed_at)
    .execute(pool)
    .await?;
    tracing::info!(
        %endpoint_id,
        tenant = %event.tenant,
        state = event.state.as_str(),
        version = event.version,
        applied = applied.rows_affected() == 1,
        "webhook endpoint state received"
    );
    Ok(())
}

fn decode(message: &OwnedMessage) -> Result<WebhookEndpointState, RecordError> {
    let envelope = onceflow_runtime::kafka::envelope_of(message)
        .map_err(|error| RecordError::data(format!("endpoint state without a valid envelope: {error}")))?;
    let event = WebhookEndpointState::decode(&envelope.schema_id, message.payload().unwrap_or_default())
        .map_err(|error| RecordError::data(format!("undecodable endpoint state: {error}")))?;
    if event.tenant != envelope.tenant {
        return Err(RecordError::data(format!(
            "endpoint state of tenant `{}` in an envelope of tenant `{}`",
            event.tenant, envelope.tenant
        )));
    }
    if event.tenant.is_empty() || event.tenant.len() > MAX_TENANT_BYTES {
        return Err(RecordError::data("endpoint state with an empty or overlong tenant"));
    }
    // What no command can name needs no row (and a row key must stay small).
    if event.url.len() > onceflow_webhook::ssrf::MAX_CALLBACK_URL_LEN || event.url.chars().any(char::is_control) {
        return Err(RecordError::data(
            "endpoint state with a URL no command can name (too long or control characters)",
        ));
    }
    Ok(event)
}

/// The id of `tenant`'s endpoint `url` if it is disabled.
pub async fn disabled(pool: &PgPool, tenant: &str, url: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT endpoint_id FROM webhook_endpoint_states WHERE tenant = $1 AND url = $2 AND state = $3")
        .bind(tenant)
        .bind(url)
        .bind(EndpointStatus::Disabled.as_str())
        .fetch_optional(pool)
        .await
}
