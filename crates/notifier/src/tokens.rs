//! Stream tokens: short-lived, read-only credentials for the SSE endpoints,
//! for browsers, whose `EventSource` cannot send an `Authorization` header
//! and so must put its credential in the URL (where proxies log it). A token
//! names a tenant, optionally one job, and an expiry; it opens that tenant's
//! streams (or only that job's) until it expires, and nothing else.
//!
//! A token is self-contained ([`onceflow_runtime::signed_tokens`]): claims
//! `{"tenant", "job_id", "exp", "epoch"}` signed under the notifier's secret
//! (`sse.token_secret`). `epoch` is the tenant's token epoch when it was
//! issued: revoking moves the epoch on and so ends every older token
//! ([`crate::revocation`]). A stream opened with a token ends when it
//! expires or is revoked.
//!
//! `POST /v1/stream-tokens` (API key in the `Authorization` header) issues
//! them: only the SSE endpoints accept a token, and a token cannot get
//! another. The key is checked before the body is read, so a caller without
//! one cannot hold the request open by sending its body slowly.

use axum::{
    Json,
    extract::{OptionalFromRequest, Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use onceflow_runtime::{
    openapi::ProblemDocument,
    problem::Problem,
    signed_tokens::{Expiring, SignedTokens},
};
use uuid::Uuid;

use crate::AppState;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    pub tenant: String,
    /// Only this job's streams, when set.
    pub job_id: Option<Uuid>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// The tenant's token epoch when issued (tokens from before revocation
    /// existed carry none: epoch 0).
    #[serde(default)]
    pub epoch: i64,
}

impl Expiring for Claims {
    fn expires_at(&self) -> i64 {
        self.exp
    }
}

/// The setting of the secret.
pub const SETTING: &str = "sse.token_secret";

/// Stream tokens are signed tokens with [`Claims`].
pub type StreamTokens = SignedTokens;

/// What tells one token from another (its signature), for counting the
/// streams open with it; `token` has been verified.
pub fn identity(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(_, tag)| tag)
}

/// The body of `POST /v1/stream-tokens`; optional, like each field.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Only this job's streams (a UUID); absent: every stream of the tenant.
    pub job_id: Option<String>,
    /// Lifetime in seconds, at most `sse.token_max_ttl_secs`; absent: `sse.token_ttl_secs`.
    pub ttl_secs: Option<u64>,
}

/// A stream token and what it grants.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// Pass as `?token=` to `GET /v1/events` or `GET /v1/jobs/{job_id}/events`.
    pub token: String,
    pub tenant: String,
    /// The job it is limited to, if any.
    pub job_id: Option<Uuid>,
    /// When it stops working (RFC 3339).
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub expires_in: u64,
}

/// Issue a short-lived, read-only stream token for the caller's tenant
/// (optionally one job), for browsers' `EventSource`.
#[utoipa::path(
    post,
    path = "/v1/stream-tokens",
    tag = "streams",
    security(("api_key" = [])),
    request_body(content = Option<TokenRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The token", body = TokenResponse),
        (status = 400, description = "Malformed body, job id or lifetime", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No or unknown API key in the Authorization header (answered before the body is read)", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unreachable; retry", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn issue(State(state): State<AppState>, request: Request) -> Result<Response, Response> {
    // The key first: the body is read only for a known tenant.
    let tenant =
        state.api_keys.authenticate(request.headers()).ok_or_else(|| Problem::unauthorized().into_response())?;
    let body = <Json<TokenRequest> as OptionalFromRequest<AppState>>::from_request(request, &state)
        .await
        .map_err(IntoResponse::into_response)?;
    let body = body.map(|Json(body)| body).unwrap_or_default();
    let epoch = crate::revocation::current(&state.stream_pool, &tenant.0)
        .await
        .map_err(|error| crate::revocation::unavailable(&error).into_response())?;
    token_for(&state, tenant.0, &body, epoch).map(IntoResponse::into_response).map_err(IntoResponse::into_response)
}

/// The token `request` asks for, of `tenant` at `epoch`.
fn token_for(
    state: &AppState,
    tenant: String,
    request: &TokenRequest,
    epoch: i64,
) -> Result<impl IntoResponse, Problem> {
    let sse = &state.config.sse;
    let ttl = request.ttl_secs.unwrap_or(sse.token_ttl_secs);
    if ttl == 0 || ttl > sse.token_max_ttl_secs {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-ttl",
            "Invalid token lifetime",
            format!("ttl_secs must be between 1 and {}", sse.token_max_ttl_secs),
        ));
    }
    let job_id = request
        .job_id
        .as_deref()
        .map(|raw| {
            Uuid::parse_str(raw).map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-job-id",
                    "Invalid job id",
                    format!("`{raw}` is not a UUID"),
                )
            })
        })
        .transpose()?;
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX));
    let claims = Claims { tenant, job_id, exp: expires_at.timestamp(), epoch };
    let body = TokenResponse {
        token: state.tokens.issue(&claims),
        tenant: claims.tenant,
        job_id,
        expires_at,
        expires_in: ttl,
    };
    // A credential: no cache may keep it.
    Ok(([(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(body)))
}

#[cfg(test)]
mod tests {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    use onceflow_runtime::signed_tokens::TokenError;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn tokens() -> StreamTokens {
        StreamTokens::from_config(SECRET, SETTING).unwrap().0
    }

    fn claims(job_id: Option<Uuid>) -> Claims {
        Claims { tenant: "dev".to_owned(), job_id, exp: 1_000, epoch: 0 }
    }

    #[test]
    fn a_token_carries_its_claims_until_it_expires() {
        let job = Uuid::now_v7();
        let token = tokens().issue(&claims(Some(job)));
        assert_eq!(tokens().verify::<Claims>(&token, 999), Ok(claims(Some(job))));
        assert_eq!(tokens().verify::<Claims>(&token, 1_000), Err(TokenError::Expired));
        let tenant_wide = tokens().issue(&claims(None));
        assert_eq!(tokens().verify::<Claims>(&tenant_wide, 0).unwrap().job_id, None);
    }

    #[test]
    fn an_altered_or_foreign_token_is_refused() {
        let token = tokens().issue(&claims(None));
        let (_, body, tag) = {
            let mut parts = token.split('.');
            (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
        };
        // Another tenant, a later expiry, under the original tag.
        let forged_claims = Claims { tenant: "other".to_owned(), job_id: None, exp: i64::MAX, epoch: 0 };
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        assert_eq!(tokens().verify::<Claims>(&format!("v1.{forged_body}.{tag}"), 0), Err(TokenError::BadSignature));
        // One flipped character of the tag.
        let mut flipped = tag.to_owned().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(tokens().verify::<Claims>(&format!("v1.{body}.{flipped}"), 0), Err(TokenError::BadSignature));
        // Another secret's token.
        let (other, _) = StreamTokens::from_config("another-secret-of-32-bytes-at-least", SETTING).unwrap();
        assert_eq!(other.verify::<Claims>(&token, 0), Err(TokenError::BadSignature));
        for garbage in ["", "v1", "v1.x", "v2.a.b", "v1.!!.??", "dev-onceflow-key"] {
            assert_eq!(tokens().verify::<Claims>(garbage, 0), Err(TokenError::Malformed), "{garbage}");
        }
    }

    #[test]
    fn secrets_are_long_enough_or_random_per_process() {
        assert!(StreamTokens::from_config("short", SETTING).is_err());
        let (first, configured) = StreamTokens::from_config("", SETTING).unwrap();
        assert!(!configured);
        let (second, _) = StreamTokens::from_config("", SETTING).unwrap();
        let token = first.issue(&claims(None));
        assert!(first.verify::<Claims>(&token, 0).is_ok());
        assert_eq!(
            second.verify::<Claims>(&token, 0),
            Err(TokenError::BadSignature),
            "each process has its own secret"
        );
    }
}
