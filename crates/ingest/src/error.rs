//! Every HTTP error of ingest, mapped in this one place to an RFC 9457
//! [`Problem`] with a stable `type`.
//!
//! Internal errors are logged with their cause and answered with a generic
//! `500`: what failed inside is never leaked to the client.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use onceflow_runtime::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    InvalidIdempotencyKey(String),
    #[error("{0}")]
    InvalidCorrelationId(String),
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("the request body could not be read: {0}")]
    UnreadableBody(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    InvalidCommand(String),
    #[error(
        "the webhook endpoint {url} is disabled for this tenant (it answered 410 Gone); enable it with \
         POST /v1/webhook-endpoints/{endpoint_id}/enable on the notifier, or name another callback_url"
    )]
    EndpointDisabled { url: String, endpoint_id: uuid::Uuid },
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    RequestInFlight { retry_after_secs: u64 },
    #[error("job not found")]
    JobNotFound,
    #[error("{0}")]
    JobEnded(String),
    #[error("the processor has not recorded the job yet (it is on its way: try again in a second)")]
    NotCancellable,
    #[error("the processor did not answer (or execution_status_url is not set); try again")]
    ProcessorUnavailable,
    #[error("{reason}")]
    Overloaded { reason: String, retry_after_secs: u64 },
    #[error("{reason}")]
    OverShare { reason: String, retry_after_secs: u64 },
    #[error("this tenant may submit {rate_per_sec} commands a second (submit_limits.rate_per_sec); retry later")]
    RateLimited { rate_per_sec: u32, retry_after_secs: u64, fields: crate::limits::RateLimitFields },
    #[error("this tenant has {limit} requests in flight (submit_limits.max_in_flight); retry when one was answered")]
    TooManyInFlight { limit: u32 },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn problem(&self) -> Problem {
        let (status, slug, title) = match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Self::InvalidIdempotencyKey(_) => {
                (StatusCode::BAD_REQUEST, "invalid-idempotency-key", "Invalid Idempotency-Key")
            }
            Self::InvalidCorrelationId(_) => {
                (StatusCode::BAD_REQUEST, "invalid-correlation-id", "Invalid X-Correlation-Id")
            }
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON"),
            Self::UnreadableBody(_) => (StatusCode::BAD_REQUEST, "unreadable-body", "Unreadable body"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
            }
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large"),
            Self::InvalidCommand(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-command", "Invalid command"),
            Self::EndpointDisabled { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "endpoint-disabled", "Webhook endpoint disabled")
            }
            Self::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused with another request",
            ),
            Self::RequestInFlight { .. } => (StatusCode::CONFLICT, "request-in-flight", "Request in flight"),
            Self::JobNotFound => (StatusCode::NOT_FOUND, "job-not-found", "Job not found"),
            Self::JobEnded(_) => (StatusCode::CONFLICT, "job-ended", "Job ended"),
            Self::NotCancellable => (StatusCode::CONFLICT, "not-cancellable", "Not cancellable now"),
            Self::ProcessorUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "processor-unavailable", "Processor unavailable")
            }
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Service overloaded"),
            Self::OverShare { .. } => (StatusCode::TOO_MANY_REQUESTS, "over-share", "Over the tenant's share"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Rate limited"),
            Self::TooManyInFlight { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too-many-in-flight", "Too many requests in flight")
            }
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        };
        let problem = Problem::new(status, slug, title, self.to_string());
        match self.retry_after_secs() {
            Some(secs) => problem.retry_after(secs),
            None => problem,
        }
    }

    /// The `Retry-After` its answer carries, for the errors a client may
    /// simply send again later.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RequestInFlight { retry_after_secs }
            | Self::Overloaded { retry_after_secs, .. }
            | Self::OverShare { retry_after_secs, .. }
            | Self::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            Self::NotCancellable | Self::ProcessorUnavailable | Self::TooManyInFlight { .. } => Some(1),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            // Every pooled connection is busy: shed rather than queue.
            sqlx::Error::PoolTimedOut => {
                metrics::counter!("onceflow_ingest_shed_total", "reason" => "database_pool").increment(1);
                Self::Overloaded { reason: "the database is saturated; retry later".to_owned(), retry_after_secs: 1 }
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<onceflow_outbox::Error> for ApiError {
    fn from(error: onceflow_outbox::Error) -> Self {
        Self::Internal(error.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = ?cause, "request failed");
        }
        let mut response = self.problem().into_response();
        if let Self::RateLimited { fields, .. } = &self {
            fields.insert_into(response.headers_mut());
        }
        response
    }
}
