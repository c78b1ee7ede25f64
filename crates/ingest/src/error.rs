//! Every HTTP error of ingest, mapped in this one place to an RFC 9457
//! `application/problem+json` response with a stable `type`.
//!
//! Internal errors are logged with their cause and answered with a generic
//! `500`: what failed inside is never leaked to the client.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    InvalidIdempotencyKey(String),
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    InvalidCommand(String),
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    RequestInFlight { retry_after_secs: u64 },
    #[error("job not found")]
    JobNotFound,
    #[error("{reason}")]
    Overloaded { reason: String, retry_after_secs: u64 },
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status_and_type(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            Self::InvalidIdempotencyKey(_) => {
                (StatusCode::BAD_REQUEST, "invalid-idempotency-key", "Invalid Idempotency-Key")
            }
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type")
            }
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large"),
            Self::InvalidCommand(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-command", "Invalid command"),
            Self::IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused with another request",
            ),
            Self::RequestInFlight { .. } => (StatusCode::CONFLICT, "request-in-flight", "Request in flight"),
            Self::JobNotFound => (StatusCode::NOT_FOUND, "job-not-found", "Job not found"),
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "Service overloaded"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(error.into())
    }
}

impl From<onceflow_outbox::Error> for ApiError {
    fn from(error: onceflow_outbox::Error) -> Self {
        Self::Internal(error.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.status_and_type();
        if let Self::Internal(cause) = &self {
            tracing::error!(error = ?cause, "request failed");
        }
        let body = serde_json::json!({
            "type": format!("https://onceflow.dev/problems/{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            Self::RequestInFlight { retry_after_secs } | Self::Overloaded { retry_after_secs, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
