//! The operator's side of every service: one `admin.token` setting and the
//! one bearer check of every `/admin/*` endpoint (dead letters on the
//! processor, parked records on ingest and the notifier).

use axum::{
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse as _, Response},
};
use subtle::ConstantTimeEq as _;

use crate::problem::Problem;

/// The fewest characters an admin token may have: the admin endpoints
/// redrive dead letters, so a token must not be guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// `[admin]` of a service's configuration.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "AdminSettings")]
pub struct AdminConfig {
    /// Bearer token of the `/admin/*` endpoints; empty (the default) serves
    /// none of them. At least [`MIN_TOKEN_CHARS`] characters, refused at
    /// start otherwise. Set it from a secret, e.g. `ONCEFLOW_ADMIN__TOKEN`.
    pub token: String,
}

/// `[admin]` as written, before it is checked.
#[derive(serde::Deserialize)]
struct AdminSettings {
    #[serde(default)]
    token: String,
}

impl TryFrom<AdminSettings> for AdminConfig {
    type Error = String;

    fn try_from(settings: AdminSettings) -> Result<Self, String> {
        let chars = settings.token.chars().count();
        if chars > 0 && chars < MIN_TOKEN_CHARS {
            return Err(format!(
                "admin.token has {chars} characters; it must have at least {MIN_TOKEN_CHARS} (or be empty, which \
                 serves no admin endpoint): e.g. `openssl rand -hex 24`"
            ));
        }
        Ok(Self { token: settings.token })
    }
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
    fn a_short_admin_token_is_refused_and_none_or_a_long_one_accepted() {
        let parse = |json: &str| serde_json::from_str::<AdminConfig>(json).map(|admin| admin.token);
        let error = parse(r#"{"token": "x"}"#).unwrap_err().to_string();
        assert!(error.contains("admin.token has 1 characters") && error.contains("at least 16"), "{error}");
        assert!(parse(r#"{"token": "fifteen-chars-x"}"#).is_err());
        assert_eq!(parse(r#"{"token": "sixteen-chars-xx"}"#).unwrap(), "sixteen-chars-xx");
        assert_eq!(parse("{}").unwrap(), "");
    }

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
