//! RFC 9457 problem details: the one shape of every HTTP error onceflow sends.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem response. `slug` becomes the stable `type` URI clients match on.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Sent as `Retry-After` (seconds) when the client should try again later.
    pub retry_after_secs: Option<u64>,
    /// Extension members (RFC 9457, section 3.2), beside the standard ones.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, slug, title, detail: detail.into(), retry_after_secs: None, extensions: serde_json::Map::new() }
    }

    /// `401`: no API key, or one that names no tenant.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", "missing or invalid API key")
    }

    /// The generic problem of `status`, for errors that no handler typed
    /// (a missing route, a wrong method, a rejected extractor, a timeout).
    pub fn for_status(status: StatusCode, detail: impl Into<String>) -> Self {
        let (slug, title) = match status {
            StatusCode::BAD_REQUEST => ("bad-request", "Bad request"),
            StatusCode::UNAUTHORIZED => ("unauthorized", "Unauthorized"),
            StatusCode::FORBIDDEN => ("forbidden", "Forbidden"),
            StatusCode::NOT_FOUND => ("not-found", "Not found"),
            StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "Method not allowed"),
            StatusCode::NOT_ACCEPTABLE => ("not-acceptable", "Not acceptable"),
            StatusCode::REQUEST_TIMEOUT => ("request-timeout", "Request timeout"),
            StatusCode::CONFLICT => ("conflict", "Conflict"),
            StatusCode::LENGTH_REQUIRED => ("length-required", "Length required"),
            StatusCode::PAYLOAD_TOO_LARGE => ("payload-too-large", "Payload too large"),
            StatusCode::URI_TOO_LONG => ("uri-too-long", "URI too long"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported-media-type", "Unsupported media type"),
            StatusCode::UNPROCESSABLE_ENTITY => ("unprocessable-content", "Unprocessable content"),
            StatusCode::TOO_MANY_REQUESTS => ("too-many-requests", "Too many requests"),
            StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "Service unavailable"),
            s if s.is_client_error() => ("client-error", "Client error"),
            _ => ("internal", "Internal error"),
        };
        Self::new(status, slug, title, detail)
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_secs = Some(seconds);
        self
    }

    /// With the extension member `name` (a standard member's name is ignored).
    pub fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        if !matches!(name, "type" | "title" | "status" | "detail" | "instance") {
            self.extensions.insert(name.to_owned(), value);
        }
        self
    }

    /// The `type` URI of a problem slug.
    pub fn type_uri(slug: &str) -> String {
        format!("https://onceflow.dev/problems/{slug}")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = self.extensions;
        body.insert("type".to_owned(), Self::type_uri(self.slug).into());
        body.insert("title".to_owned(), self.title.into());
        body.insert("status".to_owned(), self.status.as_u16().into());
        body.insert("detail".to_owned(), self.detail.into());
        let body = serde_json::Value::Object(body);
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
