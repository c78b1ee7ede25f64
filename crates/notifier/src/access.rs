//! Who may open a stream, and for how long: the credential (a stream token
//! in `?token=`, else the API key in the `Authorization` header), the job a
//! token is limited to, the tenant's stream limits ([`crate::admission`]),
//! and, for a token, its revocation ([`crate::revocation`]) and expiry, at
//! which its stream ends ([`TokenEnd`]).
//!
//! The checks run cheapest first: the signature and expiry, then the
//! in-memory limits, and only then the database (the tenant's token epoch),
//! so a tenant at its limit costs the database nothing.

use std::pin::Pin;

use axum::http::{HeaderMap, StatusCode};
use onceflow_runtime::{auth::Tenant, problem::Problem};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    AppState,
    admission::{Admitted, Ask},
    tokens::{self, Claims},
};

/// Who opens a stream, and which job only, if a token says so.
pub struct Access {
    pub tenant: String,
    pub job_id: Option<Uuid>,
    token: Option<Grant>,
}

/// What a stream token adds: its identity, expiry and epoch.
struct Grant {
    identity: String,
    expires_at: i64,
    epoch: i64,
}

/// Why a token's stream ends before its client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Expired,
    Revoked,
}

impl Ending {
    /// As the `stream.closed` event says it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Expired => "token_expired",
            Self::Revoked => "token_revoked",
        }
    }
}

/// When a stream opened with a token must end: at its expiry, or when its
/// tenant's token epoch moves past the token's.
pub struct TokenEnd {
    /// Registered once for the stream's life, not once per event sent.
    expiry: Pin<Box<tokio::time::Sleep>>,
    epoch: i64,
    epochs: watch::Receiver<i64>,
}

impl TokenEnd {
    /// Whether the token has already ended.
    pub fn reached_now(&self) -> Option<Ending> {
        if *self.epochs.borrow() > self.epoch {
            Some(Ending::Revoked)
        } else if tokio::time::Instant::now() >= self.expiry.deadline() {
            Some(Ending::Expired)
        } else {
            None
        }
    }

    /// Resolves when the token ends.
    pub async fn reached(&mut self) -> Ending {
        let (epoch, epochs) = (self.epoch, &mut self.epochs);
        // `false` when no revocation can come any more: only the expiry then.
        let revoked = async move { epochs.wait_for(|current| *current > epoch).await.is_ok() };
        tokio::select! {
            () = self.expiry.as_mut() => Ending::Expired,
            true = revoked => Ending::Revoked,
        }
    }
}

/// Resolves when `end` is reached; never for a stream without a token.
pub async fn ended(end: &mut Option<TokenEnd>) -> Ending {
    match end {
        Some(end) => end.reached().await,
        None => std::future::pending().await,
    }
}

/// What an admitted stream holds while it is open.
pub struct Opened {
    pub admitted: Admitted,
    pub end: Option<TokenEnd>,
}

impl Access {
    /// The token in `token`, else the API key in the `Authorization` header;
    /// `key_in_url` says the request put an API key in its URL (refused).
    pub fn authenticate(
        state: &AppState,
        headers: &HeaderMap,
        token: Option<&str>,
        key_in_url: bool,
    ) -> Result<Self, Problem> {
        if key_in_url {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                "the API key is not accepted in a URL (proxies log URLs): send it in the Authorization header, or \
                 get a short-lived stream token with POST /v1/stream-tokens and pass it as ?token=",
            ));
        }
        if let Some(token) = token {
            let claims: Claims = state
                .tokens
                .verify(token, chrono::Utc::now().timestamp())
                .map_err(|error| token_refused(&format!("stream token: {error}; get a new one")))?;
            let grant =
                Grant { identity: tokens::identity(token).to_owned(), expires_at: claims.exp, epoch: claims.epoch };
            return Ok(Self { tenant: claims.tenant, job_id: claims.job_id, token: Some(grant) });
        }
        let Tenant(tenant) = state.api_keys.authenticate(headers).ok_or_else(Problem::unauthorized)?;
        Ok(Self { tenant, job_id: None, token: None })
    }

    /// `wanted` (a job the request names, if any) if this access may see it.
    pub fn scope(&self, wanted: Option<Uuid>) -> Result<Option<Uuid>, Problem> {
        match (self.job_id, wanted) {
            (Some(scope), Some(wanted)) if scope != wanted => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "token-scope",
                "Outside the token's scope",
                format!("this stream token opens only the streams of job {scope}"),
            )),
            _ => Ok(wanted),
        }
    }

    /// Admit a stream (one that catches up first if `replay`) under the
    /// tenant's limits, and for a token, if it is not revoked: `429` beyond
    /// a limit, `401` for a revoked token.
    pub async fn open(&self, state: &AppState, replay: bool) -> Result<Opened, Problem> {
        let ask = Ask { tenant: &self.tenant, token: self.token.as_ref().map(|grant| grant.identity.as_str()), replay };
        let admitted = state.admission.admit(&ask)?;
        let Some(grant) = &self.token else { return Ok(Opened { admitted, end: None }) };
        // Watch first: a revocation committed after the read below still
        // reaches this stream through the watch.
        let epochs = state.epochs.watch(&self.tenant);
        let current = crate::revocation::current(&state.stream_pool, &self.tenant)
            .await
            .map_err(|error| crate::revocation::unavailable(&error))?;
        state.epochs.observe(&self.tenant, current);
        if grant.epoch < current {
            return Err(token_refused("stream token: revoked (POST /v1/stream-tokens/revoke); get a new one"));
        }
        let left_ms = grant.expires_at.saturating_mul(1000).saturating_sub(chrono::Utc::now().timestamp_millis());
        let left = std::time::Duration::from_millis(u64::try_from(left_ms).unwrap_or(0));
        let end = TokenEnd { expiry: Box::pin(tokio::time::sleep(left)), epoch: grant.epoch, epochs };
        Ok(Opened { admitted, end: Some(end) })
    }
}

fn token_refused(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail)
}
