//! The idempotency record of a key as ingest answers from it: the exact
//! response stored with the first request, replayed byte for byte to the
//! same request, `422` to another (see [`super`] for the contract).

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use onceflow_runtime::auth::Tenant;
use sqlx::Row as _;
use uuid::Uuid;

use crate::{AppState, error::ApiError, group_commit::Acceptance};

pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// A response as stored for replay.
struct StoredResponse {
    status: u16,
    body: Vec<u8>,
    location: String,
}

impl StoredResponse {
    fn into_response(self, replayed: bool) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::ACCEPTED);
        let mut response = (status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(location) = HeaderValue::from_str(&self.location) {
            headers.insert(header::LOCATION, location);
        }
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}

impl Acceptance {
    /// The `202` of a first request, as stored for its replays.
    pub(super) fn accepted_response(self) -> Response {
        StoredResponse {
            status: u16::try_from(self.response_status).unwrap_or(202),
            body: self.response_body,
            location: self.response_location,
        }
        .into_response(false)
    }
}

/// The recorded answer of `key`, unless it expired.
pub(super) async fn recorded(state: &AppState, tenant: &Tenant, key: &str) -> Result<Option<Recorded>, ApiError> {
    let row = sqlx::query(
        "SELECT fingerprint, job_id, response_status, response_body, response_location
         FROM idempotency_keys WHERE tenant = $1 AND idempotency_key = $2 AND expires_at >= now()",
    )
    .bind(&tenant.0)
    .bind(key)
    .fetch_optional(&state.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let status: i16 = row.try_get("response_status")?;
    Ok(Some(Recorded {
        fingerprint: row.try_get("fingerprint")?,
        job_id: row.try_get("job_id")?,
        response: StoredResponse {
            status: u16::try_from(status).unwrap_or(202),
            body: row.try_get("response_body")?,
            location: row.try_get("response_location")?,
        },
    }))
}

/// A key's record: the request it was first used with, and the answer given.
pub(super) struct Recorded {
    fingerprint: Vec<u8>,
    /// The job the key made, which the request's span and logs then name
    /// (not the id the request was given while it was judged).
    job_id: Uuid,
    response: StoredResponse,
}

impl Recorded {
    /// The recorded response for the same request, `422` for another.
    pub(super) fn answer(self, fingerprint: &[u8]) -> Result<Response, ApiError> {
        tracing::Span::current().record("job_id", tracing::field::display(self.job_id));
        if self.fingerprint != fingerprint {
            return Err(ApiError::IdempotencyKeyReused);
        }
        tracing::info!("replaying stored response");
        Ok(self.response.into_response(true))
    }
}

/// A lock timeout means another request with the same key is still running.
pub(super) fn in_flight_or_internal(error: sqlx::Error) -> ApiError {
    let lock_timeout = error.as_database_error().and_then(|e| e.code()).is_some_and(|code| code == "55P03");
    if lock_timeout { ApiError::RequestInFlight { retry_after_secs: 1 } } else { error.into() }
}
