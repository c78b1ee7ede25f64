//! The operator's side of every service: one `admin.token` setting and the
//! one bearer check of every `/admin/*` endpoint (dead letters on the
//! processor, parked records on ingest and the notifier).

use axum::http::{HeaderMap, header};
use subtle::ConstantTimeEq as _;

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
