//! What a request of `POST /v1/commands` says at the door, checked before
//! anything is judged: its `Idempotency-Key`, media type, `X-Correlation-Id`,
//! its body read up to the limit, and the fingerprint a replay is matched by.

use axum::{
    body::{Body, Bytes},
    extract::{
        FromRequest as _, Request,
        rejection::{BytesRejection, FailedToBufferBody},
    },
    http::{HeaderMap, header, request::Parts},
};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{AppState, error::ApiError};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const CORRELATION_ID: &str = "x-correlation-id";
const PATH: &str = "/v1/commands";

/// Read the body, at most `max_body_bytes` of it: a declared length over the
/// limit is refused before reading anything, an undeclared one as soon as
/// the limit is passed. The router's `DefaultBodyLimit` is the same setting,
/// so axum's own 2 MB default never applies.
pub(super) async fn read_body(state: &AppState, parts: &Parts, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if declared.is_some_and(|length: u64| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let request = Request::from_parts(parts.clone(), body);
    Bytes::from_request(request, state).await.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            ApiError::PayloadTooLarge { limit }
        }
        other => ApiError::UnreadableBody(other.body_text()),
    })
}

/// The `Idempotency-Key`: 1–255 visible ASCII characters.
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(IDEMPOTENCY_KEY)
        .ok_or_else(|| ApiError::InvalidIdempotencyKey("the Idempotency-Key header is required".to_owned()))?;
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
        ApiError::InvalidIdempotencyKey("Idempotency-Key must be 1-255 visible ASCII characters".to_owned())
    })?;
    Ok(key)
}

pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type must be application/json, got `{content_type}`")))
    }
}

/// The client's `X-Correlation-Id`, which must be 1–128 visible ASCII
/// characters (it travels in Kafka headers and log lines), or a fresh one.
pub(super) fn correlation_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(CORRELATION_ID) else { return Ok(Uuid::new_v4().to_string()) };
    value
        .to_str()
        .ok()
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::InvalidCorrelationId("X-Correlation-Id must be 1-128 visible ASCII characters".to_owned())
        })
}

/// SHA-256 of the method, the path and the canonical JSON body: key order and
/// white space do not make two requests different.
pub(super) fn fingerprint(request: &serde_json::Value) -> [u8; 32] {
    let canonical = onceflow_contracts::payload::canonical_json(request);
    let mut hasher = Sha256::new();
    hasher.update(b"POST ");
    hasher.update(PATH.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn fingerprint_ignores_key_order_and_white_space() {
        let parse = |text: &str| fingerprint(&serde_json::from_str(text).unwrap());
        let a = parse(r#"{"type":"ledger.deposit","payload":{"account_id":"a","amount":5}}"#);
        let b = parse("{ \"payload\" : { \"amount\":5, \"account_id\":\"a\" },\n \"type\":\"ledger.deposit\" }");
        let c = parse(r#"{"type":"ledger.deposit","payload":{"account_id":"a","amount":6}}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn idempotency_keys_must_be_visible_ascii_of_bounded_length() {
        let key = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(value).unwrap());
            idempotency_key(&headers).map(str::to_owned)
        };
        assert!(key("order-42").is_ok());
        assert!(key(&"k".repeat(255)).is_ok());
        assert!(key(&"k".repeat(256)).is_err());
        assert!(key("has space").is_err());
        assert!(key("").is_err());
        assert!(idempotency_key(&HeaderMap::new()).is_err());
    }
}
