//! The operator's side of every service: one `admin.token` setting and the
//! one bearer check of every `/admin/*` endpoint (dead letters on the
//! processor, parked records on ingest and the notifier).

use axum::{
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse as _, Response},
};
use subtle::ConstantTimeEq as _;

use crate::problem::Problem;

/// `[admin]` of a service's configuration.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct AdminConfig {
    /// Bearer token of the `/admin/*` endpoints; empty (the default) serves
    /// none of them. Set it from a secret, e.g. `ONCEFLOW_ADMIN__TOKEN`.
    #[serde(default)]
    pub token: String,
}

/// Whether `headers` carry `Authorization: Bearer <token>`. Compared in
/// constant time, so response timing does not reveal how much of a guess
/// matched; an empty `token` authorises nobody.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// `401` problem+json for a request without the admin token.
pub fn unauthorized() -> Response {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", "a valid admin token is required")
        .into_response()
}

/// `?limit=N` of an admin listing.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// How many to list, newest first: 100 unless given, at most 1,000.
    limit: Option<i64>,
}

impl ListQuery {
    /// The rows to list: 100 unless asked, at least 1, at most 1,000.
    pub fn limit(&self) -> i64 {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_matches(&headers, "s3cret"));
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(bearer_matches(&headers, "s3cret"));
        assert!(!bearer_matches(&headers, "s3cre"));
        assert!(!bearer_matches(&headers, ""));
        headers.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert!(!bearer_matches(&headers, ""));
    }
}
